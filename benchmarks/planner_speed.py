"""Wall time of `shardwise plan` searches at 3072 GPUs (median of 5, JSON report included).

    PYTHONPATH=. python benchmarks/planner_speed.py
"""
from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import time

from shardwise.planner.__main__ import main

CASES = {
    "1T training, 3072 A100": ["--model", "megatron-gpt-1t", "--gpus", "3072", "--gpu", "a100",
                               "--global-batch", "3072", "--recompute", "full", "--json"],
    "Llama-3.1-405B training, 3072 H100": ["--model", "llama-3.1-405b", "--gpus", "3072", "--gpu", "h100",
                                           "--global-batch", "2048", "--json"],
    "Llama-3.1-405B serving, 3072 H100": ["--model", "llama-3.1-405b", "--gpus", "3072", "--gpu", "h100",
                                          "--workload", "serve", "--json"],
}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main_bench() -> None:
    print(f"CPU: {_cpu()}; load average {os.getloadavg()}")
    for name, argv in CASES.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                main(argv)
            times.append(time.perf_counter() - t)
        print(f"{name}: median {1e3 * statistics.median(times):.0f} ms (min {1e3 * min(times):.0f} ms)")


if __name__ == "__main__":
    main_bench()
