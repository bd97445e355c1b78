"""`submit.py pipeline` before anything is queued: the plan (stages in dependency order, their
resources, dependencies and commands), what is skipped, and every bad input as one line with
exit code 2 and nothing queued or written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pipeline_tiny import write_tiny_pipeline

from dinosys.errors import UserError
from launch.pipeline import check_resources, check_stage_flags, stage_status, topological
from launch.submit import main


def _submit(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    """``launch/submit.py pipeline ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["pipeline", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def no_slurm(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """No Slurm client on PATH: a dry run skips the cluster checks and says so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("SLURM_CONF", raising=False)


def _queued() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                          timeout=30, check=True).stdout.split()


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    # paths only: nothing here reads the data
    return write_tiny_pipeline(tmp_path / "cfg", tmp_path / "builtin")


def _row(name: str, *inputs: str) -> dict:
    return {"stage": name, "inputs": list(inputs)}


def test_stages_come_after_their_inputs_and_cycles_or_unknown_inputs_are_refused() -> None:
    plan = [_row("export", "evaluate", "pretrain"), _row("evaluate", "pretrain"),
            _row("pretrain", "curate"), _row("curate")]
    assert [r["stage"] for r in topological(plan)] == ["curate", "pretrain", "evaluate",
                                                      "export"]
    with pytest.raises(UserError, match=r"cycle \(each reads the next\): curate -> evaluate "
                       r"-> pretrain -> curate"):
        topological([_row("curate", "evaluate"), _row("pretrain", "curate"),
                     _row("evaluate", "pretrain")])
    with pytest.raises(UserError, match="stage distill reads unknown stage 'teacher'"):
        topological([_row("pretrain"), _row("distill", "teacher")])


def test_a_stage_job_requeues_only_a_preempted_training_stage_and_fails_otherwise() -> None:
    """The status a stage job's task returns (what launch.task.Task acts on): finished for a
    stage that ran, was complete or did its part; preempted (-> checkpoint was saved, requeue)
    for a training stage stopped by USR2; anything else fails the job (dependents never
    start)."""
    for status in ("ran", "skipped", "part"):
        assert stage_status({"stage": "pretrain", "status": status}) == "finished"
    assert stage_status({"stage": "pretrain", "status": "incomplete",
                         "record": {"incomplete": True, "status": "preempted"}}) == "preempted"
    with pytest.raises(RuntimeError, match="stage distill did not finish: status incomplete "
                       r"\(diverged\)"):
        stage_status({"stage": "distill", "status": "incomplete",
                      "record": {"incomplete": True, "status": "diverged"}})


def test_resources_a_stage_cannot_use_are_refused() -> None:
    base = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "parts": 1}
    check_resources("pretrain", True, {**base, "nodes": 4, "gpus_per_node": 8})
    with pytest.raises(UserError, match="stage pretrain: resources.tasks_per_node 2 with "
                       "gpus_per_node 8: GPU jobs run one task per GPU"):
        check_resources("pretrain", True, {**base, "gpus_per_node": 8, "tasks_per_node": 2})
    with pytest.raises(UserError, match="stage export runs in one process"):
        check_resources("export", False, {**base, "nodes": 2})
    with pytest.raises(UserError, match="only the curate stage has parts"):
        check_resources("evaluate", False, {**base, "parts": 4})
    with pytest.raises(UserError, match="--nodes: a pipeline sizes every stage from its config"):
        check_stage_flags(["--partition", "gpu", "--nodes=4"])


def test_dry_run_prints_every_stage_in_order_with_resources_dependencies_and_command(
        tiny: Path, tmp_path: Path, capsys, no_slurm) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    code, stdout, err = _submit(capsys, "--dry-run", "--out", str(run), "--", str(tiny),
                                "pretrain.resources.nodes=2",
                                "pretrain.resources.gpus_per_node=4")
    assert code == 0, err
    out = stdout.splitlines()
    stages = [line.split(":")[0] for line in out if line.startswith("stage ")]
    assert stages == ["stage curate", "stage pretrain", "stage distill", "stage text_align",
                      "stage evaluate", "stage export"]
    # the tiny curation does not verify: no verify array
    assert any(line.startswith("stage curate: 6 array(s) of 2 x 1 task (ingest, embed, dedup, "
                               "cluster, retrieve, shard), then 1 task") for line in out), out
    assert ("stage pretrain: 2 node(s) x 4 task(s), 4 GPU(s) per node, 10 min; after: curate"
            in out)
    assert "stage evaluate: 1 task, CPU only, 10 min; after: pretrain, distill, text_align" in out
    assert (f"  command: dinosys pipeline {run}/submission/pipeline.yaml --out {run} --stage "
            "pretrain" in out)
    assert ("  command: dinosys-curate embed <stage curate's curation> --part '<array index>/2'"
            in out)
    script = stdout.split("# ---- stage pretrain\n")[1]
    assert "#SBATCH --dependency='afterok:<curate job>'" in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --nodes=2" in script
    assert "#SBATCH --dependency='afterok:<curate-shard job>'" in stdout  # arrays, then merge
    summary = json.loads(out[-1])
    assert summary["to_run"] == ["curate", "pretrain", "distill", "text_align", "evaluate",
                                 "export"] and summary["slurm_checked"] is False
    assert not run.exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, message", [
    (["frobnicate.recipe=x"], "unknown config key 'frobnicate"),  # no such stage
    (["pretrain.resources.gpus_per_node=-1"], "resources.gpus_per_node': must be >= 0"),
    (["export.resources.nodes=2"], "stage export runs in one process"),
    (["pretrain.overrides=[optim.lr=1]"], "stage pretrain: unknown config key 'optim.lr'"),
    (["curate.overrides=[dedup.nope=0]"], "stage curate: unknown config key 'dedup.nope'"),
    (["distill.overrides=[loss.mode=bogus]"], "stage distill: "),
    (["text_align.overrides=[model.text.width=zero]"], "stage text_align: "),
    (["evaluate.suite=no_such_suite"], "stage evaluate: "),
    (["export.formats=[native,tflite]"], "stage export: export.formats: unknown export format"),
    (["--", "--gpus-per-node", "8"], "--gpus-per-node: a pipeline sizes every stage from its "
     "config"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
        tiny: Path, tmp_path: Path, capsys, no_slurm, args: list[str],  # noqa: ANN001
        message: str) -> None:
    flags = args[1:] if args[0] == "--" else []
    overrides = [] if flags else args
    run = tmp_path / "run"
    code, _, err = _submit(capsys, *flags, "--dry-run", "--out", str(run), "--", str(tiny),
                           *overrides)
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith("launch/submit.py: error:") and message in line, line
    assert not run.exists()


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs the Slurm client commands")
def test_a_gpu_stage_slurm_cannot_place_is_refused_before_anything_is_queued(
        tiny: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The local cluster has no GPU: `sbatch --test-only` of the pretrain job fails, so no job
    of the pipeline (not even the curation before it) is queued."""
    before = _queued()
    run = tmp_path / "run"
    code, _, err = _submit(capsys, "--partition", "debug", "--out", str(run), "--", str(tiny),
                           "pretrain.resources.gpus_per_node=1")
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith("launch/submit.py: error: stage pretrain: Slurm would refuse its job "
                           "(1 node(s) x 1 task(s), 1 GPU(s) per node, 10 min, partition debug)"
                           ), line
    assert _queued() == before and not run.exists()
    code, _, err = _submit(capsys, "--out", str(run), "--", str(tiny),
                           "curate.resources.partition=nope")
    assert code == 2 and "stage curate: unknown Slurm partition 'nope'" in err, err
    assert _queued() == before and not run.exists()
