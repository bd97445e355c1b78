"""The task contract end to end: a few-line task with no SSL parts (dinosys.train.tasks.toy)
trained through the real loop, with a checkpoint, a preemption and a resume that lands on the
same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinosys.config import load_config
from dinosys.errors import ConfigError
from dinosys.train.run import run_train
from dinosys.train.tasks import TASKS, load_task_config, register_task
from dinosys.train.tasks.toy import ToyConfig, ToyTask


@register_task
class PreemptedOnceToy(ToyTask):
    """The toy task, whose process gets SIGUSR2 (Slurm's preemption notice) after step 3."""

    name = "toy_preempted_once"

    def after_optimizer_step(self, step: int, applied: torch.Tensor) -> None:
        if step == 2 and os.environ.get("TOY_PREEMPT") == "1":
            os.kill(os.getpid(), signal.SIGUSR2)


def toy_yaml(tmp_path: Path, builtin_data: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(f"""\
task: toy
name: toy_test
model: {{arch: vit_tiny, img_size: 28, patch_size: 14, embed_dim: 32, depth: 2, num_heads: 2}}
data:
  sources: [{{path: {builtin_data / 'mnist' / 'train'}}}]
  batch_size_per_gpu: 8
  num_workers: 0
optim: {{iters_per_epoch: 2, warmup_epochs: 1, epochs: 3}}
checkpoint: {{every_n_steps: 2}}
dist: {{param_dtype: fp32}}
log: {{every_n_steps: 1, progress: false}}
""")
    return path


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_toy_task_checkpoint_preempt_resume(tmp_path: Path, builtin_data: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = toy_yaml(tmp_path, builtin_data)
    straight = run_train(load_task_config(config), tmp_path / "straight")
    assert straight["status"] == "finished" and straight["step"] == 6
    assert straight["task"] == "toy"

    cfg = load_config(ToyConfig, config, ["task=toy_preempted_once"])
    monkeypatch.setenv("TOY_PREEMPT", "1")
    first = run_train(cfg, tmp_path / "resumed")
    assert first["status"] == "preempted" and first["step"] == 3
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000003").is_dir()
    assert not (tmp_path / "resumed" / "export").exists()
    monkeypatch.setenv("TOY_PREEMPT", "0")
    second = run_train(cfg, tmp_path / "resumed")
    assert second["status"] == "finished" and second["step"] == 6

    # the resumed run is the uninterrupted run: same losses, same exported weights
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=0)
    a = load_file(str(tmp_path / "straight" / "export" / "backbone" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "export" / "backbone" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((tmp_path / "straight" / "export" / "backbone" / "config.json")
                          .read_text())
    assert exported["model_type"] == "vit_backbone"
    import dinosys.export

    model = dinosys.export.load(tmp_path / "straight")  # RUN -> RUN/export/backbone
    assert model.cfg.embed_dim == 32


def test_task_key_picks_the_schema(tmp_path: Path, builtin_data: Path) -> None:
    config = toy_yaml(tmp_path, builtin_data)
    assert type(load_task_config(config)) is ToyConfig
    with pytest.raises(ConfigError, match="unknown config key 'heads'"):
        load_task_config(config, ["heads.n_prototypes=8"])  # an SSL section: not the toy's
    with pytest.raises(ConfigError, match="unknown task 'toi'.*did you mean 'toy'"):
        load_task_config(config, ["task=toi"])
    assert {"ssl", "toy"} <= set(TASKS)
