"""`dinosys distill` end to end: 2 students on 4 gloo ranks == the same students in turn in one
process; kill -9 and exact resume at the same and another world size, in turn and on rank
subgroups; checkpoints without the teacher; exports with a model card naming the teacher."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinosys.distributed.sharded_checkpoint import CheckpointManager, load_backbone_state

REPO = Path(__file__).resolve().parents[2]
KILLER = REPO / "tests" / "distributed" / "train_until_killed.py"
STEPS = 6
TIMING = {"images_per_s", "data_wait_frac", "tflops_per_s", "mfu", "peak_mem_gib", "elapsed_s",
          "eta_s"}
STUDENT = ("{{name: {name}, {ranks}model: {{arch: vit_tiny, img_size: 28, patch_size: 14, "
           "embed_dim: {width}, depth: {depth}, num_heads: 2, layerscale_init: null}}, "
           "heads: {{hidden_dim: 32, bottleneck_dim: 16}}}}")


def students(ranks: dict[str, tuple[int, int]] | None = None) -> str:
    """Two students: 's' (24 wide, 1 block) and 'b' (32 wide, 2 blocks), optional rank ranges."""
    parts = []
    for name, width, depth in (("s", 24, 1), ("b", 32, 2)):
        r = f"ranks: [{ranks[name][0]}, {ranks[name][1]}], " if ranks else ""
        parts.append(STUDENT.format(name=name, ranks=r, width=width, depth=depth))
    return "students=[" + ", ".join(parts) + "]"


def distill(run: Path, teacher: Path, data: Path, nproc: int, per_rank: int,
            ranks: dict[str, tuple[int, int]] | None, *extra: str,
            script: list[str] | None = None) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []),
           *(script or ["-m", "dinosys.cli"]), "distill", "mnist_demo_cpu", "--out", str(run),
           f"teacher.path={teacher}", students(ranks), f"max_steps={STEPS}",
           f"data.batch_size_per_gpu={per_rank}", "data.num_workers=0",
           f"data.sources=[{{path: {data / 'mnist' / 'train'}}}]", "checkpoint.every_n_steps=3",
           "checkpoint.keep_last=5", "log.every_n_steps=1", "log.progress=false",
           "optim.iters_per_epoch=2", "optim.warmup_epochs=1", "export_formats=[native]",
           "eval.knn_train=null", "eval.knn_val=null", "loss.feature_weight=0.0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def ok(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def metrics(run: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items()
                            if k not in TIMING and isinstance(v, (int, float))}
    return out


def assert_same_run(ref: Path, got: Path, tol: float = 1e-5) -> None:
    """Per-student losses / grad norms each step, and final students + EMAs + centres."""
    a, b = metrics(ref), metrics(got)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        keys = [k for k in a[step] if k.startswith(("s/", "b/", "grad_norm/"))]
        assert len(keys) >= 8
        for key in keys:
            assert math.isclose(b[step][key], a[step][key], rel_tol=tol, abs_tol=tol), \
                f"step {step} {key}: {b[step][key]} != {a[step][key]}"
    final = f"checkpoints/step_{STEPS:08d}"
    for prefix in ("student_s", "student_b", "ema_s", "ema_b"):
        x, y = load_backbone_state(ref / final, prefix), load_backbone_state(got / final, prefix)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-5,
                                       msg=f"{prefix}.{key}")


@pytest.fixture(scope="module")
def reference(teacher_run: Path, builtin_data: Path, tmp_path_factory) -> Path:
    """Both students in turn in one process on the global batch of 8, exported in all formats."""
    run = tmp_path_factory.mktemp("ref") / "run"
    mnist = builtin_data / "mnist"
    summary = ok(distill(run, teacher_run, builtin_data, 1, 8, None,
                         "export_formats=[native,timm,hf,onnx]",
                         f"eval.knn_train={mnist / 'train'}", f"eval.knn_val={mnist / 'val'}"))
    assert summary["status"] == "finished" and summary["mode"] == "heads"
    return run


@pytest.mark.dist
@pytest.mark.slow
def test_students_on_rank_subgroups_equal_students_in_turn(reference: Path, teacher_run: Path,
                                                           builtin_data: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "four"
    ok(distill(run, teacher_run, builtin_data, 4, 2, {"s": (0, 1), "b": (2, 3)}))
    assert_same_run(reference, run)
    # the steps really trained (so equality is not trivially of untouched weights)
    first = load_backbone_state(run / "checkpoints" / "step_00000003", "student_b")
    last = load_backbone_state(run / "checkpoints" / f"step_{STEPS:08d}", "student_b")
    assert any(not torch.equal(first[k], last[k]) for k in first)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)  # four multi-rank runs: ~10 min on 2 heavily shared cores
def test_kill_9_then_exact_resume_at_same_and_other_world_size(reference: Path,
                                                                teacher_run: Path,
                                                                builtin_data: Path,
                                                                tmp_path: Path) -> None:
    """Students in turn on 2 ranks, killed after the step-3 checkpoint; resumed on 2 ranks and
    (a copy) on 1 process: both equal the uninterrupted reference."""
    killed = tmp_path / "killed"
    res = distill(killed, teacher_run, builtin_data, 2, 4, None, script=[str(KILLER), "3"])
    assert res.returncode != 0, "the run should have been killed at step 3"
    assert [s for s, _ in CheckpointManager(killed / "checkpoints").committed()] == [3]
    other = tmp_path / "other"
    shutil.copytree(killed, other)
    ok(distill(killed, teacher_run, builtin_data, 2, 4, None))
    assert_same_run(reference, killed)
    ok(distill(other, teacher_run, builtin_data, 1, 8, None))  # DCP reshards, loader re-splits
    assert_same_run(reference, other)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_9_then_exact_resume_on_rank_subgroups(reference: Path, teacher_run: Path,
                                                     builtin_data: Path, tmp_path: Path) -> None:
    """2 students on 4 ranks (2 each), killed after the step-3 checkpoint; resumed on the same
    subgroups and (a copy) on 2 ranks (1 each): both equal the uninterrupted reference. Each
    rank saves only its student's optimizer groups, so they must not collide in the
    checkpoint (they once did: a resume lost the groups' lr multipliers and hung)."""
    four = {"s": (0, 1), "b": (2, 3)}
    killed = tmp_path / "killed"
    res = distill(killed, teacher_run, builtin_data, 4, 2, four, script=[str(KILLER), "3"])
    assert res.returncode != 0, "the run should have been killed at step 3"
    assert [s for s, _ in CheckpointManager(killed / "checkpoints").committed()] == [3]
    other = tmp_path / "other"
    shutil.copytree(killed, other)
    ok(distill(killed, teacher_run, builtin_data, 4, 2, four))
    assert_same_run(reference, killed)
    ok(distill(other, teacher_run, builtin_data, 2, 4, {"s": (0, 0), "b": (1, 1)}))
    assert_same_run(reference, other)


def test_checkpoint_and_exports(reference: Path, teacher_run: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    from dinosys.distill.teacher import load_teacher
    from dinosys.distributed.sharded_checkpoint import resolve_checkpoint

    meta = FileSystemReader(str(resolve_checkpoint(reference))).read_metadata()
    tops = {k.split(".")[0] for k in meta.state_dict_metadata}
    assert {"student_s", "student_b", "ema_s", "ema_b", "optim"} <= tops
    assert not any("teacher" in k for k in meta.state_dict_metadata)
    sha = load_teacher(teacher_run).fingerprint
    import dinosys.export

    for name in ("s", "b"):
        out = reference / "export" / name
        for sub in ("model.safetensors", "timm/model.safetensors", "hf/config.json",
                    "onnx/model.onnx"):
            assert (out / sub).is_file(), sub
        card = (out / "README.md").read_text()
        assert sha in card and str(teacher_run) in card and "knn_top1_k10" in card
        assert "mnist" in card and "heads" in card
        model = dinosys.export.load(out)
        ema = load_backbone_state(reference / "checkpoints" / f"step_{STEPS:08d}", f"ema_{name}")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, ema[key])


@pytest.mark.dist
@pytest.mark.parametrize("nproc, ranks", [(2, None), (4, {"s": (0, 1), "b": (2, 3)})],
                         ids=["in-turn-2-ranks", "subgroups-4-ranks"])
def test_periodic_and_final_knn_of_each_student(teacher_run: Path, builtin_data: Path,
                                                small_digits: Path,
                                                tmp_path: Path, nproc: int,
                                                ranks: dict[str, tuple[int, int]] | None) -> None:
    """eval.knn_every_n_steps: the registry's kNN (the trainer's one periodic-evaluation path)
    on each student's EMA, logged as <student>/knn/top1_k<k>, its extraction sharded over that
    student's own ranks (on rank subgroups it used to shard and gather over the world and so mix
    the students' features). At the last step the EMA is the export, so each student's logged
    kNN equals the final kNN of its exported weights, computed on its writer rank alone (no
    collectives: it used to abort in a mismatched gloo collective) and put in its card."""
    data = small_digits
    run = tmp_path / "run"
    summary = ok(distill(run, teacher_run, builtin_data, nproc, 8 // nproc, ranks,
                         "eval.knn_every_n_steps=3", "eval.knn_k=[3]",
                         f"eval.knn_train={data / 'train'}", f"eval.knn_val={data / 'val'}"))
    assert summary["status"] == "finished" and summary["world_size"] == nproc
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("s", "b"):
        evals = [r for r in records if f"{name}/knn/top1_k3" in r]
        assert [r["step"] for r in evals] == [3, 6]
        final = summary["students"][name]["knn_top1"]
        assert evals[-1][f"{name}/knn/top1_k3"] == pytest.approx(final[3] if 3 in final
                                                                 else final["3"], abs=1e-6)
        assert "knn_top1_k3" in (run / "export" / name / "README.md").read_text()


@pytest.mark.dist
@pytest.mark.parametrize("nproc, ranks", [
    (2, None), pytest.param(4, {"s": (0, 1), "b": (2, 3)}, marks=pytest.mark.slow)],
    ids=["in-turn-2-ranks", "subgroups-4-ranks"])
def test_feature_projection_on_several_ranks(teacher_run: Path, builtin_data: Path,
                                             tmp_path: Path, nproc: int,
                                             ranks: dict[str, tuple[int, int]] | None) -> None:
    """loss.feature_weight > 0 with student 's' narrower than the teacher (a learned projection,
    FSDP-sharded over the student's ranks) trains on several ranks with the same losses as in
    one process. It used to go out of step: one world finite-check all-reduce per trainable
    module (the students on different subgroups own different module counts; gloo "24 vs 4
    bytes"), and the projection returned a view whose FSDP2 pre-backward hook could be lost."""
    extra = ("loss.feature_weight=1.0", "max_steps=2")
    one = metrics(tmp_path / "one") if ok(distill(tmp_path / "one", teacher_run, builtin_data, 1,
                                                  8, None, *extra)) else {}
    ok(distill(tmp_path / "multi", teacher_run, builtin_data, nproc, 8 // nproc, ranks, *extra))
    multi = metrics(tmp_path / "multi")
    assert "grad_norm/s-proj" in multi[2] and "s/cls_loss" in multi[2]
    for step in (1, 2):
        for key in ("s/loss", "s/cls_loss", "s/patch_loss", "b/loss", "grad_norm/s-proj"):
            assert multi[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), key
