"""The smallest complete task: a ViT + linear head trained on image labels (cross-entropy).

It exists to show and test the task contract (docs/tasks.md): a schema that extends
:class:`RunConfig`, modules, a loader over the generic stream, a loss and an export; the loop
gives it everything else (optimizer, schedules, clipping, checkpoints, preemption, evaluators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import nn

from dinosys.data.labelled_images import LabelledImageBatches
from dinosys.data.stream import SampleLoader
from dinosys.models import backbone_from_config
from dinosys.models.vit import BackboneConfig
from dinosys.train.tasks import register_task
from dinosys.train.tasks.base import Exportable, RunConfig, TrainTask


@dataclass
class ToyConfig(RunConfig):
    """`task: toy`: supervised classification of ``num_classes`` labels."""

    name: str = "toy"
    task: str = "toy"
    model: BackboneConfig = field(default_factory=lambda: BackboneConfig(arch="vit_tiny"))
    num_classes: int = 10  # classes of the toy classifier


@register_task
class ToyTask(TrainTask):
    """Backbone CLS token -> linear classifier; exports the backbone."""

    name = "toy"
    config_class = ToyConfig
    checkpoint_backbone = "backbone"

    def __init__(self, cfg: ToyConfig, env) -> None:  # noqa: ANN001 - DistEnv
        super().__init__(cfg, env)
        self.model = nn.ModuleDict({"backbone": backbone_from_config(cfg.model)})
        self.model["head"] = nn.Linear(self.model["backbone"].embed_dim, cfg.num_classes)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.model.items())

    def build_loader(self) -> SampleLoader:
        transform = LabelledImageBatches(self.cfg.model.img_size)
        return SampleLoader(self.cfg.data, self.cfg.seed, self.env.rank, self.env.world_size,
                            transform)

    def forward_loss(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        cls = self.model["backbone"](batch["images"])["x_norm_clstoken"]
        logits = self.model["head"](cls)
        loss = F.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def exports(self) -> dict[str, Exportable]:
        return {"backbone": Exportable(self.model["backbone"],
                                       lambda: backbone_from_config(self.cfg.model))}
