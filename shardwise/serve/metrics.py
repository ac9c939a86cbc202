"""Server metrics in the Prometheus text format (names prefixed ``shardwise_``).

Gauges mirror the engine's last report (requests waiting and running, KV blocks used, free and
cached, the prefix cache's hit ratio); the engine's cumulative counts (prefix-cache hits, prefill
tokens, preemptions) are taken as they are reported; the other counters and the histograms are
kept by the server as tokens stream out.
"""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


GAUGES = {
    "requests_waiting": "Requests queued for admission to the running batch.",
    "requests_running": "Requests in the running batch.",
    "kv_blocks_used": "KV cache blocks held by requests.",
    "kv_blocks_free": "KV cache blocks free.",
    "kv_blocks_total": "KV cache blocks (per rank).",
    "requests_in_flight": "Requests accepted by the server and not yet finished.",
    "kv_blocks_cached": "KV cache blocks registered in the prefix cache (held or evictable).",
    "prefix_cache_hit_ratio": "Prompt tokens served from the prefix cache / prompt tokens "
                              "admitted, since the start.",
}
COUNTERS = {
    "prompt_tokens_total": "Prompt tokens of admitted requests.",
    "generation_tokens_total": "Tokens generated.",
    "requests_total": "Requests finished, by finish reason.",
    "requests_rejected_total": "Requests refused (4xx or 5xx), by status.",
    "engine_steps_total": "Engine steps run.",
    "engine_step_seconds_total": "Wall time of engine steps.",
    "engine_comm_seconds_total": "Time rank 0 spent in collectives (with --profile).",
    "engine_mixed_steps_total": "Engine steps that fed prompt tokens (run eager; the others "
                                "are decode steps through the compiled graph).",
    "engine_mixed_step_seconds_total": "Wall time of the engine steps that fed prompt tokens.",
    "engine_collectives_total": "Collectives rank 0 took part in, by op (with --profile; "
                                "every rank runs as many: an empty expert-parallel group too).",
    "preemptions_total": "Sequences preempted for lack of KV blocks (recomputed later).",
    "prefix_cache_hit_tokens_total": "Prompt tokens whose KV came from the prefix cache.",
    "prefix_cache_query_tokens_total": "Prompt tokens of sequences admitted (cache looked up).",
    "prefix_cache_evictions_total": "Cached blocks evicted to make room.",
    "prefill_tokens_total": "Prompt tokens run through the model (the rest came from the cache "
                            "or a forked sample).",
}


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gauges = {k: 0.0 for k in GAUGES}
        self.counters: dict[str, dict[str, float]] = {k: {} for k in COUNTERS}
        self.ttft = Histogram("shardwise_time_to_first_token_seconds",
                              "Time from request arrival to its first token.")
        self.itl = Histogram("shardwise_inter_token_latency_seconds",
                             "Time between successive tokens of a request.")
        self.step = Histogram("shardwise_engine_step_seconds", "Wall time of one engine step.")

    def inc(self, name: str, value: float = 1.0, label: str = "") -> None:
        with self.lock:
            c = self.counters[name]
            c[label] = c.get(label, 0.0) + value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = float(value)

    def engine_stats(self, stats: dict) -> None:
        """Take the engine's report (gauges; and for a step, its timing)."""
        with self.lock:
            self.gauges["requests_waiting"] = stats["waiting"]
            self.gauges["requests_running"] = stats["running"]
            self.gauges["kv_blocks_used"] = stats["blocks_used"]
            self.gauges["kv_blocks_free"] = stats["blocks_free"]
            self.counters["preemptions_total"][""] = stats["preemptions"]
            self.gauges["kv_blocks_cached"] = stats.get("blocks_cached", 0)
            hit, query = stats.get("prefix_hit_tokens", 0), stats.get("prefix_query_tokens", 0)
            self.counters["prefix_cache_hit_tokens_total"][""] = hit
            self.counters["prefix_cache_query_tokens_total"][""] = query
            self.counters["prefill_tokens_total"][""] = stats.get("prefill_tokens", 0)
            self.counters["prefix_cache_evictions_total"][""] = stats.get("evictions", 0)
            self.gauges["prefix_cache_hit_ratio"] = hit / query if query else 0.0
            if "step_s" in stats:
                self.step.observe(stats["step_s"])
                c = self.counters
                c["engine_steps_total"][""] = c["engine_steps_total"].get("", 0) + 1
                for k, v in (("engine_step_seconds_total", stats["step_s"]),
                             ("engine_comm_seconds_total", stats.get("comm_s", 0.0))):
                    c[k][""] = c[k].get("", 0) + v
                if stats.get("step_tokens", 0) > stats.get("step_seqs", 0):  # prompt tokens fed
                    for k, v in (("engine_mixed_steps_total", 1),
                                 ("engine_mixed_step_seconds_total", stats["step_s"])):
                        c[k][""] = c[k].get("", 0) + v
                for op, n in stats.get("collectives", {}).items():
                    c["engine_collectives_total"][op] = \
                        c["engine_collectives_total"].get(op, 0) + n

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            for k, help in GAUGES.items():
                lines += [f"# HELP shardwise_{k} {help}", f"# TYPE shardwise_{k} gauge",
                          f"shardwise_{k} {self.gauges[k]:g}"]
            for k, help in COUNTERS.items():
                lines += [f"# HELP shardwise_{k} {help}", f"# TYPE shardwise_{k} counter"]
                values = self.counters[k] or {"": 0.0}
                label = {"requests_total": "finish_reason",
                         "requests_rejected_total": "status",
                         "engine_collectives_total": "op"}.get(k)
                for lab, v in sorted(values.items()):
                    sel = f'{{{label}="{lab}"}}' if label and lab else ""
                    lines.append(f"shardwise_{k}{sel} {v:g}")
            for h in (self.ttft, self.itl, self.step):
                lines += h.render()
        return "\n".join(lines) + "\n"
