"""data.gpu_augment: the batched torch photometric ops against the CPU (numpy) path.

The torch ops repeat the CPU path's float32 arithmetic: brightness, contrast blending, hue,
blur, solarize and normalisation are bit-identical for identical input; grey levels (OpenBLAS
gemv on the CPU, whose kernel changes with the image size) differ by an ulp, and the contrast op's
image mean differs more: numpy's float32 mean of non-integer levels is off by up to ~1e-2 levels
on a 224x224 crop (torch's by ~2e-5), which moves the blend by up to 0.4 of that. So whole
pipelines agree to 1e-2 of a uint8 level (typically ~1e-4), except that a value within that of
the solarize threshold (128) may be inverted on one side only: the end-to-end checks tolerate
such mirror-image pixels, and only a handful of them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import tiny_config

from dinosys.config import load_config
from dinosys.data import color
from dinosys.data import gpu_augment as G
from dinosys.data.augment import CropConfig, MultiCropAugmentation, color_jitter
from dinosys.data.gpu_augment import PARAMS_KEY, PhotometricAugment, PhotometricParams
from dinosys.data.multicrop import build_ssl_loader
from dinosys.train.tasks.ssl import SSLConfig

LIMIT = 10**9
PATCH = 8
SMALL = dict(global_size=64, local_size=32, n_local=2)  # real photos, small crops: fast on CPU
ALL_ON = dict(color_jitter_p=1.0, grayscale_p=0.3, blur_p_global2=1.0, blur_p_local=1.0,
              solarize_p_global2=1.0)


def _patches(photos: list[np.ndarray], n: int, size: tuple[int, int]) -> np.ndarray:
    """n real (3, H, W) float32 patches on the [0, 255] scale, from different photos/places."""
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = (37 * i) % (p.shape[0] - size[0]), (53 * i) % (p.shape[1] - size[1])
        out.append(p[y:y + size[0], x:x + size[1]].transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _photo_bytes(builtin_data: Path) -> list[bytes]:
    paths = sorted(p for p in (builtin_data / "photos").iterdir()
                   if p.suffix.lower() in (".png", ".jpg"))
    return [p.read_bytes() for p in paths]


def _both_paths(cfg: CropConfig, datas: list[bytes], seed: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Crop-major batches of the CPU path and of geometric crops + parameters (before the
    photometric step), for the same per-image RNG seeds."""
    aug = MultiCropAugmentation(cfg)
    b = len(datas)
    cpu: dict[str, list] = {"global_crops": [], "local_crops": []}
    geo: dict[str, list] = {"global_crops": [], "local_crops": []}
    params = PhotometricParams(b, cfg)
    for i, data in enumerate(datas):
        out = aug.from_bytes(data, np.random.default_rng([seed, i]), LIMIT)
        crops, crop_params = aug.geometric_from_bytes(data, np.random.default_rng([seed, i]),
                                                      LIMIT)
        params.set_sample(i, crop_params)
        for key in cpu:
            cpu[key].append(out[key])
            geo[key].append([np.ascontiguousarray(c) for c in crops[key]])

    def crop_major(per_image: list[list[np.ndarray]]) -> torch.Tensor:
        return torch.from_numpy(np.stack([per_image[i][c] for c in range(len(per_image[0]))
                                          for i in range(b)]))

    return ({k: crop_major(v) for k, v in cpu.items()}, {k: crop_major(v) for k, v in geo.items()},
            params.as_dict())


def _levels(x: torch.Tensor, cfg: CropConfig) -> torch.Tensor:
    """Normalised crops back to the [0, 255] scale."""
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    return x.cpu().double() * std + mean


def _assert_close_levels(ours: torch.Tensor, ref: torch.Tensor, solarized: torch.Tensor,
                         cfg: CropConfig, atol: float = 1e-2) -> None:
    a, b = _levels(ours, cfg), _levels(ref, cfg)
    bad = (a - b).abs() > atol
    # a solarize decision on the other side of 128: the two values mirror each other
    mirrored = ((a + b - 255).abs() < 0.05) & solarized.view(-1, 1, 1, 1)
    assert not (bad & ~mirrored).any(), f"max diff {(a - b).abs().max():.2e} levels"
    assert int((bad & mirrored).sum()) <= max(3, a.numel() // 100_000)


# --------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("size", [(64, 80), (17, 13)])
def test_each_op_matches_the_cpu_op(photos: list[np.ndarray], size: tuple[int, int]) -> None:
    x = _patches(photos, 6, size)
    x[1] = np.clip(x[1] * 1.37, 0, 255)  # saturated highlights
    x[2] = x[2].mean(0, keepdims=True)  # a grey image: no hue
    xt = torch.from_numpy(x)
    rng = np.random.default_rng(0)
    cases = [(color.adjust_brightness, G.adjust_brightness, rng.uniform(0.6, 1.4, 6), 0.0),
             (color.adjust_contrast, G.adjust_contrast, rng.uniform(0.6, 1.4, 6), 5e-3),
             (color.adjust_saturation, G.adjust_saturation, rng.uniform(0.8, 1.2, 6), 1e-4),
             (color.adjust_hue, G.adjust_hue, rng.uniform(-0.5, 0.5, 6), 0.0),
             (color.gaussian_blur, G.gaussian_blur, rng.uniform(0.1, 2.0, 6), 0.0)]
    for np_op, torch_op, factors, atol in cases:
        got = torch_op(xt, torch.from_numpy(factors)).numpy()
        for i, f in enumerate(factors):
            np.testing.assert_allclose(got[i], np_op(x[i], float(f)), rtol=0, atol=atol,
                                       err_msg=f"{torch_op.__name__} sample {i}")
    gray = G.to_gray(xt).numpy()
    for i in range(6):
        np.testing.assert_allclose(gray[i, 0], color.to_gray(x[i]), rtol=0, atol=1e-4)
        assert np.array_equal(G.solarize(xt)[i].numpy(), color.solarize(x[i]))
    with pytest.raises(ValueError, match="too small"):
        G.gaussian_blur(xt[:, :, :4], torch.ones(6))


def test_per_sample_jitter_order(photos: list[np.ndarray]) -> None:
    """24 samples, one per op order, strong factors: each equals the CPU jitter in its order."""
    cfg = CropConfig()
    orders = list(itertools.permutations(range(4)))
    n = len(orders)
    x = np.repeat(_patches(photos, 1, (24, 24)), n, axis=0)
    factors = (1.35, 0.65, 1.2, 0.09)
    params = {"jitter": torch.ones(n, dtype=torch.bool), "order": torch.tensor(orders),
              "factors": torch.tensor([factors] * n, dtype=torch.float64),
              "gray": torch.zeros(n, dtype=torch.bool), "blur": torch.zeros(n, dtype=torch.bool),
              "blur_sigma": torch.ones(n, dtype=torch.float64),
              "solarize": torch.zeros(n, dtype=torch.bool)}
    out = _levels(PhotometricAugment.from_config(cfg).crops(torch.from_numpy(x), params), cfg)
    for i, order in enumerate(orders):
        ref = color_jitter(x[i], order, factors)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=0, atol=1e-2, err_msg=str(order))
    distinct = {tuple(np.round(out[i].numpy().ravel()[:500], 2)) for i in range(n)}
    assert len(distinct) > 12  # the order really matters for these factors


# --------------------------------------------------------------------------- whole pipeline


def test_geometric_crops_are_the_cpu_crops(builtin_data: Path) -> None:
    """No photometric op: normalising the uint8 geometric crops gives the CPU crops exactly."""
    cfg = CropConfig(**SMALL, flip_p=0.5, color_jitter_p=0.0, grayscale_p=0.0,
                     blur_p_global1=0.0, blur_p_global2=0.0, blur_p_local=0.0,
                     solarize_p_global2=0.0)
    cpu, geo, params = _both_paths(cfg, _photo_bytes(builtin_data)[:4], seed=3)
    assert geo["global_crops"].dtype == torch.uint8
    batch = PhotometricAugment.from_config(cfg).apply({**geo, PARAMS_KEY: params})
    assert PARAMS_KEY not in batch
    for key in ("global_crops", "local_crops"):
        assert torch.equal(batch[key], cpu[key]), key


@pytest.mark.parametrize("probs", [{}, ALL_ON], ids=["dinov2_rates", "every_op"])
def test_end_to_end_matches_the_cpu_path(builtin_data: Path, probs: dict) -> None:
    cfg = CropConfig(**SMALL, **probs)
    datas = _photo_bytes(builtin_data)
    cpu, geo, params = _both_paths(cfg, datas, seed=11)
    g = params["global_crops"]
    assert g["jitter"].any() and g["blur"].any() and g["gray"].any() and g["solarize"].any()
    aug = PhotometricAugment.from_config(cfg)
    for key in ("global_crops", "local_crops"):
        out = aug.crops(geo[key], params[key])
        assert out.dtype == torch.float32 and out.shape == cpu[key].shape
        _assert_close_levels(out, cpu[key], params[key]["solarize"], cfg)


def test_deterministic_with_a_seed(builtin_data: Path) -> None:
    cfg = CropConfig(**SMALL, **ALL_ON)
    datas = _photo_bytes(builtin_data)[:3]
    aug = PhotometricAugment.from_config(cfg)
    runs = []
    for seed in (5, 5, 6):
        _, geo, params = _both_paths(cfg, datas, seed)
        runs.append(aug.apply({**geo, PARAMS_KEY: params}))
    for key in ("global_crops", "local_crops"):
        assert torch.equal(runs[0][key], runs[1][key])
        assert not torch.equal(runs[0][key], runs[2][key])


def test_hook_passes_other_batches_and_checks_counts() -> None:
    plain = {"global_crops": torch.zeros(2, 3, 8, 8)}
    assert G.apply_photometric(plain, "cpu") is plain
    params = PhotometricParams(2, CropConfig(n_local=0)).as_dict()
    with pytest.raises(ValueError, match="3 crops but photometric parameters for 4"):
        PhotometricAugment.from_config(CropConfig()).crops(
            torch.zeros(3, 3, 8, 8, dtype=torch.uint8), params["global_crops"])


# --------------------------------------------------------------------------- loader + trainer


def _take(cfg, n: int) -> tuple[list[dict], dict]:
    loader = build_ssl_loader(cfg, 0, 1, PATCH)
    batches = list(itertools.islice(iter(loader), n))
    return batches, loader.state_dict()


def test_loader_with_gpu_augment_matches_the_cpu_loader(id_shards: Path) -> None:
    shards = [(str(id_shards / "{000000..000002}.tar"), 1.0)]
    ref_cfg = tiny_config(shards)
    ref_cfg.crops = CropConfig(global_size=32, local_size=16, n_local=2, **ALL_ON)
    gpu_cfg = tiny_config(shards)
    gpu_cfg.crops = ref_cfg.crops
    gpu_cfg.data.gpu_augment = True
    ref, ref_state = _take(ref_cfg, 3)
    raw, gpu_state = _take(gpu_cfg, 3)
    assert gpu_state == ref_state
    gpu_cfg.data.num_workers = 2  # the parameters cross the worker -> main process queue
    raw_workers, _ = _take(gpu_cfg, 3)
    for r, g, w in zip(ref, raw, raw_workers):
        assert g["global_crops"].dtype == torch.uint8 and g["local_crops"].dtype == torch.uint8
        assert torch.equal(g["global_crops"], w["global_crops"])
        assert all(torch.equal(a, b) for a, b in zip(g[PARAMS_KEY]["local_crops"].values(),
                                                     w[PARAMS_KEY]["local_crops"].values()))
        done = G.apply_photometric(g, "cpu")
        assert set(done) == set(r)
        for key in ("masks", "mask_indices", "mask_weights", "labels"):
            assert torch.equal(done[key], r[key]), key
        for key in ("global_crops", "local_crops"):
            _assert_close_levels(done[key], r[key], g[PARAMS_KEY][key]["solarize"],
                                 ref_cfg.crops)


def test_training_with_gpu_augment_gives_the_same_losses(builtin_data: Path,
                                                         tmp_path: Path) -> None:
    """The trainer hook: two real steps with and without data.gpu_augment (every op enabled)
    give the same losses (crops agree to ~1e-4 levels)."""
    from dinosys.train.run import run_train

    tiny = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.n_prototypes=64",
            "heads.hidden_dim=64", "heads.bottleneck_dim=16", "data.batch_size_per_gpu=8",
            "data.num_workers=0", "optim.iters_per_epoch=2", "optim.warmup_epochs=1",
            "log.every_n_steps=1", "log.progress=false", "eval.knn_every_n_steps=0",
            "max_steps=2", "checkpoint.every_n_steps=0",
            f"data.sources=[{{path: {builtin_data / 'mnist' / 'train'}}}]"]
    ops = ["crops.color_jitter_p=1.0", "crops.grayscale_p=0.2", "crops.blur_p_global1=1.0",
           "crops.blur_p_local=0.5", "crops.solarize_p_global2=0.5", "crops.flip_p=0.5"]
    losses = []
    for on in ("false", "true"):
        cfg = load_config(SSLConfig, "mnist_tiny_cpu", [*tiny, *ops, f"data.gpu_augment={on}"],
                          kind="train")
        run = tmp_path / on
        assert run_train(cfg, run)["status"] == "finished"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_matches_cpu(builtin_data: Path) -> None:
    cfg = CropConfig(global_size=224, local_size=98, n_local=8, **ALL_ON)
    cpu, geo, params = _both_paths(cfg, _photo_bytes(builtin_data)[:6], seed=2)
    batch = {**geo, PARAMS_KEY: params, "batch_size": 6}
    on_gpu = G.apply_photometric(batch, "cuda")
    assert on_gpu["global_crops"].is_cuda and on_gpu["batch_size"] == 6
    again = G.apply_photometric(batch, "cuda")
    on_cpu = PhotometricAugment.from_config(cfg).apply(batch)
    for key in ("global_crops", "local_crops"):
        assert torch.equal(on_gpu[key], again[key])  # deterministic on the device
        solarized = params[key]["solarize"]
        _assert_close_levels(on_gpu[key], on_cpu[key], solarized, cfg)
        _assert_close_levels(on_gpu[key], cpu[key], solarized, cfg)
