"""``shardwise plan``: options and the run function the top-level CLI dispatches to.

Contract: ``add_arguments(parser)`` adds every option to a (sub)parser; ``run(args)`` prints the
plan and returns 0 when a layout fits, 1 when none does. Bad input raises ValueError with the
numbers and the closest catalog names; the caller prints ``error: <message>`` and exits 2.
With ``--json`` stdout holds exactly one JSON object (the ``--plot`` notice goes to stderr).
"""
from __future__ import annotations

import argparse
import json
import sys

from . import calibration
from .gpus import GPUS, check_interconnect, default_interconnect, get_gpu
from .memory import WEIGHT_BYTES
from .model_catalog import MODELS, get_model
from .search import Cluster, ServeRequest, TrainRequest, plan
from .software import DEFAULT_SOFTWARE, SOFTWARE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` options to ``parser``."""
    g = parser.add_argument_group("what and where")
    g.add_argument("--model", help="catalog id (e.g. llama-2-70b, gpt3-175b) or path to an HF config.json")
    g.add_argument("--gpus", type=int, help="total number of GPUs")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    g.add_argument("--gpu", default="a100", help="GPU id, e.g. a100-80gb-sxm, h100-pcie, l40s; "
                   "short forms a100 (80 GB SXM) and h100 (SXM) (default a100)")
    g.add_argument("--interconnect", choices=("nvlink", "pcie"),
                   help="intra-node link (default: nvlink for SXM parts, pcie for PCIe cards)")
    g.add_argument("--network-gbps", type=float,
                   help="inter-node network per GPU in Gb/s (default from the GPU's reference system)")
    g.add_argument("--workload", choices=("train", "serve"), default="train")
    g.add_argument("--precision", default="bf16",
                   help="train: bf16 | fp16 (fp32 weights and AdamW, 16-bit autocast, as "
                        "`shardwise train --bf16`) | fp32; serve: bf16 | fp16 | fp8 | int8 | int4 "
                        "(default bf16)")
    t = parser.add_argument_group("training")
    t.add_argument("--seq-len", type=int, help="sequence length (default: the model's pre-training length)")
    t.add_argument("--global-batch", type=int, default=512, help="sequences per step (default 512)")
    t.add_argument("--micro-batch", type=int,
                   help="train: sequences per micro-batch; serve: sequences per replica (default: searched)")
    t.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism")
    t.add_argument("--recompute", choices=("none", "selective", "full"), default="selective",
                   help="activation recomputation (default selective)")
    t.add_argument("--zero", type=int, choices=(0, 1, 2), default=0,
                   help="ZeRO over dp: 1 shards the AdamW states, 2 also the gradients")
    t.add_argument("--zero1", dest="zero", action="store_const", const=1,
                   help="alias of --zero 1")
    t.add_argument("--virtual-stages", type=int, metavar="V",
                   help="model chunks per GPU for the interleaved 1F1B schedule (default: searched)")
    t.add_argument("--software", default=DEFAULT_SOFTWARE, choices=sorted(SOFTWARE),
                   help="kernels and overlaps of the training software (default megatron-core; "
                        "the megatron-2021/2022 presets reproduce the papers' runs)")
    t.add_argument("--no-dp-overlap", action="store_true",
                   help="do not overlap the gradient all-reduce with the backward pass")
    s = parser.add_argument_group("serving")
    s.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (default 1024)")
    s.add_argument("--output-len", type=int, default=256, help="generated tokens (default 256)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent requests (default 16)")
    s.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="KV cache type")
    s.add_argument("--ttft-ms", type=float, help="time-to-first-token target, ms")
    s.add_argument("--tpot-ms", type=float, help="time-per-output-token target, ms")
    o = parser.add_argument_group("layout and output")
    o.add_argument("--tp", type=int, help="pin the tensor-parallel degree")
    o.add_argument("--pp", type=int, help="pin the pipeline-parallel degree")
    o.add_argument("--dp", type=int, help="pin the data-parallel degree")
    o.add_argument("--ep", type=int, help="mixture of experts: pin the expert-parallel degree (TP "
                   "groups side by side that split the experts; GPUs = tp x ep x pp x dp)")
    o.add_argument("--expert-tp", type=int, metavar="N", help="mixture of experts: pin the ranks "
                   "each expert spans inside its TP group (tp: tensor-parallel experts; 1: whole "
                   "experts, expert parallelism within the TP group)")
    o.add_argument("--calibration", metavar="FILE",
                   help="measured collectives (JSON from `shardwise bench comm`) for intra-node links")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    o.add_argument("--plot", metavar="FILE.png", help="write the trade-off picture")
    o.add_argument("--list", action="store_true", help="list the model and GPU catalogs")


def _catalogs() -> str:
    lines = ["models:"] + [f"  {m.name:22s} {m.total_params() / 1e9:8.2f}B  {m.source[:80]}"
                           for m in MODELS.values()]
    lines += ["gpus:"] + [f"  {g.name:16s} {g.memory_gib:5g} GiB {g.bf16_tflops or g.fp16_tflops:5g} TFLOPS "
                          f"{g.hbm_GBps:5g} GB/s  NVLink {g.nvlink_GBps:g} GB/s  PCIe gen{g.pcie_gen}"
                          for g in GPUS.values()]
    return "\n".join(lines)


def build_request(args: argparse.Namespace, seq_default: int) -> TrainRequest | ServeRequest:
    if args.workload == "train":
        if args.virtual_stages is not None and args.virtual_stages < 1:
            raise ValueError(f"--virtual-stages must be at least 1, got {args.virtual_stages}")
        return TrainRequest(seq=args.seq_len or seq_default, global_batch=args.global_batch,
                            micro_batch=args.micro_batch, precision=args.precision,
                            sp=args.sequence_parallel, recompute=args.recompute, zero=args.zero,
                            dp_overlap=not args.no_dp_overlap, virtual_stages=args.virtual_stages,
                            software=args.software)
    if args.precision not in WEIGHT_BYTES:
        raise ValueError(f"--precision {args.precision!r}: serving supports {', '.join(WEIGHT_BYTES)}")
    for name in ("ttft_ms", "tpot_ms"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    return ServeRequest(prompt=args.prompt_len, output=args.output_len, concurrency=args.concurrency,
                        precision=args.precision, kv_bytes=2.0 if args.kv_dtype == "bf16" else 1.0,
                        ttft_target_s=args.ttft_ms / 1e3 if args.ttft_ms else None,
                        tpot_target_s=args.tpot_ms / 1e3 if args.tpot_ms else None, batch=args.micro_batch)


def make_plan(args: argparse.Namespace):
    """Parse the options into a :class:`~shardwise.planner.search.Plan` (raises ValueError)."""
    if not args.model:
        raise ValueError("--model is required: a catalog id (see --list) or a path to an HF config.json")
    if args.gpus is None:
        raise ValueError("--gpus is required (total number of GPUs)")
    model = get_model(args.model)
    gpu = get_gpu(args.gpu)
    inter = args.interconnect or default_interconnect(gpu)
    check_interconnect(gpu, inter)
    if args.network_gbps is not None and args.network_gbps <= 0:
        raise ValueError(f"--network-gbps must be positive, got {args.network_gbps}")
    measured = calibration.load(args.calibration).link() if args.calibration else None
    cluster = Cluster(gpu, args.gpus, args.gpus_per_node, inter, args.network_gbps or gpu.network_gbps,
                      measured)
    return plan(model, cluster, build_request(args, model.seq_len), tp=args.tp, pp=args.pp, dp=args.dp,
                ep=args.ep, expert_tp=args.expert_tp)


def check(args: argparse.Namespace) -> None:
    """Validate the options (ValueError with the numbers and the closest names) and the extras."""
    if args.list:
        return
    if args.plot:
        from ..usage import require
        require("matplotlib", what="--plot")
    args.plan = make_plan(args)


def run(args: argparse.Namespace) -> int:
    """Print the plan (text or JSON), write the plot if asked; 0 if a layout fits, else 1."""
    if args.list:
        print(_catalogs())
        return 0
    p = args.plan if getattr(args, "plan", None) is not None else make_plan(args)
    from .report import to_json, to_text

    if args.json:
        print(json.dumps(to_json(p), indent=2))
    else:
        print(to_text(p))
    if args.plot:
        from .plot import plot_candidates
        print(f"wrote {plot_candidates(p, args.plot)}", file=sys.stderr)
    return 0 if p.best else 1
