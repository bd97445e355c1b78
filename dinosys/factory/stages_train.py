"""The training stages: ``pretrain`` (DINOv2, ``dinosys train``), ``distill`` (``dinosys
distill``) and ``text_align`` (LiT, ``dinosys clip``), each on the curated shards, each in its
run directory ``OUT/<stage>/`` (so a rerun resumes from its checkpoint). Every rank of a
torchrun / Slurm job runs them; rank 0 records the stage."""

from __future__ import annotations

from pathlib import Path

from dinosys.errors import UserError
from dinosys.factory.record import sha256_file
from dinosys.factory.stages import Context, Stage, register_stage


def _data_overrides(ctx: Context) -> list[str]:
    if "curate" not in ctx.records:
        return []
    return [f"data.sources=[{{path: \"{ctx.records['curate']['shards']}\"}}]"]


def run_command(command: str, recipe: str, overrides: list[str], run_dir: Path) -> dict:
    """What ``dinosys COMMAND RECIPE --out RUN_DIR OVERRIDES`` runs (the task registered for
    COMMAND, or the recipe's ``task``), returning its summary."""
    from dinosys.cli import load_command_config
    from dinosys.train.run import run_train

    return run_train(load_command_config(command, recipe, overrides), run_dir)


def teacher_of(ctx: Context) -> dict | None:
    """The pretrained teacher's export (path + weights hash), when this pipeline trained it."""
    if "pretrain" not in ctx.records:
        return None
    path = Path(ctx.records["pretrain"]["export"])
    return {"path": str(path), "run_dir": ctx.records["pretrain"]["run_dir"],
            "sha256": sha256_file(path / "model.safetensors")}


def _record(ctx: Context, name: str, summary: dict, run_dir: Path) -> dict:
    if summary.get("status") != "finished":  # preempted: the requeued job resumes it
        return {"incomplete": True, "status": summary.get("status"),
                "step": summary.get("step"), "checkpoint": summary.get("checkpoint")}
    return {"run_dir": str(run_dir), "config_sha256": sha256_file(run_dir / "config.yaml"),
            "recipe": getattr(ctx.cfg, name).recipe, "steps": summary.get("step"),
            "status": "finished", "summary": summary}


def _run_pretrain(ctx: Context) -> dict:
    run_dir = ctx.dir("pretrain")
    summary = run_command("train", ctx.cfg.pretrain.recipe,
                          [*_data_overrides(ctx), *ctx.overrides("pretrain")], run_dir)
    result = _record(ctx, "pretrain", summary, run_dir)
    if not result.get("incomplete"):
        result.update(export=summary["exports"]["teacher"], knn_top1=summary.get("knn_top1"),
                      exports={"teacher": summary["exports"]["teacher"]})
    return result


def _run_distill(ctx: Context) -> dict:
    run_dir = ctx.dir("distill")
    teacher = teacher_of(ctx)
    wired = [*_data_overrides(ctx)] + ([f"teacher.path={teacher['run_dir']}"] if teacher else [])
    summary = run_command("distill", ctx.cfg.distill.recipe,
                          [*wired, *ctx.overrides("distill")], run_dir)
    result = _record(ctx, "distill", summary, run_dir)
    if not result.get("incomplete"):
        students = summary.get("students", {})
        result["exports"] = {name: s["export"] for name, s in students.items() if "export" in s}
        if not result["exports"]:
            raise UserError(f"stage distill: {run_dir} finished without a student export")
        result["teacher"] = teacher or summary.get("teacher")
        result["knn_top1"] = {n: s.get("knn_top1") for n, s in students.items()}
    return result


def _run_text_align(ctx: Context) -> dict:
    run_dir = ctx.dir("text_align")
    teacher = teacher_of(ctx)
    wired = [*_data_overrides(ctx)] + (
        [f"model.image.locked={teacher['run_dir']}"] if teacher else [])
    summary = run_command("clip", ctx.cfg.text_align.recipe,
                          [*wired, *ctx.overrides("text_align")], run_dir)
    result = _record(ctx, "text_align", summary, run_dir)
    if not result.get("incomplete"):
        exports = summary.get("exports") or {}
        if not exports:
            raise UserError(f"stage text_align: {run_dir} finished without an export")
        result.update(exports=exports, teacher=teacher,
                      zeroshot_top1=summary.get("zeroshot_top1"))
    return result


register_stage(Stage("pretrain", ("curate",), _run_pretrain,
                     "DINOv2 pretraining of the teacher on the curated shards (dinosys train)",
                     collective=True, numbers=(("steps", "steps"), ("kNN", "knn_top1"))))
register_stage(Stage("distill", ("curate", "pretrain"), _run_distill,
                     "distillation of the teacher into student(s) (dinosys distill)",
                     collective=True, numbers=(("steps", "steps"),)))
register_stage(Stage("text_align", ("curate", "pretrain"), _run_text_align,
                     "LiT: a text tower aligned to the frozen teacher (dinosys clip)",
                     collective=True, numbers=(("steps", "steps"),)))
