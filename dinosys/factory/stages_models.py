"""The model stages: ``evaluate`` (the eval suite on every trained model) and ``export``
(``export_model`` of each into ``OUT/export/<model>/`` with its provenance chain)."""

from __future__ import annotations

from dinosys.factory.provenance import chain_for
from dinosys.factory.stages import Context, Stage, ensure_builtin, register_stage

TRAIN_STAGES = ("pretrain", "distill", "text_align")


def trained_models(ctx: Context) -> dict[str, tuple[str, str]]:
    """Every model the training stages exported: name -> (stage, export path). The teacher is
    ``teacher``, students keep their names, the text-aligned model is ``text``."""
    models: dict[str, tuple[str, str]] = {}
    for stage in TRAIN_STAGES:
        record = ctx.records.get(stage)
        if record is None:
            continue
        for name, path in record["exports"].items():
            models["text" if stage == "text_align" else name] = (stage, path)
    return models


def _run_evaluate(ctx: Context) -> dict:
    from dinosys.eval.models import EvalModel
    from dinosys.eval.registry import get_evaluator, run_evaluator

    cfg = ctx.cfg.evaluate
    results: dict[str, dict] = {}
    for name, (stage, path) in trained_models(ctx).items():
        suite = cfg.text_suite if stage == "text_align" else cfg.suite
        if not suite:
            continue
        ensure_builtin(ctx, [_suite_text(suite)])
        suite_cfg = get_evaluator("suite").make_config(suite=suite, data=ctx.builtin)
        out = run_evaluator("suite", EvalModel.load(path), suite_cfg)
        results[name] = {"stage": stage, "path": path, "metrics": out["metrics"],
                         "results_json": out.get("results_json"),
                         "table": [{k: r[k] for k in ("name", "evaluator", "metrics", "command")}
                                   for r in out["results"]]}
    return {"models": results}


def _suite_text(suite: str) -> str:
    """The suite file's text (its ``{builtin}/<set>`` paths name the sets to build)."""
    from dinosys.config import find_config

    return find_config(suite, kind="eval").read_text()


register_stage(Stage("evaluate", TRAIN_STAGES, _run_evaluate,
                     "the eval suite (kNN, linear; zero-shot for the text model) on every model"))


def _run_export(ctx: Context) -> dict:
    from dinosys.export.exporter import export_model

    cfg = ctx.cfg.export
    exports: dict[str, dict] = {}
    for name, (stage, path) in trained_models(ctx).items():
        formats = cfg.text_formats if stage == "text_align" else cfg.formats
        chain = chain_for(ctx, name, stage)
        card = {"name": f"{ctx.cfg.name}-{name}", "provenance": chain}
        out = ctx.dir("export") / name
        summary = export_model(path, out, formats=list(formats), card=card)
        exports[name] = {"out": str(out), "formats": summary["formats"], "stage": stage,
                         "num_parameters": summary["num_parameters"]}
    return {"models": exports}


register_stage(Stage("export", ("curate", *TRAIN_STAGES, "evaluate"), _run_export,
                     "exports of every model (native, timm, hf, onnx; open_clip for the text "
                     "model) carrying the provenance chain"))
