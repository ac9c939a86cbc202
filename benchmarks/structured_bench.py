"""Structured output on the real server: every answer valid, and what the token mask costs.

    /work/wt/cpulock bench /work/main/.venv/bin/python benchmarks/structured_bench.py --tp 1
    /work/wt/cpulock bench /work/main/.venv/bin/python benchmarks/structured_bench.py --tp 2

1. Validity: ``--outputs`` chat requests (``response_format`` json_schema, strict), cycling over
   five nested schemas (objects in arrays in objects, enums, required fields, numbers with
   bounds), sampled at temperature 0.8 with a seed per request, ``--concurrency`` at a time.
   Each answer must parse (``json.loads``) and validate (``jsonschema``). With ``--bounded``, every
   string without a ``maxLength`` gets 40, every array without ``maxItems`` 4 and every number
   without bounds [-10**6, 10**6], so that an answer's length is bounded by the schema rather
   than by the model's will to stop.
2. Cost: rounds of ``--concurrency`` streamed requests, alternating *with* a schema (A) and
   *without* (B, the same prompts, ``ignore_eos`` and ``max_tokens`` set to the token count each
   request produced in the A round before it, so both do the same work). Decode throughput of a
   request = (tokens - 1) / (time of its last chunk - time of its first); medians of each
   contender, and the ratio A / B (goal: at least 0.8).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import jsonschema

from served import machine, metrics, serve

MODEL = "smollm2-135m"
STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props),
            "additionalProperties": False}


SCHEMAS = {
    "a person and their address": obj({
        "name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": obj({"street": STR, "city": STR,
                        "country": {"enum": ["France", "Germany", "Italy", "Spain"]}}),
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de", "it", "es"]},
                      "minItems": 1}}),
    "an online order": obj({
        "order_id": INT, "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {"type": "array", "minItems": 1, "items": obj({
            "product": STR, "quantity": {"type": "integer", "minimum": 1}, "price": NUM})},
        "shipping": obj({"method": {"enum": ["standard", "express"]}, "days": INT})}),
    "a meeting": obj({
        "title": STR, "priority": {"enum": ["low", "medium", "high"]},
        "attendees": {"type": "array", "items": obj({
            "name": STR, "role": {"enum": ["host", "speaker", "guest"]}})},
        "online": {"type": "boolean"}}, ["title", "priority", "attendees"]),
    "a recipe": obj({
        "name": STR, "servings": {"type": "integer", "minimum": 1},
        "ingredients": {"type": "array", "minItems": 1, "items": obj({
            "name": STR, "amount": NUM, "unit": {"enum": ["g", "ml", "cup", "piece"]}})},
        "vegetarian": {"type": "boolean"}}),
    "a weather forecast": obj({
        "city": STR,
        "days": {"type": "array", "minItems": 1, "maxItems": 7, "items": obj({
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            "high": NUM, "low": NUM, "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]}})}}),
}


def bounded(s: dict) -> dict:
    """``s`` with ``maxLength`` 40 on its strings, ``maxItems`` 4 on its arrays and +-10**6 on its
    numbers (where unset)."""
    s = {k: {n: bounded(x) for n, x in v.items()} if k == "properties" else
         bounded(v) if isinstance(v, dict) else v for k, v in s.items()}
    if s.get("type") == "string":
        s.setdefault("maxLength", 40)
    if s.get("type") == "array":
        s.setdefault("maxItems", 4)
    if s.get("type") in ("integer", "number"):
        s.setdefault("minimum", -10**6)
        s.setdefault("maximum", 10**6)
    return s


def body(i: int, *, schema: bool, max_tokens: int, stream: bool = False) -> dict:
    what, sch = list(SCHEMAS.items())[i % len(SCHEMAS)]
    b = {"model": MODEL, "messages": [{"role": "user", "content": (
        f"Describe {what} as JSON. Example number {i}.")}], "max_tokens": max_tokens,
        "temperature": 0.8, "seed": i}
    if schema:
        b["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": sch, "strict": True}}
    else:
        b["ignore_eos"] = True
    if stream:
        b.update(stream=True, stream_options={"include_usage": True})
    return b


async def validity(url: str, n: int, conc: int, max_tokens: int) -> dict:
    sem, out = asyncio.Semaphore(conc), {"valid": 0, "invalid": [], "tokens": 0, "length": 0}
    async with httpx.AsyncClient(timeout=600) as http:
        async def one(i: int) -> None:
            async with sem:
                r = (await http.post(url + "/v1/chat/completions",
                                     json=body(i, schema=True, max_tokens=max_tokens))).json()
            c = r["choices"][0]
            out["tokens"] += r["usage"]["completion_tokens"]
            out["length"] += c["finish_reason"] == "length"
            try:
                jsonschema.validate(json.loads(c["message"]["content"]),
                                    list(SCHEMAS.values())[i % len(SCHEMAS)])
                out["valid"] += 1
            except (ValueError, jsonschema.ValidationError) as e:
                out["invalid"].append((i, c["finish_reason"], c["message"]["content"][-80:],
                                       str(e)[:120]))
        await asyncio.gather(*[one(i) for i in range(n)])
    return out


async def streamed(http: httpx.AsyncClient, url: str, b: dict) -> tuple[int, float]:
    """(completion tokens, decode tokens/s) of one streamed request."""
    first = last = None
    tokens = 0
    async with http.stream("POST", url + "/v1/chat/completions", json=b) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            d = json.loads(line[6:])
            if d.get("usage") and not d["choices"]:
                tokens = d["usage"]["completion_tokens"]
            elif any(c["delta"].get("content") for c in d["choices"]):
                last = time.perf_counter()
                first = first or last
    return tokens, (tokens - 1) / (last - first) if last and last > first else 0.0


async def cost(url: str, rounds: int, conc: int, max_tokens: int) -> dict:
    rates: dict[str, list[float]] = {"schema": [], "free": []}
    wall: dict[str, float] = {"schema": 0.0, "free": 0.0}
    async with httpx.AsyncClient(timeout=600) as http:
        for r in range(rounds):
            ids = range(1000 + r * conc, 1000 + (r + 1) * conc)
            t0 = time.perf_counter()
            a = await asyncio.gather(*[streamed(http, url, body(i, schema=True, stream=True,
                                                                max_tokens=max_tokens))
                                       for i in ids])
            t1 = time.perf_counter()
            b = await asyncio.gather(*[streamed(http, url, body(i, schema=False, stream=True,
                                                                max_tokens=max(2, n)))
                                       for i, (n, _) in zip(ids, a)])
            wall["schema"] += t1 - t0
            wall["free"] += time.perf_counter() - t1
            rates["schema"] += [x for _, x in a if x]
            rates["free"] += [x for _, x in b if x]
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"decode_tok_s_median": med, "ratio": med["schema"] / med["free"],
            "round_seconds": wall, "requests": {k: len(v) for k, v in rates.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--outputs", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds of the cost measurement")
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--bounded", action="store_true", help="bound strings and arrays (above)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(machine(), flush=True)
    if args.bounded:
        for k in SCHEMAS:
            SCHEMAS[k] = bounded(SCHEMAS[k])
    with serve(MODEL, args.tp, "--max-seqs", str(args.concurrency)) as url:
        t0 = time.perf_counter()
        v = asyncio.run(validity(url, args.outputs, args.concurrency, args.max_tokens))
        v["seconds"] = time.perf_counter() - t0
        c = asyncio.run(cost(url, args.rounds, args.concurrency, args.max_tokens)) \
            if args.rounds else None
        m = metrics(url)
    fig = {"machine": machine(), "tp": args.tp, "outputs": args.outputs, "bounded": args.bounded,
           "validity": v, "cost": c,
           "requests_rejected": {k: x for k, x in m.items() if "rejected" in k}}
    print(f"tp={args.tp}{' bounded' if args.bounded else ''}: {v['valid']}/{args.outputs} parse "
          f"and validate ({v['length']} cut by max_tokens; {v['tokens']} tokens in "
          f"{v['seconds']:.0f} s)")
    if c is not None:
        print(f"decode tok/s median with schema {c['decode_tok_s_median']['schema']:.1f}, "
              f"without {c['decode_tok_s_median']['free']:.1f}: ratio {c['ratio']:.2f}")
    for bad in v["invalid"][:5]:
        print("  invalid:", bad)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0 if v["valid"] == args.outputs and (c is None or c["ratio"] >= 0.8) else 1


if __name__ == "__main__":
    raise SystemExit(main())
