"""One contract for every command: bad values fail before anything is spawned, in one line on
stderr naming the value, exit 2; internal errors are tracebacks with exit 1; a missing optional
dependency names its install line; ``python -m shardwise`` and the ``python -m
shardwise.<command>`` entry points behave like ``shardwise``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from shardwise.cli import main
from shardwise.usage import UsageError, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def py(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


@pytest.fixture
def no_spawn(monkeypatch):
    """Anything that would start a worker process fails the test."""
    import shardwise.launch
    import shardwise.serve.client

    def refuse(*a, **k):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(shardwise.launch, "spawn", refuse)
    monkeypatch.setattr(shardwise.launch.WorkerPool, "__init__", refuse)
    monkeypatch.setattr(shardwise.serve.client.EngineClient, "start", refuse)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"shardwise {argv[0]}: error: "), err
    return err


CASES = [
    (["serve", "--model", "debug", "--max-seqs", "0"], "--max-seqs: 0 must be >= 1"),
    (["serve", "--model", "debug", "--max-batched-tokens", "0"], "--max-batched-tokens: 0"),
    (["serve", "--model", "debug", "--block-size", "0"], "--block-size: 0 must be >= 1"),
    (["serve", "--model", "debug", "--kv-tokens", "0"], "--kv-tokens: 0 must be >= 1"),
    (["serve", "--model", "debug", "--kv-tokens", "8", "--block-size", "16"],
     "less than one block of --block-size=16"),
    (["serve", "--model", "debug", "--port", "70000"], "70000 must be in [1, 65535]"),
    (["serve", "--model", "debug", "--max-queue", "-1"], "--max-queue: -1 must be >= 0"),
    (["serve", "--model", "debug", "--tp", "5"], "tp=5 but the model has 4 query heads"),
    (["serve", "--model", "debug", "--api-key", " "], "the API key is empty"),
    (["serve", "--model", "nope"], "model 'nope' is not a preset"),
    (["generate", "--model", "tiny", "--prompt", "x", "--seed", str(2**80)],
     "--seed: 1208925819614629174706176 must be in [-9223372036854775808, 9223372036854775807]"),
    (["generate", "--model", "tiny", "--prompt", "x", "--top-p", "0"], "--top-p: 0 must be > 0"),
    (["train", "--data", "x.txt", "--tp", "0"], "--tp: 0 must be >= 1"),
    (["train", "--model", "tiny", "--data", "missing.txt"], "missing.txt does not exist"),
    (["verify", "--model", "tiny", "--tp", "5"], "tp=5 but the model has 4 query heads"),
    (["verify", "--model", "tiny", "--tp", "2", "--sequence-parallel", "1", "--seq", "5"],
     "use a --seq that is a multiple of 2"),
    (["convert", "--model", "tiny", "--out", "x"], "saving a model needs --tp N and --out DIR"),
    (["convert", "--from", "no/such/dir", "--to-hf", "x"], "checkpoint no/such/dir does not exist"),
    (["bench", "comm", "--ops", "all_to_all"], "--ops 'all_to_all': use a comma list of"),
    (["bench", "serve", "--tp", "1,x"], "give comma-separated integers"),
    (["demo", "--tp", "10"], "tp=10 but the model has 9 query heads"),
    (["plan", "--model", "llama-2-7", "--gpus", "8"], "unknown model 'llama-2-7'"),
]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_values_fail_in_one_line_before_spawning(argv, fragment, capsys, no_spawn):
    assert fragment in one_line_error(capsys, argv)


def test_port_in_use_fails_before_the_model_loads(capsys, no_spawn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(capsys, ["serve", "--model", "debug", "--port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_missing_extra_names_the_install_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    err = one_line_error(capsys, ["plan", "--model", "llama-2-7b", "--gpus", "8",
                                  "--plot", str(tmp_path / "p.png")])
    assert "needs the 'matplotlib' package" in err and "pip install 'shardwise[bench]'" in err
    assert require("json", what="x").dumps([]) == "[]"
    with pytest.raises(UsageError, match="pip install no_such_module_i18"):
        require("no_such_module_i18", what="x")
    # an ImportError inside an installed module is a broken install, not a missing extra
    (tmp_path / "broken_i18.py").write_text("import no_such_dependency_i18\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_i18"):
        require("broken_i18", what="x")


def test_internal_errors_are_tracebacks_with_exit_1():
    code = ("import sys, shardwise.planner.cli as c\n"
            "def boom(args): raise KeyError('an internal bug')\n"
            "c.make_plan = boom\n"
            "from shardwise.cli import main\n"
            "sys.exit(main(['plan', '--model', 'llama-2-7b', '--gpus', '8']))\n")
    r = py("-c", code)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'an internal bug'" \
        in r.stderr, r.stderr


def test_python_m_entry_points_share_the_contract():
    r = py("-m", "shardwise", "plan", "--model", "llama-2-7b", "--gpus", "8", "--json")
    assert r.returncode == 0 and '"layout"' in r.stdout, r.stderr
    for args, fragment in ((["-m", "shardwise", "serve", "--model", "debug", "--max-seqs", "0"],
                            "shardwise serve: error: --max-seqs: 0 must be >= 1"),
                           (["-m", "shardwise.serve", "--model", "debug", "--block-size", "0"],
                            "shardwise serve: error: --block-size: 0 must be >= 1")):
        r = py(*args)
        assert r.returncode == 2 and r.stderr.strip().startswith(fragment), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
