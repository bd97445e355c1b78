"""``dinosys eval retrieval``: image->text and text->image recall@k on image-text shards.

``--data`` is WebDataset shards (a folder of ``.tar`` or one tar) whose samples hold an image
and a ``.txt`` caption (the curation output, ``dinosys data builtin``'s shards). A sample
without a caption or with an empty one (``no_text``), a caption that is not UTF-8
(``bad_text``) or an unreadable image is skipped and counted (``skipped`` by reason). Equal
captions are one text (see :mod:`dinosys.eval.text_prompts`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from dinosys.data.decode import BadImageError, decode_image
from dinosys.data.sources import DataSourceConfig, build_source
from dinosys.errors import UserError
from dinosys.eval.images import MAX_PIXELS, preprocess
from dinosys.eval.models import EvalModel, frozen
from dinosys.eval.registry import register_evaluator
from dinosys.eval.text_prompts import retrieval_metrics, unique_texts
from dinosys.eval.zeroshot import text_tower_of

log = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    """``dinosys eval retrieval``: recall@k both ways on captioned shards."""

    data: str = field(metadata={"help": "image-text shards: a folder of .tar or one tar "
                                        "(<key>.jpg|png + <key>.txt)", "path": True})
    k: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "recall@k"})
    batch_size: int = field(default=256, metadata={"help": "images / texts per forward pass"})
    max_samples: int = field(default=0, metadata={"help": "use the first N samples (0: all)"})

    def validate(self) -> None:
        """Positive k and batch size."""
        if not self.k or any(int(k) < 1 for k in self.k):
            raise UserError(f"--k needs positive values, got {list(self.k)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_samples < 0:
            raise UserError(f"--max-samples must be >= 0, got {self.max_samples}")


def read_pairs(cfg: RetrievalConfig, model: EvalModel) -> tuple[torch.Tensor, list[str], Counter]:
    """Preprocessed images and their captions; skipped samples counted by reason."""
    source = build_source(DataSourceConfig(path=cfg.data))
    n = len(source) if not cfg.max_samples else min(cfg.max_samples, len(source))
    images, captions, skipped = [], [], Counter()
    for i in range(n):
        try:
            sample = source.read(i)
        except BadImageError as exc:
            skipped[exc.reason] += 1
            continue
        if sample.text_error:
            skipped["bad_text"] += 1
            continue
        text = (sample.text or "").strip()
        if not text:
            skipped["no_text"] += 1
            continue
        try:
            img = decode_image(sample.image, MAX_PIXELS, draft_size=(model.image_size,) * 2)
        except BadImageError as exc:
            skipped[exc.reason] += 1
            continue
        images.append(preprocess(img, model.image_size, model.mean, model.std))
        captions.append(text)
    if len(captions) < 2:
        raise UserError(f"--data {cfg.data}: {len(captions)} usable image-text pairs "
                        f"(skipped: {dict(skipped) or 'none'}); retrieval needs at least 2")
    return torch.stack(images), captions, skipped


@register_evaluator("retrieval", RetrievalConfig, needs=("image", "text tower"),
                    help="image<->text recall@k on captioned shards (image-text models)")
def run(model: EvalModel, cfg: RetrievalConfig) -> dict:
    """Recall@k of ``model`` on the pairs of ``cfg.data``."""
    t0 = time.perf_counter()
    encode_text, tokenizer = text_tower_of(model, "retrieval")
    images, captions, skipped = read_pairs(cfg, model)
    texts, text_of_image = unique_texts(captions)
    module, bs, dev = model.module, cfg.batch_size, model.device
    with frozen(module), torch.no_grad():
        img = torch.cat([module.encode_image(images[i:i + bs].to(dev)).float().cpu()
                         for i in range(0, len(images), bs)])
        txt = torch.cat([encode_text(tokenizer(texts[i:i + bs]).to(dev)).float().cpu()
                         for i in range(0, len(texts), bs)])
    metrics = retrieval_metrics(img, txt, text_of_image, [int(k) for k in cfg.k])
    log.info("retrieval on %d images / %d texts: %s", len(img), len(texts), metrics)
    return {"metrics": metrics, "n_images": len(img), "n_texts": len(texts),
            "skipped": dict(skipped), "model": model.name, "data": str(cfg.data),
            "image_size": model.image_size, "seconds": round(time.perf_counter() - t0, 2)}
