"""``shardwise bench comm | step | decode | serve``: argument parsing and output (JSON, table,
plot)."""
from __future__ import annotations

import argparse
import json
import os

from ..usage import float_range, int_range

DEFAULT_STEP_OUT = "benchmarks/tp_step"


def _sizes(text: str) -> tuple[int, ...]:
    """``"4:64M"`` (powers of 4 from 4 B to 64 MiB) or a comma list ``"4,1K,1M"``."""
    def one(s: str) -> int:
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:].upper(), 1)
        return int(s[:-1] if mult > 1 else s) * mult
    try:
        if ":" in text:
            lo, hi = (one(x) for x in text.split(":"))
            out, s = [], lo
            while s <= hi:
                out.append(s)
                s *= 4
            return tuple(out)
        return tuple(one(x) for x in text.split(",") if x)
    except ValueError:
        raise ValueError(f"--sizes {text!r}: use LO:HI (e.g. 4:64M, powers of 4) or a list "
                         "(e.g. 4,1K,1M)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    c = sub.add_parser("comm", help="latency and bus bandwidth of the collectives vs size")
    c.add_argument("--nprocs", type=int_range(1), default=2, help="local ranks (default 2)")
    c.add_argument("--sizes", type=_sizes, default="4:64M",
                   help="message sizes: LO:HI in x4 steps, or a list (default 4:64M)")
    c.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter")
    c.add_argument("--backend", choices=("auto", "native", "dist"), default="auto",
                   help="auto: shardwise.comm's path (shared memory on one host); native: the "
                        "same with its all-reduce in C++ (the inference engines' path); "
                        "dist: torch.distributed directly (gloo)")
    c.add_argument("--iters", type=int_range(1), default=50, help="timed calls per size, at most")
    c.add_argument("--budget", type=float_range(0.0, strict=True), default=0.5,
                   help="seconds per size, about")
    c.add_argument("--json", metavar="FILE", help="write the calibration file for plan")

    s = sub.add_parser("step", help="TP training/decode step vs PyTorch TP and one process")
    s.add_argument("--preset", choices=("issue7", "tiny"), default="issue7")
    s.add_argument("--rounds", type=int_range(1), default=3, help="interleaved rounds A B C D ...")
    s.add_argument("--train-steps", type=int_range(1), default=4,
                   help="timed training steps per round")
    s.add_argument("--decode-steps", type=int_range(1), default=10,
                   help="timed decode steps per round")
    s.add_argument("--out", default=DEFAULT_STEP_OUT,
                   help="write OUT.json and OUT.png (default benchmarks/tp_step)")
    s.add_argument("--no-plot", action="store_true")

    d = sub.add_parser("decode", help="batch-1 decode and prefill beside llama.cpp")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--tp", default="1,2", help="comma-separated tp degrees (default 1,2)")
    d.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    d.add_argument("--quant", default="none",
                   help="comma-separated weights: none (the dtype's), int8, int4 (default none)")
    d.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    d.add_argument("--prefill-tokens", type=int, default=128)
    d.add_argument("--decode-tokens", type=int, default=64)
    d.add_argument("--no-compile", action="store_true", help="eager steps only")
    d.add_argument("--freezing", action="store_true",
                   help="add the compiled step with inductor's freezing (\"frozen\")")
    d.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    d.add_argument("--transformers", action="store_true", help="add transformers eager")
    d.add_argument("--json", metavar="FILE", help="write the results as JSON")

    v = sub.add_parser("serve", help="serving throughput (shardwise.serve)")
    from ..serve.cli import add_bench_arguments
    add_bench_arguments(v)


def check(args: argparse.Namespace) -> None:
    """The options of each measurement, and its extras, before anything is spawned."""
    from ..usage import require
    if args.bench == "comm":
        from .comm import OPS
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"--ops {args.ops!r}: use a comma list of {', '.join(OPS)}")
    elif args.bench == "step":
        if args.out and not args.no_plot:
            require("matplotlib", what="bench step's plot (or pass --no-plot)")
    elif args.bench == "decode":
        _check_decode(args)
    else:
        from ..serve.cli import check_bench
        check_bench(args)


def run(args: argparse.Namespace) -> int:
    if args.bench == "comm":
        return _run_comm(args)
    if args.bench == "step":
        return _run_step(args)
    if args.bench == "decode":
        return _run_decode(args)
    from ..serve.cli import run_bench
    return int(run_bench(args) or 0)


def _run_comm(args: argparse.Namespace) -> int:
    from .comm import bench_comm, format_table
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    sizes = args.sizes if isinstance(args.sizes, tuple) else _sizes(args.sizes)
    res = bench_comm(args.nprocs, sizes, ops, backend=args.backend, iters=args.iters,
                     budget_s=args.budget)
    print(format_table(res))
    if args.json:
        _write_json(args.json, res)
        print(f"wrote {args.json} (use: shardwise plan --calibration {args.json} ...)")
    return 0


def _run_step(args: argparse.Namespace) -> int:
    from .step import bench_step, format_table, plot
    res = bench_step(args.preset, rounds=args.rounds, train_steps=args.train_steps,
                     decode_steps=args.decode_steps)
    print(format_table(res))
    if args.out:
        _write_json(args.out + ".json", res)
        if not args.no_plot:
            plot(res, args.out + ".png")
        print(f"wrote {args.out}.json" + ("" if args.no_plot else f" and {args.out}.png"))
    return 0


def _check_decode(args: argparse.Namespace) -> None:
    """tp degrees and dtypes of ``bench decode`` before anything is spawned."""
    try:
        tps = [int(t) for t in args.tp.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--tp {args.tp!r}: use a comma list of positive integers") from None
    if not tps or min(tps) < 1:
        raise ValueError(f"--tp {args.tp!r}: use a comma list of positive integers, e.g. 1,2")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
        raise ValueError(f"--dtype {args.dtype!r}: use a comma list of float32, bfloat16")
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    if not quants or set(quants) - {"none", "int8", "int4"}:
        raise ValueError(f"--quant {args.quant!r}: use a comma list of none, int8, int4")
    if args.rounds < 1 or args.decode_tokens < 1 or args.prefill_tokens < 1:
        raise ValueError(f"--rounds {args.rounds}, --decode-tokens {args.decode_tokens} and "
                         f"--prefill-tokens {args.prefill_tokens} must each be >= 1")


def _run_decode(args: argparse.Namespace) -> int:
    from .decode import bench_decode, format_table
    res = bench_decode(model=args.model, tps=tuple(int(t) for t in args.tp.split(",") if t),
                       dtypes=tuple(d for d in args.dtype.split(",") if d),
                       modes=("eager",) if args.no_compile else
                       ("eager", "compiled") + (("frozen",) if args.freezing else ()),
                       rounds=args.rounds, prefill=args.prefill_tokens,
                       decode=args.decode_tokens, llama=not args.no_llama,
                       transformers=args.transformers,
                       quants=tuple(q.strip() for q in args.quant.split(",") if q.strip()))
    print(format_table(res))
    if args.json:
        _write_json(args.json, res)
    return 0


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m shardwise.bench ...``: the same as ``shardwise bench ...``."""
    import sys

    from ..cli import main as shardwise
    return shardwise(["bench", *(sys.argv[1:] if argv is None else argv)])
