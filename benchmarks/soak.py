"""Soak the real server: many requests of every kind, then check that nothing was lost or leaked.

    /work/wt/cpulock bench python benchmarks/soak.py --model debug --tp 2 --requests 2000
    /work/wt/cpulock bench python benchmarks/soak.py --model smollm2-135m --tp 2 --requests 200

Starts ``shardwise serve`` on a free loopback port (with an API key), sends ``--requests``
requests from ``--concurrency`` clients: random prompt lengths (text or token ids) and
``max_tokens``, chat and completions, half streaming; ``--cancel`` of them (10%) are streams
that the client closes after a few chunks; ``--invalid`` (5%) are bad requests (a 2**80 seed, JSON
100,000 levels deep, a body over the size limit, unsupported fields, wrong types, token ids
beyond the vocabulary, a wrong API key). Bounded: it stops sending at ``--deadline`` seconds.

Pass: every valid request answered (200 and a finish reason; cancelled ones excepted), every
invalid one a 4xx, no 5xx at all, the same worker processes at the end, no KV block and no
in-flight slot held after the last request, no ``/dev/shm`` segment left after the server exits,
and resident memory (server + workers) grown by under 5% from after the warm-up (the first 10%
of requests) to the end. Prints a markdown table and writes ``--json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shardwise.bench import cpu_model  # noqa: E402,F401  (served.py imports it from here)
from shardwise.launch import free_port  # noqa: E402

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "the a of to in tensor parallel model rank shard cache token batch server request".split()


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1))
    return total / 1024


def shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm"))


def mapped_shm(pids: list[int]) -> set[str]:
    """The /dev/shm entries our processes have mapped (other users of the machine create and
    remove their own meanwhile: only ours, and any ``shardwise-*`` segment, are checked)."""
    out = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            out |= {m.group(1) for m in re.finditer(r"/dev/shm/(\S+)", f.read())}
    return out


def invalid_request(rng: random.Random, model: str) -> tuple[str, bytes, dict]:
    msgs = [{"role": "user", "content": "hi"}]
    kinds = [
        {"model": model, "messages": msgs, "seed": 2**80},
        "[" * 100_000 + "]" * 100_000,
        '{"model": "%s", "prompt": "%s"}' % (model, "x" * (9 << 20)),
        {"model": model, "messages": msgs, "tools": [{"type": "function",
                                                      "function": {"name": "f"}}],
         "tool_choice": {"type": "function", "function": {"name": "g"}}},
        {"model": model, "messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"model": model, "prompt": "x", "echo": True, "best_of": 3},
        {"model": model, "messages": msgs, "n": 300},
        {"model": model, "messages": msgs, "temperature": "hot"},
        {"model": model, "prompt": [1, 2, 10**9]},
        {"model": model, "prompt": "x", "max_tokens": 10**6},
        {"model": model, "messages": msgs, "max_token": 3},
        {"model": "gpt-4", "messages": msgs},
    ]
    i = rng.randrange(len(kinds) + 1)
    if i == len(kinds):  # the wrong key
        return "/v1/completions", json.dumps({"model": model, "prompt": "x"}).encode(), \
            {"Authorization": "Bearer wrong"}
    body = kinds[i]
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return ("/v1/completions" if "prompt" in str(body)[:400] else "/v1/chat/completions"), \
        data, AUTH


def valid_request(rng: random.Random, model: str, vocab: int, max_new: int) -> tuple[str, dict]:
    n = rng.randint(1, 120)
    body: dict = {"model": model, "max_tokens": rng.randint(1, max_new),
                  "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(2**63)}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": " ".join(rng.choice(WORDS)
                                                                 for _ in range(n))}]
        return "/v1/chat/completions", body
    body["prompt"] = [rng.randrange(100, vocab) for _ in range(n)] if rng.random() < 0.5 else \
        " ".join(rng.choice(WORDS) for _ in range(n))
    return "/v1/completions", body


async def one(http: httpx.AsyncClient, url: str, rng: random.Random, args, vocab: int,
              out: dict) -> None:
    r = rng.random()
    t0 = time.perf_counter()
    if r < args.invalid:
        path, data, headers = invalid_request(rng, args.model)
        resp = await http.post(url + path, content=data,
                               headers={"content-type": "application/json", **headers})
        out["invalid"].append(resp.status_code)
        return
    path, body = valid_request(rng, args.model, vocab, args.max_tokens)
    cancel = r < args.invalid + args.cancel
    stream = cancel or rng.random() < 0.5
    if not stream:
        resp = await http.post(url + path, json=body, headers=AUTH)
        ok = resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in \
            ("stop", "length")
        out["valid"].append((resp.status_code, ok, time.perf_counter() - t0))
        return
    body["stream"] = True
    body["max_tokens"] = max(body["max_tokens"], 8) if cancel else body["max_tokens"]
    async with http.stream("POST", url + path, json=body, headers=AUTH) as resp:
        finish, chunks = None, 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            if cancel and chunks >= 2:
                break  # close the connection mid-stream
            for c in json.loads(line[6:]).get("choices", []):
                finish = c.get("finish_reason") or finish
    if cancel:
        out["cancelled"].append(resp.status_code)
    else:
        out["valid"].append((resp.status_code, finish in ("stop", "length"),
                             time.perf_counter() - t0))


async def soak(url: str, args, vocab: int, on_warm) -> tuple[dict, float]:
    rng = random.Random(args.seed)
    out: dict = {"valid": [], "invalid": [], "cancelled": []}
    sem = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.deadline
    warm_at, sent = max(1, args.requests // 10), 0
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def guarded(seed: int) -> None:
            async with sem:
                await one(http, url, random.Random(seed), args, vocab, out)
        tasks = []
        for i in range(args.requests):
            if time.monotonic() > deadline:
                break
            await sem.acquire()
            sem.release()
            tasks.append(asyncio.create_task(guarded(rng.randrange(2**32))))
            sent += 1
            if sent == warm_at:
                await asyncio.gather(*tasks)
                on_warm()
        await asyncio.gather(*tasks)
    return out, time.perf_counter() - t0


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines()
                                     if ln.startswith("shardwise_"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens of a request")
    p.add_argument("--cancel", type=float, default=0.10)
    p.add_argument("--invalid", type=float, default=0.05)
    p.add_argument("--deadline", type=float, default=600.0, help="stop sending after (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    shm_before = shm_segments()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", SHARDWISE_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", "--model", args.model,
                             "--tp", str(args.tp), "--port", str(port)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(open(log.name).read())
            time.sleep(0.5)
        workers = httpx.get(url + "/health").json()["workers"]
        vocab = 49152
        pids = [proc.pid, *workers]
        rss: dict[str, float] = {}
        out, seconds = asyncio.run(soak(url, args, vocab,
                                        lambda: rss.__setitem__("warm", rss_mib(pids))))
        time.sleep(1.0)
        rss["end"] = rss_mib(pids)
        health = httpx.get(url + "/health").json()
        m = metrics(url)
        ours = mapped_shm(pids)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    time.sleep(0.5)
    now = shm_segments()
    leaked = sorted((now & ours) | {n for n in now - shm_before if n.startswith("shardwise")})
    valid = out["valid"]
    lat = sorted(t for _, _, t in valid)
    fig = {
        "cpu": cpu_model(), "load_avg": os.getloadavg(), "model": args.model, "tp": args.tp,
        "requests": len(valid) + len(out["invalid"]) + len(out["cancelled"]),
        "seconds": round(seconds, 1), "valid": len(valid),
        "valid_answered": sum(ok for _, ok, _ in valid),
        "cancelled": len(out["cancelled"]), "invalid": len(out["invalid"]),
        "invalid_4xx": sum(400 <= s < 500 for s in out["invalid"]),
        "status_5xx": sum(s >= 500 for s, _, _ in valid) + sum(s >= 500 for s in out["invalid"]),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "generated_tokens": int(m.get("shardwise_generation_tokens_total", 0)),
        "workers_same": health["workers"] == workers and health["status"] == "ok",
        "kv_blocks_used_after": m["shardwise_kv_blocks_used"],
        "in_flight_after": m["shardwise_requests_in_flight"],
        "shm_mapped_during_run": len(ours), "shm_leaked": leaked,
        "rss_warm_mib": round(rss["warm"], 1), "rss_end_mib": round(rss["end"], 1),
        "rss_growth": round(rss["end"] / rss["warm"] - 1, 4), "server_exit_code": code,
    }
    ok = (fig["valid_answered"] == fig["valid"] and fig["invalid_4xx"] == fig["invalid"]
          and fig["status_5xx"] == 0 and fig["workers_same"] and not leaked
          and fig["kv_blocks_used_after"] == 0 and fig["in_flight_after"] == 0
          and fig["rss_growth"] < 0.05 and code == 0)
    fig["pass"] = ok
    print(f"CPU: {fig['cpu']}; load average {fig['load_avg']}")
    print("| " + " | ".join(fig) + " |")
    print("| " + " | ".join(str(v) for v in fig.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    os.unlink(log.name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
