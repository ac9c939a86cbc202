"""``shardwise bench serve``: a chat-service load on the real server, beside transformers.

Workload (seeded): ``--requests`` prompts of ``--prompt-min..--prompt-max`` random tokens, each
asking for ``--out-min..--out-max`` tokens (greedy, end-of-sequence ignored so lengths are exact),
sent by ``--concurrency`` clients in arrival order over loopback as streaming completions.

Contenders, interleaved and repeated (medians reported, the machine is noisy):

* ``shardwise tp=N``: ``python -m shardwise.serve`` started per run; output tokens/s, time to
  first token and inter-token latency (client side, per SSE chunk) p50 / p99, and the engine's
  step profile from ``/metrics``;
* ``llama-server``: llama.cpp's server on the same weights at the same precision (F32 / BF16
  GGUF; with ``--quant int4`` the Q4_1 file both serve, ``int8`` its Q8_0 re-quantization), one
  slot per client, all cores (``benchmarks/llama_cpp.py`` builds it);
* ``hf static``: transformers ``generate`` on batches of ``--concurrency`` in arrival order, each
  batch until its longest request is done (left padding);
* ``hf generate_batch``: transformers' continuous batching on the whole workload with each
  request's own ``max_new_tokens``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Run:
    name: str
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def workload(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    return [([rng.randrange(100, 40000) for _ in range(rng.randint(args.prompt_min,
                                                                   args.prompt_max))],
             rng.randint(args.out_min, args.out_max)) for _ in range(args.requests)]


# ---------------------------------------------------------------------------- shardwise
async def _client(url: str, model: str, jobs: asyncio.Queue, run: Run, deadline: float) -> None:
    # a fresh connection per request (loopback: cheap, the same for every contender): a kept-alive
    # one the server has closed in the meantime fails as "disconnected without a response"
    async with httpx.AsyncClient(timeout=600,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as http:
        while not jobs.empty() and time.monotonic() < deadline:
            prompt, n = jobs.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            t0, last = time.perf_counter(), None
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    run.ttft.append(now - t0) if last is None else run.itl.append(now - last)
                    last = now
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        run.tokens += usage["completion_tokens"]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _start(cmd: list[str], url: str, what: str, timeout_s: float = 600):
    """Start a server process and wait for its /health (compiling can take minutes)."""
    import subprocess
    import tempfile
    # stderr to a file, not a pipe nobody drains: a chatty server blocks once a pipe is full
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start: {_tail(proc)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _tail(proc, chars: int = 3000) -> str:
    proc.log.seek(0)
    return proc.log.read()[-chars:]


def _stop(proc) -> None:
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.log.close()


def _drive(args: argparse.Namespace, url: str, model: str, run: Run, work) -> None:
    """Warm up with one short request, then the workload from ``--concurrency`` clients."""
    httpx.post(url + "/v1/completions", timeout=300, json={"model": model, "prompt": "hi",
                                                           "max_tokens": 4})
    jobs: asyncio.Queue = asyncio.Queue()
    for w in work:
        jobs.put_nowait(w)

    async def go() -> None:
        end = time.monotonic() + args.timeout
        await asyncio.gather(*[_client(url, model, jobs, run, end)
                               for _ in range(args.concurrency)])
    t0 = time.perf_counter()
    asyncio.run(go())
    run.seconds = time.perf_counter() - t0


def bench_shardwise(args: argparse.Namespace, tp: int, work) -> Run:
    from ..launch import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = args.model
    if args.quant == "int8":  # the Q8_0 file llama-server reads
        from ..bench.decode import llama_contenders
        found, _ = llama_contenders(args.model, ["int8"])
        model = str(next(iter(found.values()))[1]) if found else model
    cmd = [sys.executable, "-m", "shardwise.serve", "--model", model, "--tp", str(tp),
           "--port", str(port), "--max-seqs", str(args.concurrency), "--dtype", args.dtype,
           "--max-batched-tokens", str(args.max_batched_tokens), "--profile"]
    cmd += ["--no-compile"] if args.no_compile else []
    cmd += ["--quant", args.quant] if args.quant else []
    t0 = time.perf_counter()
    proc = _start(cmd, url, f"server tp={tp}")
    try:
        start_s = time.perf_counter() - t0
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        run = Run(f"shardwise tp={tp}" + (f" {args.quant}" if args.quant else ""), 0, 0.0)
        before = httpx.get(url + "/metrics").text
        _drive(args, url, name, run, work)
        after = httpx.get(url + "/metrics").text
        delta = {k: _metric(after, f"shardwise_{k}") - _metric(before, f"shardwise_{k}")
                 for k in ("engine_steps_total", "engine_step_seconds_total",
                           "engine_comm_seconds_total", "engine_mixed_steps_total",
                           "engine_mixed_step_seconds_total")}
        steps, step_s = delta["engine_steps_total"], delta["engine_step_seconds_total"]
        mixed, mixed_s = delta["engine_mixed_steps_total"], delta["engine_mixed_step_seconds_total"]
        run.extra = {"steps": steps, "step_ms": 1000 * step_s / max(steps, 1),
                     "mixed_steps": mixed, "mixed_share": mixed_s / max(step_s, 1e-9),
                     "mixed_step_ms": 1000 * mixed_s / max(mixed, 1),
                     "decode_step_ms": 1000 * (step_s - mixed_s) / max(steps - mixed, 1),
                     "comm_fraction": delta["engine_comm_seconds_total"] / max(step_s, 1e-9),
                     "engine_busy": step_s / run.seconds, "start_s": start_s,
                     "preemptions": _metric(after, "shardwise_preemptions_total")}
        return run
    finally:
        _stop(proc)


def bench_llama_server(args: argparse.Namespace, work) -> Run:
    """llama.cpp's server on the same weights (F32 / BF16 GGUF), ``--concurrency`` slots of
    ``prompt_max + out_max`` tokens each, continuous batching, all cores."""
    from ..bench.decode import DTYPES, QUANTS, llama_contenders
    from ..launch import free_port
    found, why = llama_contenders(args.model, [args.quant or args.dtype])
    if not found:
        raise RuntimeError(f"llama-server unavailable: {why}")
    bench_bin, gguf = next(iter(found.values()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slot = args.prompt_max + args.out_max + 16
    cmd = [str(bench_bin.with_name("llama-server")), "-m", str(gguf), "--port", str(port),
           "-np", str(args.concurrency), "-c", str(args.concurrency * slot),
           "-t", str(len(os.sched_getaffinity(0))), "--threads-http", str(args.concurrency + 4),
           "--no-webui"]
    t0 = time.perf_counter()
    proc = _start(cmd, url, "llama-server")
    try:
        run = Run(f"llama-server {QUANTS[args.quant] if args.quant else DTYPES[args.dtype]}",
                  0, 0.0,
                  extra={"start_s": time.perf_counter() - t0})
        try:
            _drive(args, url, "model", run, work)
        except httpx.HTTPError as e:
            raise RuntimeError(f"llama-server failed ({e}); its log ends:\n{_tail(proc)}") from e
        return run
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------- transformers
_HF: dict = {}


def _hf_model(model: str):
    if "m" not in _HF:
        import torch
        from transformers import AutoModelForCausalLM

        from ..checkpoint.source import resolve
        src = resolve(model)
        if src.weights is None:
            raise ValueError(f"{model!r} has no weights on disk for transformers to load")
        torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
        _HF["m"] = AutoModelForCausalLM.from_pretrained(src.weights, dtype=torch.float32).eval()
        # transformers' baselines run fp32 whatever --dtype says (they are the issue-4 baselines)
    return _HF["m"]


def bench_static(args: argparse.Namespace, work) -> Run:
    import torch
    m = _hf_model(args.model)
    run = Run("hf static", 0, 0.0)
    t0, deadline = time.perf_counter(), time.monotonic() + args.timeout
    with torch.inference_mode():
        for i in range(0, len(work), args.concurrency):
            if time.monotonic() > deadline:
                break
            batch = work[i:i + args.concurrency]
            run.tokens += sum(n for _, n in batch)
            width, longest = max(len(p) for p, _ in batch), max(n for _, n in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                       min_new_tokens=longest, do_sample=False, pad_token_id=0)
    run.seconds = time.perf_counter() - t0
    return run


def bench_generate_batch(args: argparse.Namespace, work) -> Run:
    import torch
    from transformers import GenerationConfig
    m = _hf_model(args.model)
    gc = GenerationConfig(max_new_tokens=args.out_max, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    run = Run("hf generate_batch", 0, 0.0)
    t0 = time.perf_counter()
    with torch.inference_mode(), m.continuous_batching_context_manager(generation_config=gc) \
            as manager:
        for p, n in work:
            manager.add_request(p, max_new_tokens=n)
        done, deadline = 0, time.monotonic() + args.timeout
        while done < len(work) and time.monotonic() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                done += 1
                run.tokens += len(r.generated_tokens)
    run.seconds = time.perf_counter() - t0
    return run


# ---------------------------------------------------------------------------- report
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(runs: dict[str, list[Run]], args: argparse.Namespace) -> str:
    from ..bench import cpu_model
    lines = [f"Workload: {args.requests} requests, prompts {args.prompt_min}-{args.prompt_max} "
             f"tokens, outputs {args.out_min}-{args.out_max} tokens, at most {args.concurrency} "
             f"in flight; model {args.model} {args.dtype}"
             f"{' --quant ' + args.quant if args.quant else ''}; {args.repeats} interleaved repeat(s), "
             f"medians. {cpu_model()}, load average {os.getloadavg()[0]:.2f} at the end.",
             "", "| contender | output tok/s | vs llama-server | vs static | TTFT p50 / p99 (s) | "
             "ITL p50 / p99 (ms) | step ms: decode / mixed | mixed share | in collectives | "
             "engine busy | start (s) | runs (tok/s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    med = {name: statistics.median(r.tps for r in rs) for name, rs in runs.items()}
    static = med.get("hf static")
    llama = next((v for k, v in med.items() if k.startswith("llama-server")), None)
    for name, rs in runs.items():
        tps = med[name]
        ttft = [x for r in rs for x in r.ttft]
        itl = [x for r in rs for x in r.itl]
        lat = f"{_pct(ttft, .5):.2f} / {_pct(ttft, .99):.2f}" if ttft else "-"
        il = f"{1000 * _pct(itl, .5):.0f} / {1000 * _pct(itl, .99):.0f}" if itl else "-"
        ours = "step_ms" in rs[0].extra
        med_of = lambda k: statistics.median(r.extra[k] for r in rs)  # noqa: E731
        step = f"{med_of('decode_step_ms'):.0f} / {med_of('mixed_step_ms'):.0f}" if ours else "-"
        mixed = f"{med_of('mixed_share'):.0%}" if ours else "-"
        start = f"{med_of('start_s'):.1f}" if "start_s" in rs[0].extra else "-"
        busy = f"{statistics.median(r.extra['engine_busy'] for r in rs):.0%}" if ours else "-"
        comm = f"{statistics.median(r.extra.get('comm_fraction', 0) for r in rs):.0%}" \
            if ours else "-"
        vs_llama = f"{tps / llama:.2f}x" if llama else "-"
        vs_static = f"{tps / static:.2f}x" if static else "-"
        lines.append(f"| {name} | {tps:.1f} | {vs_llama} | {vs_static} | {lat} | {il} | {step} | "
                     f"{mixed} | {comm} | {busy} | {start} | "
                     f"{', '.join(f'{r.tps:.1f}' for r in rs)} |")
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> int:
    work = workload(args)
    tps = [int(t) for t in args.tp.split(",") if t]
    base = [b for b in args.baselines.split(",") if b]
    order = []  # interleave: tp=1, static, tp=2, generate_batch, tp=3, ...
    for i in range(max(len(tps), len(base))):
        order += [("tp", tps[i])] if i < len(tps) else []
        order += [("hf", base[i])] if i < len(base) else []
    runs: dict[str, list[Run]] = {}
    for rep in range(args.repeats):
        for kind, what in (order if rep % 2 == 0 else order[::-1]):
            if kind == "tp":
                r = bench_shardwise(args, what, work)
            elif what == "llama-server":
                r = bench_llama_server(args, work)
            else:
                r = {"static": bench_static, "generate_batch": bench_generate_batch}[what](
                    args, work)
            runs.setdefault(r.name, []).append(r)
            print(f"[rep {rep}] {r.name}: {r.tokens} tokens in {r.seconds:.1f} s = "
                  f"{r.tps:.1f} tok/s {r.extra or ''}", file=sys.stderr, flush=True)
    text = report(runs, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
