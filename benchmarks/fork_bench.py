"""``n`` samples of one prompt cost one prefill: n = 4 beside n = 1 and four separate requests.

    /work/wt/cpulock bench /work/main/.venv/bin/python benchmarks/fork_bench.py --tp 1

One SmolLM2 server with ``--no-prefix-cache`` (so that only the fork shares the prompt), a prompt
of about ``--prompt-tokens`` tokens, made different each round (no reuse across rounds either).
Interleaved rounds of three contenders: one request with n = 1; one request with n = 4; four
requests with n = 1 sent together. For each: the prompt tokens the engine ran through the model
(``shardwise_prefill_tokens_total``), the time to the first streamed chunk, and the time to the
whole answer (``--max-tokens`` per sample, ``ignore_eos``). Goal: n = 4 runs the prompt once.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from served import machine, metrics, serve

MODEL = "smollm2-135m"
WORDS = ("the model splits its weight matrices across ranks and every rank computes a slice of "
         "each layer before the partial sums meet in one all reduce").split()


def prompt(round_: int, n_tokens: int) -> str:
    words = [WORDS[(i * 7 + round_) % len(WORDS)] for i in range(n_tokens)]
    return f"Round {round_}. " + " ".join(words)


async def request(http: httpx.AsyncClient, url: str, text: str, n: int, seed: int,
                  max_tokens: int) -> float:
    """Time to the first streamed chunk."""
    body = {"model": MODEL, "prompt": text, "n": n, "max_tokens": max_tokens, "stream": True,
            "temperature": 1.0, "seed": seed, "ignore_eos": True}
    t0, first = time.perf_counter(), None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - t0
    return first or 0.0


async def contender(url: str, kind: str, text: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, time to the whole answer)."""
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        if kind == "n=1":
            ttft = await request(http, url, text, 1, 1, max_tokens)
        elif kind == "n=4":
            ttft = await request(http, url, text, 4, 1, max_tokens)
        else:
            ttft = max(await asyncio.gather(*[request(http, url, text, 1, s, max_tokens)
                                              for s in range(4)]))
        return ttft, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(machine(), flush=True)
    kinds = ["n=1", "n=4", "4 x n=1"]
    out: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "ttft": [], "total": []}
                                              for k in kinds}
    with serve(MODEL, args.tp, "--no-prefix-cache") as url:
        asyncio.run(contender(url, "n=1", "warm up", 2))
        for r in range(args.rounds):
            for i, kind in enumerate(kinds[r % 3:] + kinds[:r % 3]):  # rotate the order
                before = metrics(url)["shardwise_prefill_tokens_total"]
                ttft, total = asyncio.run(contender(url, kind, prompt(10 * r + i,
                                                                      args.prompt_tokens),
                                                    args.max_tokens))
                out[kind]["prefill"].append(metrics(url)["shardwise_prefill_tokens_total"] -
                                            before)
                out[kind]["ttft"].append(ttft)
                out[kind]["total"].append(total)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in out.items()}
    fig = {"machine": machine(), "tp": args.tp, "rounds": out, "median": med,
           "prefill_ratio_n4_vs_n1": med["n=4"]["prefill"] / med["n=1"]["prefill"],
           "ttft_ratio_n4_vs_n1": med["n=4"]["ttft"] / med["n=1"]["ttft"],
           "ttft_ratio_4sep_vs_n1": med["4 x n=1"]["ttft"] / med["n=1"]["ttft"]}
    print(json.dumps({k: v for k, v in fig.items() if k != "rounds"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0 if fig["prefill_ratio_n4_vs_n1"] == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
