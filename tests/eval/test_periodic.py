"""Registry evaluators as the training loop's periodic evaluations."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dinosys.constants import IMAGENET_MEAN, IMAGENET_STD
from dinosys.eval.knn import KnnConfig
from dinosys.eval.linear import LinearConfig
from dinosys.eval.periodic import RegistryEvaluator
from dinosys.eval.registry import run_evaluator
from dinosys.models import create_backbone


def test_periodic_knn_and_linear_on_a_live_module(small_digits) -> None:
    train, val = small_digits
    torch.manual_seed(0)
    module = create_backbone("vit_tiny", img_size=28, patch_size=14, embed_dim=32, depth=2,
                             num_heads=2, layerscale_init=None).train()
    task = SimpleNamespace(periodic_eval_modules=lambda: {"": (module, None)},
                           device=torch.device("cpu"))
    knn = RegistryEvaluator("knn", KnnConfig(train=str(train), val=str(val), k=[5]), 100,
                            IMAGENET_MEAN, IMAGENET_STD)
    logged = knn(task, step=100)
    assert module.training  # the training mode is restored
    assert set(logged) == {"knn/top1_k5", "knn/top5_k5"} and knn.last is not None
    direct = run_evaluator("knn", module.eval(), train=str(train), val=str(val), k=[5])
    assert logged["knn/top1_k5"] == direct["metrics"]["top1_k5"]
    linear = RegistryEvaluator("linear", LinearConfig(train=str(train), val=str(val),
                                                      lrs=[0.1], n_blocks=[1], epochs=1),
                               500, IMAGENET_MEAN, IMAGENET_STD, name="probe")
    assert set(linear(task, step=500)) == {"probe/top1", "probe/holdout_top1", "probe/top5"}
    assert linear.every_n_steps == 500 and len(linear.last["grid"]) == 2
