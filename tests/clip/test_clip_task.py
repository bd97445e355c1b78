"""The clip task through the real loop: LiT (frozen backbone never saved, preempt + exact
resume), CLIP from scratch and SigLIP, exports that load, zero-shot on them, config errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from dinosys.config import load_config
from dinosys.errors import ConfigError
from dinosys.eval.models import EvalModel
from dinosys.eval.registry import run_evaluator
from dinosys.export import load
from dinosys.models.clip import LOCKED_PREFIX, CLIPModel
from dinosys.train.run import run_train
from dinosys.train.tasks import load_task_config, register_task
from dinosys.train.tasks.clip import ClipRunConfig, ClipTask
from tests.clip.conftest import TRAINED_TOWER, clip_yaml

TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "clip" / "mnist_templates.txt"


@register_task
class PreemptedOnceClip(ClipTask):
    """The clip task, whose process gets SIGUSR2 (Slurm's preemption notice) after step 3."""

    name = "clip_preempted_once"
    command = None

    def after_optimizer_step(self, step: int, applied: torch.Tensor) -> None:
        super().after_optimizer_step(step, applied)
        if step == 2 and os.environ.get("CLIP_PREEMPT") == "1":
            os.kill(os.getpid(), signal.SIGUSR2)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_lit_locked_backbone_is_not_saved_and_resume_is_exact(tmp_path, builtin_data,
                                                              tiny_export, monkeypatch):
    config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist",
                       f"{{locked: {tiny_export}, trainable_blocks: 1}}")
    straight = run_train(load_task_config(config), tmp_path / "straight")
    assert straight["status"] == "finished" and straight["step"] == 6
    cfg = load_config(ClipRunConfig, config, ["task=clip_preempted_once"])
    monkeypatch.setenv("CLIP_PREEMPT", "1")
    first = run_train(cfg, tmp_path / "resumed")
    assert first["status"] == "preempted" and first["step"] == 3
    ckpt = tmp_path / "resumed" / "checkpoints" / "step_00000003"
    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert any(k.startswith("clip.visual.blocks.0") for k in keys)
    assert not any("locked" in k for k in keys)  # frozen: neither weights nor optimizer state
    monkeypatch.setenv("CLIP_PREEMPT", "0")
    assert run_train(cfg, tmp_path / "resumed")["step"] == 6

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}

    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=0)
    a = load_file(str(tmp_path / "straight" / "export" / "clip" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "export" / "clip" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the export is self-contained: the frozen backbone inside it is the original, unchanged
    original = load_file(str(tiny_export / "model.safetensors"))
    for k, v in original.items():
        assert torch.equal(a[LOCKED_PREFIX + k], v), k
    model = load(tmp_path / "straight")
    assert isinstance(model, CLIPModel) and model.is_locked
    logged = _metrics(tmp_path / "straight")
    assert all(0 < r["logit_scale"] <= 100.0 + 1e-4 for r in logged if "logit_scale" in r)


def test_clip_from_scratch_and_siglip_export_and_zero_shot(tmp_path, builtin_data):
    shards = builtin_data / "shards" / "mnist"
    val = builtin_data / "mnist" / "val"
    clip_cfg = load_task_config(clip_yaml(tmp_path, shards, TRAINED_TOWER), [
        "max_steps=2", "eval.zeroshot_every_n_steps=2", f"eval.zeroshot_val={val}",
        f"eval.zeroshot_templates={TEMPLATES}"])
    run = run_train(clip_cfg, tmp_path / "clip")
    assert run["status"] == "finished"
    periodic = [r for r in _metrics(tmp_path / "clip") if "zeroshot/top1" in r]
    assert periodic and 0 <= periodic[-1]["zeroshot/top1"] <= 1  # the loop's evaluators
    exported = json.loads((tmp_path / "clip" / "export" / "clip" / "config.json").read_text())
    assert exported["model_type"] == "clip" and exported["objective"] == "clip"
    model = load(tmp_path / "clip")
    assert isinstance(model, CLIPModel) and not model.is_locked and model.logit_bias is None
    out = run_evaluator("zeroshot", EvalModel.load(tmp_path / "clip"), val=str(val),
                        templates=str(TEMPLATES))
    assert out["n_classes"] == 10 and out["n_val"] == 1000 and 0 <= out["metrics"]["top1"] <= 1

    sig_cfg = load_task_config(clip_yaml(tmp_path, shards, TRAINED_TOWER, "loss: {kind: siglip}"),
                               ["max_steps=2"])
    run_train(sig_cfg, tmp_path / "siglip")
    rows = [r for r in _metrics(tmp_path / "siglip") if "logit_bias" in r]
    assert rows and rows[0]["logit_bias"] == pytest.approx(-10.0, abs=0.1)
    assert rows[0]["logit_scale"] == pytest.approx(10.0, rel=0.05)
    sig = load(tmp_path / "siglip")
    assert sig.logit_bias is not None
    assert json.loads((tmp_path / "siglip" / "export" / "clip" / "config.json")
                      .read_text())["objective"] == "siglip"


def test_config_errors_name_the_key(tmp_path, builtin_data):
    config = clip_yaml(tmp_path, builtin_data / "shards" / "mnist", TRAINED_TOWER)
    with pytest.raises(ConfigError, match="image.size"):
        load_task_config(config, ["image.size=56"])
    with pytest.raises(ConfigError, match="model.init_logit_bias"):
        load_task_config(config, ["model.init_logit_bias=-10"])
    with pytest.raises(ConfigError, match="loss.kind"):
        load_task_config(config, ["loss.kind=triplet"])
    with pytest.raises(ConfigError, match="model.text.width"):
        load_task_config(config, ["model.text.width=33"])
