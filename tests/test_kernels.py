"""The native dense products (``shardwise/kernels/linear.cpp``) against float64 references, and
the tiled weight form the inference engines hold. Tolerances: fp32 1e-5 relative to the largest
output (summation order only), bf16 one bf16 rounding of the result (2^-8 relative) plus fp32
summation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise import kernels

pytestmark = pytest.mark.skipif(not kernels.load() or not kernels.enable(),
                                reason="native kernels not built or not supported on this CPU")

DTYPES = [dt for dt in (torch.float32, torch.bfloat16) if dt in kernels.enable()]
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 17, 70])  # every pass width, and units' tails
def test_tiled_product_equals_reference(dtype, rows):
    torch.manual_seed(rows)
    n, k = 16 * 13, 98 if dtype == torch.bfloat16 else 99  # 13 tiles: a unit and a tail; odd k (pairs)
    w, b = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    x = torch.randn(2, rows, k).to(dtype)
    form = kernels.Tiled(w)
    ref = x.double() @ w.double().t() + b.double()
    y = form.linear(x, b)
    assert y.shape == (2, rows, n) and y.dtype == dtype
    assert _rel(y, ref) < TOL[dtype]
    assert _rel(form.linear(x), x.double() @ w.double().t()) < TOL[dtype]
    # the layout round-trips: rows looked up and the whole weight, bit for bit
    ids = torch.tensor([[0, 15, 16], [n - 1, 37, 0]])
    assert torch.equal(form.rows(ids), F.embedding(ids, w))
    assert torch.equal(form.dequantize(dtype), w)
    if rows <= kernels.MAX_ROWS:  # the row-major decode kernel agrees too
        assert _rel(torch.ops.shardwise.linear(x, w, b), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 17, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_tiling_equals_the_unfused_pair(dtype, rows, bias):
    """A gate/up weight in the SwiGLU form: one product gives silu(gate) * up, what the product
    of the plain tiling then ``shardwise::silu_mul`` give (the same roundings; the sums' order
    can differ, as it does between thread counts: fp32 1e-6 of the largest output, bf16 one
    rounding) and a float64 reference within the products' tolerance; rows and the whole weight
    still round-trip."""
    torch.manual_seed(rows)
    local, k = 16 * 7, 98 if dtype == torch.bfloat16 else 99  # 14 tiles: pairs across a unit
    w = torch.randn(2 * local, k).to(dtype)
    b = torch.randn(2 * local).to(dtype) if bias else None
    x = torch.randn(2, rows, k).to(dtype)
    fused = kernels.Tiled(w, swiglu=True)
    y = fused.linear(x, b)
    assert y.shape == (2, rows, local) and y.dtype == dtype and fused.form.endswith("-swiglu")
    pair = torch.ops.shardwise.silu_mul(kernels.Tiled(w).linear(x, b), local)
    assert _rel(y, pair.double()) < (1e-6 if dtype == torch.float32 else 2 ** -7)
    gu = x.double() @ w.double().t() + (b.double() if bias else 0)
    ref = F.silu(gu[..., :local]) * gu[..., local:]
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 3 * TOL[dtype])
    ids = torch.tensor([[0, 15, 16], [2 * local - 1, local, local + 17]])
    assert torch.equal(fused.rows(ids), F.embedding(ids, w))
    assert torch.equal(fused.dequantize(dtype), w)


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no bf16 products on this CPU")
@pytest.mark.parametrize("rows", [3, 4, 16, 17, 33, 70])  # below, at and past the AMX threshold
@pytest.mark.parametrize("swiglu", [False, True])
def test_bf16_products_of_many_rows(rows, swiglu):
    """bf16 with K a multiple of 32: from 4 rows on, the products run on AMX tiles where the CPU
    has them (``linear_amx``). Against float64 (one rounding), and, where AMX runs, against the
    AVX-512 path switched in by ``set_linear_amx(False)``: the same fp32 sums in another order,
    so at most one bf16 rounding apart (2^-7 of the largest output; SwiGLU's rounded gate, up and
    activation: 2^-6), with and without the bias, 15 tiles (an odd one at the end of a range)."""
    torch.manual_seed(rows)
    n, k = 16 * (14 if swiglu else 15), 96
    w, b = torch.randn(n, k).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    x = torch.randn(rows, k).to(torch.bfloat16)
    form = kernels.Tiled(w, swiglu=swiglu)
    gu = x.double() @ w.double().t() + b.double()
    ref = F.silu(gu[..., :n // 2]) * gu[..., n // 2:] if swiglu else gu
    y = form.linear(x, b)
    assert _rel(y, ref) < (3 if swiglu else 1) * TOL[torch.bfloat16]
    if torch.ops.shardwise.linear_amx():
        was = torch.ops.shardwise.set_linear_amx(False)
        try:
            assert not torch.ops.shardwise.linear_amx()
            avx = form.linear(x, b)
        finally:
            torch.ops.shardwise.set_linear_amx(was)
        assert torch.ops.shardwise.linear_amx()
        assert _rel(y, avx.double()) <= (2 ** -6 if swiglu else 2 ** -7)
        if rows < 4:  # below the threshold both are the AVX-512 path
            assert torch.equal(y, avx)


def test_swiglu_tiling_needs_whole_tiles():
    with pytest.raises(ValueError, match="16s of rows; got 48 rows"):
        kernels.Tiled(torch.randn(48, 64), swiglu=True)
    with pytest.raises(RuntimeError, match=r"\(gate, up\) pairs"):
        torch.ops.shardwise.linear_tiled_swiglu(torch.randn(1, 64), kernels._tile(torch.randn(48, 64)))


def test_tiled_rejects_a_wrong_layout():
    w = torch.randn(32, 64)
    with pytest.raises(RuntimeError, match=r"\(N/16, K, 16\)"):
        torch.ops.shardwise.linear_tiled(torch.randn(1, 64), w)  # row-major, not tiled
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.Tiled(w).linear(torch.randn(1, 64, requires_grad=True))


def test_tile_weights_on_a_model_keeps_its_outputs():
    """The engines' pass: every sharded linear, the embedding and the tied head tiled, each
    held once, the logits unchanged (fp32: 1e-5 relative)."""
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.quant.load import weight_bytes
    from shardwise.shards import init_weights
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg, group=None).eval()
    init_weights(model, seed=0, std=0.3)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).double()
        held = weight_bytes(model)
        tiled = kernels.tile_weights(model)
        assert tiled > 0 and weight_bytes(model) == held
        forms = [m for m in model.modules() if isinstance(m, kernels.Tiled)]
        assert sum(f.swiglu for f in forms) == cfg.num_hidden_layers  # each MLP's gate/up fused
        assert forms and all("weight" not in m._parameters for m in model.modules()
                             if getattr(m, "qweight", None) is not None)
        assert _rel(model(ids), ref) < 1e-5


def _paged_reference(q, kc, vc, table, lens, kv_of, scale, softcap):
    """Gather each row's keys and values, then softmax(cap(scale q k^T)) v in float64."""
    B, nq, d = q.shape
    L = table.shape[1]
    out = torch.zeros(B, nq, d, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        for h in range(nq):
            kh = int(kv_of[h])
            k = kc[table[b, :n], kh * d:(kh + 1) * d].double()
            v = vc[table[b, :n], kh * d:(kh + 1) * d].double()
            s = (k @ q[b, h].double()) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[b, h] = torch.softmax(s, 0) @ v
    assert L >= int(lens.max())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("d", [16, 64, 128])  # the generic loops; the AVX-512 path (64, 128)
@pytest.mark.parametrize("B", [4, 1])  # 8 units of a KV head each; 2 -> a unit per query head
def test_paged_decode_attention_equals_reference(dtype, softcap, d, B):
    """Irregular KV heads (query heads 0-2 -> 1, 3 -> 0, 4-6 -> 1: groups of 6 and 1, so the
    AVX-512 path's register groups of heads run whole and partial), rows of different lengths in
    scattered slots, a padding row of one key. fp32 1e-5, bf16 1e-2 (inputs in bf16, sums fp32).
    At batch 1 there are fewer (sequence, KV head) units than threads can share evenly, so the
    kernel splits the work by query head instead (with two threads or more: run with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _paged_decode_case(dtype, softcap, d, B)
    finally:
        torch.set_num_threads(threads)


def _paged_decode_case(dtype, softcap, d, B):
    g = torch.Generator().manual_seed(1)
    nq, nkv, slots, L = 7, 2, 300, 128
    q = torch.randn(B, nq, d, generator=g).to(dtype)
    kc, vc = (torch.randn(slots, nkv * d, generator=g).to(dtype) for _ in range(2))
    table = torch.randint(0, slots, (B, L), generator=g)
    lens = torch.tensor([70, 1, 128, 3][:B])
    kv_of = torch.tensor([1, 1, 1, 0, 1, 1, 1])
    out = torch.ops.shardwise.paged_decode(q, kc, vc, table, lens, kv_of, 0.25, softcap)
    ref = _paged_reference(q, kc, vc, table, lens, kv_of, 0.25, softcap)
    assert out.dtype == dtype and _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="outside the cache's 300"):
        bad = table.clone()
        bad[0, 5] = slots
        torch.ops.shardwise.paged_decode(q, kc, vc, bad, lens, kv_of, 0.25, softcap)


def _prefill_reference(q, kc, vc, slots, kv_of, q_start, window, scale, softcap):
    """Gathered keys, an explicit mask, fp64: (nq, s, d)."""
    nq, s, d = q.shape
    L = slots.numel()
    k = kc[slots].double().view(L, -1, d).transpose(0, 1)[kv_of]          # (nq, L, d)
    v = vc[slots].double().view(L, -1, d).transpose(0, 1)[kv_of]
    x = q.double() @ k.transpose(1, 2) * scale                             # (nq, s, L)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    gap = torch.arange(s)[:, None] + q_start - torch.arange(L)[None]
    seen = (gap >= 0) & ((gap < window) if window else True)
    return torch.softmax(x.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128, 40])  # the AVX-512 path (d % 16 == 0), the generic loops
@pytest.mark.parametrize("s,q_start,window,softcap", [
    (241, 0, 0, 0.0),     # a prompt's first chunk
    (37, 300, 0, 0.0),    # a later chunk: the cached keys span two blocks of 256
    (70, 5, 24, 0.0),     # a sliding window (its first keys never read by the last rows)
    (3, 9, 0, 30.0),      # soft-capped scores, fewer rows than a register group
    (1, 0, 0, 0.0),       # one query, one key
])
def test_prefill_attention_equals_reference(dtype, d, s, q_start, window, softcap):
    """``shardwise::prefill_attention`` (a prompt chunk over keys where they lie in the paged
    cache) against gathered keys and an explicit causal mask in fp64, irregular KV heads, the
    queries a strided view: fp32 1e-5, bf16 1e-2 relative (inputs in bf16, sums in fp32)."""
    g = torch.Generator().manual_seed(2)
    nq, nkv, cache = 7, 2, 600
    L = q_start + s
    q = torch.randn(1, nq, s + 4, d, generator=g).to(dtype)[0, :, 2:2 + s]
    kc, vc = (torch.randn(cache, nkv * d, generator=g).to(dtype) for _ in range(2))
    slots = torch.randperm(cache, generator=g)[:L]
    kv_of = torch.tensor([1, 1, 1, 0, 1, 1, 1])
    out = torch.ops.shardwise.prefill_attention(q, kc, vc, slots, kv_of, q_start, window, 0.25,
                                                softcap)
    ref = _prefill_reference(q, kc, vc, slots, kv_of, q_start, window, 0.25, softcap)
    assert out.shape == (nq, s, d) and out.dtype == dtype
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="outside the cache's 600"):
        bad = slots.clone()
        bad[-1] = cache
        torch.ops.shardwise.prefill_attention(q, kc, vc, bad, kv_of, q_start, window, 0.25, 0.0)


def _tiny(variant: str | None):
    """A 2-layer GQA model (6 query heads, 2 KV heads); ``softcap``: Gemma 2's soft-capped
    scores, without its sliding windows; ``window``: Mistral's sliding window of 20."""
    from dataclasses import replace
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    cfg = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    if variant == "softcap":
        cfg = replace(cfg, model_type="gemma2", hidden_act="gelu_pytorch_tanh",
                      attn_logit_softcapping=30.0, sliding_window=None)
    elif variant == "window":
        cfg = replace(cfg, model_type="mistral", sliding_window=20)
    model = LlamaForCausalLM(cfg, group=None).eval()
    init_weights(model, seed=0, std=0.3)
    return model


@pytest.mark.parametrize("variant", [None, "softcap", "window"])
def test_flat_step_paged_decode_equals_gathered(variant):
    """Mixed steps (decode rows beside a prompt fed in chunks: the flat eager step) with the
    decode rows through ``paged_decode`` against the gathered keys and SDPA: logits within
    1e-5 (fp32), GQA, soft-capped and sliding-window layers (whose decode rows start past 0)."""
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    model = _tiny(variant)
    out = {}
    with torch.inference_mode():
        for paged in (True, False):
            cache = PagedKVCache(model, 48, 16)
            step = StaticStep(model, cache, StepOptions(compile=False, max_seqs=4,
                                                        paged_attention=paged))
            assert cache.paged == paged
            prompts = [list(range(3, 30)), [26, 43, 38]]
            blocks = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
            step([Chunk(i, p, 0, blocks[i], True) for i, p in enumerate(prompts)])
            lens, toks, logits = [len(p) for p in prompts], [5, 6], []
            long = list(range(60, 102))  # fed 7 tokens a step beside the two decodes
            for s in range(6):
                chunks = [Chunk(i, [toks[i]], lens[i], blocks[i], True) for i in range(2)]
                chunks.append(Chunk(2, long[7 * s:7 * s + 7], 7 * s, blocks[2], s == 5))
                logits.append(step(chunks).double())
                lens = [n + 1 for n in lens]
            out[paged] = torch.cat(logits)
    assert out[True].shape == (6 * 2 + 1, 256)
    assert _rel(out[True], out[False]) < 1e-5


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_step_paged_attention_equals_gathered(softcap):
    """The static step with the paged kernel against the gathered keys and SDPA (eager, fp32,
    GQA and a soft-capped variant): logits within 1e-5, over widths 64 and 128 and 3 rows."""
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    model = _tiny("softcap" if softcap else None)
    out = {}
    with torch.inference_mode():
        for paged in (True, False):
            cache = PagedKVCache(model, 48, 16)
            step = StaticStep(model, cache, StepOptions(compile=False, max_seqs=4,
                                                        paged_attention=paged))
            assert step.paged == paged and step.static
            assert next(iter(model.model.layers.values())).self_attn.params.softcap == softcap
            prompts = [list(range(3, 14)), [26, 43, 38], list(range(40, 100))]
            blocks = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
            step([Chunk(i, p, 0, blocks[i], True) for i, p in enumerate(prompts)])  # prefill
            lens, toks, logits = [len(p) for p in prompts], [5, 6, 7], []
            for _ in range(8):  # the 60-token prompt crosses the width 64
                lg = step([Chunk(i, [toks[i]], lens[i], blocks[i], True) for i in range(3)])
                logits.append(lg.double())
                lens = [n + 1 for n in lens]
            out[paged] = torch.stack(logits)
    assert _rel(out[True], out[False]) < 1e-5


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_row_argmax_equals_torch_max(data):
    """``shardwise::row_argmax`` (the greedy pick) gives ``torch.max(x, dim=-1)``'s values and
    indices exactly: ties to the first index, -inf rows, a NaN wins at its first index, widths
    with and without a 16-lane tail."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    rows, n = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 80))
    # few distinct values: ties are common
    vals = st.sampled_from([-3.0, -1.5, 0.0, 0.25, 2.0, 7.5, float("-inf")])
    x = torch.tensor(data.draw(st.lists(st.lists(vals, min_size=n, max_size=n),
                                        min_size=rows, max_size=rows)), dtype=dtype)
    if data.draw(st.booleans()):
        x[data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, n - 1))] = float("nan")
    got, ref = torch.ops.shardwise.row_argmax(x), x.max(dim=-1)
    assert torch.equal(got[1], ref.indices), (x, got, ref)
    assert torch.allclose(got[0].double(), ref.values.double(), rtol=0, atol=0, equal_nan=True)


def test_row_argmax_at_vocabulary_width():
    """A real width (SmolLM2's 49,152 and a padded tail): bit-equal to torch's answer."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(16, 49152 + 7).to(dtype)
        x[3, 100] = x[3, 40000] = x[3].max() + 1  # a tie far apart: the first wins
        got, ref = torch.ops.shardwise.row_argmax(x), x.max(dim=-1)
        assert torch.equal(got[0], ref.values) and torch.equal(got[1], ref.indices)
        assert got[1][3] == 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_pieces_equal_the_torch_composition(dtype):
    """``pieces.cpp``'s RMSNorm (Llama's and Gemma's ``1 + w``), SiLU-and-multiply and rope
    against the torch composition of :mod:`shardwise.models.pieces` (run with a gradient, which
    keeps it torch's): fp32 within 1e-6 relative; bf16 rope bit-identical (the same roundings),
    the norm and SiLU within one bf16 rounding (a sum's order, an exp's last bit). The rope input
    is a strided view of a fused qkv output, as in the model."""
    from shardwise.models import pieces
    from shardwise.models.rope import apply_rope, cos_sin
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 37, 72, generator=g) * 3).to(dtype)
    w = torch.randn(72, generator=g).to(dtype)
    qkv = torch.randn(2, 37, 5 * 64, generator=g).to(dtype)
    q = qkv[..., :3 * 64].view(2, 37, 3, 64).transpose(1, 2)                     # (b, h, s, d)
    cos, sin = cos_sin(torch.arange(37).expand(2, 37) + 5, 1.0 / 10000 ** (torch.arange(32) / 32),
                       dtype)
    gu = (torch.randn(2, 37, 2 * 96, generator=g) * 4).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    with torch.inference_mode():
        assert kernels.native_pieces(x)
        got = [pieces.rms_norm(x, w, 1e-5), pieces.rms_norm(x, w, 1e-5, 1.0),
               pieces.glu(gu, 96, F.silu), apply_rope(q, cos, sin)]
    with torch.enable_grad():
        assert not kernels.native_pieces(x)
        want = [pieces.rms_norm(x, w, 1e-5), pieces.rms_norm(x, w, 1e-5, 1.0),
                pieces.glu(gu, 96, F.silu), apply_rope(q, cos, sin)]
    for name, a, b in zip(("norm", "norm 1 + w", "silu * up", "rope"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        exact = name == "rope" and dtype == torch.bfloat16
        assert _rel(a, b.double()) <= (0.0 if exact else tol), name
    assert got[3].transpose(1, 2).is_contiguous()  # laid out (b, s, h, d): the cache's rows


def test_native_pieces_keep_a_models_outputs():
    """A GQA model's eager logits (a prompt, then a decode step) with the native pieces and with
    the torch composition: fp32 within 1e-5 relative."""
    from shardwise.models.cache import KVCache
    model = _tiny(None)
    outs = []
    for native in (True, False):
        saved, kernels._PIECES = kernels._PIECES, native
        try:
            with torch.inference_mode():
                cache = KVCache(model, 1, 40)
                ids = torch.tensor([list(range(3, 30))])
                a = model(ids, cache.positions(1, ids.shape[1]), attend=cache.attend)
                cache.advance(ids.shape[1])
                b = model(torch.tensor([[7]]), cache.positions(1, 1), attend=cache.attend)
            outs.append(torch.cat([a[0], b[0]]).double())
        finally:
            kernels._PIECES = saved
    assert _rel(outs[0], outs[1]) < 1e-5
