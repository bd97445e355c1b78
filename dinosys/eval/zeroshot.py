"""``dinosys eval zeroshot``: zero-shot classification with an image-text model's text tower.

Class names are the folder names of ``--val DIR/<class>/<image>`` (underscores as spaces); each
class's text embedding is the normalised mean over the templates (``--templates FILE``, one per
line with ``{}``; default: open_clip's 7 simple ImageNet templates) of the normalised text
embeddings; an image is classified by its nearest class embedding. Reports top-1, top-5 and the
mean per-class recall (clip_benchmark's numbers) and the recall of every class.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dinosys.errors import UserError
from dinosys.eval.features import extract_features
from dinosys.eval.images import ImageSet, load_image_folder
from dinosys.eval.models import EvalModel, frozen
from dinosys.eval.registry import register_evaluator
from dinosys.eval.text_prompts import (
    class_name,
    class_text_embeddings,
    load_templates,
    zeroshot_metrics,
)

log = logging.getLogger(__name__)


@dataclass
class ZeroShotConfig:
    """``dinosys eval zeroshot``: nearest class-prompt embedding."""

    val: str = field(metadata={"help": "image folder DIR/<class>/<image> (class names = folder "
                                       "names)", "path": True})
    templates: str | None = field(default=None, metadata={
        "help": "prompt templates, one per line with {} for the class name (default: 7 simple "
                "ImageNet templates)", "path": True, "file_example": "a photo of a {}.\n"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})

    def validate(self) -> None:
        """A positive batch size and a readable, non-empty templates file."""
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        load_templates(self.templates)


def text_tower_of(model: EvalModel, evaluator: str):  # type: ignore[no-untyped-def]
    """The model's ``encode_text`` and its tokenizer; UserError for a model without a text
    tower (e.g. a DINOv2 backbone)."""
    module = model.module
    if not (hasattr(module, "encode_text") and hasattr(module, "encode_image")):
        raise UserError(f"eval {evaluator} needs an image-text model (encode_image and "
                        f"encode_text); {model.name} is a {type(module).__name__} without a "
                        "text tower")
    from dinosys.data.tokenizer import get_tokenizer

    return module.encode_text, get_tokenizer(module.text.context_length)


def zeroshot_on_set(model: EvalModel, images: ImageSet, templates: list[str],
                    batch_size: int = 256, progress: bool = True) -> dict:
    """Zero-shot metrics of ``model`` on a loaded image set."""
    encode_text, tokenizer = text_tower_of(model, "zeroshot")
    names = [class_name(c) for c in images.classes]
    with frozen(model.module):
        class_emb = class_text_embeddings(encode_text, tokenizer, names, templates,
                                          model.device).cpu()
        feats = extract_features(model.module, images, ["image"], batch_size, model.device,
                                 "zeroshot image features" if progress else None)["image"]
    result = zeroshot_metrics(feats, images.labels, class_emb, images.classes)
    result.update(n_val=len(images), n_classes=len(names), n_templates=len(templates))
    return result


@register_evaluator("zeroshot", ZeroShotConfig, needs=("image", "text tower"),
                    help="zero-shot classification with class-name prompts (image-text models)")
def run(model: EvalModel, cfg: ZeroShotConfig) -> dict:
    """Zero-shot top-1/top-5/per-class recall of ``model`` on ``cfg.val``."""
    t0 = time.perf_counter()
    text_tower_of(model, "zeroshot")  # fail before reading any image
    templates = load_templates(cfg.templates)
    images = load_image_folder(cfg.val, model.image_size, model.mean, model.std)
    if len(images.classes) < 2:
        raise UserError(f"--val {cfg.val}: zero-shot needs at least 2 class folders")
    result = zeroshot_on_set(model, images, templates, cfg.batch_size)
    result.update(model=model.name, val=str(cfg.val), templates=templates,
                  image_size=model.image_size, seconds=round(time.perf_counter() - t0, 2))
    log.info("zero-shot top-1 %.4f on %d images", result["metrics"]["top1"], len(images))
    return result
