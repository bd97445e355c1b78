"""Zero-shot prompts and retrieval metrics shared by the zero-shot and retrieval evaluators.

- Templates: a file with one prompt per line, ``{}`` where the class name goes (blank lines
  and ``#`` comments ignored). Default: open_clip's 7 simple ImageNet templates.
- Class text embedding (open_clip): the normalised mean over templates of the normalised text
  embeddings of ``template.format(class name)``.
- Zero-shot metrics: top-1, top-5 and the mean per-class recall (clip_benchmark's numbers).
- Retrieval metrics: image->text and text->image recall@k. Equal caption strings are one text
  (label-derived captions repeat): an image's positives are the texts equal to its captions,
  a text's positives are the images captioned with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dinosys.errors import UserError

SIMPLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def load_templates(path: str | Path | None) -> list[str]:
    """Prompt templates from ``path`` (default: the 7 simple ones); UserError for a file that
    is unreadable, not UTF-8, empty, or has a line without ``{}``."""
    if path is None:
        return list(SIMPLE_TEMPLATES)
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"--templates {path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"--templates {path}: not UTF-8 text (byte {exc.start})") from exc
    templates = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
    if not templates:
        raise UserError(f"--templates {path}: no templates (one per line, '{{}}' for the class)")
    for i, t in enumerate(templates):
        if t.count("{}") != 1 or any(c in t.replace("{}", "") for c in "{}"):
            raise UserError(f"--templates {path}: template {i + 1} {t!r} needs exactly one '{{}}'"
                            " where the class name goes")
    return templates


def class_name(folder_name: str) -> str:
    """The class name a prompt uses for a class folder (underscores become spaces)."""
    return folder_name.replace("_", " ")


@torch.no_grad()
def class_text_embeddings(encode_text, tokenizer, classes: Sequence[str],  # type: ignore[no-untyped-def]
                          templates: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """(C, E) normalised mean over templates of the normalised text embeddings per class."""
    rows = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows)


def zeroshot_metrics(image_features: Tensor, labels: Tensor, class_embeddings: Tensor,
                     classes: Sequence[str]) -> dict:
    """top1, top5 and mean per-class recall of nearest-class-text predictions (+ per class)."""
    logits = F.normalize(image_features.float(), dim=-1) @ class_embeddings.T
    k = min(5, class_embeddings.shape[0])
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    recall = {}
    for c, name in enumerate(classes):
        mask = labels == c
        if mask.any():
            recall[name] = float(hit1[mask].float().mean())
    return {"metrics": {"top1": float(hit1.float().mean()), "top5": float(hit5.float().mean()),
                        "mean_per_class_recall": sum(recall.values()) / max(len(recall), 1)},
            "per_class_recall": recall}


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_of_image: Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways; ``text_of_image[i]`` is the index of image i's (unique) text."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    sim = img @ txt.T  # (N images, M unique texts)
    out: dict[str, float] = {}
    for k in ks:
        ki = min(k, sim.shape[1])
        top_t = sim.topk(ki, dim=1).indices
        out[f"image_to_text_R@{k}"] = float((top_t == text_of_image[:, None]).any(1).float()
                                            .mean())
        kt = min(k, sim.shape[0])
        top_i = sim.T.topk(kt, dim=1).indices  # (M, kt) image indices
        hit = text_of_image[top_i] == torch.arange(sim.shape[1])[:, None]
        out[f"text_to_image_R@{k}"] = float(hit.any(1).float().mean())
    return out


def unique_texts(captions: Sequence[str]) -> tuple[list[str], Tensor]:
    """The distinct captions (first-seen order) and each sample's index into them."""
    index: dict[str, int] = {}
    of_sample = [index.setdefault(c, len(index)) for c in captions]
    return list(index), torch.tensor(of_sample, dtype=torch.long)
