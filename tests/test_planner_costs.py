"""Planner memory and time models against the formulas and figures of the papers they come from."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise.planner.calibration import busbw
from shardwise.planner.gpus import Link, get_gpu
from shardwise.planner.memory import (activation_bytes_per_layer, kv_bytes_per_token, serving_memory,
                                      training_memory)
from shardwise.planner.model_catalog import MODELS, get_model
from shardwise.planner.search import Cluster, TrainRequest, plan
from shardwise.planner.timing import allreduce_s, tp_volume_per_layer, training_flops

KORTHIKANTI_TABLE3 = ["megatron-gpt-22b", "megatron-gpt-175b", "megatron-gpt-530b", "megatron-gpt-1t"]


@pytest.mark.parametrize("name", KORTHIKANTI_TABLE3)
@pytest.mark.parametrize("b", [1, 4])
def test_korthikanti_table2(name, b):
    """Each row of Table 2, for the Table 3 configurations (s = 2048, t = 8)."""
    m = get_model(name)
    s, h, a, t = 2048, m.hidden, m.heads, 8
    sbh = s * b * h
    act = lambda **kw: activation_bytes_per_layer(m, s, b, kw.pop("tp", t), **kw)  # noqa: E731
    assert act(tp=1, sp=False, recompute="none") == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act(sp=False, recompute="none") == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert act(sp=True, recompute="none") == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert act(sp=False, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert act(sp=True, recompute="selective") == pytest.approx(34 * sbh / t)
    assert act(sp=False, recompute="full") == pytest.approx(2 * sbh)


def test_attention_term_dominates_for_large_models():
    # the paper's motivation for selective recomputation: 5as/h exceeds 34 for large models
    for name, ratio in (("megatron-gpt-175b", 80), ("megatron-gpt-530b", 64)):
        m = get_model(name)
        assert 5 * m.heads * 2048 / m.hidden == ratio


def test_kv_cache_per_token():
    m = get_model("llama-3-70b")  # 80 layers, 8 KV heads, head_dim 128
    assert kv_bytes_per_token(m, 1) == 320 * 1024
    assert kv_bytes_per_token(m, 8) == 40 * 1024
    assert kv_bytes_per_token(m, 16) == 40 * 1024  # tp > kv heads: each rank keeps one KV head
    assert kv_bytes_per_token(m, 8, pp=2) == 20 * 1024


def test_trainer_precision_and_zero_bytes_per_param():
    """As `shardwise train` keeps them: fp32 weights, gradients and AdamW m, v (16 B/param); under
    bf16 autocast also a 16-bit copy of every matmul weight; ZeRO-1 divides AdamW by dp, ZeRO-2
    the gradients too."""
    m = get_model("llama-2-7b")
    n = m.total_params()
    kw = dict(tp=1, pp=1, micro_batch=1, micro_batches=1, seq=4096, sp=False, recompute="full",
              capacity=80 * 2**30)
    fp32 = training_memory(m, dp=1, zero=0, precision="fp32", **kw)
    assert fp32.weights + fp32.grads + fp32.optimizer == 16 * n
    bf16 = training_memory(m, dp=1, zero=0, precision="bf16", **kw)
    matmul = m.layers * m.matmul_params_per_layer() + m.vocab * m.hidden  # + the output head
    assert bf16.weights - fp32.weights == 2 * matmul
    z1 = training_memory(m, dp=8, zero=1, precision="bf16", **kw)
    z2 = training_memory(m, dp=8, zero=2, precision="bf16", **kw)
    assert z1.optimizer == pytest.approx(8 * n / 8) and z1.grads == 4 * n
    assert z2.grads == pytest.approx(4 * n / 8) and z2.optimizer == z1.optimizer


def test_quantised_weights_shrink():
    m = get_model("llama-2-70b")
    kw = dict(tp=8, pp=1, batch=1, prompt=128, output=128, kv_bytes=2, capacity=80 * 2**30)
    w = {p: serving_memory(m, precision=p, **kw).weights for p in ("bf16", "fp8", "int4")}
    assert w["bf16"] > 1.9 * w["fp8"] > 3.5 * w["int4"]


def test_allreduce_volume_and_time():
    b, s, h, t = 1, 2048, 12288, 8
    # Narayanan et al.: 8 b s h (t-1)/t elements per device per layer and micro-batch
    assert tp_volume_per_layer(b, s, h, t) == 8 * b * s * h * (t - 1) / t
    link = Link("test", 0.0, 100.0, 100.0)
    four = 4 * allreduce_s(b * s * h * 2, t, link)  # 16-bit activations, 100 GB/s, no latency
    assert four == pytest.approx(tp_volume_per_layer(b, s, h, t) * 2 / 100e9)
    assert allreduce_s(1e9, 1, link) == 0.0


def test_busbw_matches_nccl_tests():
    # nccl-tests output quoted in NVIDIA/nccl-tests issue 194 (2 x H100 PCIe, NVLink bridge):
    # 1073741824 B in 9306.7 us -> algbw 115.37, busbw 115.37 GB/s
    assert busbw("all_reduce", 1073741824, 9306.7e-6, 2) == pytest.approx(115.37, abs=0.01)
    assert busbw("all_reduce", 8e9, 1.0, 8) == pytest.approx(8 * 2 * 7 / 8)
    assert busbw("all_gather", 8e9, 1.0, 8) == pytest.approx(8 * 7 / 8)
    with pytest.raises(ValueError, match="unknown collective"):
        busbw("broadcast_all", 1, 1.0, 2)


def test_training_flops_equal_narayanan_formula():
    for name in ("megatron-gpt-1t", "megatron-gpt-145.6b"):
        m = MODELS[name]
        B, s, l, h, V = 512, 2048, m.layers, m.hidden, m.vocab
        f96 = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
        assert training_flops(m, B, s, "full") == pytest.approx(f96, rel=1e-9)
        f72 = 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))  # no recomputation
        assert training_flops(m, B, s, "none") == pytest.approx(f72, rel=1e-9)


def test_search_finds_narayanans_1t_layout_on_3072_gpus():
    c = Cluster(get_gpu("a100"), 3072, 8, "nvlink", 200)
    p = plan(get_model("megatron-gpt-1t"), c, TrainRequest(2048, 3072, recompute="full"))
    assert (p.best.layout.tp, p.best.layout.pp, p.best.layout.dp) == (8, 64, 6)
    assert any(r.reason.startswith("TP across nodes") for r in p.rejected)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), k=st.integers(0, 3))
def test_more_tp_never_needs_more_weight_memory(name, k):
    m = MODELS[name]
    t = 2 ** k
    if 2 * t > m.heads:
        return
    kw = dict(pp=1, batch=4, prompt=256, output=64, precision="bf16", kv_bytes=2, capacity=80 * 2**30)
    a, b = serving_memory(m, tp=t, **kw), serving_memory(m, tp=2 * t, **kw)
    assert b.weights <= a.weights
    if m.heads % (2 * t) == 0 and (m.kv_heads % (2 * t) == 0 or (2 * t) % m.kv_heads == 0):
        assert b.kv_cache <= a.kv_cache


def test_uneven_heads_can_cost_more_kv_per_gpu():
    # 24 query heads in groups of 3 over 16 ranks: ranks hold 2 or 1 query heads and a rank with
    # heads 2-3 needs KV heads 0 and 1, so tp=16 keeps more KV per GPU than tp=8 (found by hypothesis)
    m = get_model("llama-3.2-3b")
    assert kv_bytes_per_token(m, 16) == 2 * kv_bytes_per_token(m, 8)
