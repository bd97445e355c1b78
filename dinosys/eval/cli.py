"""``dinosys eval NAME --model M [options]``: one subcommand per registered evaluator, its options
generated from the evaluator's config dataclass (see :mod:`dinosys.eval.registry`).

The same parsing serves ``launch/submit.py eval``: :func:`parse_request` turns the arguments into
an :class:`EvalRequest` (evaluator, model, validated config, output file) on the submitting
machine, and every task of the job runs :func:`run_request` on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinosys.errors import UserError
from dinosys.eval.registry import Evaluator, evaluators, get_evaluator, validate_config

log = logging.getLogger(__name__)


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (case-insensitive)."""
    low = text.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        item = args[0] if args else str
        kwargs.update(nargs="+", type=parse_bool if item is bool else item)
    elif hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            hint = next(a for a in args if a is not type(None))
        kwargs["type"] = hint
    if required:
        kwargs["required"] = True
    else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["default"] = default
        if kwargs["help"] and "action" not in kwargs:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            kwargs["help"] += f" (default: {shown})"
    parser.add_argument(_flag(f), **kwargs)


def add_evaluator_parser(sub: Any, evaluator: Evaluator) -> argparse.ArgumentParser:
    """``dinosys eval NAME``: --model, --out and one option per config field."""
    p = sub.add_parser(evaluator.name, help=evaluator.help, description=evaluator.help)
    p.add_argument("--model", required=True,
                   help="run directory, checkpoint or exported model; random:RUN (that "
                   "model's architecture, fresh weights, seed 0) or random:ARCH[:IMG_SIZE] "
                   "(e.g. random:vits14:224) for a random-init baseline")
    p.add_argument("--out", help="also write the JSON result to this file")
    hints = typing.get_type_hints(evaluator.config)
    for f in dataclasses.fields(evaluator.config):
        _add_field(p, f, hints[f.name])
    p.set_defaults(evaluator=evaluator.name)
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    """The parser of ``dinosys eval`` (every registered evaluator)."""
    parser = argparse.ArgumentParser(
        prog="dinosys eval", description="Evaluate a model with a registered evaluator; prints "
        "a summary and, as the last stdout line, the JSON result.")
    sub = parser.add_subparsers(dest="evaluator", metavar="EVALUATOR", required=True)
    for evaluator in evaluators().values():
        add_evaluator_parser(sub, evaluator)
    return parser


@dataclass
class EvalRequest:
    """A parsed, validated evaluation: what to run on which model, and where to write it."""

    evaluator: str
    model: str
    config: Any
    out: Path | None = None

    def command(self) -> str:
        """The `dinosys eval` command line that reproduces this request."""
        return command_line(self.evaluator, self.model, self.config)


def command_line(name: str, model: str, cfg: Any) -> str:
    """``dinosys eval NAME --model M`` plus every option that differs from its default."""
    import shlex

    words = ["dinosys", "eval", name, "--model", str(model)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                or value != default:
            if isinstance(value, bool):
                words.append(_flag(f) if value else "--no-" + _flag(f)[2:])
            elif isinstance(value, list):
                words += [_flag(f), *[str(v).lower() if isinstance(v, bool) else str(v)
                                      for v in value]]
            else:
                words += [_flag(f), str(value)]
    return shlex.join(words)


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    """An :class:`EvalRequest` from parsed ``dinosys eval`` arguments (validated)."""
    evaluator = get_evaluator(args.evaluator)
    if args.out and Path(args.out).is_dir():  # checked before a long evaluation, not after
        raise UserError(f"--out {args.out} is a folder; name the JSON file to write")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(evaluator.config)}
    cfg = evaluator.config(**values)
    validate_config(cfg)
    return EvalRequest(evaluator.name, args.model, cfg, Path(args.out) if args.out else None)


def parse_request(argv: Sequence[str]) -> EvalRequest:
    """Parse ``dinosys eval`` arguments; a usage error becomes one UserError line."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_eval_parser().parse_args(list(argv))
    except SystemExit as exc:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else f"invalid arguments: {' '.join(argv)}") from exc
    return request_from_args(args)


def run_request(request: EvalRequest) -> dict:
    """Run the request in this process (every rank of a distributed job calls it); rank 0
    writes ``request.out``. Initialises the process group from the environment when the job
    has several ranks."""
    from dinosys.atomic import write_atomic
    from dinosys.distributed.env import init_distributed
    from dinosys.eval.models import EvalModel
    from dinosys.eval.registry import run_evaluator

    env = init_distributed()
    try:
        model = EvalModel.load(request.model, env.device)
        result = run_evaluator(request.evaluator, model, request.config)
        result["command"] = request.command()
        result["world_size"] = env.world_size
        if request.out is not None and env.is_main:
            write_atomic(request.out, json.dumps(result, indent=2, sort_keys=True,
                                                 default=str) + "\n")
    finally:
        env.shutdown()
    result["rank"] = env.rank
    return result


def main(argv: Sequence[str]) -> int:
    """``dinosys eval ...``: parse, run, print the JSON result (rank 0)."""
    from dinosys.cli import print_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_eval_parser().parse_args(list(argv))
    result = run_request(request_from_args(args))
    if result.pop("rank") == 0:  # one summary per job, not one per rank
        print_json(result)
    return 0
