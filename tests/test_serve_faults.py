"""Faults of the real server on the small random ``debug`` preset: overload (429), SIGTERM drain,
a TP worker that dies (503, then a non-zero exit). Bounded in count and time."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from shardwise.launch import free_port
from test_serve_util import Server, proc_stat

MODEL = "debug"


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "hello there", "temperature": 0, **body})


def test_overload_429_then_sigterm_drains():
    s = Server("--model", MODEL, "--tp", "2", "--max-seqs", "2", "--max-queue", "1")
    try:
        # 8 at once, each long: 3 fit (2 running + 1 waiting), the rest get 429
        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda _: _post(s.url, max_tokens=300, ignore_eos=True), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(429) >= 1 and codes.count(200) >= 3, codes
        err = next(r for r in rs if r.status_code == 429).json()["error"]
        assert err["code"] == "queue_full"
        assert all(r.json()["usage"]["completion_tokens"] == 300 for r in rs
                   if r.status_code == 200)
        assert _post(s.url, max_tokens=4).status_code == 200  # still serving

        # SIGTERM while a stream is in flight: it finishes, then the server exits 0
        with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 400,
                                "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            s.proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in rest[-2]
        assert s.wait_exit(timeout_s=60) == 0, s.output()
    finally:
        s.close()


def test_worker_death_503_then_nonzero_exit():
    s = Server("--model", MODEL, "--tp", "2")
    try:
        workers = httpx.get(s.url + "/health").json()["workers"]
        assert len(workers) == 2
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(_post, s.url, max_tokens=2000, ignore_eos=True)
            s.wait_metric("shardwise_requests_running", lambda v: v >= 1, timeout_s=30)
            os.kill(workers[1], signal.SIGKILL)
            r = fut.result(timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "worker_died"
        try:  # while it shuts down: 503 or already gone
            late = _post(s.url, max_tokens=2)
            assert late.status_code == 503
        except httpx.HTTPError:
            pass
        code = s.wait_exit(timeout_s=60)
        assert code != 0, s.output()
        assert "died" in s.output() or "failed" in s.output()
    finally:
        s.close()


def test_bad_server_arguments_fail_fast():
    with pytest.raises(RuntimeError, match="exited 2"):
        Server("--model", "no-such-model", "--tp", "1", timeout_s=60)
    with pytest.raises(RuntimeError, match="query heads|KV heads|tp="):
        Server("--model", MODEL, "--tp", "7", timeout_s=60)


def _workers(pid: int) -> list[int]:
    """The multiprocessing workers ``pid`` spawned (not its resource tracker)."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(proc_stat(int(d))[1]) == pid and \
                    b"spawn_main" in open(f"/proc/{d}/cmdline", "rb").read():
                out.append(int(d))
        except OSError:  # it exited meanwhile
            pass
    return out


def _running(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_exit_when_their_server_is_killed_while_they_load():
    """A server SIGKILLed while its workers still load: they finish loading, find it gone and
    exit (a worker that read its parent only after loading read init's pid and served nothing,
    forever, holding the model's memory)."""
    proc = subprocess.Popen([sys.executable, "-m", "shardwise.serve", "--model", MODEL, "--tp",
                             "2", "--no-compile", "--port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, kids = time.monotonic() + 60, []
        while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            kids = _workers(proc.pid)
            time.sleep(0.05)
        assert len(kids) == 2, kids
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and any(_running(k) for k in kids):
        time.sleep(0.2)
    alive = [k for k in kids if _running(k)]
    for k in alive:
        os.kill(k, signal.SIGKILL)
    assert not alive, f"workers {alive} still running 90 s after their server was killed"
