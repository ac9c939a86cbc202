"""``shardwise bench step``: a training step and a decode step, shardwise tp=2 against PyTorch's
tensor parallelism and single-process baselines, interleaved in one run.

Contenders, each in its own long-lived processes (:class:`~shardwise.launch.WorkerPool`), built
once, then measured in rounds ``A B C D A B C D ...`` so that a noisy neighbour hurts all alike:

==================  ==================================================================
``shardwise_tp2``   :class:`~shardwise.models.llama.LlamaForCausalLM` on 2 ranks, vocab-parallel
                    cross-entropy; ``cores // 2`` threads per rank
``dtensor_tp2``     :mod:`.torch_llama` under ``torch.distributed.tensor.parallel`` (torchtitan's
                    plan without sequence parallelism, loss parallel); same threads
``single_<T>threads``  :mod:`.torch_llama` in one process with the same total threads T
``single_1thread``  the same with one thread: half its time is the physical limit of tp=2
==================  ==================================================================

Training step: ``zero_grad`` + forward + loss + backward (no optimizer). Decode step: one new token
for every sequence of the batch against a KV cache holding ``decode_context`` earlier tokens
(the cache is not advanced, so every step sees the same length); logits stay vocabulary-parallel
(no sampling) for both TP contenders. Times are rank 0's wall clock per step; medians over all
rounds' timed steps.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from .torch_llama import STEP_PRESETS, StepModelConfig, TorchLlama, parallelize

_STATE: dict[str, Any] = {}  # per worker process: the contender's model, inputs, group

GOALS = {"train_vs_limit": 1.1, "train_vs_dtensor": 0.9, "decode_vs_single": 1.1}


def _inputs(c: StepModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"ids": torch.randint(0, c.vocab, (c.batch, c.seq), generator=g),
            "targets": torch.randint(0, c.vocab, (c.batch, c.seq), generator=g),
            "context": torch.randint(0, c.vocab, (c.decode_batch, c.decode_context), generator=g),
            "token": torch.randint(0, c.vocab, (c.decode_batch, 1), generator=g)}


def setup(kind: str, c: StepModelConfig) -> dict[str, Any]:
    """Worker: build the contender's model (seeded) and decode cache. Returns its description."""
    torch.manual_seed(0)
    st: dict[str, Any] = {"kind": kind, "c": c, "x": _inputs(c), "group": None}
    tp = 2 if kind.endswith("_tp2") else 1
    if kind == "shardwise_tp2":
        from ..mesh import Mesh
        from ..models.cache import KVCache
        from ..models.llama import LlamaForCausalLM
        from ..shards import init_weights
        mesh = Mesh.init(tp=tp)
        st["group"] = mesh.tp_group
        model = LlamaForCausalLM(c.llama_config(), group=mesh.tp_group)
        init_weights(model, seed=0)
        st["cache"] = KVCache(model, c.decode_batch, c.decode_context + 1)
    else:
        model = TorchLlama(c)
        if tp > 1:
            parallelize(model, tp)
        model.allocate_cache(c.decode_batch, c.decode_context + 1, tp)
    st["model"] = model
    _prefill(st)
    _STATE.clear()
    _STATE.update(st)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return {"kind": kind, "threads": torch.get_num_threads(), "tp": tp, "loss": _loss(),
            "param_mib": round(sum(p.numel() * p.element_size() for p in local) / 2**20, 1)}


@torch.no_grad()
def _prefill(st: dict[str, Any]) -> None:
    ctx = st["x"]["context"]
    if st["kind"] == "shardwise_tp2":
        cache = st["cache"]
        st["model"](ctx, cache.positions(ctx.shape[0], ctx.shape[1]), attend=cache.attend)
        cache.advance(ctx.shape[1])
    else:
        st["model"](ctx, start=0)


def _loss() -> float:
    """The training loss of the benchmark batch, once (a check that contenders agree: the torch
    model gives the same loss single-process and under PyTorch TP)."""
    with torch.no_grad():
        return train_step(backward=False)


def train_step(backward: bool = True) -> float:
    st, x = _STATE, _STATE["x"]
    model, c = st["model"], st["c"]
    model.zero_grad(set_to_none=True)
    if st["kind"] == "shardwise_tp2":
        from ..layers import finalize_grads
        from ..loss import vocab_parallel_cross_entropy
        logits = model(x["ids"])
        loss = vocab_parallel_cross_entropy(logits, x["targets"], group=st["group"],
                                            vocab_start=model.vocab_start, vocab_size=c.vocab)
        if backward:
            loss.backward()
            finalize_grads(model, st["group"])
    elif st["kind"] == "dtensor_tp2":
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():
            pred = model(x["ids"])
            loss = F.cross_entropy(pred.flatten(0, 1), x["targets"].flatten(0, 1))
            if backward:
                loss.backward()
        loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
    else:
        loss = F.cross_entropy(model(x["ids"]).flatten(0, 1), x["targets"].flatten(0, 1))
        if backward:
            loss.backward()
    return float(loss.detach())


@torch.no_grad()
def decode_step() -> None:
    st = _STATE
    tok, c = st["x"]["token"], st["c"]
    if st["kind"] == "shardwise_tp2":
        cache = st["cache"]  # not advanced: every step attends to the same 128 + 1 positions
        st["model"](tok, cache.positions(tok.shape[0], 1), attend=cache.attend)
    else:
        st["model"](tok, start=c.decode_context)


def measure(phase: str, steps: int, warmup: int, ledger: bool = False) -> dict[str, Any]:
    """Worker: ``warmup`` untimed steps, then ``steps`` timed ones. With ``ledger``, one more
    untimed step under the collective ledger (collectives and seconds per step)."""
    import torch.distributed as dist
    fn = train_step if phase == "train" else decode_step
    for _ in range(warmup):
        fn()
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {"times": times}
    if ledger:
        from ..comm import Ledger, backend_name
        with Ledger() as led:
            start = time.perf_counter()
            fn()
            total = time.perf_counter() - start
        out["collectives"] = led.counts()
        out["comm_fraction"] = round(led.seconds / total, 3) if total else 0.0
        out["comm_backend"] = backend_name(_STATE["group"]) if _STATE["group"] is not None \
            else ("gloo" if dist.is_initialized() else "none")
    return out


def contenders(tp: int = 2) -> dict[str, tuple[int, int | None]]:
    """name -> (processes, threads per process; None = the launcher's cores // processes)."""
    from ..launch import threads_per_rank
    total = tp * threads_per_rank(tp)
    return {"shardwise_tp2": (tp, None), "dtensor_tp2": (tp, None),
            f"single_{total}threads": (1, total), "single_1thread": (1, 1)}


def bench_step(preset: str | StepModelConfig = "issue7", *, rounds: int = 3, train_steps: int = 4,
               decode_steps: int = 10, train_warmup: int = 1, decode_warmup: int = 3,
               progress: bool = True) -> dict[str, Any]:
    """Run every contender, interleaved over ``rounds``; medians and goal ratios."""
    from ..launch import WorkerPool
    c = STEP_PRESETS[preset] if isinstance(preset, str) else preset
    if rounds < 1 or train_steps < 1 or decode_steps < 1:
        raise ValueError(f"rounds={rounds}, train_steps={train_steps}, decode_steps={decode_steps}:"
                         " each must be >= 1")
    specs = contenders()
    pools: dict[str, WorkerPool] = {}
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "decode": []} for k in specs}
    info: dict[str, Any] = {"loadavg_start": _loadavg()}
    try:
        for name, (n, threads) in specs.items():  # start every process first: imports overlap
            pools[name] = WorkerPool(n, threads=threads, timeout_s=1800)
        for name, pool in pools.items():
            info[name] = pool.run(setup, name, c)[0]
        for r in range(rounds):
            for phase, steps, warm in (("train", train_steps, train_warmup),
                                       ("decode", decode_steps, decode_warmup)):
                for name, pool in pools.items():
                    res = pool.run(measure, phase, steps, warm + (r == 0), r == 0)[0]
                    times[name][phase] += res["times"]
                    if r == 0:
                        info[name][phase] = {k: v for k, v in res.items() if k != "times"}
                    if progress:
                        med = statistics.median(res["times"])
                        print(f"round {r + 1}/{rounds} {phase:<6} {name:<16} "
                              f"median {med * 1e3:9.1f} ms", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    info["loadavg_end"] = _loadavg()
    return summarize(c, times, info)


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a shared machine shows here how shared it was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summarize(c: StepModelConfig, times: dict[str, dict[str, list[float]]],
              info: dict[str, Any]) -> dict[str, Any]:
    med = {k: {ph: statistics.median(v) for ph, v in t.items() if v} for k, t in times.items()}
    single_all = next(k for k in med if k.startswith("single_") and k != "single_1thread")
    tw, dt = med["shardwise_tp2"], med["dtensor_tp2"]
    ratios = {
        "train_vs_limit": tw["train"] / (med["single_1thread"]["train"] / 2),
        "train_vs_dtensor": tw["train"] / dt["train"],
        "decode_vs_single": tw["decode"] / med[single_all]["decode"],
        "dtensor_train_vs_limit": dt["train"] / (med["single_1thread"]["train"] / 2),
        "dtensor_decode_vs_single": dt["decode"] / med[single_all]["decode"],
    }
    met = {k: ratios[k] <= goal for k, goal in GOALS.items()}
    load = {k: info.pop(k, None) for k in ("loadavg_start", "loadavg_end")}
    return {"config": asdict(c), "median_s": med, "machine": {**load, "cpus": os.cpu_count()}, "steps": {k: {ph: len(v) for ph, v in t.items()}
                                                            for k, t in times.items()},
            "times_s": times, "contenders": info, "ratios": ratios, "goals": GOALS,
            "goals_met": met, "single_all_threads": single_all, "torch": torch.__version__}


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{'contender':<18} {'train ms':>10} {'decode ms':>10} {'threads':>8}  comm"]
    for k, m in res["median_s"].items():
        inf = res["contenders"].get(k, {})
        comm = inf.get("train", {}).get("comm_backend", "")
        frac = inf.get("train", {}).get("comm_fraction")
        extra = f"{comm} ({100 * frac:.0f}% of train step)" if frac else comm
        lines.append(f"{k:<18} {m['train'] * 1e3:>10.1f} {m['decode'] * 1e3:>10.2f} "
                     f"{inf.get('threads', '?'):>8}  {extra}")
    lines.append("")
    names = {"train_vs_limit": "tp2 train / (single_1thread train / 2)",
             "train_vs_dtensor": "tp2 train / dtensor tp2 train",
             "decode_vs_single": f"tp2 decode / {res['single_all_threads']} decode"}
    for k, label in names.items():
        ok = "met" if res["goals_met"][k] else "NOT met"
        lines.append(f"{label:<44} {res['ratios'][k]:6.3f}  (goal <= {res['goals'][k]}: {ok})")
    lines.append(f"{'dtensor tp2 train / limit':<44} {res['ratios']['dtensor_train_vs_limit']:6.3f}")
    m = res.get("machine", {})
    lines.insert(0, f"{m.get('cpus')} CPUs, load average at start {m.get('loadavg_start')}, "
                    f"at end {m.get('loadavg_end')}")
    lines.append(f"{'dtensor tp2 decode / single decode':<44} "
                 f"{res['ratios']['dtensor_decode_vs_single']:6.3f}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    """Two bar charts (train, decode) of the medians, with every timed step as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["median_s"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase, unit, scale in ((axes[0], "train", "s", 1.0), (axes[1], "decode", "ms", 1e3)):
        meds = [res["median_s"][n][phase] * scale for n in names]
        ax.bar(range(len(names)), meds, color=["C0", "C1", "C2", "C7"][:len(names)])
        for i, n in enumerate(names):
            pts = [t * scale for t in res["times_s"][n][phase]]
            ax.plot([i] * len(pts), pts, "k.", alpha=0.4, markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_ylabel(f"{phase} step ({unit}), median")
        ax.set_title(f"{phase} step")
    single1 = res["median_s"]["single_1thread"]["train"]
    axes[0].axhline(single1 / 2, color="k", ls="--", lw=1, label="limit: single 1 thread / 2")
    axes[0].legend(fontsize=8)
    fig.suptitle("shardwise tp=2 vs PyTorch TP vs one process (CPU, fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
