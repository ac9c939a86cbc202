"""Helpers (no tests): start and stop a real ``python -m shardwise.serve`` on a free loopback port."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from shardwise.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: ``[state, ppid, ...]``."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


class Server:
    """``python -m shardwise.serve ARGS``; with ``torchrun=N``, under ``torchrun
    --nproc-per-node N`` (``proc`` is then torchrun's agent, the ranks its children).
    ``compile=False`` (the default here) serves with eager steps (``--no-compile``): compiling
    every batch bucket of SmolLM2 at start-up costs minutes of CPU per module; the compiled server
    is tested on the tiny model (``compile=True``, a small ``--max-seqs``: few buckets), the
    compiled SmolLM2 step by tests/test_real_model.py and tests/test_compiled_step.py.
    ``timeout_s`` allows for the native kernels' first build (1.5 minutes alone, more beside the
    other test worker) landing inside a start-up, as it does in CI from a fresh clone."""

    def __init__(self, *args: str, timeout_s: float = 300.0, torchrun: int = 0,
                 compile: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        # unbuffered: a server that fails to start shows how far it got
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        launch = [sys.executable]
        if torchrun:
            launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        self.proc = subprocess.Popen([*launch, "-m", "shardwise.serve", *args,
                                      *([] if compile else ["--no-compile"]),
                                      "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        log = self.output()
        self.close()
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{log}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(shardwise_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_metric(self, name: str, pred, timeout_s: float = 30.0) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.metrics().get(name)
            if v is not None and pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}={v} did not reach the expected value")
            time.sleep(0.1)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        os.unlink(self.log.name)
