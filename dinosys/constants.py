"""Constants shared across dinosys: image normalisation of the released models."""

from __future__ import annotations

#: ImageNet mean / std (RGB, 0-1 scale): DINOv2 training, evaluation and exported models
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: OpenAI CLIP's normalisation (RGB, 0-1 scale), used by CLIP image towers and open_clip exports
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
