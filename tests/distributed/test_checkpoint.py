"""CheckpointManager: atomic commit, pointer, pruning, resharded load, kill -9 during a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dinosys.distributed.sharded_checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_backbone_state,
    resolve_checkpoint,
    restore_rng_state,
)
from dinosys.errors import ConfigError, UserError
from dinosys.train.train_state import CheckpointConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "ckpt_worker.py"


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)


def make_state(seed: int) -> dict:
    torch.manual_seed(seed)
    student, teacher = Teacher(), Teacher()
    optim = torch.optim.AdamW(student.parameters(), lr=0.1)
    loss = student.head(student.backbone(torch.randn(3, 4))).pow(2).mean()
    loss.backward()
    optim.step()
    return {"student": student, "teacher": teacher, "optim": optim,
            "loss_state": {"center": torch.randn(5), "count": seed}}


def save_steps(root: Path, steps, keep_last=3, keep_every=0) -> CheckpointManager:
    manager = CheckpointManager(root, keep_last=keep_last, keep_every=keep_every)
    state = make_state(0)
    for step in steps:
        manager.save(step, state, {"seed": 3})
    return manager


def steps_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "latest")


# ----------------------------------------------------------------------------- one process


def test_roundtrip_layout_and_restore(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    saved = make_state(1)
    path = manager.save(7, saved, {"seed": 3, "config_digest": "abc"}, rank_state={"pos": 42})
    assert path == tmp_path / "ckpt" / "step_00000007"
    assert steps_on_disk(tmp_path / "ckpt") == ["step_00000007"]  # no temp folder left
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000007"
    extra = json.loads((path / "extra.json").read_text())
    assert extra["step"] == 7 and extra["world_size"] == 1 and extra["config_digest"] == "abc"
    assert manager.latest() == path

    expected_draw = torch.rand(4)  # what the RNG gives right after the save
    fresh = make_state(2)
    assert not torch.equal(fresh["student"].head.weight, saved["student"].head.weight)
    info = manager.load(path, fresh)
    assert torch.equal(torch.rand(4), expected_draw)
    assert info["rank_state"] == {"pos": 42} and info["same_world_size"]
    for name in ("student", "teacher"):
        for (k, a), b in zip(saved[name].state_dict().items(), fresh[name].state_dict().values()):
            assert torch.equal(a, b), k
    for p_saved, p_fresh in zip(saved["student"].parameters(), fresh["student"].parameters()):
        sa, sb = saved["optim"].state[p_saved], fresh["optim"].state[p_fresh]
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(fresh["loss_state"]["center"], saved["loss_state"]["center"])
    assert fresh["loss_state"]["count"] == 1


def test_rng_state_roundtrip() -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    json.dumps(state)  # JSON data
    restore_rng_state(json.loads(json.dumps(state)))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]


def test_prune_keep_last_and_keep_every(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(root, range(1, 11), keep_last=2, keep_every=4)
    assert steps_on_disk(root) == [f"step_{s:08d}" for s in (4, 8, 9, 10)]


def test_prune_never_deletes_the_pointed_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = save_steps(root, [1, 2, 3], keep_last=3)
    (root / "latest").write_text("step_00000001\n")  # a person rolled back
    assert manager.latest() == root / "step_00000001"
    manager.keep_last = 1
    manager.prune()
    assert steps_on_disk(root) == ["step_00000001", "step_00000003"]


def test_latest_ignores_temp_and_unmarked_folders(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = save_steps(root, [1, 2])
    (root / ".tmp-step_00000003-deadbeef").mkdir()  # a killed save
    (root / ".tmp-step_00000003-deadbeef" / ".metadata").write_bytes(b"")
    unmarked = root / "step_00000009"  # e.g. copied by hand, half way
    unmarked.mkdir()
    (root / "latest").unlink()
    assert manager.latest() == root / "step_00000002"
    with pytest.raises(UserError, match="step_00000009"):
        resolve_checkpoint(unmarked)
    manager.save(4, make_state(0))
    assert not (root / ".tmp-step_00000003-deadbeef").exists()  # cleaned by the next save
    assert manager.latest() == root / "step_00000004"


@pytest.mark.parametrize("pointer", [b"garbage\n", b"step_00000077\n", b"\xff\xfe\x00", None])
def test_corrupt_or_missing_pointer_falls_back_to_scan(tmp_path: Path, pointer) -> None:
    root = tmp_path / "ckpt"
    manager = save_steps(root, [5, 6])
    if pointer is None:
        (root / "latest").unlink()
    else:
        (root / "latest").write_bytes(pointer)
    assert manager.latest() == root / "step_00000006"
    assert CheckpointManager(tmp_path / "nothing").latest() is None


def test_same_step_saved_twice(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    state = make_state(0)
    manager.save(5, state)
    with torch.no_grad():
        state["teacher"].head.weight.fill_(3.0)
    manager.save(5, state)
    assert steps_on_disk(root) == ["step_00000005"]
    got = load_backbone_state(root / "step_00000005", prefix="teacher.head")
    assert torch.equal(got["weight"], torch.full((2, 8), 3.0))


def test_load_backbone_state_without_process_group(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    state = make_state(4)
    CheckpointManager(root).save(3, state)
    expected = state["teacher"].backbone.state_dict()
    for where in (root / "step_00000003", root, tmp_path / "run"):  # checkpoint, root, run dir
        got = load_backbone_state(where)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(UserError, match="no tensors under 'teacher.trunk'"):
        load_backbone_state(root / "step_00000003", prefix="teacher.trunk")


def test_not_a_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        load_backbone_state(tmp_path / "nope")
    with pytest.raises(UserError, match="is not a checkpoint"):
        CheckpointManager(tmp_path / "ckpt").load(tmp_path, make_state(0))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(UserError):
        CheckpointManager(Path("x"), keep_every=-1)


# ----------------------------------------------------------------------------- several ranks


def torchrun(nproc: int, *args: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def run_ok(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """Two FSDP2 ranks: 3 steps, checkpoint, 2 more steps; references written by rank 0."""
    out = tmp_path_factory.mktemp("ckpt2")
    run_ok(torchrun(2, "save", str(out)))
    return out


def assert_same(ref: dict, got: dict, atol: float) -> None:
    for part in ("student", "teacher", "optim"):
        assert ref[part].keys() == got[part].keys(), part
        for key in ref[part]:
            torch.testing.assert_close(got[part][key], ref[part][key], atol=atol, rtol=0,
                                       msg=f"{part}.{key}")


@pytest.mark.dist
def test_save_2_ranks_load_2_ranks_exact(saved_run: Path) -> None:
    run_ok(torchrun(2, "load", str(saved_run)))
    ref = torch.load(saved_run / "reference.pt", weights_only=True)
    got = torch.load(saved_run / "loaded_2.pt", weights_only=True)
    assert_same(ref["at_save"], got["at_save"], atol=0)
    assert_same(ref["after"], got["after"], atol=0)  # training continues bit for bit
    for rank in (0, 1):
        res = json.loads((saved_run / f"load_2_{rank}.json").read_text())
        assert res["same"] and res["rank_state"] == {"pos": 100 * rank + 3}
        assert res["draws"] == json.loads((saved_run / f"draws_{rank}.json").read_text())
        assert res["loss_state"] == {"center": [0.5] * 4, "count": 7}
    # the frozen parameter had no optimizer state when saved and has none after the load
    assert not any(k.startswith("frozen.") for k in got["at_save"]["optim"])


@pytest.mark.dist
def test_save_2_ranks_load_1_process_resharded(saved_run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(WORKER), "load", str(saved_run)], env=env, check=True,
                   timeout=240, capture_output=True)
    ref = torch.load(saved_run / "reference.pt", weights_only=True)
    got = torch.load(saved_run / "loaded_1.pt", weights_only=True)
    assert_same(ref["at_save"], got["at_save"], atol=0)
    assert_same(ref["after"], got["after"], atol=1e-6)  # one rank: another reduction order
    res = json.loads((saved_run / "load_1_0.json").read_text())
    assert not res["same"] and res["rank_state"] is None
    assert res["rank_states"] == [{"pos": 3}, {"pos": 103}]
    backbone = load_backbone_state(saved_run / "checkpoints")
    teacher = ref["at_save"]["teacher"]
    assert backbone.keys() == teacher.keys()
    assert all(torch.equal(backbone[k], teacher[k]) for k in teacher)


@pytest.mark.dist
def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    proc = torchrun(2, "crash", str(tmp_path), start_new_session=True)
    deadline = time.time() + 180
    while not (tmp_path / "in_commit").exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "the worker never reached the commit of step 2"
        time.sleep(0.2)
    # a node failure: every worker (each in its own session under torchrun) and the launcher
    for rank in (0, 1):
        while not (tmp_path / f"pid_{rank}").exists():
            time.sleep(0.1)
        os.kill(int((tmp_path / f"pid_{rank}").read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    root = tmp_path / "checkpoints"
    temps = [p.name for p in root.iterdir() if p.name.startswith(".tmp-step_00000002")]
    assert len(temps) == 1 and (root / temps[0] / ".metadata").exists()  # shards were written
    assert not (root / "step_00000002").exists()
    manager = CheckpointManager(root)
    assert manager.latest() == root / "step_00000001"
    assert (root / "latest").read_text().strip() == "step_00000001"
    backbone = load_backbone_state(root)
    assert "blocks.0.fc.weight" in backbone and backbone["blocks.0.fc.weight"].shape == (16, 16)


def test_resuming_a_different_model_is_a_user_error(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, {"student": nn.Sequential(nn.Linear(4, 8))})
    with pytest.raises(UserError, match=r"does not match .*Size mismatch.*student\.0\.weight"):
        manager.load(manager.latest(), {"student": nn.Sequential(nn.Linear(4, 9))})
    with pytest.raises(UserError, match=r"does not match .*Missing key.*student\.1\.weight"):
        manager.load(manager.latest(),
                     {"student": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))})


def test_extra_that_is_not_json_fails_the_save_and_commits_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, {"student": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="JSON serializable"):
        manager.save(2, {"student": nn.Linear(2, 2)}, {"when": object()})
    assert manager.latest() == tmp_path / "ckpt" / "step_00000001"
    assert [s for s, _ in manager.committed()] == [1]


def _grouped_state(seed: int, lr_mults: tuple[float, float]) -> dict:
    """make_state with two AdamW groups carrying an extra key (as the loop's lr_mult)."""
    state = make_state(seed)
    student = state["student"]
    groups = [{"params": list(student.backbone.parameters()), "lr_mult": lr_mults[0]},
              {"params": list(student.head.parameters()), "lr_mult": lr_mults[1]}]
    optim = torch.optim.AdamW(groups, lr=0.1)
    student.head(student.backbone(torch.randn(3, 4))).pow(2).mean().backward()
    optim.step()
    state["optim"] = optim
    return state


@pytest.mark.parametrize("by_position", [False, True])
def test_optimizer_groups_are_keyed_by_parameter_name(tmp_path: Path, by_position) -> None:
    """Groups are saved as optim.param_groups.<first param>.*: ranks holding different modules
    (distillation students on rank subgroups) cannot overwrite each other's groups. A checkpoint
    with the former position keys (optim.param_groups.0.*) still loads."""
    from torch.distributed.checkpoint import FileSystemReader

    import dinosys.distributed.state_adapters as adapters

    saved = _grouped_state(1, (0.5, 2.0))
    manager = CheckpointManager(tmp_path / "ckpt")
    original = adapters.OptimizerState.__init__

    def legacy_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        self._groups_by_position = by_position

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapters.OptimizerState, "__init__", legacy_init)
        path = manager.save(1, saved, {"seed": 0})
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    group_keys = {k for k in keys if k.startswith("optim.param_groups.")}
    first = "optim.param_groups.0." if by_position else "optim.param_groups.backbone.0.weight."
    assert f"{first}lr_mult" in group_keys, sorted(group_keys)
    fresh = _grouped_state(2, (1.0, 1.0))
    manager.load(path, fresh)
    assert [g["lr_mult"] for g in fresh["optim"].param_groups] == [0.5, 2.0]
    for p_saved, p_fresh in zip(saved["student"].parameters(), fresh["student"].parameters()):
        sa, sb = saved["optim"].state[p_saved], fresh["optim"].state[p_fresh]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
