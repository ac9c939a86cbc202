"""`python -m shardwise.planner` end to end: JSON, text, plot, calibration, errors, no torch, speed."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardwise.planner.__main__ import main
from shardwise.planner.calibration import busbw, load, result_row

ROOT = Path(__file__).resolve().parents[1]
PLANNER = ROOT / "shardwise" / "planner"
SERVE_70B = ["--model", "llama-2-70b", "--gpus", "8", "--workload", "serve"]


def _py(code_or_args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, **kw)


def test_json_is_one_object_on_stdout():
    r = _py(["-m", "shardwise.planner", *SERVE_70B, "--gpu", "a100-80gb-sxm", "--json"])
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)  # exactly one JSON document
    assert j["layout"]["tp"] == 8 and j["fits"] is True
    assert {"tp", "pp", "dp", "micro_batch"} <= set(j["layout"])
    assert j["memory_per_gpu_gib"] < 80 and j["throughput"]["value"] > 0
    assert j["candidates"] and all(r["reason"] for r in j["rejected"]) and j["explanation"]


def test_bad_input_exits_2_with_closest_names():
    r = _py(["-m", "shardwise.planner", "--model", "llama-2-7", "--gpus", "8"])
    assert r.returncode == 2 and "error: unknown model 'llama-2-7'" in r.stderr
    assert "llama-2-7b" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("argv,msg", [
    (["--model", "llama-2-70b", "--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--model", "llama-2-70b", "--gpus", "8", "--gpu", "a100-80gb-sxn"], "closest: a100-80gb-sxm"),
    (["--model", "llama-2-7b", "--gpus", "6", "--gpus-per-node", "6", "--dp", "3", "--global-batch", "512"],
     "global batch 512 cannot be split over dp=3 (512 % 3 = 2): use a multiple of 3 such as 510 or 513"),
    (["--model", "llama-2-7b", "--gpus", "8", "--micro-batch", "3"], "cannot be split into micro-batches of 3"),
    (["--model", "llama-2-7b", "--gpus", "8", "--tp", "3"], "tp=3 does not divide 8 GPUs"),
    (["--model", "llama-2-7b", "--gpus", "8", "--tp", "8", "--pp", "1", "--dp", "2"], "= 16 GPUs but --gpus is 8"),
    (["--model", "smollm2-135m", "--gpus", "16", "--tp", "16"], "tp=16 but the model has 9 query heads"),
    (["--model", "llama-2-7b", "--gpus", "12"], "not a whole number of 8-GPU nodes"),
    (["--model", "llama-2-7b", "--gpus", "8", "--gpu", "l40s", "--interconnect", "nvlink"], "no NVLink"),
    ([*SERVE_70B, "--dp", "8", "--concurrency", "4"], "4 concurrent requests cannot be split over dp=8"),
    ([*SERVE_70B, "--precision", "int3"], "serving supports bf16, fp16, fp8, int8, int4"),
    (["--gpus", "8"], "--model is required"),
    (["--model", "llama-3-8b", "--gpus", "16", "--virtual-stages", "3"], "--virtual-stages 3: no pipeline"),
    (["--model", "llama-3-8b", "--gpus", "16", "--virtual-stages", "0"], "--virtual-stages must be at least 1"),
])
def test_errors(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardwise plan: error: ") and msg in err


def test_text_report_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main([*SERVE_70B, "--gpu", "a100-80gb-pcie", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "TPOT" in out and "rejected:" in out and "why:" in out and "lowest TPOT" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_text_and_no_fit_exit_code(capsys):
    assert main(["--model", "llama-3-8b", "--gpus", "16", "--gpu", "h100", "--global-batch", "256"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["--model", "llama-3.1-405b", "--gpus", "8", "--gpu", "l40s"]) == 1
    out = capsys.readouterr().out
    assert "No layout fits" in out and "To make it fit, try --sequence-parallel" in out


def test_zero_flag_and_its_alias(capsys):
    """--zero 1 shards the AdamW states over dp (--zero1 is the same), --zero 2 the gradients."""
    base = ["--model", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--tp", "2", "--pp", "1",
            "--dp", "4", "--global-batch", "64", "--micro-batch", "1", "--json"]
    got = {}
    for extra in ([], ["--zero", "1"], ["--zero1"], ["--zero", "2"]):
        main([*base, *extra])
        j = json.loads(capsys.readouterr().out)
        got[" ".join(extra)] = ((j["candidates"] or j["rejected"])[0]["memory_bytes"],
                                j["request"]["zero"])
    (plain, z0), (one, z1), (alias, za), (two, z2) = got.values()
    assert (z0, z1, za, z2) == (0, 1, 1, 2) and one == alias
    assert one["optimizer"] == pytest.approx(plain["optimizer"] / 4) and one["grads"] == plain["grads"]
    assert two["grads"] == pytest.approx(plain["grads"] / 4)


def test_pinned_layout_is_evaluated_even_across_nodes(capsys):
    argv = ["--model", "llama-3.1-405b", "--gpus", "16", "--gpu", "h100", "--workload", "serve",
            "--tp", "16", "--pp", "1", "--dp", "1", "--json"]
    assert main(argv) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["pinned"] and j["layout"]["tp"] == 16 and len(j["candidates"]) == 1


def test_calibration_file_replaces_catalog_link(tmp_path, capsys):
    n = 8
    rows = [result_row("all_reduce", b, 200e-6 + b / 5e9, n) for b in (2**10, 2**20, 2**26)]
    cal = {"device": "slow box", "world_size": n, "backend": "nccl", "results": rows}
    f = tmp_path / "comm.json"
    f.write_text(json.dumps(cal))
    c = load(str(f))
    assert c.link().alpha_s == pytest.approx(200e-6 + 2**10 / 5e9)
    assert c.link().busbw_GBps == pytest.approx(busbw("all_reduce", 2**26, 200e-6 + 2**26 / 5e9, n))
    argv = [*SERVE_70B, "--tp", "8", "--pp", "1", "--dp", "1", "--json"]
    assert main(argv) == 0
    base = json.loads(capsys.readouterr().out)
    assert main([*argv, "--calibration", str(f)]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["cluster"]["measured_link"] and slow["decode_allreduce_share"] > base["decode_allreduce_share"]
    f.write_text(json.dumps(dict(cal, world_size=1)))
    assert main([*argv, "--calibration", str(f)]) == 2
    assert "world_size must be an integer >= 2" in capsys.readouterr().err


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "h100-pcie" in out


def test_no_torch_and_fast_for_3072_gpus():
    """Import every planner module under a bare `shardwise` package (the real one imports torch for
    the model code) and plan the 1T model on 3072 GPUs: no torch, no matplotlib, under one second
    (issue 17's goal: every tp x pp x dp x micro-batch x virtual-stage layout, text and JSON)."""
    code = f"""
import sys, time, types, json, io, contextlib
pkg = types.ModuleType("shardwise"); pkg.__path__ = [{str(ROOT / "shardwise")!r}]
sys.modules["shardwise"] = pkg
import shardwise.planner
from shardwise.planner import (calibration, cli, gpus, kernels, layer, memory, model_catalog, models, plot,
                               report, search, software, timing, validation)
from shardwise.planner.__main__ import main
argv = ["--model", "megatron-gpt-1t", "--gpus", "3072", "--gpu", "a100", "--global-batch", "3072",
        "--recompute", "full", "--json"]
times = []
for _ in range(3):  # the fastest of three: the code's cost, not a neighbour's load spike
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    times.append(time.perf_counter() - t)
    assert rc == 0, rc
dt = min(times)
assert json.loads(buf.getvalue())["layout"]["pp"] == 64
print(json.dumps({{"torch": "torch" in sys.modules, "mpl": "matplotlib" in sys.modules, "s": dt}}))
"""
    r = _py(["-c", code])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["torch"] is False and res["mpl"] is False
    assert res["s"] < 1.0  # measured ~0.25 s on this 2-core machine


def test_planner_sources_import_no_torch_and_matplotlib_lazily():
    for f in PLANNER.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(m.startswith("matplotlib") for m in mods), f
        assert len(f.read_text().splitlines()) < 400, f
