"""``shardwise verify``: run a model at tp=N and at tp=1 on the same input and compare, layer by layer.

The tool for "tensor parallelism broke my model". For each stage of the forward pass -- the
embedding, the hidden state after every decoder layer, the final logits -- it reports

* the largest absolute difference between the tp=N activation (gathered to full size) and the
  unsharded one, and whether it exceeds ``atol + rtol * max|reference|``;
* the collectives the stage issued on each rank (counted by :class:`~shardwise.comm.Ledger` between
  a forward pre-hook and a forward hook) against the theoretical count: per decoder layer two
  all-reduces in forward (after ``o_proj`` and ``down_proj``, a mixture of experts' block too),
  or with sequence parallelism two all-gathers and two reduce-scatters (one of each per
  attention / MLP block), and for OLMoE one all-reduce more (its q/k norm spans all heads);
  the embedding one all-reduce (a reduce-scatter under sequence parallelism); the
  vocabulary-parallel head none (an all-gather of the sequence under sequence parallelism);
* per rank: parameter bytes and peak RSS.

The first stage over tolerance names where the sharded model departs from the unsharded one.
Both sides run in fp32 on the device the mesh picks (``--device``: the GPU when CUDA is present);
under torchrun the launcher's processes are the tp ranks and rank 0 also runs the reference.
Tolerance: fp32 on CPU agrees to about 1e-5 per layer (different summation order in the
all-reduce); the default ``atol=1e-4, rtol=1e-4`` leaves an order of magnitude of headroom and
scales with the activations of real checkpoints, whose hidden states grow far above 1.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .comm import Ledger, all_gather_dim
from .failure import phase
from .layers import gather_logits
from .mesh import Mesh, group_size, launch_env, pick_device, subgroup, under_launcher
from .quant.config import QuantConfig
from .quant.load import weight_bytes

EXIT_EXCEEDED = 1


@dataclass
class VerifyJob:
    model: str
    tp: int
    batch: int = 2
    seq: int = 16
    seed: int = 0
    sequence_parallel: bool = False
    corrupt: tuple[str, int] | None = None  # test hook: (parameter name, tp rank) to perturb
    compile: bool = False  # also decode compiled vs eager on the tp=N model
    device: str = "auto"   # "auto" (CUDA when present), "cpu" or "cuda"
    quant: QuantConfig | None = None        # both sides quantized alike (shardwise.quant)


@dataclass
class Stage:
    name: str
    max_abs_diff: float
    max_abs_ref: float
    exceeds: bool
    collectives: dict[str, int]            # counted on rank 0 of the TP group
    expected: dict[str, int]               # theoretical forward count at this tp
    collectives_ok: bool


@dataclass
class Report:
    model: str
    tp: int
    sequence_parallel: bool
    atol: float
    rtol: float
    stages: list[Stage]
    first_exceeding: str | None
    ranks: list[dict[str, Any]] = field(default_factory=list)
    comm_backend: str = "none"
    compiled: dict[str, Any] | None = None  # compiled vs eager decode (rank 0), when checked

    @property
    def compiled_ok(self) -> bool:
        c = self.compiled
        return c is None or (c["max_abs_diff"] <= self.atol and c["tokens_equal"]
                             and c["eager_collectives"] == c["compiled_collectives"]
                             and c["graph_breaks"] == 0)

    @property
    def ok(self) -> bool:
        return self.first_exceeding is None and all(s.collectives_ok for s in self.stages) \
            and self.compiled_ok

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def expected_collectives(stage: str, tp: int, sequence_parallel: bool, *,
                         qk_norm_all: bool = False) -> dict[str, int]:
    """Theoretical forward collectives of one stage on one rank (nothing at tp=1).
    ``qk_norm_all``: the family's q/k norm spans all heads (OLMoE), one all-reduce more per
    layer for its statistics."""
    if tp == 1:
        return {}
    if stage == "embed_tokens":
        return {"reduce_scatter": 1} if sequence_parallel else {"all_reduce": 1}
    if stage == "logits":
        return {"all_gather": 1} if sequence_parallel else {}
    out = {"all_gather": 2, "reduce_scatter": 2} if sequence_parallel else {"all_reduce": 2}
    if qk_norm_all:
        out["all_reduce"] = out.get("all_reduce", 0) + 1
    return out


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _group_for(tp: int, device: str) -> tuple[Any, torch.device]:
    """The TP group of the first ``tp`` ranks and this rank's device: a fresh mesh, or a subgroup
    of a running pool's world (every rank of the world joins group creation; ranks >= tp get
    ``False``)."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() != tp:
        group = subgroup(list(range(tp)))
        return (group if dist.get_rank() < tp else False), pick_device("cpu")
    if tp == 1:
        return None, pick_device(device, launch_env().local_rank)
    mesh = Mesh.init(tp=tp, device=device)
    return mesh.tp_group, mesh.device


def _comm_backend(group) -> str:
    if group is None:
        return "none"
    from . import comm
    name = getattr(comm, "backend_name", None)
    if callable(name):
        return str(name(group))
    import torch.distributed as dist
    return str(dist.get_backend(group))


@torch.no_grad()
def run_rank(job: VerifyJob) -> dict[str, Any] | None:
    """One rank's forward with hooks: full activations by stage, ledger counts, memory."""
    from .checkpoint.source import build_model, resolve
    with phase("start"):
        group, device = _group_for(job.tp, job.device)
    if group is False:
        return None
    source = resolve(job.model, dense=job.quant is None)
    model = build_model(source, group=group, sequence_parallel=job.sequence_parallel,
                        seed=job.seed, device=device, quant=job.quant).eval()
    rank = 0 if group is None else torch.distributed.get_rank(group)
    if job.corrupt is not None and job.corrupt[1] == rank:
        params = dict(model.named_parameters())
        name = job.corrupt[0]
        if name not in params:
            raise ValueError(f"corrupt: no parameter {name!r} in the model")
        gen = torch.Generator().manual_seed(1234)
        p = params[name]
        noise = torch.randn(p.shape, generator=gen).to(p.dtype).to(device)
        p.add_(noise * p.float().std().clamp(min=1e-3))
    g = torch.Generator().manual_seed(job.seed + 1)
    ids = torch.randint(0, source.config.vocab_size, (job.batch, job.seq), generator=g)
    ids = ids.to(device)

    outputs: dict[str, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = {}
    before: dict[str, dict[str, int]] = {}
    modules = [("embed_tokens", model.model.embed_tokens)]
    modules += [(f"layers.{k}", m) for k, m in model.model.layers.items()]
    modules += [("logits", model.lm_head)]
    handles = []
    with phase("forward"), Ledger() as ledger:
        for name, mod in modules:
            def pre(_m, _a, name=name):
                before[name] = ledger.counts()

            def post(_m, _a, out, name=name):
                now, was = ledger.counts(), before[name]
                counts[name] = {k: v - was.get(k, 0) for k, v in now.items() if v - was.get(k, 0)}
                outputs[name] = out.detach()
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        model(ids)
    for h in handles:
        h.remove()
    full: dict[str, torch.Tensor] = {}
    for name, out in outputs.items():  # gather outside the ledger: not part of the model's cost
        if name == "logits":
            full[name] = gather_logits(out, model.lm_head)
        elif job.sequence_parallel and group_size(group) > 1:
            full[name] = all_gather_dim(out, group, 1)
        else:
            full[name] = out
    compiled = None
    if job.compile and not job.sequence_parallel:
        from .serve.compare import compare_compiled
        prompts = [ids[i].tolist() for i in range(ids.shape[0])]
        compiled = vars(compare_compiled(model, group, prompts, steps=8))
    return {"rank": rank, "outputs": {k: v.cpu() for k, v in full.items()} if rank == 0 else None,
            "counts": counts, "device": str(device),
            "compiled": compiled,
            "param_bytes": weight_bytes(model),
            "peak_rss_mib": round(_peak_rss_mib(), 1), "comm_backend": _comm_backend(group)}


def verify(model: str, tp: int, *, batch: int = 2, seq: int = 16, seed: int = 0,
           sequence_parallel: bool = False, atol: float = 1e-4, rtol: float = 1e-4,
           corrupt: tuple[str, int] | None = None, pool: Any = None,
           compile: bool = False, device: str = "auto",
           quant: QuantConfig | None = None) -> Report:
    """Compare ``model`` at ``tp`` ranks (spawned locally, on ``pool``, a
    :class:`~shardwise.launch.WorkerPool` of at least ``tp`` ranks, or torchrun's processes) with
    tp=1 in this process (rank 0's under torchrun). Under torchrun every rank returns the report.

    ``corrupt=(parameter name, rank)`` adds noise to that rank's slice of one parameter before
    the forward (a test hook: the report must then name that parameter's layer).
    """
    if tp < 1:
        raise ValueError(f"tp={tp}: must be >= 1")
    if sequence_parallel and seq % tp:
        raise ValueError(f"sequence parallelism needs seq % tp == 0 (seq={seq}, tp={tp})")
    job = VerifyJob(model, tp, batch, seq, seed, sequence_parallel, corrupt, compile, device, quant)
    if under_launcher() and tp > 1:
        ref, results = _launched(job)
    else:
        ref = run_rank(VerifyJob(model, 1, batch, seq, seed, device=device, quant=quant))
        results = _local(job, pool)
    from .checkpoint.source import resolve
    qk_all = resolve(model, dense=quant is None).config.arch.qk_norm_all
    stages, first = [], None
    for name, want in ref["outputs"].items():
        got = results[0]["outputs"][name]
        if got.shape != want.shape:
            raise ValueError(f"{name}: tp={tp} gives shape {tuple(got.shape)}, tp=1 "
                             f"{tuple(want.shape)}")
        finite = torch.isfinite(want)
        diff = float((got - want)[finite].abs().max()) if finite.any() else 0.0
        if not torch.equal(torch.isfinite(got), finite):
            diff = float("inf")
        scale = float(want[finite].abs().max()) if finite.any() else 0.0
        exceeds = not diff <= atol + rtol * scale
        expected = expected_collectives(name, tp, sequence_parallel, qk_norm_all=qk_all)
        seen = results[0]["counts"].get(name, {})
        same = all(r["counts"].get(name, {}) == seen for r in results)
        stages.append(Stage(name, diff, scale, exceeds, seen, expected, same and seen == expected))
        if exceeds and first is None:
            first = name
    ranks = [{k: r[k] for k in ("rank", "param_bytes", "peak_rss_mib")} for r in results]
    return Report(model, tp, sequence_parallel, atol, rtol, stages, first, ranks,
                  results[0]["comm_backend"], results[0].get("compiled"))


def _local(job: VerifyJob, pool: Any) -> list[dict]:
    """The tp ranks' results: in this process (tp=1), on ``pool`` or on spawned processes."""
    if job.tp == 1:
        return [run_rank(job)]
    if pool is not None:
        if pool.nprocs < job.tp:
            raise ValueError(f"tp={job.tp} needs a pool of >= {job.tp} workers, this one has "
                             f"{pool.nprocs}")
        return [r for r in pool.run(run_rank, job) if r is not None]
    from .launch import spawn
    return spawn(run_rank, job.tp, job)


def _launched(job: VerifyJob) -> tuple[dict, list[dict]]:
    """Under torchrun: every process runs its rank of ``job``; rank 0 also the tp=1 reference
    (before the sharded forward, which needs every rank); every rank gets both."""
    import torch.distributed as dist
    first = launch_env().rank == 0
    ref = run_rank(VerifyJob(job.model, 1, job.batch, job.seq, job.seed, device=job.device)) \
        if first else None
    mine = run_rank(job)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, (ref, mine))
    dist.destroy_process_group()
    return out[0][0], [r for _, r in out]


def format_report(rep: Report) -> str:
    sp = ", sequence parallel" if rep.sequence_parallel else ""
    lines = [f"{rep.model}: tp={rep.tp}{sp} vs tp=1 (tolerance {rep.atol:g} + {rep.rtol:g} x "
             f"max|ref|; comm {rep.comm_backend})",
             f"{'stage':<14} {'max |diff|':>11} {'max |ref|':>10}  {'status':<8} collectives "
             "(seen / theory)"]
    for s in rep.stages:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
        status = "EXCEEDS" if s.exceeds else "ok"
        comm = fmt(s.collectives) + ("" if s.collectives_ok else f"  != theory {fmt(s.expected)}")
        lines.append(f"{s.name:<14} {s.max_abs_diff:>11.3e} {s.max_abs_ref:>10.3g}  {status:<8} "
                     f"{comm}")
    for r in rep.ranks:
        lines.append(f"rank {r['rank']}: parameters {r['param_bytes'] / 2**20:.1f} MiB, "
                     f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    c = rep.compiled
    if c is not None:
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
        lines.append(f"compiled decode vs eager: max |diff| {c['max_abs_diff']:.3e}, greedy "
                     f"tokens {'identical' if c['tokens_equal'] else 'DIFFER'}, collectives per "
                     f"step {fmt(c['compiled_collectives'])} vs {fmt(c['eager_collectives'])}, "
                     f"{c['graphs']} graph(s), {c['graph_breaks']} graph break(s)")
    if rep.first_exceeding:
        lines.append(f"FAIL: {rep.first_exceeding} is the first stage over tolerance")
    elif not rep.compiled_ok:
        lines.append("FAIL: the compiled decode step departs from the eager one")
    elif not rep.ok:
        lines.append("FAIL: collective counts differ from theory")
    else:
        lines.append("OK: every stage within tolerance, collectives as in theory"
                     + ("; the compiled decode step equals the eager one" if c else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .usage import int_range, seed
    parser.add_argument("--model", required=True, help="preset, HF directory or .gguf file")
    parser.add_argument("--tp", type=int_range(1), required=True,
                        help="tensor-parallel ranks to compare")
    parser.add_argument("--sequence-parallel", type=int, choices=(0, 1), default=0)
    parser.add_argument("--batch", type=int_range(1), default=2)
    parser.add_argument("--seq", type=int_range(1), default=16)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compiled-vs-eager decode check")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda:LOCAL_RANK with NCCL when CUDA is present")
    from .quant.config import add_arguments as quant_arguments
    quant_arguments(parser)


def check(args: argparse.Namespace) -> None:
    """The model, the layout and the lengths, before any worker starts."""
    from .checkpoint.source import quant_for, resolve
    from .partition import HeadLayout
    from .quant.config import from_args
    args.quant_config = from_args(args)
    source = resolve(args.model, dense=args.quant_config is None)
    quant_for(source, args.quant_config)
    cfg = source.config
    HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
    if args.sequence_parallel and args.seq % args.tp:
        raise ValueError(f"sequence parallelism splits --seq={args.seq} over tp={args.tp} ranks: "
                         f"use a --seq that is a multiple of {args.tp}")
    from .usage import check_device
    check_device(args)
    if args.seq > cfg.max_position_embeddings:
        raise ValueError(f"--seq={args.seq} exceeds the model's {cfg.max_position_embeddings} "
                         "positions")


def run(args: argparse.Namespace) -> int:
    rep = verify(args.model, args.tp, batch=args.batch, seq=args.seq, seed=args.seed,
                 sequence_parallel=bool(args.sequence_parallel), atol=args.atol, rtol=args.rtol,
                 compile=not args.no_compile, device=args.device,
                 quant=getattr(args, "quant_config", None))
    if launch_env().rank == 0:  # under torchrun: rank 0 speaks for every rank
        print(json.dumps(rep.to_json(), indent=1) if args.json else format_report(rep))
    return 0 if rep.ok else EXIT_EXCEEDED


if __name__ == "__main__":
    from .cli import main
    sys.exit(main(["verify", *sys.argv[1:]]))
