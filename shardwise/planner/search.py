"""Enumerate (tp, pp, dp) with tp x pp x dp = GPUs, evaluate each, reject with reasons, rank.

Ranks are laid out as ``arange(world).view(pp, dp, tp)`` (TP innermost, as ``shardwise.mesh``), so a
TP group is ``tp`` neighbouring GPUs, a DP group strides by ``tp`` and pipeline neighbours are
``tp x dp`` apart. A group stays inside a node when its span divides the GPUs per node.

Mixtures of experts add ``ep`` TP groups side by side (``view(pp, dp, ep, tp)``: EP strides by tp) and
``etp``, the ranks each expert spans in its TP group; every (tp, ep, pp, dp) is tried with etp in {tp, 1}.

Training ranks feasible layouts by tokens/s; serving by output tokens/s among layouts that meet
the latency targets. Each (tp, pp, dp) appears once: in training with the micro-batch that gives
the highest throughput, in serving with batch ceil(concurrency / dp) per replica.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gpus import GPUSpec, Link, intra_link, network_link
from .memory import GiB, TRAIN_PRECISION, WEIGHT_BYTES, Memory, kv_bytes_per_token, serving_memory, training_memory
from .memory import stage_params_per_rank
from .models import ModelSpec, moe_problem, tp_problem
from .software import DEFAULT_SOFTWARE, get_software
from .timing import ServeTime, TrainTime, serve_time, train_time


@dataclass(frozen=True)
class Cluster:
    gpu: GPUSpec
    gpus: int
    gpus_per_node: int
    interconnect: str
    network_gbps: float
    measured: Link | None = None  # from --calibration: replaces the catalog's intra-node link

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {self.gpus}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            lo = self.gpus // self.gpus_per_node * self.gpus_per_node
            raise ValueError(f"{self.gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU nodes: "
                             f"use --gpus {lo} or {lo + self.gpus_per_node}, or set --gpus-per-node")

    @property
    def node_size(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    def intra(self, size: int, stride: int = 1) -> Link:
        # an NVLink bridge joins neighbouring pairs only: a strided group never uses it
        pairs_ok = size if stride == 1 else self.node_size + 1
        return self.measured or intra_link(self.gpu, self.interconnect, pairs_ok)

    def within_node(self, size: int, stride: int) -> bool:
        span = size * stride
        return span <= self.node_size and self.node_size % span == 0

    def link(self, size: int, stride: int) -> Link:
        """What a group of ``size`` ranks ``stride`` apart sees."""
        intra = self.intra(size, stride)
        if size <= 1 or self.within_node(size, stride):
            return intra
        members = max(1, min(size, self.node_size // stride))
        return network_link(self.network_gbps, members, intra)

    def alltoall_link(self, size: int, stride: int) -> Link:
        """An all-to-all: the intra link inside a node; across nodes each rank's own NIC."""
        intra = self.intra(size, stride)
        return intra if size <= 1 or self.within_node(size, stride) else \
            network_link(self.network_gbps, 1, intra)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    ep: int = 1  # TP groups splitting the experts (attention data-parallel over them)
    etp: int | None = None  # ranks each expert spans (None: tp; 1: whole experts)

    def short(self) -> str:
        moe = (f" ep={self.ep}" if self.ep > 1 else "") + \
            (f" expert-tp={self.etp}" if self.etp is not None and self.etp != self.tp else "")
        return f"tp={self.tp}{moe} pp={self.pp} dp={self.dp}"

    @property
    def data(self) -> int:
        """Data-parallel width of the dense layers: dp x ep."""
        return self.dp * self.ep


@dataclass(frozen=True)
class TrainRequest:
    seq: int
    global_batch: int
    micro_batch: int | None = None
    precision: str = "bf16"
    sp: bool = False
    recompute: str = "selective"
    zero: int = 0  # 1: AdamW states sharded over dp; 2: and the gradients
    dp_overlap: bool = True
    virtual_stages: int | None = None  # model chunks per GPU (interleaved 1F1B); None: searched
    software: str = DEFAULT_SOFTWARE  # a preset of ``software.SOFTWARE``


@dataclass(frozen=True)
class ServeRequest:
    prompt: int
    output: int
    concurrency: int
    precision: str = "bf16"
    kv_bytes: float = 2.0
    ttft_target_s: float | None = None
    tpot_target_s: float | None = None
    batch: int | None = None  # sequences per replica; default ceil(concurrency / dp)


@dataclass
class Candidate:
    layout: Layout
    memory: Memory | None = None
    time: TrainTime | ServeTime | None = None
    throughput: float = 0.0  # tokens/s (training) or output tokens/s (serving)
    reason: str | None = None  # why rejected; None when feasible

    @property
    def fits(self) -> bool:
        return self.reason is None


@dataclass
class Plan:
    workload: str
    model: ModelSpec
    cluster: Cluster
    request: TrainRequest | ServeRequest
    candidates: list[Candidate] = field(default_factory=list)  # feasible, best first
    rejected: list[Candidate] = field(default_factory=list)
    pinned: bool = False

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(n: int, *, tp: int | None = None, pp: int | None = None, dp: int | None = None):
    """Every (tp, pp, dp) with product n that agrees with the pinned values."""
    for t in _divisors(n):
        for p in _divisors(n // t):
            d = n // t // p
            if (tp or t) == t and (pp or p) == p and (dp or d) == d:
                yield t, p, d


def moe_layouts(m: ModelSpec, n: int, *, tp=None, pp=None, dp=None, ep=None, etp=None):
    """Every (tp, ep, pp, dp, etp) for ``m``: for a dense model (tp, 1, pp, dp, None)."""
    for e in (_divisors(n) if m.is_moe else [1]):
        if (ep or e) != e:
            continue
        for t, p, d in layouts(n // e, tp=tp, pp=pp, dp=dp):
            choices = [etp] if etp else [None] + ([1] if m.is_moe and t > 1 else [])
            for x in choices:
                yield t, e, p, d, (None if x == t else x)


def _check_pins(m: ModelSpec, c: Cluster, tp, pp, dp, ep=None, etp=None) -> None:
    pins = {k: v for k, v in (("tp", tp), ("ep", ep), ("pp", pp), ("dp", dp)) if v is not None}
    for k, v in pins.items():
        if v < 1:
            raise ValueError(f"--{k} must be at least 1, got {v}")
    if etp is not None and etp < 1:
        raise ValueError(f"--expert-tp must be at least 1, got {etp}")
    if (ep or 1) > 1 or etp is not None:
        if not m.is_moe:
            raise ValueError(f"--ep and --expert-tp place experts, but {m.name} has none")
    prod = (tp or 1) * (ep or 1) * (pp or 1) * (dp or 1)
    desc = " x ".join(f"{k}={v}" for k, v in pins.items())
    if len(pins) == (4 if ep is not None else 3) and prod != c.gpus:
        raise ValueError(f"{desc} = {prod} GPUs but --gpus is {c.gpus}")
    if c.gpus % prod:
        ok = [d for d in _divisors(c.gpus) if d * prod // max(pins.values()) <= c.gpus][:8]
        hint = f" (divisors of {c.gpus}: {', '.join(map(str, ok))})" if len(pins) == 1 else ""
        raise ValueError(f"{desc}{'' if len(pins) == 1 else f' = {prod}'} does not divide {c.gpus} GPUs{hint}")
    if tp and (why := tp_problem(m, tp)):
        raise ValueError(why)
    if tp and (why := moe_problem(m, tp, ep or 1, etp)):
        raise ValueError(why)
    if pp and pp > m.layers:
        raise ValueError(f"pp={pp} but the model has {m.layers} layers: use pp <= {m.layers}")


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def _oom(mem: Memory, cap: float, what: str = "") -> str:
    return (f"out of memory by {_gib(mem.total - cap)}: needs {_gib(mem.total)} per GPU of {_gib(cap)}"
            f" (weights {_gib(mem.weights)}{what})")


def _tp_cross(c: Cluster, tp: int) -> str | None:
    if c.within_node(tp, 1):
        return None
    far, near = c.link(tp, 1), c.intra(tp)
    nodes = -(-tp // c.node_size)
    span = f"spans {nodes} nodes" if tp > c.node_size else f"does not divide the {c.node_size} GPUs of a node"
    return (f"TP across nodes: tp={tp} {span}, so each of its blocking all-reduces crosses the network "
            f"({far.alpha_s * 1e6:.0f} us latency instead of {near.alpha_s * 1e6:.0f} us on {near.kind}, "
            f"at most {far.busbw_GBps:.0f} GB/s) and competes with data- and pipeline-parallel traffic "
            f"for the NICs; pin --tp/--pp/--dp to evaluate it anyway")


def chunk_choices(m: ModelSpec, pp: int, micro_batches: int, pinned: int | None) -> list[int]:
    """Virtual stages v to try: v divides the stage's layers, and (Megatron's rule for the
    interleaved schedule) the micro-batches are a multiple of pp."""
    n = -(-m.layers // pp)
    if pinned:
        ok = pinned == 1 or (pp > 1 and n % pinned == 0 and micro_batches % pp == 0)
        return [pinned] if ok else []
    if pp == 1 or micro_batches % pp:
        return [1]
    return [v for v in (1, 2, 3, 4, 6, 8) if n % v == 0]


def evaluate_train(m: ModelSpec, c: Cluster, r: TrainRequest, *, tp: int, pp: int, dp: int,
                   micro_batch: int, virtual_stages: int = 1, pinned: bool = True, ep: int = 1,
                   etp: int | None = None) -> Candidate:
    """Memory and time of one training layout (rejected with a reason when it cannot work)."""
    lay = Layout(tp, pp, dp, micro_batch, ep, etp)
    micro = r.global_batch // (dp * ep * micro_batch)
    cap = c.gpu.memory_bytes
    mem = training_memory(m, tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, micro_batches=micro,
                          seq=r.seq, sp=r.sp, recompute=r.recompute, zero=r.zero, capacity=cap,
                          precision=r.precision, virtual_stages=virtual_stages, ep=ep, etp=etp)
    params = sum(stage_params_per_rank(m, tp, pp, ep, etp))
    tm = train_time(m, c.gpu, tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, micro_batches=micro,
                    seq=r.seq, precision=r.precision, sp=r.sp, recompute=r.recompute, zero1=r.zero >= 1,
                    dp_overlap=r.dp_overlap, stage_params=params, tp_link=c.link(tp, 1),
                    pp_link=c.link(pp, tp * ep * dp), dp_link=c.link(dp * ep, tp),
                    virtual_stages=virtual_stages, software=get_software(r.software), ep=ep, etp=etp,
                    ep_link=c.alltoall_link(ep, tp))
    cand = Candidate(lay, mem, tm, r.global_batch * r.seq / tm.step_s)
    if mem.total > cap:
        cand.reason = _oom(mem, cap, f", activations {_gib(mem.activations)}")
    elif not pinned and (why := _tp_cross(c, tp)):
        cand.reason = why
    return cand


def _train(m, c, r: TrainRequest, pins, pinned) -> tuple[list, list]:
    ok, bad = [], []
    for t, e, p, d, x in moe_layouts(m, c.gpus, **pins):
        lay = Layout(t, p, d, r.micro_batch or 1, e, x)
        n = d * e  # data-parallel width of the dense layers
        why = tp_problem(m, t) or moe_problem(m, t, e, x) or \
            (f"pp={p} exceeds the model's {m.layers} layers" if p > m.layers else None)
        if not why and r.global_batch % n:
            why = f"global batch {r.global_batch} does not split over dp x ep={n} ({r.global_batch} % {n} = {r.global_batch % n})"
        if not why and r.micro_batch and (r.global_batch // n) % r.micro_batch:
            why = (f"{r.global_batch // n} sequences per replica do not split into micro-batches of "
                   f"{r.micro_batch}")
        if why:
            bad.append(Candidate(lay, reason=why))
            continue
        per = r.global_batch // n
        mbs = [r.micro_batch] if r.micro_batch else [b for b in (1, 2, 4, 8) if per % b == 0]
        tried = [evaluate_train(m, c, r, tp=t, pp=p, dp=d, micro_batch=mb, virtual_stages=v,
                                pinned=pinned, ep=e, etp=x)
                 for mb in mbs for v in chunk_choices(m, p, per // mb, r.virtual_stages)]
        if not tried:
            bad.append(Candidate(lay, reason=(
                f"--virtual-stages {r.virtual_stages} needs pp > 1, the {-(-m.layers // p)} layers per "
                f"stage divisible by it and micro-batches a multiple of pp={p}")))
            continue
        good = [x for x in tried if x.fits]
        if good:
            ok.append(max(good, key=lambda x: (x.throughput, x.layout.micro_batch)))
        else:
            bad.append(tried[0])
    return ok, bad


def _serve(m, c, r: ServeRequest, pins, pinned) -> tuple[list, list]:
    ok, bad = [], []
    cap = c.gpu.memory_bytes
    for t, e, p, d, x in moe_layouts(m, c.gpus, **pins):
        b = r.batch or -(-r.concurrency // d)
        lay = Layout(t, p, d, b, e, x)
        why = tp_problem(m, t) or moe_problem(m, t, e, x) or \
            (f"pp={p} exceeds the model's {m.layers} layers" if p > m.layers else None)
        if not why and r.concurrency < d:
            why = f"dp={d} replicas but only {r.concurrency} concurrent requests: {d - r.concurrency} would idle"
        if not why and b < e:
            why = f"ep={e} TP groups share a replica's {b} sequences: {e - b} would idle"
        if why:
            bad.append(Candidate(lay, reason=why))
            continue
        mem = serving_memory(m, tp=t, pp=p, batch=b, prompt=r.prompt, output=r.output,
                             precision=r.precision, kv_bytes=r.kv_bytes, capacity=cap, ep=e, etp=x)
        kv_tok = kv_bytes_per_token(m, t, p, r.kv_bytes)
        tm = serve_time(m, c.gpu, tp=t, pp=p, dp=d, batch=b, prompt=r.prompt, output=r.output,
                        precision=r.precision, weight_bytes=mem.weights, kv_token_bytes=kv_tok,
                        tp_link=c.link(t, 1), pp_link=c.link(p, t * e * d), ep=e, etp=x,
                        ep_link=c.alltoall_link(e, t))
        cand = Candidate(lay, mem, tm, tm.throughput)
        if mem.total > cap:
            free = cap - mem.total + mem.kv_cache
            fit = int(max(0.0, free) // ((r.prompt + r.output) * kv_tok)) * e
            kv = f", KV cache {_gib(mem.kv_cache)} for {-(-b // e)} x {r.prompt + r.output} tokens"
            cand.reason = _oom(mem, cap, kv) + (f"; at most {fit} sequences fit" if fit else "")
        elif not pinned and (w := _tp_cross(c, t)):
            cand.reason = w
        elif r.ttft_target_s and tm.ttft_s > r.ttft_target_s:
            cand.reason = f"TTFT {tm.ttft_s * 1e3:.0f} ms misses the {r.ttft_target_s * 1e3:.0f} ms target"
        elif r.tpot_target_s and tm.tpot_s > r.tpot_target_s:
            cand.reason = f"TPOT {tm.tpot_s * 1e3:.1f} ms misses the {r.tpot_target_s * 1e3:.1f} ms target"
        (ok if cand.fits else bad).append(cand)
    return ok, bad


def plan(model: ModelSpec, cluster: Cluster, request: TrainRequest | ServeRequest, *,
         tp: int | None = None, pp: int | None = None, dp: int | None = None,
         ep: int | None = None, expert_tp: int | None = None) -> Plan:
    """Search (or, with pins, evaluate) the layouts for ``request`` on ``cluster``; ``ep`` and
    ``expert_tp`` pin the expert placement of a mixture of experts."""
    _check_pins(model, cluster, tp, pp, dp, ep, expert_tp)
    pins = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "etp": expert_tp}
    pinned = None not in (tp, pp, dp) and (ep is not None or not model.is_moe)
    if request.precision == "bf16" and cluster.gpu.bf16_tflops is None:
        raise ValueError(f"{cluster.gpu.name} has no BF16 tensor cores: use --precision fp16")
    if isinstance(request, TrainRequest):
        _check_train(request, dp)
        _check_chunks(model, cluster, request, pp)
        ok, bad = _train(model, cluster, request, pins, pinned)
        workload = "train"
    else:
        _check_serve(request, dp)
        ok, bad = _serve(model, cluster, request, pins, pinned)
        workload = "serve"
    ok.sort(key=lambda x: (-x.throughput, x.memory.total if x.memory else 0))
    cap = cluster.gpu.memory_bytes
    bad.sort(key=lambda x: (x.time is None, max(0.0, x.memory.total - cap) if x.memory else 0.0,
                            -x.throughput))
    return Plan(workload, model, cluster, request, ok, bad, pinned)


def _check_train(r: TrainRequest, dp: int | None) -> None:
    if r.seq < 1 or r.global_batch < 1:
        raise ValueError(f"--seq-len and --global-batch must be positive, got {r.seq} and {r.global_batch}")
    if r.micro_batch is not None and (r.micro_batch < 1 or r.global_batch % r.micro_batch):
        raise ValueError(f"global batch {r.global_batch} cannot be split into micro-batches of {r.micro_batch}")
    if dp and r.global_batch % dp:
        near = sorted({r.global_batch // dp * dp, (r.global_batch // dp + 1) * dp} - {0})
        raise ValueError(f"global batch {r.global_batch} cannot be split over dp={dp} "
                         f"({r.global_batch} % {dp} = {r.global_batch % dp}): use a multiple of {dp} "
                         f"such as {' or '.join(map(str, near))}")
    if dp and r.micro_batch and (r.global_batch // dp) % r.micro_batch:
        raise ValueError(f"{r.global_batch} sequences over dp={dp} is {r.global_batch // dp} per replica, "
                         f"which micro-batches of {r.micro_batch} cannot split")
    if r.precision not in TRAIN_PRECISION:
        raise ValueError(f"training precision must be one of {', '.join(TRAIN_PRECISION)}, "
                         f"got {r.precision!r}")
    if r.zero not in (0, 1, 2):
        raise ValueError(f"--zero {r.zero}: use 0, 1 (optimizer states) or 2 (and gradients)")
    if r.virtual_stages is not None and r.virtual_stages < 1:
        raise ValueError(f"--virtual-stages must be at least 1, got {r.virtual_stages}")
    get_software(r.software)  # raises with the closest preset names


def _check_chunks(m: ModelSpec, c: Cluster, r: TrainRequest, pp: int | None) -> None:
    """A pinned --virtual-stages V > 1 needs some pp > 1 whose stages hold a multiple of V layers."""
    v = r.virtual_stages
    if not v or v == 1:
        return
    ok = [p for p in ([pp] if pp else _divisors(c.gpus)) if p > 1 and -(-m.layers // p) % v == 0]
    if not ok:
        raise ValueError(f"--virtual-stages {v}: no pipeline degree{f' (pp={pp})' if pp else ''} gives "
                         f"stages whose layers ({m.layers} in all) split into {v} chunks; use a divisor "
                         f"of the layers per stage")


def _check_serve(r: ServeRequest, dp: int | None) -> None:
    if r.prompt < 1 or r.output < 1 or r.concurrency < 1:
        raise ValueError(f"--prompt-len, --output-len and --concurrency must be positive, got "
                         f"{r.prompt}, {r.output} and {r.concurrency}")
    if dp and r.concurrency < dp:
        raise ValueError(f"{r.concurrency} concurrent requests cannot be split over dp={dp} replicas: "
                         f"use --concurrency >= {dp} or a smaller dp")
    if r.batch is not None and r.batch < 1:
        raise ValueError(f"--micro-batch (sequences per replica) must be positive, got {r.batch}")
    if r.precision not in WEIGHT_BYTES:
        raise ValueError(f"serving precision must be one of {', '.join(WEIGHT_BYTES)}, got {r.precision!r}")
