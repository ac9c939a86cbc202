"""Quantized weights: the kernels' facts, the canonical form, the kernel grid, and quantized
layers and models at tp 1-4 against the unsharded quantized ones.

Tolerance: fp32 activations, 1e-5 of the largest output (relative): a sharded layer holds
exactly the unsharded layer's quantized values (groups split at rank boundaries keep their scale
and zero point), so only the summation order differs (observed ~1e-6). Where a rank's columns
start inside a group at an offset that is not a multiple of 32, the straddling kernel groups are
re-quantized (:mod:`shardwise.quant.grid`): each re-quantized value is within half a step of its
new grid, and the output within ``sum_j |x_j| * half step`` over those columns.
"""
import pytest
import torch

from quant_checks import reference, run_quant
from shardwise.quant.grid import int4_grid
from shardwise.quant.kernels import PACK_ROWS, prepare
from shardwise.quant.config import QuantConfig
from shardwise.quant.qtensor import pack_nibbles, quantize, unpack_nibbles

REL = 1e-5
# built to straddle: 6 heads of 32 (o_proj splits 2+2+1+1 heads on 4 ranks: columns 128, 160
# inside groups of 128), hidden 192 = 1.5 groups of 128, 320 MLP columns = 2.5 groups
STRADDLE = dict(vocab_size=64, hidden_size=192, intermediate_size=320, num_hidden_layers=1,
                num_attention_heads=6, num_key_value_heads=2, head_dim=32)
# heads of 48: 5 heads split 3 + 2 start rank 1 at column 144 = 16 into a group of 64
ODD_HEADS = dict(vocab_size=64, hidden_size=256, intermediate_size=320, num_hidden_layers=1,
                 num_attention_heads=5, num_key_value_heads=1, head_dim=48)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------- torch's kernels
def test_int4_kernel_computes_q_minus_8_times_s_plus_z_and_packs_64_row_blocks():
    g = torch.Generator().manual_seed(0)
    n, k, group = 80, 256, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    s, z = torch.rand(k // group, n, generator=g) + 0.1, torch.randn(k // group, n, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(3, k, generator=g)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, torch.stack([s, z], -1))
    w = (q.float() - 8).view(n, -1, group) * s.t()[..., None] + z.t()[..., None]
    assert rel_err(y, x @ w.view(n, k).t()) < REL
    chunks = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r:r + 64].contiguous(), 1)
                        for r in range(0, n, 64)])
    assert torch.equal(chunks, packed) and PACK_ROWS % 64 == 0
    with pytest.raises(RuntimeError, match="16"):
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[:40].contiguous(), 1)


def test_int8_kernel_takes_per_channel_scales_only():
    q = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    x = torch.randn(2, 64)
    s = torch.rand(24)
    y = torch.ops.aten._weight_int8pack_mm(x, q, s)
    assert rel_err(y, x @ (q.float() * s[:, None]).t()) < REL
    with pytest.raises(RuntimeError, match="1d"):
        torch.ops.aten._weight_int8pack_mm(x, q, torch.rand(24, 2))


# ----------------------------------------------------------------------- canonical form
@pytest.mark.parametrize("method,group", [("int8", None), ("int8", 32), ("int4", 32),
                                          ("int4", 128)])
def test_quantize_error_is_half_a_step_and_slices_keep_values(method, group):
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(2))
    qt = quantize(w, method, group=group)
    step = qt.scale[:, qt.group_index()]                       # (n, k): one step per element
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    for a, b in [(0, 200), (40, 170), (17, 33), (128, 200)]:
        part = qt.cols(a, b)
        assert torch.equal(part.dequantize(), qt.dequantize()[:, a:b])
        assert torch.equal(part.rows(3, 9).dequantize(), qt.dequantize()[3:9, a:b])


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (5, 13), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q), 13), q)


def test_kernel_grid_rules():
    assert int4_grid(32, 576, 128).kernel_group == 64          # 4.5 groups of 128
    assert int4_grid(32, 256, 128, offset=64).exact            # split group keeps its scale
    g = int4_grid(32, 96, 64, offset=16)                       # heads of 48: straddles
    assert (g.kernel_group, g.requantized, g.source) == (32, 1, (0, -1, 1))
    assert int4_grid(32, 48, 64).kernel_group is None          # no kernel: dequantize
    assert int4_grid(24, 64, 64).kernel_group is None


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("method,group", [("int8", None), ("int8", 128), ("int4", 128)])
def test_runtime_forms_equal_their_values(method, group, kernels, monkeypatch):
    if kernels == "torch":
        monkeypatch.setenv("SHARDWISE_QUANT_KERNELS", "torch")
    w = torch.randn(48, 576, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, method, group=group)
    x = torch.randn(2, 3, 576)
    for part in (qt, qt.cols(320, 576), qt.cols(16, 64)):
        qw, _ = prepare(part, dtype=torch.float32)
        assert rel_err(qw.linear(x[..., :part.shape[1]]),
                       x[..., :part.shape[1]] @ part.dequantize().t()) < REL
        assert torch.allclose(qw.dequantize(), part.dequantize(), atol=1e-6)


# ----------------------------------------------------------------------- sharded vs unsharded
CASES = [
    {"kind": "column", "kw": {"in": 192, "out": 96}, "quant": {"method": "int4", "group": 128}},
    {"kind": "row", "kw": {"in": 320, "out": 64}, "quant": {"method": "int4", "group": 128}},
    {"kind": "row", "kw": {"in": 320, "out": 64}, "quant": {"method": "int8"}},
    {"kind": "model", "kw": STRADDLE, "quant": {"method": "int4", "group": 128}},
    {"kind": "model", "kw": STRADDLE, "quant": {"method": "int8"}},
    {"kind": "model", "kw": dict(STRADDLE, tie_word_embeddings=False),
     "quant": {"method": "int4", "group": 32, "embedding": "int4"}},
    # torch's kernels (the fallback where the native ones are not built)
    {"kind": "model", "kw": STRADDLE, "quant": {"method": "int4", "group": 128},
     "kernels": "torch"},
    {"kind": "model", "kw": STRADDLE, "quant": {"method": "int8", "group": 0}, "kernels": "torch"},
]
KERNEL_FORMS = {"int4", "int8", "int4-native", "int8-native"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['kind']}-{c['quant']['method']}-"
                         f"{c['quant'].get('group', '')}-{c['kw'].get('tie_word_embeddings', '')}"
                         f"-{c.get('kernels', 'native')}")
def test_sharded_equals_unsharded(pool, case):
    ref = reference(case)
    forms = set()
    for tp in (1, 2, 3, 4):
        res = [r for r in pool.run(run_quant, case, tp) if r]
        assert rel_err(res[0]["out"], ref["out"]) < REL, f"tp={tp}"
        forms |= {f for r in res for f in r["forms"].values()}
        assert not any("re-quantized" in line for r in res for said in r["notes"].values()
                       for line in said), "exact splits must not re-quantize"
    assert forms & KERNEL_FORMS, forms  # the kernels ran, not only the dequantizing fallback
    if case.get("kernels") == "torch":
        assert not {f for f in forms if f.endswith("-native")}, forms


def test_every_head_layout_loads_and_odd_heads_requantize_as_documented(pool):
    case = {"kind": "model", "kw": ODD_HEADS, "quant": {"method": "int4", "group": 64}}
    ref = reference(case)
    for tp in (3, 4):  # exact splits and dequantize-then-matmul
        res = [r for r in pool.run(run_quant, case, tp) if r]
        assert rel_err(res[0]["out"], ref["out"]) < REL, f"tp={tp}"
    res = [r for r in pool.run(run_quant, case, 2) if r]
    said = res[1]["notes"]["model.layers.0.self_attn.o_proj.weight"]
    assert any("re-quantized 1 of 3 groups of 32" in line for line in said), said


def test_straddling_row_split_is_within_half_a_step(pool):
    """A row-parallel weight split at columns 0 | 144 | 240 (heads of 48), groups of 64: rank 1's
    kernel group [176, 208) straddles 192 and is re-quantized; the rest is exact."""
    case = {"kind": "row", "kw": {"in": 240, "out": 32, "bounds": [0, 144, 240]},
            "quant": {"method": "int4", "group": 64}}
    ref = reference({**case, "kw": {"in": 240, "out": 32, "bounds": [0, 240]}})
    res = [r for r in pool.run(run_quant, case, 2) if r]
    full = ref["values"]["qweight"]                            # (32, 240) unsharded values
    mine = res[1]["values"]["qweight"]                         # rank 1: columns 144..239
    exact = torch.ones(96, dtype=torch.bool)
    exact[176 - 144:208 - 144] = False
    assert torch.allclose(mine[:, exact], full[:, 144:][:, exact], atol=1e-6)
    block = full[:, 176:208]
    half = (block.amax(1) - block.amin(1)) / 15 / 2            # half the new step, per row
    assert ((mine[:, ~exact] - block).abs() <= half[:, None] + 1e-6).all()
    assert not torch.allclose(mine[:, ~exact], block, atol=1e-6)  # it did re-quantize
    x = torch.randn(2, 5, 240, generator=torch.Generator().manual_seed(1))
    bound = x[..., 176:208].abs().sum(-1, keepdim=True) * half  # (2, 5, 32) per output
    assert ((res[0]["out"] - ref["out"]).abs() <= bound + 1e-5).all()


def test_quant_config_refuses_bad_values():
    with pytest.raises(ValueError, match="group 100"):
        QuantConfig("int4", group=100)
    with pytest.raises(ValueError, match="int3"):
        QuantConfig("int3")


# ----------------------------------------------------------------------- the native kernel
@pytest.mark.skipif(not __import__("shardwise.kernels").kernels.qlinear_available(),
                    reason="shardwise::qlinear needs AVX-512 and a C++ compiler")
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_equals_the_dequantized_weight(method, dtype):
    """``shardwise::qlinear`` (up to NATIVE_ROWS rows streamed, more dequantize-then-GEMM) against
    ``x @ W^T`` of the dequantized values with the scales rounded to the activation dtype:
    fp32 within 1e-5 of the largest output, bf16 within its output rounding (2^-8 relative)."""
    from shardwise.quant.native import (NATIVE_ROWS, Native, pack_words, tiled, unpack_words,
                                         untiled)
    g = torch.Generator().manual_seed(5)
    n, k = 176, 256                                 # 11 tiles of 16 rows: passes of 4 and 1
    for group in (32, 128, k):
        if method == "int4" and group == k:
            continue
        qt = quantize(torch.randn(n, k, generator=g), method, group=group)
        qw = Native(method, qt.q, qt.scale, qt.zero, group, dtype, "cpu")
        if method == "int4":
            assert torch.equal(unpack_words(pack_words(qt.q)), qt.q)
        assert torch.equal(untiled(tiled(qt.scale)), qt.scale)
        s = qt.scale.to(dtype).float().repeat_interleave(group, 1)
        w = qt.q.float() * s if method == "int8" else \
            (qt.q.float() - 8) * s + qt.zero.to(dtype).float().repeat_interleave(group, 1)
        assert torch.equal(qw.dequantize(), w)
        assert torch.equal(qw.rows(torch.tensor([[3, 50]])).float(), w[[3, 50]].to(dtype)[None].float())
        bias = torch.randn(n, generator=g).to(dtype)
        limit = NATIVE_ROWS[qw.bits]
        for rows in (1, 2, 3, 4, 5, 16, 17, limit + 1):
            x = torch.randn(rows, k, generator=g).to(dtype)
            want = x.float() @ w.t() + bias.float()
            got = qw.linear(x, bias)
            assert got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            assert rel_err(got.float(), want) < tol, (group, rows)
