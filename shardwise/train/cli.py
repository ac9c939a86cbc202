"""``shardwise train``: arguments and entry point (also ``python -m shardwise.train``).

Locally it launches tp x pp x dp worker processes itself; under ``torchrun`` (RANK / WORLD_SIZE
set) each process trains in place, so the same command line runs across nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE --master-addr $HEAD \\
        -m shardwise.train --model smollm2-135m --data corpus.txt --tp 8 --pp 2 --dp 1
"""
from __future__ import annotations

import argparse
import sys

from ..usage import float_range, int_range, seed
from .config import RECOMPUTE, SCHEDULES, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model,
                   help="preset (debug, tiny, ...), smollm2-135m, an HF directory or a .gguf file")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="text files")
    for name in ("tp", "pp", "dp"):
        p.add_argument(f"--{name}", type=int_range(1), default=1, help=f"{name.upper()} degree")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split norms/residuals along the sequence across TP ranks")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="pipeline schedule")
    p.add_argument("--micro-batch", type=int_range(1), default=d.micro_batch,
                   help="sequences per micro-batch")
    p.add_argument("--global-batch", type=int_range(1), default=d.global_batch,
                   help="sequences per step (a multiple of micro-batch x dp)")
    p.add_argument("--seq-len", type=int_range(1), default=d.seq_len)
    p.add_argument("--steps", type=int_range(1), default=d.steps)
    p.add_argument("--lr", type=float_range(0.0, strict=True), default=d.lr,
                   help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float_range(0.0), default=d.min_lr,
                   help="end of the cosine decay")
    p.add_argument("--warmup", type=int_range(0), default=d.warmup, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float_range(0.0), default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float_range(0.0), default=d.max_grad_norm,
                   help="clip by the global norm (0: no clipping)")
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights and optimizer)")
    p.add_argument("--recompute", choices=RECOMPUTE, default=d.recompute,
                   help="activation recomputation: none; selective (norms, rope, SwiGLU: no "
                        "matmul or collective again); full (every decoder layer)")
    p.add_argument("--activation-checkpointing", dest="recompute", action="store_const",
                   const="full", help="alias of --recompute full")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=d.zero,
                   help="ZeRO over dp: 1 shards the AdamW states, 2 also the gradients "
                        "(0: plain DDP)")
    p.add_argument("--out", default=d.out_dir, help="log, plot and checkpoints go here")
    p.add_argument("--save-every", type=int_range(0), default=d.save_every,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint (any tp/pp/dp): OUT/checkpoints or a step dir")
    p.add_argument("--peak-tflops", type=float_range(0.0), default=d.peak_tflops,
                   help="per-device peak TFLOP/s for MFU (e.g. 989 for H100 bf16; 0: off)")
    p.add_argument("--workers", type=int_range(1), default=None,
                   help="expected number of processes (checked against tp x pp x dp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, data=list(args.data), tp=args.tp, pp=args.pp, dp=args.dp,
        sequence_parallel=args.sequence_parallel, schedule=args.schedule,
        micro_batch=args.micro_batch, global_batch=args.global_batch, seq_len=args.seq_len,
        steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        bf16=args.bf16, recompute=args.recompute, zero=args.zero,
        out_dir=args.out, save_every=args.save_every, save=not args.no_save, resume=args.resume,
        peak_tflops=args.peak_tflops, progress=not args.no_progress, workers=args.workers)


def check(args: argparse.Namespace) -> None:
    """Every check that needs no worker (:func:`shardwise.train.run.prepare`: the model, the
    layout, the batch arithmetic, the data files, the checkpoint to resume)."""
    from .run import prepare
    args.config = config_from_args(args)
    args.prepared = prepare(args.config)


def run(args: argparse.Namespace) -> int:
    """Train (after :func:`check`) and print the summary."""
    from .run import train
    if not hasattr(args, "prepared"):
        check(args)
    cfg = args.config
    res = train(cfg, prepared=args.prepared)
    from ..mesh import launch_env
    if launch_env().rank == 0 and res.get("losses"):
        last = res["records"][-1] if res.get("records") else {}
        print(f"steps {res['steps'][0]}-{res['steps'][-1]}: loss {res['losses'][0]:.4f} -> "
              f"{res['losses'][-1]:.4f}; {last.get('tokens_per_s', 0):.0f} tokens/s; "
              f"comm fraction max {max(last.get('comm_fraction', [0])):.0%}")
        print(f"log {cfg.out_dir}/train_log.jsonl, plot {res.get('plot')}, "
              f"checkpoint {cfg.out_dir}/checkpoints")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m shardwise.train ...``: the same as ``shardwise train ...``."""
    from ..cli import main as shardwise
    return shardwise(["train", *(sys.argv[1:] if argv is None else argv)])
