"""``shardwise bench``: the calibration schema and nccl-tests' busbw factors, the size parser,
and the step benchmark end to end on a tiny model. No timing is asserted."""
import json
import math

import pytest

from shardwise.bench.cli import _sizes
from shardwise.planner import calibration

FACTOR = {"all_reduce": 2 * (2 - 1) / 2, "all_gather": (2 - 1) / 2, "reduce_scatter": (2 - 1) / 2}


def test_comm_cli_writes_a_calibration_file(tmp_path, capsys):
    from shardwise.cli import main
    path = tmp_path / "cal.json"
    assert main(["bench", "comm", "--nprocs", "2", "--sizes", "4,4K", "--iters", "3",
                 "--budget", "0.01", "--json", str(path)]) == 0
    assert "all_reduce" in capsys.readouterr().out
    obj = json.loads(path.read_text())
    cal = calibration.parse(obj)  # the schema plan --calibration reads
    assert cal.world_size == 2 and cal.backend in ("shm", "gloo")
    assert {r["op"] for r in cal.results} == set(calibration.OPS)
    for r in cal.results:
        assert r["bytes"] >= 4 and r["latency_s"] > 0
        assert math.isclose(r["algbw_GBps"], r["bytes"] / r["latency_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(r["busbw_GBps"], r["algbw_GBps"] * FACTOR[r["op"]], rel_tol=1e-9)
    gathered = [r["bytes"] for r in cal.results if r["op"] == "all_gather"]
    assert all(b % (2 * 4) == 0 for b in gathered)  # whole fp32 shards on both ranks
    assert cal.link().alpha_s > 0


def test_comm_dist_path_and_errors():
    from shardwise.bench.comm import bench_comm
    res = bench_comm(2, (1024,), ("all_reduce",), backend="dist", iters=3, budget_s=0.01)
    assert res["backend"] == "gloo" and res["results"][0]["bytes"] == 1024
    from shardwise import kernels
    if kernels.load():  # the inference engines' path: the shared-memory sums in C++
        res = bench_comm(2, (1024,), ("all_reduce",), backend="native", iters=3, budget_s=0.01)
        assert res["backend"] == "shm (all-reduce in C++)", res["backend"]
    with pytest.raises(ValueError, match="at least 2 ranks"):
        bench_comm(1)
    with pytest.raises(ValueError, match="unknown collective"):
        bench_comm(2, (4,), ("all_to_all",))


def test_sizes_parser():
    assert _sizes("4:64M")[0] == 4 and _sizes("4:64M")[-1] == 64 * 2**20
    assert len(_sizes("4:64M")) == 13
    assert _sizes("4,1K,2M") == (4, 1024, 2 * 2**20)
    with pytest.raises(ValueError, match="--sizes"):
        _sizes("lots")


def test_step_benchmark_end_to_end(tmp_path):
    from shardwise.bench.step import GOALS, bench_step, format_table, plot
    res = bench_step("tiny", rounds=2, train_steps=1, decode_steps=2, train_warmup=0,
                     decode_warmup=0, progress=False)
    names = list(res["median_s"])
    assert names[:2] == ["shardwise_tp2", "dtensor_tp2"] and "single_1thread" in names
    for name in names:
        assert res["steps"][name] == {"train": 2, "decode": 4}
        assert all(t > 0 for t in res["median_s"][name].values())
    assert set(GOALS) <= set(res["ratios"]) and all(r > 0 for r in res["ratios"].values())
    info = res["contenders"]
    single = info["single_1thread"]["loss"]
    # the same torch model (same seed) under PyTorch TP gives the single-process loss
    assert info["dtensor_tp2"]["loss"] == pytest.approx(single, abs=1e-5)
    assert all(abs(info[n]["loss"] - math.log(256)) < 0.1 for n in names)  # random init
    sw = info["shardwise_tp2"]
    # forward + backward: 2 + 2 all-reduces per layer, 1 for the embedding forward, the
    # vocab-parallel head's backward all-reduce, 2 for the vocab-parallel cross-entropy
    assert sw["train"]["collectives"] == {"all_reduce": 4 * 2 + 1 + 1 + 2}
    assert sw["decode"]["collectives"] == {"all_reduce": 2 * 2 + 1}
    assert sw["train"]["comm_backend"] in ("shm", "gloo")
    json.dumps(res)
    assert "tp2 train / dtensor tp2 train" in format_table(res)
    plot(res, str(tmp_path / "step.png"))
    assert (tmp_path / "step.png").stat().st_size > 1000


def test_decode_goals_pair_rounds():
    """The decode benchmark's goals: the ratio of the medians decides; the round-by-round
    ratios (a round's contenders ran minutes apart) are reported beside it."""
    from shardwise.bench.decode import format_table, summarize
    mine = [80.0, 100.0, 60.0]  # drifts with the machine, as does the reference below
    ref = [84.0, 90.0, 66.0]
    runs = {"shardwise tp=1 bfloat16 compiled": [{"decode_tps": d, "prefill_tps": 1.0}
                                                 for d in mine],
            "llama.cpp BF16": [{"decode_tps": d, "prefill_tps": 2.0} for d in ref]}
    info = {"cpu": "test CPU", "cores": 2, "torch": "x", "loadavg_start": (0.0,),
            "loadavg_end": (0.0,), "skipped": {}}
    res = summarize(runs, info, (1,), ("bfloat16",))
    g = res["goals"]["decode tp=1 bfloat16 / llama.cpp BF16"]
    assert g["ratio"] == round(80 / 84, 3) and not g["met"]
    assert g["paired"] == {"median": round(80 / 84, 3), "min": round(60 / 66, 3),
                           "max": round(100 / 90, 3)}
    assert res["goals"]["prefill bfloat16 / llama.cpp pp BF16"]["paired"]["median"] == 0.5
    table = format_table(res)
    assert "| decode tp=1 bfloat16 / llama.cpp BF16 >= 1.0 | 0.95 | 0.95 (0.91-1.11) | MISSED |" \
        in table
    assert "bandwidth" not in table  # no bytes known: no bandwidth table


def test_decode_against_the_read_bandwidth():
    """Each contender's decode as GB/s (weight bytes per token x tok/s) and as its share of the
    read bandwidth measured in the same round; the probe itself reads at a plausible rate."""
    from shardwise.bench.decode import format_table, read_bandwidth, summarize
    runs = {"shardwise tp=1 bfloat16 compiled": [{"decode_tps": d, "prefill_tps": 1.0}
                                                 for d in (100.0, 50.0, 80.0)],
            "llama.cpp BF16": [{"decode_tps": d, "prefill_tps": 1.0} for d in (90.0, 60.0, 70.0)]}
    info = {"cpu": "test CPU", "cores": 2, "torch": "x", "loadavg_start": (0.0,),
            "loadavg_end": (0.0,), "skipped": {}, "read_gbps": [40.0, 20.0, 40.0],
            "decode_bytes": {"shardwise tp=1 bfloat16 compiled": 300_000_000,
                             "llama.cpp BF16": 270_000_000}}
    bw = summarize(runs, info, (1,), ("bfloat16",))["bandwidth"]
    # GB/s per round 30, 15, 24 against 40, 20, 40: shares 0.75, 0.75, 0.6
    assert bw["shardwise tp=1 bfloat16 compiled"] == {"bytes": 300_000_000, "gbps": 24.0,
                                                      "of_read": 0.75}
    assert bw["llama.cpp BF16"]["gbps"] == round(0.27 * 70, 2)
    # shares 0.6075, 0.81, 0.4725: the median of the rounds, not the ratio of medians
    assert bw["llama.cpp BF16"]["of_read"] == round(0.27 * 90 / 40, 3)
    table = format_table(summarize(runs, info, (1,), ("bfloat16",)))
    assert "| shardwise tp=1 bfloat16 compiled | 300 | 24.0 | 75% |" in table
    assert "median 40.0 GB/s, 20.0-40.0" in table
    assert 0.5 < read_bandwidth(1, mib=64, repeats=1) < 2000
