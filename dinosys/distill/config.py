"""Configuration of a distillation job (``task: distill``): the teacher, the students and the
objective, on top of what every training run has (:class:`RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from dinosys.config import ConfigError, Section, check_bounds, check_choice
from dinosys.data.augment import CropConfig
from dinosys.data.masking import MaskConfig
from dinosys.models.heads import HeadConfig
from dinosys.models.vit import BackboneConfig
from dinosys.train.tasks.base import RunConfig
from dinosys.train.tasks.ssl import SSLLossConfig, SSLOptimConfig

MODES = ("auto", "heads", "features")


@dataclass
class TeacherConfig(Section):
    """The frozen teacher (see dinosys.distill.teacher for the accepted paths)."""

    path: str = MISSING  # run dir, checkpoint, export, timm or HF directory, or a weights file
    arch: str | None = None  # architecture of a bare weights file (vits14 ... vitg14[_reg])
    num_heads: int | None = None  # attention heads of a bare weights file when not the arch's
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; bf16, fp32

    def validate(self) -> None:
        check_choice(self.dtype, ("auto", "bf16", "fp32"), "teacher.dtype")


@dataclass
class StudentConfig(Section):
    """One student: architecture, heads, its ranks and its own lr and layer-wise decay.

    ``None`` knobs take the job-wide ``optim.*`` value (clipping, schedules and the EMA
    momentum are job-wide). Heads get the teacher's prototype
    counts (the targets' width) whatever ``heads.n_prototypes`` says.
    """

    name: str = MISSING
    model: BackboneConfig = field(default_factory=BackboneConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    ranks: list[int] | None = None  # [first, last] ranks (inclusive); None: every rank, in turn
    base_lr: float | None = None  # this student's peak lr before batch scaling
    layerwise_decay: float | None = None  # over this student's own depth

    def validate(self) -> None:
        if self.name is not MISSING and (not self.name or not self.name.replace("_", "").isalnum()):
            raise ConfigError(f"config key 'students.name': {self.name!r} must be a non-empty "
                              "name of letters, digits and underscores")


@dataclass
class DistillLossConfig(SSLLossConfig):
    """Head mode: DINOv2's DINO + iBOT + KoLeo on the teacher's normalised head outputs.
    Feature mode: normalised cls/patch tokens, cosine + smooth-L1 (+ KoLeo if weighted)."""

    mode: str = "auto"  # auto: heads when the teacher has them, else features
    mask_student: bool = False  # DINOv2: no masking of student inputs; DINOv3 kept it
    # heads mode: the DINO term also pairs each student global crop with the teacher's view of
    # the same crop (function matching), averaged with the cross-view pairs
    dino_same_view: bool = False
    # heads mode: add the feature objective (cls/patch tokens of the global crops, the
    # feature-mode terms and weights below) with this weight; 0: off
    feature_weight: float = 0.0
    cls_weight: float = 1.0  # feature mode: weight of the class-token term
    patch_weight: float = 1.0  # feature mode: weight of the patch-token term
    cosine_weight: float = 1.0  # feature mode: weight of the cosine distance
    smooth_l1_weight: float = 1.0  # feature mode: weight of the smooth-L1 distance
    smooth_l1_beta: float = 1.0  # feature mode: smooth-L1 beta (quadratic below it)

    def validate(self) -> None:
        super().validate()
        check_choice(self.mode, MODES, "loss.mode")
        check_bounds(self, "loss", {"feature_weight": (0, None), "cls_weight": (0, None),
                                    "patch_weight": (0, None), "cosine_weight": (0, None),
                                    "smooth_l1_weight": (0, None), "smooth_l1_beta": (0, None)})


@dataclass
class DistillConfig(RunConfig):
    """`dinosys distill`: a frozen teacher into one or more students (one teacher forward)."""

    name: str = "distill"
    task: str = "distill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # the students: [{name, model, heads, ranks, ...}, ...]
    students: list[StudentConfig] = field(default_factory=list)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    optim: SSLOptimConfig = field(default_factory=SSLOptimConfig)  # + the students' EMA momentum
    # formats of each student's export
    export_formats: list[str] = field(default_factory=lambda: ["native"])

    def validate(self) -> None:
        super().validate()
        if not self.students:
            raise ConfigError("config key 'students': list at least one student "
                              "(name, model.arch, ...)")
