"""The ``shardwise`` command: generate | serve | train | plan | bench | verify | convert | demo.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
this file only dispatches. Bad input raises ``ValueError`` / ``FileNotFoundError`` and is printed
as one line, exit code 2 (``--traceback`` shows the whole stack). A failed worker rank
(:class:`~shardwise.launch.WorkerError`) is printed with its rank, phase and traceback, exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, add_arguments, run, help)
COMMANDS = {
    "generate": ("shardwise.generate_cli", "add_arguments", "run",
                 "generate text from a prompt on N tensor-parallel ranks"),
    "serve": ("shardwise.serve.cli", "add_arguments", "run",
              "OpenAI-compatible server with continuous batching on N ranks"),
    "train": ("shardwise.train.cli", "add_arguments", "run",
              "train with tensor x pipeline x data parallelism"),
    "plan": ("shardwise.planner.cli", "add_arguments", "run",
             "recommend TP/PP/DP for a model, GPUs and interconnect, with reasons"),
    "verify": ("shardwise.verify", "add_arguments", "run",
               "compare a model at tp=N with tp=1 layer by layer"),
    "convert": ("shardwise.checkpoint.convert", "add_arguments", "run",
                "save, merge and reshard checkpoints"),
    "bench": ("shardwise.bench.cli", "add_arguments", "run",
              "measurements: comm, tp scaling, serving"),
    "demo": ("shardwise.cli", "_demo_arguments", "_demo",
             "a tensor-parallel block vs the unsharded one, on local gloo workers"),
}


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2)


def _demo(args: argparse.Namespace) -> int:
    from .demo import main
    return main(args.tp)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__.splitlines()[0])
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if only is None or name == only:
            try:
                getattr(importlib.import_module(mod), add)(p)
            except ImportError as e:  # a subcommand whose extras are not installed
                p.set_defaults(_unavailable=f"{name} is unavailable: {e}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only).parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    mod, _, run, _ = COMMANDS[args.command]
    from .launch import WorkerError
    try:
        return int(getattr(importlib.import_module(mod), run)(args) or 0)
    except WorkerError as e:  # a rank failed: its rank, phase and traceback, exit 1
        if args.traceback:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError) as e:
        if args.traceback:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
