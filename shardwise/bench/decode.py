"""``shardwise bench decode``: batch-1 decode and 128-token prefill of a real model, shardwise
beside llama.cpp (and transformers), interleaved.

Contenders, each measured once per round, rounds repeated (medians reported; a noisy neighbour
hurts all alike):

* ``shardwise tp=T <dtype> [int8|int4] <eager|compiled|frozen>``:
  :class:`~shardwise.serve.step.StaticStep` on T pinned ranks (one long-lived pool per tp, dtype
  and quantization holding the eager and the compiled step, and with ``--freezing`` the compiled
  step with inductor's freezing, over one copy of the weights). ``--quant int4`` loads SmolLM2's
  Q4_1 file kept quantized (its Q8_0 embedding as int8 per row); ``int8`` loads the Q8_0 file
  llama.cpp's contender reads (Q8_0 re-quantized per row), or the Q4_1 file at int8 where
  llama.cpp is not built; ``<dtype>`` is then the activation dtype;
* ``llama.cpp <F32|BF16|Q8_0|Q4_1>``: ``llama-bench -p 128 -n 64 -r 1 -t <cores>`` on the same
  weights converted with ``llama-quantize --allow-requantize`` (Q4_1: the file itself;
  ``benchmarks/llama_cpp.py`` builds it; skipped with a message where it is not built);
* ``transformers <dtype>`` (``--transformers``): ``LlamaForCausalLM`` eager with its dynamic
  cache, all cores.

Decode: a fresh cache, a one-token prompt, then ``--decode-tokens`` greedy tokens (llama-bench's
tg64 starts from an empty context too); tokens per second of the decode loop. Prefill: a fresh
cache and a ``--prefill-tokens`` prompt in one step, tokens per second (llama-bench's pp128).

Batch-1 decode reads every weight once a token, so its ceiling is the memory bandwidth. Each
round also measures what this machine reads right then (:func:`read_bandwidth`: a sum over
512 MiB of fp32 with every core, 16 streams a core), and each contender
is reported as weight bytes per token (:func:`decode_bytes`; llama.cpp's: its GGUF's tensors)
times its tokens per second, against that round's read bandwidth. The KV cache's reads are left
out (a few MB a token at this context).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import cpu_model

_STATE: dict[str, Any] = {}
DTYPES = {"float32": "F32", "bfloat16": "BF16"}
QUANTS = {"int8": "Q8_0", "int4": "Q4_1"}  # shardwise --quant -> the llama.cpp file it faces


# ---------------------------------------------------------------------------- shardwise ranks
def setup(model: str, dtype: str, modes: tuple[str, ...], tp: int,
          quant: str | None = None) -> dict[str, Any]:
    """Worker: load the rank's shard (``quant``: int8/int4 weights), build an eager and/or
    compiled step, compile (timed)."""
    from ..checkpoint.source import build_model, resolve
    from ..mesh import Mesh
    from ..quant.config import QuantConfig
    from ..serve.kv import PagedKVCache
    from ..serve.step import StaticStep, StepOptions
    mesh = Mesh.init(tp=tp)
    t0 = time.perf_counter()
    m = build_model(resolve(model, dense=quant is None), group=mesh.tp_group,
                    dtype=getattr(torch, dtype),
                    quant=QuantConfig(method=quant) if quant else None).eval()
    load_s = time.perf_counter() - t0
    _STATE.update(model=m, group=mesh.tp_group, steps={})
    from .. import kernels
    info: dict[str, Any] = {"model": model, "load_s": round(load_s, 2),
                            "decode_bytes": decode_bytes(m), "threads": torch.get_num_threads(),
                            "cores": sorted(os.sched_getaffinity(0)), "kernels": kernels.status()}
    with torch.inference_mode():
        for mode in modes:
            cache = PagedKVCache(m, 32, 16)  # 512 tokens: enough for both phases
            step = StaticStep(m, cache, StepOptions(compile=mode != "eager", max_seqs=1,
                                                    max_context=512, freezing=mode == "frozen"))
            t0 = time.perf_counter()
            step.warmup()
            info[f"{mode}_compile_s"] = round(time.perf_counter() - t0, 2)
            _STATE["steps"][mode] = step
    return info


def decode_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode token reads on this rank: the weights as held
    (:func:`~shardwise.quant.load.weight_bytes`), less an embedding table that is not also the
    head (a token reads one row of it)."""
    from ..quant.load import weight_bytes
    total = weight_bytes(model)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and not model.config.tie_word_embeddings:
        total -= weight_bytes(embed)
    return total


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 3) -> float:
    """GB/s this machine reads right now with ``threads`` threads: the median of ``repeats``
    sums over ``mib`` MiB of fp32 (past any cache), each thread reading its part as 16
    interleaved streams (``shardwise::stream_sum``; torch's sum where the kernels are not built).
    One stream a thread is not the machine's rate everywhere: on a 2-core Xeon with AMX it
    reads 19 GB/s where 16 streams read 32-34 (on the AMD EPYC of rounds 8-10 both the same);
    benchmarks/RESULTS.md, issue 10."""
    from .. import kernels
    buf = _STATE.get(("probe", mib))
    if buf is None:
        buf = _STATE[("probe", mib)] = torch.ones(mib * 2 ** 20 // 4)
    read = torch.ops.shardwise.stream_sum if kernels.load() else torch.sum
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        read(buf)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            total = read(buf)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    if float(total) != buf.numel():  # every element read, once
        raise RuntimeError(f"read_bandwidth: the probe summed {float(total)} ones of {buf.numel()}")
    return buf.numel() * 4 / statistics.median(times) / 1e9


def gguf_bytes(path: Path) -> int:
    """Weight bytes one decode token of llama.cpp reads from a GGUF: its tensors', less an
    embedding table the head does not share (``output.weight`` present)."""
    from gguf import GGUFReader
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    skip = "token_embd.weight" if "output.weight" in tensors else None
    return sum(n for k, n in tensors.items() if k != skip)


def measure(mode: str, prompt: list[int], prefill: int, decode: int) -> dict[str, float]:
    """Worker: one prefill of ``prefill`` tokens, then one-token prompt + ``decode`` tokens."""
    from ..sampling import SamplingParams, sample
    from ..serve.kv import Chunk
    step, head = _STATE["steps"][mode], _STATE["model"].lm_head
    blocks = list(range(step.cache.num_blocks))
    greedy = [SamplingParams()]

    def pick(logits: torch.Tensor) -> int:
        return int(sample(logits, greedy, [None], start=head.start, vocab=head.num_embeddings,
                          group=_STATE["group"])[0])

    with torch.inference_mode():
        _barrier()
        t0 = time.perf_counter()
        pick(step([Chunk(0, prompt[:prefill], 0, blocks, True)]))
        prefill_s = time.perf_counter() - t0
        tok = pick(step([Chunk(0, prompt[:1], 0, blocks, True)]))
        _barrier()
        t0 = time.perf_counter()
        for pos in range(1, decode + 1):
            tok = pick(step([Chunk(0, [tok], pos, blocks, True)]))
        decode_s = time.perf_counter() - t0
    return {"prefill_tps": prefill / prefill_s, "decode_tps": decode / decode_s}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------- llama.cpp
def llama_bench(binary: Path, gguf: Path, threads: int, prefill: int, decode: int) -> dict:
    """One llama-bench run (pp and tg, one repetition each): tokens per second."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prefill),
                          "-n", str(decode), "-r", "1", "-o", "json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    get = lambda k: next(r["avg_ts"] for r in rows if r[k] > 0)  # noqa: E731
    return {"prefill_tps": get("n_prompt"), "decode_tps": get("n_gen")}


def llama_contenders(model: str, dtypes: list[str]) -> tuple[dict[str, Any], str | None]:
    """name -> (llama-bench, gguf) for each dtype (``float32``, ``bfloat16``) or quantization
    (``int8``, ``int4``), or why llama.cpp is skipped."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import llama_cpp  # benchmarks/llama_cpp.py
    except ImportError:
        return {}, "benchmarks/llama_cpp.py not found (run from a source checkout)"
    if model != "smollm2-135m":
        return {}, f"llama.cpp runs only the GGUF model smollm2-135m here, not {model!r}"
    bins, why = llama_cpp.binaries()
    if bins is None:
        return {}, why
    from ..checkpoint.gguf import find_smollm2_gguf
    src = find_smollm2_gguf()
    try:
        return {f"llama.cpp {DTYPES.get(d) or QUANTS[d]}":
                (bins["llama-bench"], llama_cpp.gguf_at(d, src)) for d in dtypes}, None
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return {}, f"llama-quantize failed: {e}"


# ---------------------------------------------------------------------------- transformers
def hf_measure(model: str, dtype: str, prompt: list[int], prefill: int, decode: int) -> dict:
    """transformers eager (dynamic cache) in this process, all cores."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint.source import resolve
    key = ("hf", dtype)
    if key not in _STATE:
        _STATE[key] = AutoModelForCausalLM.from_pretrained(
            resolve(model).weights, dtype=getattr(torch, dtype)).eval()
    m = _STATE[key]
    with torch.inference_mode():
        t0 = time.perf_counter()
        m(torch.tensor([prompt[:prefill]]))
        prefill_s = time.perf_counter() - t0
        out = m(torch.tensor([prompt[:1]]), use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode):
            out = m(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return {"prefill_tps": prefill / prefill_s, "decode_tps": decode / decode_s}


# ---------------------------------------------------------------------------- the run
def bench_decode(*, model: str = "smollm2-135m", tps: tuple[int, ...] = (1, 2),
                 dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                 modes: tuple[str, ...] = ("eager", "compiled"), rounds: int = 3,
                 prefill: int = 128, decode: int = 64, llama: bool = True,
                 transformers: bool = False, progress: bool = True,
                 quants: tuple[str, ...] = ("none",)) -> dict[str, Any]:
    """Every contender once per round, ``rounds`` times; medians, ratios and goals.
    ``quants``: ``none`` (the dtype's dense weights) and/or ``int8``, ``int4``."""
    from ..launch import WorkerPool
    if rounds < 1 or prefill < 1 or decode < 1:
        raise ValueError(f"rounds={rounds}, prefill={prefill}, decode={decode}: each must be >= 1")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (max(prefill, 1),), generator=g).tolist()
    cores = len(os.sched_getaffinity(0))
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores, "torch": torch.__version__,
                            "loadavg_start": list(os.getloadavg()), "skipped": {}}
    runs: dict[str, list[dict]] = {}
    pools: dict[tuple[int, str, str], WorkerPool] = {}
    kinds = [d for d in dtypes if "none" in quants] + [q for q in quants if q != "none"]
    llamas, why = llama_contenders(model, kinds) if llama else ({}, "--no-llama")
    specs = {q: model for q in quants}
    if "int8" in quants and "llama.cpp Q8_0" in llamas:  # the file llama.cpp's Q8_0 reads
        specs["int8"] = str(llamas["llama.cpp Q8_0"][1])
    if why:
        info["skipped"]["llama.cpp"] = why
        if progress:
            print(f"llama.cpp skipped: {why}", file=sys.stderr)
    try:
        for tp in tps:
            for dt in dtypes:
                for q in quants:
                    pools[(tp, dt, q)] = WorkerPool(tp, timeout_s=1800)
        nbytes: dict[str, int] = {}  # weight bytes a decode token reads, all ranks together
        for (tp, dt, q), pool in pools.items():
            ranks = pool.run(setup, specs[q], dt, modes, tp, None if q == "none" else q)
            total = sum(r.pop("decode_bytes") for r in ranks)
            info[contender(tp, dt, q)] = ranks[0]
            for mode in modes:
                nbytes[f"shardwise {contender(tp, dt, q)} {mode}"] = total
        for name, (_, gguf) in llamas.items():
            nbytes[name] = gguf_bytes(gguf)
        info["decode_bytes"], info["read_gbps"] = nbytes, []
        for r in range(rounds):
            info["read_gbps"].append(round(read_bandwidth(cores), 2))
            if progress:
                print(f"round {r + 1} read bandwidth {info['read_gbps'][-1]:.1f} GB/s",
                      file=sys.stderr, flush=True)
            for (tp, dt, q), pool in pools.items():
                for mode in modes:
                    name = f"shardwise {contender(tp, dt, q)} {mode}"
                    runs.setdefault(name, []).append(
                        pool.run(measure, mode, prompt, prefill, decode)[0])
                    _say(progress, r, name, runs[name][-1])
            for name, (binary, gguf) in llamas.items():
                runs.setdefault(name, []).append(llama_bench(binary, gguf, cores, prefill, decode))
                _say(progress, r, name, runs[name][-1])
            for dt in dtypes if transformers else ():
                name = f"transformers {dt}"
                runs.setdefault(name, []).append(hf_measure(model, dt, prompt, prefill, decode))
                _say(progress, r, name, runs[name][-1])
    finally:
        for pool in pools.values():
            pool.close()
    info["loadavg_end"] = list(os.getloadavg())
    return summarize(runs, info, tps, dtypes, quants)


def contender(tp: int, dtype: str, quant: str) -> str:
    return f"tp={tp} {dtype}" + ("" if quant == "none" else f" {quant}")


def _say(progress: bool, r: int, name: str, res: dict) -> None:
    if progress:
        print(f"round {r + 1} {name:<36} decode {res['decode_tps']:7.1f} tok/s, prefill "
              f"{res['prefill_tps']:7.1f} tok/s", file=sys.stderr, flush=True)


def summarize(runs: dict[str, list[dict]], info: dict[str, Any], tps, dtypes,
              quants=("none",)) -> dict[str, Any]:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "prefill_tps")}
           for k, v in runs.items()}

    def first(*names: str) -> str | None:  # the first of these contenders that ran
        return next((n for n in names if n in med), None)

    def compare(a: str, b: str, metric: str) -> dict[str, Any]:
        """``a``'s rate over ``b``'s: the ratio of medians (which decides), and round by round (a
        round's contenders ran minutes apart, so those carry less of the machine's drift)."""
        return _goal(med[a][metric] / med[b][metric], 1.0,
                     [x[metric] / y[metric] for x, y in zip(runs[a], runs[b])])

    goals: dict[str, dict[str, Any]] = {}
    for q in quants:  # issue 16: quantized decode beside llama.cpp's file, and tp=2 / tp=1
        if q == "none":
            continue
        for dt in dtypes:
            mine = first(f"shardwise tp=1 {dt} {q} compiled", f"shardwise tp=1 {dt} {q} eager")
            ref = first(f"llama.cpp {QUANTS[q]}")
            if mine and ref:
                goals[f"decode tp=1 {dt} {q} / llama.cpp {QUANTS[q]}"] = \
                    compare(mine, ref, "decode_tps")
            two = first(f"shardwise tp=2 {dt} {q} compiled", f"shardwise tp=2 {dt} {q} eager")
            if mine and two:
                goals[f"decode tp=2 / tp=1 {dt} {q}"] = compare(two, mine, "decode_tps")
    for dt in dtypes if "none" in quants else ():
        mine = first(f"shardwise tp=1 {dt} compiled")
        ref = first(f"llama.cpp {DTYPES[dt]}")
        if mine and ref:
            goals[f"decode tp=1 {dt} / llama.cpp {DTYPES[dt]}"] = compare(mine, ref, "decode_tps")
            goals[f"prefill {dt} / llama.cpp pp {DTYPES[dt]}"] = compare(mine, ref, "prefill_tps")
        two = first(f"shardwise tp=2 {dt} compiled")
        if mine and two:
            goals[f"decode tp=2 / tp=1 {dt}"] = compare(two, mine, "decode_tps")
    return {"median": med, "runs": runs, "goals": goals, "machine": info,
            "bandwidth": bandwidth(runs, info)}


def bandwidth(runs: dict[str, list[dict]], info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per contender with known bytes: weight bytes per decode token, GB/s at its median decode
    rate, and its share of the read bandwidth measured in the same round (median over rounds)."""
    nbytes, probe = info.get("decode_bytes", {}), info.get("read_gbps", [])
    out = {}
    for name, rs in runs.items():
        if name not in nbytes:
            continue
        gbps = [nbytes[name] * r["decode_tps"] / 1e9 for r in rs]
        row = {"bytes": nbytes[name], "gbps": round(statistics.median(gbps), 2)}
        if probe:
            row["of_read"] = round(statistics.median(g / p for g, p in zip(gbps, probe)), 3)
        out[name] = row
    return out


def _goal(ratio: float, goal: float, paired: list[float] = ()) -> dict[str, Any]:
    """``ratio`` (of the medians) decides; the per-round ratios are reported beside it."""
    out = {"ratio": round(ratio, 3), "goal": goal, "met": ratio >= goal}
    if paired:
        out["paired"] = {"median": round(statistics.median(paired), 3),
                         "min": round(min(paired), 3), "max": round(max(paired), 3)}
    return out


def format_table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average "
             f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}", "",
             "| contender | decode tok/s | prefill tok/s | runs (decode) |", "|---|---|---|---|"]
    for k, v in res["median"].items():
        runs = ", ".join(f"{r['decode_tps']:.1f}" for r in res["runs"][k])
        lines.append(f"| {k} | {v['decode_tps']:.1f} | {v['prefill_tps']:.0f} | {runs} |")
    lines += ["", "| goal | ratio of medians | per round: median (min-max) | |",
              "|---|---|---|---|"]
    for k, g in res["goals"].items():
        p = g.get("paired")
        per = f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})" if p else ""
        lines.append(f"| {k} >= {g['goal']} | {g['ratio']:.2f} | {per} | "
                     f"{'met' if g['met'] else 'MISSED'} |")
    bw, probe = res.get("bandwidth", {}), m.get("read_gbps", [])
    if bw:
        lines += ["", "Decode against the memory bandwidth (weight bytes per token x tok/s; read "
                  "bandwidth: a sum over 512 MiB of fp32, all cores, 16 streams each, each round" +
                  (f": median {statistics.median(probe):.1f} GB/s, {min(probe):.1f}-"
                   f"{max(probe):.1f})" if probe else ")"), "",
                  "| contender | MB per token | GB/s | of the read bandwidth |", "|---|---|---|---|"]
        for k, v in bw.items():
            share = f"{v['of_read']:.0%}" if "of_read" in v else ""
            lines.append(f"| {k} | {v['bytes'] / 1e6:.0f} | {v['gbps']:.1f} | {share} |")
    for k, why in m["skipped"].items():
        lines.append(f"\n{k} skipped: {why}")
    for k, v in m.items():
        if k.startswith("tp="):
            lines.append(f"{k}: {v}")
    return "\n".join(lines)
