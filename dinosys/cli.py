"""The `dinosys` command line. Each subcommand imports its implementation lazily.

Bad input ends with one line on stderr and exit code 2 (`--debug` shows the traceback);
a capability that is not built yet says so in one line and exits 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dinosys.errors import NotAvailableError, UserError
from dinosys.names import check_name

# training commands: `dinosys COMMAND CONFIG` runs the task registered for COMMAND (its
# TrainTask.command) unless the config names another with `task:`
TRAIN_COMMANDS = {
    "train": "DINOv2 self-supervised pretraining -> run directory",
    "clip": "image-text contrastive training (CLIP / SigLIP / LiT) -> run directory",
    "distill": "frozen teacher -> student(s) distillation -> run directory",
}


def default_run_dir(name: str) -> Path:
    """A new run directory under runs/, named after the recipe and the start time."""
    return Path("runs") / f"{check_name(name, 'config name')}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_json(obj: dict) -> None:
    """Machine-readable result as the last line of stdout."""
    print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def _cmd_data_builtin(args: argparse.Namespace) -> int:
    from dinosys.data.builtin import build_builtin

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sets = args.sets.split(",") if args.sets else None
    summary = build_builtin(Path(args.out), sets=sets, force=args.force)
    print_json(summary)
    return 0


def load_command_config(command: str, config: str, overrides: list[str]):  # noqa: ANN201
    """The run config of ``dinosys COMMAND CONFIG key=value ...``: the schema of the config's
    ``task`` (default: the task registered for COMMAND). NotAvailableError when no task claims
    COMMAND yet."""
    from dinosys.train.tasks import load_task_config, task_for_command

    default = task_for_command(command)
    if default is None:
        raise NotAvailableError(f"dinosys {command}: not built yet (no training task is "
                                f"registered for `{command}`)")
    return load_task_config(config, overrides, default_task=default.name)


def _run_job(cfg, out: str | None, runner) -> int:
    """``runner(cfg, run_dir)`` in ``out`` (or a new default run directory); rank 0 prints the
    summary (one per job, not one per rank)."""
    from dinosys.distributed.env import detect_layout

    _, rank, world_size, _ = detect_layout()
    if world_size > 1 and not out:
        raise UserError("a multi-rank run needs --out RUN: every rank must write to the same "
                        "run directory (a default name differs between ranks)")
    summary = runner(cfg, Path(out) if out else default_run_dir(cfg.name))
    if rank == 0:
        print_json(summary)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_command_config(args.command, args.config, args.overrides)
    from dinosys.train.run import run_train

    return _run_job(cfg, args.out, run_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from dinosys.eval.cli import main as eval_main  # the evaluator registry builds its parser

    return eval_main(args.eval_args)


def _cmd_export(args: argparse.Namespace) -> int:
    from dinosys.export.exporter import export_model

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    summary = export_model(args.model, Path(args.out), formats=formats)
    print_json(summary)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dinosys.demo import check_lines, run_demo
    from dinosys.factory.runner import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_demo(Path(args.out) if args.out else default_run_dir("demo"),
                       data_dir=Path(args.data), overrides=args.overrides, jobs=args.jobs)
    for line in [*format_table(summary), *check_lines(summary)]:
        print(line)
    print_json(summary)
    return 0


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``--part i/n`` as ``(i, n)`` (None when not given); a malformed value is a UserError."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--part '{text}' must look like i/n (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part '{text}': need 0 <= i < n")
    return i, n


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from dinosys.factory.runner import format_table, load_pipeline, run_pipeline
    from dinosys.factory.stages import plan

    cfg = load_pipeline(args.config, args.overrides)
    if args.plan:
        stages = plan(cfg)
        for row in stages:
            res = row["resources"]
            tasks = (f"{res['gpus_per_node']} GPU task(s)" if res["gpus_per_node"]
                     else f"{res['tasks_per_node']} CPU task(s)")
            parts = f", {res['parts']} parts" if res["parts"] > 1 else ""
            print(f"{row['stage']:<11} after {','.join(row['inputs']) or '-':<34} "
                  f"{res['nodes']} node(s) x {tasks}, {res['timeout_min']} min{parts}")
        print_json({"pipeline": cfg.name, "stages": stages})
        return 0
    from dinosys.distributed.env import detect_layout

    _, rank, world_size, _ = detect_layout()
    out = args.out or cfg.out
    if out is None:
        if world_size > 1:
            raise UserError("a multi-rank stage needs --out DIR (the pipeline directory)")
        out = default_run_dir(cfg.name)
    from dinosys.factory.checks import check_stages

    check_stages(cfg, Path(out))  # a bad key in any stage's recipe or overrides: now, not later
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_pipeline(cfg, Path(out), args.stage, parse_part(args.part), args.jobs)
    if rank != 0:  # one summary per job, as for `dinosys train`; the ranks' outputs share a pipe
        return 0
    if "stages" in summary:
        for line in format_table(summary):
            print(line)
    print_json(summary)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from dinosys.factory.provenance import format_info, info_summary

    info = info_summary(args.model)
    if not args.json:
        for line in format_info(info):
            print(line)
    print_json(info)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from dinosys.config.describe import describe, format_table
    from dinosys.train.tasks import get_task, load_task_config

    if args.recipe is None and args.task is None:
        raise UserError("config show needs a RECIPE (a name under configs/ or a YAML path) or "
                        "--task NAME (that task's defaults)")
    if args.recipe is not None:
        cfg = load_task_config(args.recipe, args.overrides, default_task=args.task or "ssl")
        schema, task = type(cfg), cfg.task
    else:
        if args.overrides:
            raise UserError("config show --task: key=value overrides need a RECIPE")
        cls = get_task(args.task)
        cfg, schema, task = None, cls.config_class, cls.name
    rows = describe(schema, cfg)
    shown = [r for r in rows if r.changed] if args.diff else rows
    for line in format_table(shown, show_value=cfg is not None):
        print(line)
    print_json({"recipe": args.recipe, "task": task, "schema": schema.__name__,
                "keys": len(rows), "changed": sum(r.changed for r in rows), "shown": len(shown)})
    return 0


def _recipes_epilog(command: str) -> str:
    from dinosys.config.describe import shipped_recipes

    names = shipped_recipes(command)
    listed = ", ".join(names) if names else "(none yet)"
    return (f"shipped recipes (configs/{command}/): {listed}. `dinosys config show RECIPE` lists "
            f"every key with its type, default and help; `--diff` only what the recipe changes.")


def _add_config_args(p: argparse.ArgumentParser, with_out: bool = True) -> None:
    p.add_argument("config", help="YAML path or a name under configs/ (e.g. mnist_tiny_cpu)")
    if with_out:
        p.add_argument("--out", help="run directory (default: a new folder under runs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dinosys` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="dinosys",
        description="Visual foundation models end to end: data, DINOv2 pretraining, "
        "evaluation, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", help="datasets: build the embedded real data")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser("builtin", help="MNIST, digits and photos from installed wheels, offline")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--sets", help="comma-separated subset of mnist,digits,photos (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=_cmd_data_builtin)

    for command, help_text in TRAIN_COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text,
                           epilog=_recipes_epilog(command))
        _add_config_args(p)
        p.set_defaults(func=_cmd_train)

    # `dinosys eval NAME ...`: parsed by dinosys.eval.cli from the evaluator registry (imported
    # only for this command; `dinosys eval --help` lists the evaluators)
    p = sub.add_parser("eval", help="evaluate a model: knn, linear, suite, ... "
                       "(`dinosys eval --help`)", add_help=False, prefix_chars="\0")
    p.add_argument("eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a model: safetensors + config (+ timm, hf, onnx)")
    p.add_argument("--model", required=True, help="run directory or checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="native",
                   help="comma list of formats: native, timm, hf, onnx (ViT backbones), "
                   "open_clip (CLIP models); native (safetensors + config.json + model card) is "
                   "always written, the others go to OUT/<format>/ (default: native)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("config", help="see the settings: `dinosys config show RECIPE [--diff]`")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    c = csub.add_parser("show", help="every key of a recipe (or of a task's schema) with its "
                        "type, default, value and help text")
    c.add_argument("recipe", nargs="?", help="a recipe name under configs/ or a YAML path "
                   "(default: none; then --task shows that task's defaults)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    c.add_argument("--task", help="the task whose schema to show (default: the recipe's `task` "
                   "key, else ssl)")
    c.add_argument("--diff", action="store_true",
                   help="only the keys whose value differs from the schema default (default: off)")
    c.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("demo", help="the whole factory on the embedded data "
                       "(configs/pipeline/demo.yaml): pool -> curate -> pretrain -> distill, "
                       "text_align -> evaluate -> export")
    p.add_argument("--out", help="pipeline directory (default: a new folder under runs/)")
    p.add_argument("--data", default="data/builtin", help="where the embedded data is built")
    p.add_argument("--jobs", type=int, default=2, help="independent stages run at once "
                   "(distill and text_align share the 2 cores; default: 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of configs/pipeline/demo.yaml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pipeline", help="the factory as stages: all in order (complete ones "
                       "skipped), or one with --stage (a Slurm job)")
    p.add_argument("config", help="YAML path or a name under configs/pipeline/ (e.g. demo)")
    p.add_argument("--out", help="pipeline directory (default: the config's `out`, else a new "
                   "folder under runs/)")
    p.add_argument("--stage", help="run only this stage (its inputs must be complete): pool, "
                   "curate, pretrain, distill, text_align, evaluate, export")
    p.add_argument("--part", help="with --stage curate: this array task's part i/n (all n run "
                   "at once; part 0 merges and records the stage)")
    p.add_argument("--plan", action="store_true", help="print the enabled stages with their "
                   "inputs and resources, run nothing")
    p.add_argument("--jobs", type=int, default=1, help="independent stages run at once, each "
                   "in its own process (e.g. distill and text_align; default: 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("info", help="an exported model: architecture, provenance chain "
                       "(curation manifest, training run, teacher), evaluation results")
    p.add_argument("model", help="an exported model directory or a run directory")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    p.set_defaults(func=_cmd_info)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    """Parse, dispatch, and apply the error convention (shared by `dinosys-curate`)."""
    # key=value overrides may come before or after options such as --out
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except (UserError, NotAvailableError) as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dinosys` console script."""
    return run_cli(build_parser(), argv, "dinosys")


if __name__ == "__main__":
    sys.exit(main())
