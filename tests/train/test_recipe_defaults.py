"""The DINOv2 recipe's defaults (REFERENCE.md "Objectives"), pinned: a changed default changes
every run that does not set the key, and no other test would notice."""

from __future__ import annotations

import pytest

from dinosys.config import load_config
from dinosys.train.tasks.ssl import SSLConfig


@pytest.fixture(scope="module")
def defaults() -> SSLConfig:
    return load_config(SSLConfig, None, [], kind="train")


def test_loss_defaults(defaults: SSLConfig) -> None:
    loss = defaults.loss
    assert loss.center_momentum == 0.9
    assert loss.centering == "centering" and loss.sinkhorn_iterations == 3
    assert loss.student_temp == 0.1
    assert loss.teacher_temp == 0.07 and loss.warmup_teacher_temp == 0.04
    assert loss.warmup_teacher_temp_epochs == 30
    assert (loss.dino_weight, loss.ibot_weight, loss.koleo_weight) == (1.0, 1.0, 0.1)


def test_crop_defaults(defaults: SSLConfig) -> None:
    crops = defaults.crops
    assert (crops.global_size, crops.local_size, crops.n_global, crops.n_local) == (224, 98, 2, 8)
    assert list(crops.global_scale) == [0.32, 1.0] and list(crops.local_scale) == [0.05, 0.32]
    assert (crops.blur_p_global1, crops.blur_p_global2, crops.blur_p_local) == (1.0, 0.1, 0.5)
    assert list(crops.blur_sigma) == [0.1, 2.0]
    assert crops.solarize_p_global2 == 0.2 and crops.flip_p == 0.5
    assert crops.color_jitter_p == 0.8 and crops.grayscale_p == 0.2
    assert (crops.brightness, crops.contrast, crops.saturation, crops.hue) == (0.4, 0.4, 0.2, 0.1)


def test_masking_and_head_defaults(defaults: SSLConfig) -> None:
    m = defaults.masking
    assert (m.mask_probability, m.ratio_min, m.ratio_max) == (0.5, 0.1, 0.5)
    assert m.min_patches_per_block == 4 and m.aspect_min == 0.3
    h = defaults.heads
    assert (h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers) == (65536, 2048, 256, 3)
    assert h.ibot_separate_head is False


def test_optim_defaults(defaults: SSLConfig) -> None:
    o = defaults.optim
    assert o.base_lr == 4e-3 and o.lr_scaling == "sqrt" and o.reference_batch == 1024
    assert o.min_lr == 1e-6 and o.iters_per_epoch == 1250 and o.warmup_epochs == 10
    assert (o.weight_decay, o.weight_decay_end) == (0.04, 0.4)
    assert (o.momentum_teacher, o.final_momentum_teacher) == (0.992, 1.0)
    assert o.layerwise_decay == 0.9 and o.patch_embed_lr_mult == 0.2
    assert o.freeze_last_layer_epochs == 1 and o.clip_grad == 3.0
    assert list(o.betas) == [0.9, 0.999]
