"""Prefix caching on a multi-turn chat workload: time to first token with the cache and without.

    /work/wt/cpulock bench /work/main/.venv/bin/python benchmarks/prefix_bench.py --tp 1

Two servers of SmolLM2-135M-Instruct, one with the prefix cache (A, the default) and one with
``--no-prefix-cache`` (B). ``--conversations`` conversations of ``--turns`` turns each: every
request repeats the conversation so far (the system prompt, the earlier questions and answers)
and asks one more question; greedy, ``--max-tokens`` per answer. Conversations run in groups of
``--group`` at a time (each conversation's turns one after another); each group runs on both
servers, in alternating order (A B, B A, ...). Time to first token = from sending the request to
the first streamed chunk (the server sends nothing before the first token). Goal: the median with
the cache at least 3x lower; and the same answers with and without it (a differing answer is
reported with the gap between its top two log-probabilities where it first differs: a
floating-point near tie, or not).
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
SYSTEM = ("You are a friendly tutor. Explain things simply, in two or three sentences, and end "
          "with a short question that checks the student understood.")
TOPICS = ["photosynthesis", "gravity", "volcanoes", "the water cycle", "fractions", "magnets",
          "the moon's phases", "rainbows", "earthquakes", "electricity", "the heart", "clouds",
          "bees", "tides", "sound", "friction"]
FOLLOW = ["Why does that happen?", "Can you give me an everyday example?",
          "How would you explain it to a five-year-old?", "What is a common mistake about it?"]


def question(conv: int, turn: int) -> str:
    return f"Tell me about {TOPICS[conv % len(TOPICS)]}." if turn == 0 else \
        FOLLOW[(turn - 1 + conv) % len(FOLLOW)]


async def turn(http: httpx.AsyncClient, url: str, msgs: list[dict],
               max_tokens: int) -> tuple[float, str, list]:
    """(time to first token, answer, logprob entries) of one streamed request."""
    body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logprobs": True, "top_logprobs": 2}
    t0 = time.perf_counter()
    ttft, text, lps = None, "", []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ttft = ttft or time.perf_counter() - t0
            for c in json.loads(line[6:])["choices"]:
                text += c["delta"].get("content") or ""
                lps += (c.get("logprobs") or {}).get("content") or []
    return ttft, text, lps


async def conversation(http, url: str, conv: int, turns: int, max_tokens: int) -> list:
    msgs, out = [{"role": "system", "content": SYSTEM}], []
    for t in range(turns):
        msgs.append({"role": "user", "content": question(conv, t)})
        ttft, text, lps = await turn(http, url, msgs, max_tokens)
        out.append((ttft, text, lps))
        msgs.append({"role": "assistant", "content": text})
    return out


async def group(url: str, convs: range, turns: int, max_tokens: int) -> list:
    async with httpx.AsyncClient(timeout=600) as http:
        return await asyncio.gather(*[conversation(http, url, c, turns, max_tokens)
                                      for c in convs])


def near_tie(a: list, b: list) -> float | None:
    """The smaller top-two gap where two answers' tokens first differ (None: no difference)."""
    for x, y in zip(a, b):
        if x["token"] != y["token"]:
            gaps = [abs(e["top_logprobs"][0]["logprob"] - e["top_logprobs"][1]["logprob"])
                    for e in (x, y) if len(e["top_logprobs"]) > 1]
            return min(gaps) if gaps else 0.0
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="conversations at a time")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(machine(), flush=True)
    res: dict[str, dict[int, list]] = {"cache": {}, "no cache": {}}
    with serve(MODEL, args.tp) as a, serve(MODEL, args.tp, "--no-prefix-cache") as b:
        urls = {"cache": a, "no cache": b}
        for g, lo in enumerate(range(0, args.conversations, args.group)):
            convs = range(lo, min(lo + args.group, args.conversations))
            for name in (("cache", "no cache") if g % 2 == 0 else ("no cache", "cache")):
                for c, out in zip(convs, asyncio.run(group(urls[name], convs, args.turns,
                                                           args.max_tokens))):
                    res[name][c] = out
            print(f"group {g}: done", flush=True)
        m = {k: metrics(u) for k, u in urls.items()}
    ttft = {k: [t for conv in v.values() for t, _, _ in conv] for k, v in res.items()}
    by_turn = {k: [statistics.median(conv[t][0] for conv in v.values())
                   for t in range(args.turns)] for k, v in res.items()}
    diffs, same = [], 0
    for c in range(args.conversations):
        for t in range(args.turns):
            x, y = res["cache"][c][t], res["no cache"][c][t]
            if x[1] != y[1]:
                diffs.append({"conversation": c, "turn": t, "gap": near_tie(x[2], y[2])})
                break  # later turns see different histories: not compared
            same += 1
    p50 = {k: statistics.median(v) for k, v in ttft.items()}
    hit = m["cache"]["shardwise_prefix_cache_hit_tokens_total"]
    fig = {"machine": machine(), "tp": args.tp, "requests": len(ttft["cache"]),
           "ttft_p50_s": p50, "ttft_p90_s": {k: sorted(v)[int(0.9 * (len(v) - 1))]
                                             for k, v in ttft.items()},
           "ttft_p50_by_turn_s": by_turn, "speedup_p50": p50["no cache"] / p50["cache"],
           "hit_ratio": m["cache"]["shardwise_prefix_cache_hit_ratio"],
           "hit_tokens": hit,
           "prefill_tokens": {k: v["shardwise_prefill_tokens_total"] for k, v in m.items()},
           "answers_identical": same,
           "conversations_differing": diffs}
    print(json.dumps(fig, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0 if fig["speedup_p50"] >= 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
