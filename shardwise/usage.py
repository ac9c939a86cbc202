"""The command-line contract's pieces that every command uses (no torch imported here).

* :class:`UsageError`: bad input found after the arguments were checked (a late discovery, e.g.
  a file that turns out not to be a checkpoint); the CLI prints it as one line, exit code 2.
* :func:`require`: an optional dependency checked where it is used, naming the install line.
* :func:`int_range`, :func:`float_range`, :func:`port`, :func:`seed`: argparse types that refuse
  a bad value at parse time with the value and what would work.
* :func:`add_device_arguments`, :func:`check_device`: ``--device``, ``--dtype`` and
  ``--no-cuda-graphs`` for every command that runs a model.
* :class:`Parser`: argparse whose errors are one line (``shardwise serve: --tp: ...``), exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, NoReturn

EXTRAS = {  # importable name -> the extra that installs it
    "transformers": "hf", "safetensors": "hf", "gguf": "hf", "tokenizers": "hf",
    "fastapi": "serve", "uvicorn": "serve", "httpx": "serve", "llguidance": "serve",
    "matplotlib": "bench",
}


class UsageError(ValueError):
    """Bad input from the user: one line on stderr and exit code 2, never a traceback."""


def require(module: str, *, what: str) -> Any:
    """Import ``module`` (an optional dependency) for ``what``, or raise :class:`UsageError`
    with the install line. Only a missing ``module`` itself is the user's: an ImportError raised
    inside it (a broken install) propagates as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'shardwise[{extra}]'" if extra else f"pip install {module}"
        raise UsageError(f"{what} needs the {module!r} package, which is not installed: "
                         f"{hint}") from None


def int_range(low: int, *, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{v} must be {span}")
        return v
    parse.__name__ = "int"
    return parse


def float_range(low: float, *, high: float | None = None,
                strict: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float ``>= low`` (``> low`` when ``strict``), ``<= high``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (v > low if strict else v >= low) or not v < float("inf") or \
                (high is not None and v > high):
            span = f"{'>' if strict else '>='} {low:g}" + ("" if high is None else
                                                           f" and <= {high:g}")
            raise argparse.ArgumentTypeError(f"{text} must be {span}")
        return v
    parse.__name__ = "float"
    return parse


port = int_range(1, high=65535)
seed = int_range(-(2**63), high=2**63 - 1)  # int64, what torch's generators take


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("argument ", "", 1)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, the same for every command that runs a model."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where each rank runs: auto (default) is cuda:LOCAL_RANK with NCCL when "
                        "CUDA is present, else the CPU with gloo / shared memory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (with --quant: activations, scales and the "
                        "dense weights); auto (default): bfloat16 on a GPU, float32 on CPU "
                        "(with --quant: bfloat16 where the CPU has AVX512-BF16)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch decode steps kernel by kernel instead of replaying "
                        "captured CUDA graphs")


def check_device(args: argparse.Namespace) -> None:
    """``--device`` can be had here, and under torchrun the world matches ``--tp`` (ValueError
    naming the numbers otherwise)."""
    from .mesh import launch_env, pick_device, validate
    env = launch_env()
    pick_device(args.device, env.local_rank)
    if env.launched:
        try:
            validate(args.tp, 1, 1, env.world)
        except ValueError as e:
            raise ValueError(f"under torchrun: {e} (--nproc-per-node x --nnodes = --tp)") \
                from None
