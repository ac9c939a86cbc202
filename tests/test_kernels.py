"""The native dense products (``shardwise/kernels/linear.cpp``) against float64 references, and
the tiled weight form the inference engines hold. Tolerances: fp32 1e-5 relative to the largest
output (summation order only), bf16 one bf16 rounding of the result (2^-8 relative) plus fp32
summation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
        assert forms and all("weight" not in m._parameters for m in model.modules()
                             if getattr(m, "qweight", None) is not None)
        assert _rel(model(ids), ref) < 1e-5
