"""A failure on one rank ends the whole run within seconds, naming the rank, the phase and the error.

Faults are injected into the real work of each phase (``tests/faults.py``) on one rank of a
2-rank run; the peers are then blocked in a collective or a pipeline send/recv and must be torn
down. The time from the injected fault (stamped in its message) to the end of the run is held
to the goal of 30 s, with a subprocess (or launcher) timeout of 120 s so that a run that hangs
fails the assert instead of the timeout deciding. (Start-up is not counted: on a loaded 2-core
machine it alone can take tens of seconds.)

* training phases, through the launcher in this process: build, load, first step, pipeline
  send/recv, save (an untied 3-layer Llama saved by transformers, ``--tp 1 --pp 2``: the run
  that used to hang silently);
* every command, through the CLI (stderr and exit code): train, generate, serve start-up,
  verify, convert. These five subprocesses run at the same time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint.source import ModelSource
from shardwise.launch import WorkerError, free_port, spawn
from shardwise.models.config import LlamaConfig
from shardwise.train.config import TrainConfig
from shardwise.train.run import prepare

GOAL_S = 30.0
HANG_S = 120.0
ROOT = Path(__file__).resolve().parents[1]
FAULTS = str(ROOT / "tests" / "faults.py")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A random untied 3-layer Llama saved by transformers, and a data file."""
    import transformers
    tmp = tmp_path_factory.mktemp("faults")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=64, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "untied")
    (tmp / "data.txt").write_text(Path(__file__).read_text())
    return tmp


# phase injected -> (rank, phase the error must name)
TRAIN_PHASES = {"load": (0, "load"), "step": (1, "step 1"), "sendrecv": (0, "step 1"),
                "save": (1, "save step 2")}


@pytest.mark.parametrize("fault", list(TRAIN_PHASES))
def test_train_phase_failure_ends_the_run(untied, fault):
    from shardwise.train.loop import train_worker
    from faults import MESSAGE, fault_time, inject_then
    rank, phase = TRAIN_PHASES[fault]
    d = untied / "untied"
    cfg = TrainConfig(model=ModelSource("u", LlamaConfig.from_hf(d), d, None),
                      data=[str(untied / "data.txt")], pp=2, micro_batch=1, global_batch=2,
                      seq_len=16, steps=2, progress=False, out_dir=str(untied / f"run-{fault}"))
    source, data = prepare(cfg)
    with pytest.raises(WorkerError) as err:
        spawn(inject_then, 2, fault, rank, train_worker, cfg, source, data.rows,
              timeout_s=HANG_S)
    ended = time.time()
    f = err.value.failure
    assert (f.rank, f.phase, f.peer) == (rank, phase, False), str(err.value)
    assert MESSAGE in f.error and MESSAGE in str(err.value)
    assert str(err.value).startswith(f"rank {rank} failed in phase '{phase}'")
    took = ended - fault_time(f.error)
    print(f"train, fault in {fault} on rank {rank}: the run ended {took:.2f} s after it")
    assert 0 < took < GOAL_S, f"the run took {took:.1f} s to end after the fault"


def _cli_cases(tmp: Path) -> dict[str, tuple[str, int, str, list[str]]]:
    """name -> (fault, rank, phase the error must name, shardwise arguments)."""
    d = str(tmp / "untied")
    return {
        "train": ("build", 1, "build", ["train", "--model", d, "--tp", "1", "--pp", "2",
                                        "--data", str(tmp / "data.txt"), "--seq-len", "16",
                                        "--global-batch", "2", "--steps", "2", "--no-progress",
                                        "--out", str(tmp / "cli-train")]),
        "generate": ("init", 1, "init", ["generate", "--model", "debug", "--tp", "2",
                                         "--prompt", "hi", "--max-new-tokens", "2"]),
        "serve": ("build", 1, "build", ["serve", "--model", "debug", "--tp", "2",
                                        "--port", str(free_port())]),
        "verify": ("load", 1, "load", ["verify", "--model", d, "--tp", "2"]),
        "convert": ("save", 1, "save", ["convert", "--model", d, "--tp", "2",
                                        "--out", str(tmp / "cli-convert")]),
    }


@pytest.fixture(scope="module")
def cli_runs(untied):
    """Every command with its fault, all at once: name -> (exit code, stderr, time.time() at
    exit)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = {}
    for name, (fault, rank, _, args) in _cli_cases(untied).items():
        err = open(untied / f"{name}.err", "w+")
        procs[name] = (subprocess.Popen([sys.executable, FAULTS, fault, str(rank), *args],
                                        cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err),
                       err, time.monotonic())
    out = {}
    deadline = time.monotonic() + HANG_S
    while procs and time.monotonic() < deadline:
        for name, (proc, err, _) in list(procs.items()):
            if proc.poll() is not None:
                err.seek(0)
                out[name] = (proc.returncode, err.read(), time.time())
                del procs[name]
        time.sleep(0.05)
    for name, (proc, err, _) in procs.items():  # hung: fails the test below
        proc.kill()
        proc.wait()
        err.seek(0)
        out[name] = (proc.returncode, err.read(), time.time())
    return out


@pytest.mark.parametrize("name", ["train", "generate", "serve", "verify", "convert"])
def test_command_failure_names_rank_phase_and_error(untied, cli_runs, name):
    from faults import MESSAGE, fault_time
    _, rank, phase, _ = _cli_cases(untied)[name]
    code, stderr, ended = cli_runs[name]
    assert code is not None and code > 0, (code, stderr[-2000:])
    assert f"rank {rank} failed in phase '{phase}'" in stderr, stderr[-2000:]
    assert MESSAGE in stderr and "Traceback" in stderr, stderr[-2000:]
    took = ended - fault_time(stderr)
    print(f"{name}: exit {code} {took:.2f} s after the fault on rank {rank}")
    assert 0 < took < GOAL_S, f"{name} ended {took:.1f} s after the fault:\n{stderr[-2000:]}"


def test_a_silent_death_is_named_with_its_signal_and_phase():
    """A rank killed by a signal reports nothing itself: the launcher names it, not the peer
    whose collective broke."""
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        spawn(_die_in_barrier, 2, timeout_s=HANG_S)
    f = err.value.failure
    assert (f.rank, f.phase) == (1, "barrier") and "SIGKILL" in f.error, str(err.value)
    assert time.monotonic() - t0 < GOAL_S  # start-up included: two forks, one process group


def _die_in_barrier() -> None:
    import signal

    import torch.distributed as dist

    from shardwise.failure import phase
    from shardwise.mesh import Mesh
    mesh = Mesh.init(tp=2)
    with phase("barrier"):
        if mesh.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
