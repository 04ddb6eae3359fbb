"""The command line: a flat settings dataclass parsed by transformers' HfArgumentParser,
per-world defaults, and the exits (one line for bad input, one line for Ctrl-C).
Infrastructure only (the science is in the experiments, common.py and the worlds)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
from pathlib import Path

from infra import parallel
from infra.hub import SetupError


def arg(default=None, help: str = "", **worlds):  # noqa: A002 -- the name HfArgumentParser reads
    """A settings field: its default, its --help line, and per-world defaults (`toy=60, math=100`)
    used where the flag is not given; --help shows them."""
    if worlds:
        shown = ", ".join(f"{w}: {_show(v)}" for w, v in worlds.items())
        help = f"{help} (default: {shown})"
    elif default is not None:
        help = f"{help} (default: {default})"
    return dataclasses.field(
        default=default, metadata=_Metadata(help=help.replace("%", "%%"), worlds=worlds)
    )


class _Metadata(dict):
    """Field metadata whose copy (what HfArgumentParser passes to add_argument) leaves out the
    per-world defaults, which argparse does not know."""

    def copy(self):
        return {k: v for k, v in self.items() if k != "worlds"}


def _show(v) -> str:
    return " / ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)


def world_defaults(s, world: str, **keys):
    """`s` with each unset (None) field taken from its per-world default; a default that is a dict
    is looked up further by `keys` (e.g. the lr by method)."""
    filled = {}
    for f in dataclasses.fields(s):
        worlds = f.metadata.get("worlds") or {}
        if getattr(s, f.name) is None and world in worlds:
            value = worlds[world]
            filled[f.name] = value[keys[f.name]] if isinstance(value, dict) else value
    return dataclasses.replace(s, **filled)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of a usage dump; an unknown flag names the closest real one."""
        flags = [
            o
            for a in self._actions
            for o in a.option_strings
            if o.startswith("--") and "_" not in o
        ]
        bad = re.search(r"unrecognized arguments: (\S+)", message)
        if bad:
            close = difflib.get_close_matches(bad.group(1).split("=")[0], flags, n=1, cutoff=0.6)
            message = f"unknown flag {bad.group(1)}" + (
                f"; did you mean {close[0]}?" if close else ""
            )
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_settings(cls, argv: list[str] | None = None):
    """`--field-name value` for each field of a flat dataclass (HfArgumentParser); bools as
    `--flag`, `--flag false` or `--no-flag`. No prefix matching (`--step` is not `--steps`)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser, _Parser):
        pass

    doc = (sys.modules[cls.__module__].__doc__ or "").split("\n")[0]
    parser = Parser(
        cls, description=doc, allow_abbrev=False, formatter_class=argparse.HelpFormatter
    )
    for f in dataclasses.fields(cls):  # `bool | None` flags: a bare --flag means true, as for bool
        if (
            isinstance(f.type, types.UnionType)
            and bool in f.type.__args__
            or f.type in ("bool | None",)
        ):
            for action in parser._actions:
                if action.dest == f.name:
                    action.nargs, action.const = "?", True
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


class Interrupted(Exception):
    """Ctrl-C during a run: carries the run directory so that `cli` can name where it stopped."""

    def __init__(self, run):
        super().__init__(str(run))
        self.run = Path(run)


def resume_command() -> str:
    """The command line of this process with --resume added: what continues an interrupted run."""
    import shlex

    args = [a for a in sys.argv[1:]] + ([] if "--resume" in sys.argv else ["--resume"])
    if parallel.world_size() > 1:
        launcher = [
            "torchrun",
            "--nproc_per_node",
            os.environ.get("LOCAL_WORLD_SIZE", str(parallel.world_size())),
        ]
    else:
        launcher = [
            Path(sys.executable).name
            if Path(sys.executable).parent == Path(".")
            else sys.executable
        ]
    return shlex.join(launcher + [sys.argv[0]] + args)


def progress(run: Path) -> str:
    """Where a run directory stands: its newest checkpoint step, or the stages it holds."""
    steps = sorted((run / "checkpoints").glob("step_*"))
    if steps:
        return f"last checkpoint at step {int(steps[-1].name[5:])}"
    stages = sorted(p.stem for p in (run / "stages").glob("*.json"))
    if stages:
        return f"finished stages {', '.join(stages)}"
    return "no checkpoint yet (a resume starts it again)"


def cli(main_fn, argv=None):
    """Run a script's main(); bad input ends with one clear line on stderr and exit code 2
    instead of a traceback; Ctrl-C with one line naming the last checkpoint and the command that
    resumes (exit 130)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        result = main_fn(argv)
        parallel.shutdown_distributed(exit_code=0)  # under torchrun: ends this process, status 0
        return result
    except (ValueError, FileExistsError, FileNotFoundError, SetupError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (Interrupted, KeyboardInterrupt) as e:
        if parallel.is_main():
            where = (
                f"{e.run}: {progress(e.run)}"
                if isinstance(e, Interrupted)
                else "before training began"
            )
            print(
                f"interrupted (Ctrl-C), {where}; continue with: {resume_command()}", file=sys.stderr
            )
        raise SystemExit(130) from None
