"""The planner's time model against published measurements, with the split fixed before fitting,
and the pieces of the model (GEMM shapes, memory-bound kernels, interleaved 1F1B) on their own."""
import dataclasses

import pytest

from shardwise.planner import validation
from shardwise.planner.gpus import get_gpu
from shardwise.planner.kernels import gemm_efficiency, quantization, stream_efficiency, stream_s
from shardwise.planner.model_catalog import get_model
from shardwise.planner.search import Cluster, TrainRequest, evaluate_train
from shardwise.planner.timing import pipeline_s

A100 = get_gpu("a100-80gb-sxm")


@pytest.fixture(scope="module")
def errs():
    return validation.errors()


def _table(errs) -> str:
    return "\n".join(f"{r.source} {r.table} row {r.row} {r.column} [{r.split}]: measured {r.measured:g}, "
                     f"predicted {p:.3g} ({100 * e:+.1f}%)" for r, p, e in errs)


def test_split_is_the_rule_fixed_in_advance():
    rows = validation.load()
    validation.check_split(rows)  # odd rows calibrate, even rows are held out, per source table
    held = {(r.table, r.model) for r in rows if r.split == "held-out" and r.table != "Table 4"}
    assert held == {("Table 1", m) for m in ("megatron-gpt-3.6b", "megatron-gpt-18.4b", "megatron-gpt-76.1b",
                                              "megatron-gpt-310.1b", "megatron-gpt-1t")} | \
        {("Table 5", "megatron-gpt-175b"), ("Table 5", "megatron-gpt-1t")}
    flipped = [dataclasses.replace(rows[0], split="held-out")] + rows[1:]
    with pytest.raises(ValueError, match="fixed split says 'calibration'"):
        validation.check_split(flipped)


def test_held_out_rows_within_10_percent_and_mean_within_5(errs):
    mean, worst, n = validation.summary(errs, "held-out")
    assert n == 13
    assert worst < 0.10, _table(errs)
    assert mean <= 0.05, _table(errs)


def test_calibration_rows_are_not_fitted_to_zero(errs):
    # two global figures cannot reproduce 15 measurements exactly: a fit that did would be a lookup
    mean, _, n = validation.summary(errs, "calibration")
    assert n == 15 and 0.005 < mean < 0.05


def test_wave_quantization_matches_nvidias_example():
    # NVIDIA's Matrix Multiplication Background guide: 117 tiles of 256 x 128 on the A100's 108 SMs
    # take two waves; the GPU does 117 / 216 of the work it could
    assert quantization(A100, 256 * 9, 128 * 13) == pytest.approx(117 / 216)
    assert quantization(A100, 256 * 12, 128 * 9) == pytest.approx(1.0)  # 108 tiles: one full wave
    assert quantization(A100, 16, 8192) == 1.0  # skinny (decode): only the byte bound applies


def test_gemm_efficiency_falls_for_small_and_thin_shapes():
    big = gemm_efficiency(A100, 8192, 8192, 8192)
    assert big == pytest.approx(271.2 / 312 * 0.87, rel=0.02)  # MAMF ceiling x sustained share
    thin = gemm_efficiency(A100, 2048, 3 * 12288 // 64, 12288)  # a tp=64 slice of a 175B QKV
    small = gemm_efficiency(A100, 2048, 768, 768)  # a 125M-parameter model's projection
    assert thin < 0.8 * big and small < 0.8 * big


def test_memory_bound_kernels_run_at_the_streaming_bandwidth():
    assert stream_efficiency(1e9) == 0.9 and stream_efficiency(1e7) == pytest.approx(0.75)
    assert stream_efficiency(1e5) < stream_efficiency(1e6) < stream_efficiency(1e7)
    assert stream_s(A100, 1e9) == pytest.approx(1e9 / (2039e9 * 0.9 * 0.82))


def test_interleaving_divides_the_bubble_by_the_chunks():
    t, p, m = 1.0, 8, 32
    assert pipeline_s([t] * p, m, 1) - m * t == pytest.approx((p - 1) * t)
    assert pipeline_s([t] * p, m, 4) - m * t == pytest.approx((p - 1) * t / 4)


def _eval(software: str, v: int, pp: int = 8, name: str = "megatron-gpt-175b"):
    c = Cluster(A100, 8 * pp, 8, "nvlink", 200)
    r = TrainRequest(2048, 64, 1, precision="fp16", recompute="full", virtual_stages=v, software=software)
    return evaluate_train(get_model(name), c, r, tp=8, pp=pp, dp=1, micro_batch=1, virtual_stages=v)


def test_interleaving_trades_bubble_for_pipeline_sends():
    one, three = _eval("megatron-2022", 1).time, _eval("megatron-2022", 3).time
    assert three.bubble_s < 0.4 * one.bubble_s
    assert three.p2p_s == pytest.approx(3 * one.p2p_s)  # v times the sends, blocking in 2022
    assert _eval("megatron-core", 3).time.p2p_s == 0.0  # overlapped by Megatron-Core


def test_head_sits_on_the_last_stage_and_makes_it_the_busiest():
    from shardwise.planner.layer import Setup, embedding_time, head_time, layer_time
    from shardwise.planner.software import get_software

    m = get_model("megatron-gpt-175b")  # 96 layers on 96 stages: one layer each
    t = _eval("megatron-2022", 1, pp=96).time
    s = Setup(8, 1, 2048, False, "full", get_software("megatron-2022"), "fp16",
              Cluster(A100, 768, 8, "nvlink", 200).link(8, 1))
    layer, head, emb = layer_time(m, A100, s), head_time(m, A100, s), embedding_time(m, A100, s)
    assert t.compute_s == pytest.approx(layer.total.compute_s + head.total.compute_s)
    assert head.total.compute_s > 0.2 * layer.total.compute_s > emb.total.compute_s
    # the other 95 stages wait for it: the bubble is paid at the busiest stage's pace
    assert t.bubble_s > 95 * layer.total.total_s


def test_newer_software_is_faster_for_the_same_layout():
    old, new = _eval("megatron-2021", 3).time.step_s, _eval("megatron-core", 3).time.step_s
    assert new < 0.95 * old
