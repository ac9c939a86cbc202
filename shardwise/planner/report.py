"""Turn a :class:`~shardwise.planner.search.Plan` into sentences, a table and a JSON object."""
from __future__ import annotations

import math
from dataclasses import asdict

from . import gpus as G
from . import kernels as K
from .memory import FRAGMENTATION, GiB, RUNTIME_BYTES, WEIGHT_BYTES
from .search import Candidate, Plan, TrainRequest
from .software import get_software
from .timing import ServeTime, TrainTime, training_flops

SHOW = 8  # rows of each table in the text report


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if abs(x) < 1 else f"{x:.1f} s"


def _pct(x: float) -> str:
    return "<1%" if 0 < x < 0.005 else f"{100 * x:.0f}%"


def components(c: Candidate) -> dict[str, float]:
    """Where the time goes. Training: seconds of one step. Serving: seconds per generated token of
    the whole deployment (they sum to 1 / throughput), split into decode and prefill parts."""
    t = c.time
    if isinstance(t, TrainTime):
        m = t.micro_batches
        return {"compute": m * t.compute_s, "TP all-reduce": m * t.tp_comm_s,
                "EP all-to-all": m * t.ep_comm_s,
                "pipeline sends": m * t.p2p_s, "pipeline bubble": t.bubble_s,
                "DP all-reduce (exposed)": t.dp_exposed_s, "optimizer": t.optimizer_s,
                "embedding all-reduce": t.embedding_sync_s}
    assert isinstance(t, ServeTime)
    per_dec = t.output / (t.dp * t.batch * t.output)  # decode steps per generated token
    per_pre = t.batch / (t.dp * t.batch * t.output)  # prefills per generated token
    main = max(t.decode_compute_s, t.decode_memory_s)
    hop = t.tpot_s - main - t.decode_comm_s - t.decode_a2a_s
    what = "reading weights and KV cache" if t.decode_memory_s >= t.decode_compute_s else "compute"
    return {f"decode {what}": main * per_dec, "decode TP all-reduce": t.decode_comm_s * per_dec,
            "decode EP all-to-all": t.decode_a2a_s * per_dec,
            "pipeline hops": max(0.0, hop) * per_dec,
            "prefill": (t.prefill_busy_s - t.prefill_comm_s - t.prefill_a2a_s) * per_pre,
            "prefill TP all-reduce": t.prefill_comm_s * per_pre,
            "prefill EP all-to-all": t.prefill_a2a_s * per_pre}


def tp_share(c: Candidate) -> float:
    """Share of a training step, or of a decode step, spent in TP collectives."""
    t = c.time
    return t.tp_share if isinstance(t, TrainTime) else t.decode_comm_share


def _headline(p: Plan, c: Candidate) -> str:
    lay, mem, cap = c.layout, c.memory.total / GiB, p.cluster.gpu.memory_gib
    if p.workload == "train":
        t = c.time
        v = f", {t.virtual_stages} model chunks per GPU (interleaved)" if t.virtual_stages > 1 else ""
        return (f"{lay.short()} with micro-batch {lay.micro_batch}{v}: {c.throughput:,.0f} tokens/s, step "
                f"{_ms(t.step_s)}, {mem:.1f} of {cap:g} GiB per GPU")
    t = c.time
    return (f"{lay.short()} ({lay.micro_batch} sequences per replica): {c.throughput:,.0f} output tokens/s, "
            f"TTFT {_ms(t.ttft_s)}, TPOT {_ms(t.tpot_s)}, {mem:.1f} of {cap:g} GiB per GPU")


def _placement(p: Plan, c: Candidate) -> str:
    tp = c.layout.tp
    if tp == 1:
        return "No tensor parallelism: every GPU holds whole layers, so no all-reduce sits on the critical path."
    cl = p.cluster
    link = cl.link(tp, 1)
    where = "inside one node" if cl.within_node(tp, 1) else "across nodes"
    head = (f"Its TP group of {tp} GPUs sits {where} on {link.kind} ({link.busbw_GBps:.0f} GB/s bus "
            f"bandwidth, {link.alpha_s * 1e6:.0f} us latency)")
    t = c.time
    if p.workload == "serve":
        return (f"{head}: the {2 * p.model.layers} all-reduces of a decode step take "
                f"{_ms(t.decode_comm_s)} of its {_ms(t.tpot_s)} ({_pct(t.decode_comm_share)}), and "
                f"{_ms(t.prefill_comm_s * c.layout.pp)} of the {_ms(t.ttft_s)} prefill.")
    per = (6 if p.request.recompute == "full" else 4) * -(-p.model.layers // c.layout.pp)
    kind = "all-gather/reduce-scatter pairs" if p.request.sp else "all-reduces"
    return f"{head}: its {per} {kind} per micro-batch take {_pct(t.tp_share)} of the step."


def placement_kind(lay) -> str:
    """How a layout places the experts: "tp" (every expert split over its TP group), "ep within tp"
    (whole experts, or a few ranks each, inside the TP group), or "ep" (TP groups side by side)."""
    if lay.ep > 1:
        return "ep"
    return "ep within tp" if lay.etp is not None and lay.etp < lay.tp else "tp"


_KIND_WORDS = {"tp": "tensor-parallel experts (each expert split over its TP group)",
               "ep within tp": "expert parallelism within the TP group (whole experts per rank)",
               "ep": "expert parallelism beside TP (TP groups split the experts and exchange "
                     "tokens by all-to-all)"}


def _rivals(p: Plan) -> list[Candidate]:
    """The best layout of each other expert placement than the winner's."""
    kind = placement_kind(p.candidates[0].layout)
    out = []
    for other in ("tp", "ep within tp", "ep"):
        alt = next((c for c in p.candidates if placement_kind(c.layout) == other), None)
        if other != kind and alt is not None:
            out.append(alt)
    return out


def experts_choice(p: Plan) -> str | None:
    """TP or EP for the experts, and why: the best layout of each kind, compared."""
    if not p.model.is_moe or not p.candidates:
        return None
    best = p.candidates[0]
    kind = placement_kind(best.layout)
    m, lay = p.model, best.layout
    held = -(-m.experts // (lay.ep * lay.tp // (lay.etp or lay.tp)))
    out = (f"Experts: {_KIND_WORDS[kind]}, {held} of the {m.experts} experts on each GPU, "
           f"{'all' if (lay.etp or lay.tp) == 1 else f'1/{lay.etp or lay.tp}'} of each expert's "
           f"{m.ffn} columns.")
    for other in ("tp", "ep within tp", "ep"):
        if other == kind:
            continue
        alt = next((c for c in p.candidates if placement_kind(c.layout) == other), None)
        if alt is not None:
            out += f" Best with {other}: " + _versus(p, best, alt)
        else:
            why = [c for c in p.rejected if placement_kind(c.layout) == other and c.reason]
            if why:
                near = min(why, key=lambda c: c.layout.dp)
                out += f" No layout with {other} works ({near.layout.short()}: {near.reason})."
    return out


def _why_split(p: Plan) -> str | None:
    m, gpu = p.model, p.cluster.gpu
    wb = 4 if p.workload == "train" else WEIGHT_BYTES[p.request.precision]
    need = m.total_params() * wb
    if need <= gpu.memory_bytes:
        return None
    shards = math.ceil(need / gpu.memory_bytes)
    prec = "fp32" if p.workload == "train" else p.request.precision
    return (f"The weights alone are {need / 1e9:.0f} GB ({need / GiB:.1f} GiB) at {prec}, more than one "
            f"{gpu.memory_gib:g} GiB {gpu.name}, so each copy must be split over at least {shards} GPUs "
            f"(tp x pp >= {shards}).")


def _versus(p: Plan, best: Candidate, other: Candidate) -> str:
    a, b = components(best), components(other)
    key = max(b, key=lambda k: b[k] - a.get(k, 0.0))
    loss = 1 - other.throughput / best.throughput
    if p.workload == "train":
        gap = other.time.step_s - best.time.step_s
        note = ""
        if key == "compute" and other.layout.pp > 1:
            per = -(-p.model.layers // other.layout.pp)
            note = (f"; its busiest stage holds {per} of {p.model.layers} layers plus the output layer, "
                    f"the others wait for it")
        return (f"{other.layout.short()} (micro-batch {other.layout.micro_batch}) is {_pct(loss)} slower: "
                f"step {_ms(other.time.step_s)} ({'+' if gap >= 0 else ''}{_ms(gap)}), mostly "
                f"{key} ({_ms(b[key])} vs {_ms(a.get(key, 0.0))}){note}.")
    us = lambda x: f"{x * 1e3:.2f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"  # noqa: E731
    return (f"{other.layout.short()} gives {_pct(loss)} less throughput ({other.throughput:,.0f} tokens/s, "
            f"TPOT {_ms(other.time.tpot_s)}, TTFT {_ms(other.time.ttft_s)}): per generated token it "
            f"spends {us(b[key])} on {key} vs {us(a.get(key, 0.0))}.")


def _rejections(p: Plan) -> str | None:
    if not p.rejected:
        return None
    kinds: dict[str, list[Candidate]] = {}
    for c in p.rejected:
        r = c.reason or ""
        k = ("out of memory" if r.startswith("out of memory") else "TP across nodes"
             if r.startswith("TP across") else "latency target missed" if "target" in r else "invalid")
        kinds.setdefault(k, []).append(c)
    parts = [f"{len(v)} {k} (e.g. {v[0].layout.short()})" for k, v in kinds.items()]
    return f"{len(p.rejected)} layouts rejected: " + "; ".join(parts) + "."


def _remedies(p: Plan) -> str:
    r = p.request
    if p.workload == "train":
        tips = (["--sequence-parallel (activations / tp)"] if not r.sp else []) + \
               (["--recompute full (2 s b h per layer)"] if r.recompute != "full" else []) + \
               (["--zero 1 (AdamW states / dp)"] if not r.zero else
                ["--zero 2 (gradients / dp)"] if r.zero == 1 else []) + \
               ["a shorter --seq-len", "more GPUs"]
    else:
        tips = (["a lower --precision (fp8, int8, int4)"] if r.precision in ("bf16", "fp16") else []) + \
               (["--kv-dtype fp8"] if r.kv_bytes > 1 else []) + ["a lower --concurrency", "more GPUs"]
    return "To make it fit, try " + ", ".join(tips[:-1]) + " or " + tips[-1] + "."


def explain(p: Plan) -> list[str]:
    """A few plain sentences: the winner, why it splits the way it does, the runners-up."""
    best = p.best
    out = [s for s in (_why_split(p),) if s]
    if best is None:
        sized = [c for c in p.rejected if c.memory is not None] or p.rejected
        near = min(sized, key=lambda c: c.memory.total if c.memory else 0.0) if sized else None
        out += [f"No layout fits. Closest: {near.layout.short()}: {near.reason}."] if near else []
        return out + [_remedies(p)]
    out.insert(0, ("Evaluated " if p.pinned else "Best: ") + _headline(p, best) + ".")
    out.append(_placement(p, best))
    if (e := experts_choice(p)):
        out.append(e)
    shown = _rivals(p) if p.model.is_moe else []
    out += [_versus(p, best, o) for o in p.candidates[1:3] if o not in shown]
    if p.workload == "serve" and len(p.candidates) > 1:
        fastest = min(p.candidates, key=lambda c: c.time.tpot_s)
        if fastest is not best:
            rank = p.candidates.index(fastest) + 1
            out.append(f"{fastest.layout.short()} has the lowest TPOT ({_ms(fastest.time.tpot_s)}, "
                       f"{_pct(fastest.time.decode_comm_share)} of it all-reduce) but ranks {rank} on "
                       f"throughput; set --tpot-ms to rank by a latency target.")
    if (r := _rejections(p)):
        out.append(r)
    return out


def assumptions(p: Plan) -> list[str]:
    cl = p.cluster
    gpu = cl.gpu
    link = cl.intra(8)
    ceiling = gpu.fp16_tflops * gpu.matmul_fraction
    out = [f"GEMMs from their shapes: {ceiling:.0f} TFLOP/s measured matmul ceiling on {gpu.name} "
           f"({_pct(gpu.matmul_fraction)} of dense peak) x {K.SUSTAINED_MATMUL:g} sustained in a step, "
           f"tile and wave quantization over {gpu.sms} SMs, roofline at the memory bandwidth",
           f"memory-bound kernels at up to {_pct(K.STREAM_CURVE[-1][1] * K.SUSTAINED_STREAM)} of "
           f"{gpu.hbm_GBps:g} GB/s (less for small transfers)",
           f"intra-node: {link.describe()}",
           f"network: {cl.network_gbps:g} Gb/s per GPU at {_pct(G.NETWORK_EFFICIENCY)}, "
           f"{G.ALPHA_S['network'] * 1e6:.0f} us",
           f"overhead per GPU: {RUNTIME_BYTES / GiB:g} GiB runtime + {_pct(FRAGMENTATION)} of capacity"]
    if p.workload == "train":
        copies = "" if p.request.precision == "fp32" else \
            " + a 16-bit autocast copy of each matmul weight (2 B)"
        out.append(f"as `shardwise train`: fp32 weights, gradients and AdamW m, v (16 B/param){copies}; "
                   "1F1B pipeline schedule, interleaved with v model chunks per GPU when v > 1")
        sw = get_software(p.request.software)
        out.append(f"software {sw.name}: {sw.description}")
    if p.model.is_moe:
        out.append(f"experts: {p.model.experts}, top-{p.model.top_k}; routing assumed balanced (the "
                   "load-balancing loss's aim: every expert gets T k / E rows); a decode step reads "
                   "only the experts its tokens chose; all-to-alls are not overlapped")
    if p.workload == "serve":
        out.append("TTFT = prefill of one prompt on an idle replica; throughput counts each request's "
                   "prefill and its decode steps at the full batch; int8/int4 are weight-only "
                   "(16-bit compute), embeddings stay 16-bit")
        if p.request.precision == "fp8" and not cl.gpu.fp8_tflops:
            out.append(f"{cl.gpu.name} has no FP8 tensor cores: fp8 is modelled as weight-only (16-bit compute)")
    return out


def _layout(p: Plan, lay) -> dict:
    """The layout's fields; the expert placement (ep, etp) only for a mixture of experts."""
    d = asdict(lay)
    if not p.model.is_moe:
        del d["ep"], d["etp"]
    return d


def _cand_dict(p: Plan, c: Candidate) -> dict:
    d: dict = {"layout": _layout(p, c.layout)}
    if c.reason:
        d["reason"] = c.reason
    if c.memory is not None:
        d["memory_per_gpu_gib"] = round(c.memory.total / GiB, 3)
        d["memory_gib"] = c.memory.gib()
        d["memory_bytes"] = {k: int(v) for k, v in asdict(c.memory).items()}
    t = c.time
    if isinstance(t, TrainTime):
        n = p.cluster.gpus
        r = p.request
        flops = training_flops(p.model, r.global_batch, r.seq, r.recompute)
        model_flops = training_flops(p.model, r.global_batch, r.seq, "none")
        peak = p.cluster.gpu.peak_flops(r.precision)
        d.update(virtual_stages=t.virtual_stages, step_time_s=t.step_s, throughput_tokens_per_s=c.throughput,
                 tflops_per_gpu=flops / t.step_s / n / 1e12, mfu=model_flops / t.step_s / n / peak,
                 tp_comm_share=t.tp_share, bubble_share=t.bubble_s / t.step_s,
                 dp_allreduce_s=t.dp_comm_s, dp_exposed_s=t.dp_exposed_s,
                 ep_alltoall_share=t.micro_batches * t.ep_comm_s / t.step_s)
    elif isinstance(t, ServeTime):
        d.update(ttft_s=t.ttft_s, tpot_s=t.tpot_s, throughput_tokens_per_s=c.throughput,
                 decode_allreduce_share=t.decode_comm_share, prefill_allreduce_s=t.prefill_comm_s,
                 decode_alltoall_share=t.decode_a2a_share, prefill_alltoall_s=t.prefill_a2a_s)
    return d


def to_json(p: Plan) -> dict:
    """One object: chosen layout, memory, times, throughput, ranked candidates, rejections, why."""
    cl, best = p.cluster, p.best
    obj: dict = {
        "workload": p.workload,
        "model": {"name": p.model.name, "params": p.model.total_params(),
                  "active_params": p.model.active_params(), "source": p.model.source},
        "cluster": {"gpu": cl.gpu.name, "gpus": cl.gpus, "gpus_per_node": cl.node_size,
                    "nodes": math.ceil(cl.gpus / cl.node_size), "interconnect": cl.interconnect,
                    "network_gbps_per_gpu": cl.network_gbps, "gpu_memory_gib": cl.gpu.memory_gib,
                    "measured_link": cl.measured is not None},
        "request": asdict(p.request),
        "pinned": p.pinned,
        "layout": _layout(p, best.layout) if best else None,
        "fits": best is not None,
    }
    if best:
        bd = _cand_dict(p, best)
        obj.update(memory_per_gpu_gib=bd["memory_per_gpu_gib"], memory_per_gpu_bytes=int(best.memory.total),
                   memory_gib=bd["memory_gib"],
                   throughput={"value": best.throughput,
                               "unit": "tokens/s" if p.workload == "train" else "output tokens/s"})
        keys = (("virtual_stages", "step_time_s", "tflops_per_gpu", "mfu", "tp_comm_share", "bubble_share")
                if p.workload == "train" else ("ttft_s", "tpot_s", "decode_allreduce_share"))
        obj.update({k: bd[k] for k in keys})
    obj["candidates"] = [_cand_dict(p, c) for c in p.candidates]
    obj["rejected"] = [_cand_dict(p, c) for c in p.rejected]
    obj["experts"] = experts_choice(p)
    obj["explanation"] = explain(p)
    obj["assumptions"] = assumptions(p)
    return obj


def _row(p: Plan, i, c: Candidate) -> list[str]:
    lay = c.layout
    mem = f"{c.memory.total / GiB:.1f}" if c.memory else "-"
    moe = [str(lay.ep), str(lay.etp or lay.tp)] if p.model.is_moe else []
    t = c.time
    v = [str(t.virtual_stages) if isinstance(t, TrainTime) else "-"] if p.workload == "train" else []
    base = [str(i), str(lay.tp)] + moe + [str(lay.pp), str(lay.dp), str(lay.micro_batch)] + v + [mem]
    if isinstance(t, TrainTime):
        return base + [_ms(t.step_s), f"{c.throughput:,.0f}", _pct(t.tp_share),
                       _pct(t.bubble_s / t.step_s)]
    if isinstance(t, ServeTime):
        return base + [_ms(t.ttft_s), _ms(t.tpot_s), f"{c.throughput:,.0f}", _pct(t.decode_comm_share)]
    return base + ["-"] * 4


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.rjust(w[i]) for i, x in enumerate(r))  # noqa: E731
    return [fmt(head)] + [fmt(r) for r in rows]


def to_text(p: Plan) -> str:
    cl, m = p.cluster, p.model
    req = p.request
    prec = req.precision
    what = (f"train, seq {req.seq}, global batch {req.global_batch}, {prec}, recompute {req.recompute}"
            f"{', sequence parallel' if req.sp else ''}, {req.software}" if isinstance(req, TrainRequest) else
            f"serve, prompt {req.prompt} + output {req.output} tokens, {req.concurrency} concurrent, {prec}")
    active = f", {m.active_params() / 1e9:.2f}B active" if m.is_moe else ""
    lines = [f"{m.name} ({m.total_params() / 1e9:.2f}B params{active}) on {cl.gpus} x {cl.gpu.name} "
             f"({math.ceil(cl.gpus / cl.node_size)} node(s) of {cl.node_size}, {cl.interconnect}): {what}", ""]
    head = ["#", "tp"] + (["ep", "etp"] if m.is_moe else []) + ["pp", "dp"] + \
        (["mb", "v"] if p.workload == "train" else ["batch"]) + ["GiB/GPU"]
    head += (["step", "tokens/s", "TP comm", "bubble"] if p.workload == "train"
             else ["TTFT", "TPOT", "tokens/s", "AR/decode"])
    if p.candidates:
        lines += _table([_row(p, i + 1, c) for i, c in enumerate(p.candidates[:SHOW])], head)
        if len(p.candidates) > SHOW:
            lines.append(f"... {len(p.candidates) - SHOW} more feasible layouts (--json lists all)")
    else:
        lines.append("no feasible layout")
    if p.rejected:
        lines += ["", "rejected:"]
        lines += [f"  {c.layout.short()}: {c.reason}" for c in p.rejected[:SHOW]]
        if len(p.rejected) > SHOW:
            lines.append(f"  ... {len(p.rejected) - SHOW} more (--json lists all)")
    lines += ["", "why:"] + [f"  {s}" for s in explain(p)]
    return "\n".join(lines)
