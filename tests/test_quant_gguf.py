"""GGUF files kept quantized: Q4_0 and Q4_1 as int4, Q8_0 as int8, each rank reading its blocks.

Round trip: each tensor's values equal gguf's own dequantization (fp32: ``(q - 8) d + (m + 8 d)``
against gguf's ``d q + m``, a few ulp); in bf16 the runtime rounds scales and zero points to bf16,
so each value is within ``2^-8 (8 |s| + |z| + |w|)`` of gguf's (rounding of s, z and the result).
A model read from the GGUF with ``--quant int4`` equals the model dequantized to fp32 within
1e-5 of the largest logit (fp32 activations).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from quant_checks import run_source  # noqa: E402
from test_gguf import _tiny_model, _write_gguf  # noqa: E402
from shardwise.checkpoint.gguf import hf_tensor_name, unpermute_qk_from_gguf  # noqa: E402
from shardwise.checkpoint.gguf_read import GGUFTensors  # noqa: E402
from shardwise.checkpoint.source import resolve  # noqa: E402
from shardwise.mesh import LayoutOnly  # noqa: E402
from shardwise.models.llama import LlamaForCausalLM  # noqa: E402
from shardwise.quant.config import QuantConfig  # noqa: E402
from shardwise.quant.kernels import prepare  # noqa: E402
from shardwise.quant.load import load_quantized  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q8_0")
IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 64]])
REL = 1e-5


def mixed(name: str) -> str:
    """llama.cpp's habit: a Q8_0 embedding, another type for attn_v, Q4_1 elsewhere."""
    return "Q8_0" if name == "token_embd.weight" else "Q5_0" if "attn_v" in name else "Q4_1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qgguf")
    model = _tiny_model("llama", tied=True)
    out = {}
    for t in TYPES + ("mixed",):
        out[t] = d / f"tiny-{t}.gguf"
        _write_gguf(out[t], model, mixed if t == "mixed" else t)
    return out


def gguf_values(path) -> dict[str, torch.Tensor]:
    """Every 2-D tensor as gguf dequantizes it, in HF names, shapes and row order."""
    heads = {"attn_q": 4, "attn_k": 2}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) != 2:
            continue
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        w = w.reshape(int(t.shape[1]), int(t.shape[0]))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        out[hf_tensor_name(t.name)] = unpermute_qk_from_gguf(w, heads[kind]) if kind in heads \
            else w
    return out


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", TYPES)
def test_round_trip_equals_gguf_dequantization(files, kind):
    tensors = GGUFTensors(files[kind], q8_0="block")
    method = "int8" if kind == "Q8_0" else "int4"
    for name, w in gguf_values(files[kind]).items():
        n, k = w.shape
        for dim, a, b in [(0, 0, n), (0, 16, min(n, 48)), (1, 32, 64), (1, 0, 32)]:
            qt = tensors.qread(name, (n, k), dim, a, b, method, 32)
            assert (qt.method, qt.group) == (method, 32)
            ref = w[a:b] if dim == 0 else w[:, a:b]
            torch.testing.assert_close(qt.dequantize(), ref, rtol=1e-6, atol=1e-7)
        qt = tensors.qread(name, (n, k), 0, 0, n, method, 32)
        s = qt.scale[:, qt.group_index()].abs()
        z = 0 if qt.zero is None else qt.zero[:, qt.group_index()].abs()
        qw, _ = prepare(qt, dtype=torch.bfloat16)
        bound = 2.0 ** -8 * (8 * s + z + w.abs()) + 1e-7
        assert ((qw.dequantize() - w).abs() <= bound).all(), name
    tensors.close()


def test_each_rank_reads_only_its_blocks(files):
    """At tp=2 the ranks' reads partition the quantized bytes (rows of the column-parallel
    weights, block columns of each row of the row-parallel ones): nothing is read twice."""
    path = files["Q4_1"]
    source = resolve(str(path), dense=False)
    total = sum(e.row_bytes * e.shape[0] for e in GGUFTensors(path).tensors.values()
                if len(e.shape) == 2)
    read = []
    for rank in range(2):
        model = LlamaForCausalLM(source.config, group=LayoutOnly(2, rank),
                                 quant=QuantConfig("int4", group=32))
        tensors = GGUFTensors(path)
        load_quantized(model, tensors.qread, dtype=torch.float32)
        read.append(tensors.bytes_read)
    assert sum(read) == total and max(read) < 0.6 * total, (read, total)


@pytest.mark.parametrize("kind", ["Q4_1", "mixed"])
def test_gguf_as_int4_equals_the_dequantized_model(pool, files, kind):
    """Q4_1 kept as int4 (tp 1-3) equals the fp32 dequantized model; in the mixed file the
    Q5_0 attn_v (and so the fused QKV) stays dense and says so, the rest is quantized."""
    spec = str(files[kind])
    want = run_source(spec, 1, None, IDS)["logits"]
    quant = QuantConfig("int4", group=32, q8_0="block")
    for tp in (1, 2, 3):
        res = [r for r in pool.run(run_source, spec, tp, quant, IDS) if r]
        assert rel_err(res[0]["logits"], want) < REL, f"tp={tp}"
        forms = res[0]["forms"]
        assert forms["model.layers.0.mlp.down_proj.qweight"] in ("int4", "int4-native")
        assert forms["model.embed_tokens.qweight"] in (("int8-blocks", "int8-native")
                                                       if kind == "mixed" else ("dequantize",))
        assert ("model.layers.0.self_attn.qkv_proj.qweight" in forms) == (kind == "Q4_1")


def test_q8_0_per_channel_is_reported_and_close(files, capsys):
    """Q8_0 re-quantized per row (the int8 kernel): the change is reported; logits stay within
    1% of the exact blocks (a tiny random model; SmolLM2's figures are in RESULTS.md)."""
    spec = str(files["Q8_0"])
    exact = run_source(spec, 1, QuantConfig("int8", q8_0="block"), IDS)["logits"]
    chan = run_source(spec, 1, QuantConfig("int8", q8_0="channel"), IDS)
    assert set(chan["forms"].values()) <= {"int8", "int8-native"}
    assert "Q8_0 re-quantized to int8 per row: largest change" in capsys.readouterr().err
    assert 0 < rel_err(chan["logits"], exact) < 1e-2


def test_real_smollm2_tensors_round_trip():
    """A Q4_1 tensor, a rope-permuted one and the Q8_0 embedding of the real file, read by rows
    and by block columns, against gguf's dequantization of the whole tensor."""
    from shardwise.checkpoint.gguf_read import TABLE
    try:
        source = resolve("smollm2-135m", dense=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tensors = GGUFTensors(source.gguf, q8_0="block", table=source.weights / TABLE)
    for name in ("model.layers.3.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
        e = tensors.tensors[name]
        (n, k), kind = e.shape, gguf.GGMLQuantizationType[e.kind]
        rows = n if n < 4096 else 320  # the embedding: its first rows
        raw = np.fromfile(source.gguf, np.uint8, rows * e.row_bytes, offset=e.offset)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(raw.reshape(rows, -1), kind)))
        if "q_proj" in name:
            w = unpermute_qk_from_gguf(w, 9)
        method = "int8" if e.kind == "Q8_0" else "int4"
        for dim, a, b in [(0, 64, 320)] + ([(1, 320, 576)] if n < 4096 else []):
            qt = tensors.qread(name, (n, k), dim, a, b, method, 32)
            ref = w[a:b] if dim == 0 else w[:, a:b]
            torch.testing.assert_close(qt.dequantize(), ref, rtol=1e-6, atol=1e-7)
    tensors.close()
