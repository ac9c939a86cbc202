"""Helpers (no benchmark): a real ``shardwise serve`` on a free loopback port, its metrics, the
machine. Used by structured_bench.py, prefix_bench.py and fork_bench.py."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shardwise.launch import free_port  # noqa: E402
from soak import cpu_model  # noqa: E402,F401  (re-exported for the benchmarks)


@contextlib.contextmanager
def serve(model: str, tp: int, *extra: str, timeout_s: float = 300.0) -> Iterator[str]:
    """Start a server; yields its base URL; stops it (SIGTERM) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", "--model", model,
                             "--tp", str(tp), "--port", str(port), *extra], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{open(log.name).read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(shardwise_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load}"
