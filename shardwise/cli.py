"""The ``shardwise`` command: generate | serve | train | plan | verify | convert | bench | demo.

One contract for every command (also ``python -m shardwise ...`` and the ``python -m
shardwise.<command>`` entry points, which come through :func:`main` too):

* each command's module has ``add_arguments(parser)``, ``check(args)`` and ``run(args) -> int``;
* ``check`` validates everything it can before anything is spawned: a bad value there
  (``ValueError``, ``FileNotFoundError``, ...) or an argparse error is one line on stderr naming
  the value and what would work, exit code 2;
* ``run`` does the work; a :class:`~shardwise.usage.UsageError` it raises (bad input found late)
  is one line and exit 2 as well; anything else is a bug or a failure of the run: the traceback,
  exit code 1 (or the command's own code, e.g. ``verify``'s 3 for a difference over tolerance);
  a worker rank that failed (:class:`~shardwise.launch.WorkerError`) is printed as its rank,
  phase and error, then its traceback, exit code 1;
* optional dependencies are checked where they are used (:func:`shardwise.usage.require`) and
  name the install line; ``--traceback`` shows the stack of a user error too.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .failure import WorkerError
from .usage import Parser, UsageError, int_range

# subcommand -> (module, help)
COMMANDS = {
    "generate": ("shardwise.generate_cli",
                 "generate text from a prompt on N tensor-parallel ranks"),
    "serve": ("shardwise.serve.cli",
              "OpenAI-compatible server with continuous batching on N ranks"),
    "train": ("shardwise.train.cli", "train with tensor x pipeline x data parallelism"),
    "plan": ("shardwise.planner.cli", "recommend TP/PP/DP for a model, GPUs and interconnect, "
             "with reasons"),
    "verify": ("shardwise.verify", "compare a model at tp=N with tp=1 layer by layer"),
    "convert": ("shardwise.checkpoint.convert", "save, merge and reshard checkpoints"),
    "bench": ("shardwise.bench.cli", "measurements: comm, tp scaling, serving"),
    "demo": ("shardwise.cli",
             "a tensor-parallel block vs the unsharded one, on local gloo workers"),
}
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``shardwise demo``'s options."""
    parser.add_argument("--tp", type=int_range(1), default=2)


def check(args: argparse.Namespace) -> None:
    """``shardwise demo``: the block's 9 query heads must split over ``--tp`` ranks."""
    from .demo import CFG
    from .partition import HeadLayout
    HeadLayout(CFG.num_attention_heads, CFG.num_key_value_heads, args.tp)


def run(args: argparse.Namespace) -> int:
    """``shardwise demo``."""
    from .demo import main
    return main(args.tp)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="shardwise", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        if only is None or name == only:
            importlib.import_module(mod).add_arguments(p)
    return parser


def _user_error(args: argparse.Namespace, e: BaseException) -> int:
    if getattr(args, "traceback", False):
        raise e
    msg = str(e).strip().splitlines() or [type(e).__name__]
    print(f"shardwise {args.command}: error: {' '.join(m.strip() for m in msg)}",
          file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    only = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser(only).parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, already printed in one line)
        return e.code if isinstance(e.code, int) else 2
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        try:
            mod.check(args)
        except USER_ERRORS as e:
            return _user_error(args, e)
        try:
            return int(mod.run(args) or 0)
        except UsageError as e:
            return _user_error(args, e)
        except WorkerError as e:  # a rank failed: its rank, phase, error and traceback
            if getattr(args, "traceback", False):
                raise
            print(f"shardwise {args.command}: error: {e}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
