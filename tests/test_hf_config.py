"""One config reader for transformers 4.x and 5.x key styles, checked against transformers' logits.

Each case is a tiny random model saved by transformers 5 (``rope_parameters``), then the same
weights with the config rewritten as transformers 4.x wrote it (top-level ``rope_theta``,
``rope_scaling`` with ``type`` or ``rope_type``). Non-default values throughout: theta 1e6 / 5e5,
llama3 and linear scaling, an explicit head_dim, a sliding window, tied and untied embeddings.
Tolerance 1e-4 absolute on the logits (fp32, whole model). Each case also asserts that plain rope
would give logits farther than 1e-2 away, so a reader that drops the rope settings fails.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from shardwise.checkpoint.hf import load_weights
from shardwise.models.config import LlamaConfig
from shardwise.models.llama import LlamaForCausalLM

ATOL = 1e-4
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             initializer_range=0.2)  # large q, k: attention (and so rope) moves the logits
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# name -> (transformers config class, kwargs, expected LlamaConfig fields)
CASES = {
    "llama3-untied": (transformers.LlamaConfig,
                      dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3},
                           tie_word_embeddings=False),
                      dict(rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=False,
                           head_dim=None, sliding_window=None, max_position_embeddings=128)),
    "qwen2-1e6-tied-window": (transformers.Qwen2Config,
                              dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                                   tie_word_embeddings=True, use_sliding_window=True,
                                   sliding_window=48, max_window_layers=1),
                              dict(rope_theta=1e6, rope_scaling=None, tie_word_embeddings=True,
                                   attention_bias=True, sliding_window=48,
                                   layer_types=("full_attention", "sliding_attention"),
                                   max_position_embeddings=128)),
    "mistral-linear-headdim": (transformers.MistralConfig,
                               dict(rope_parameters={"rope_theta": 1e6, "rope_type": "linear",
                                                     "factor": 4.0},
                                    head_dim=24, sliding_window=None),
                               dict(rope_theta=1e6, head_dim=24, sliding_window=None,
                                    rope_scaling={"rope_type": "linear", "factor": 4.0},
                                    tie_word_embeddings=False, max_position_embeddings=128)),
}
SEQ = 40  # > original context 32 of the llama3 case; < every model's context


def to_4x(cfg: dict, legacy_type: bool) -> dict:
    """A transformers-5 config.json rewritten in transformers 4.x's key style."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    params = dict(cfg["rope_parameters"])
    out["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    out["rope_scaling"] = None if kind == "default" else \
        {("type" if legacy_type else "rope_type"): kind, **params}
    out["torch_dtype"] = "float32"
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (5.x dir, 4.x dir, transformers' logits, ids)."""
    root = tmp_path_factory.mktemp("hfcfg")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for i, (name, (cls, kw, _)) in enumerate(CASES.items()):
        cfg = cls(**SHAPE, **kw)
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        new, old = root / f"{name}-5x", root / f"{name}-4x"
        model.save_pretrained(new)
        old.mkdir()
        shutil.copy(new / "model.safetensors", old / "model.safetensors")
        raw = json.loads((new / "config.json").read_text())
        assert "rope_parameters" in raw and "rope_theta" not in raw  # transformers 5's style
        (old / "config.json").write_text(json.dumps(to_4x(raw, legacy_type=i % 2 == 0)))
        with torch.no_grad():
            out[name] = (new, old, model(ids).logits, ids)
    return out


def ours(path, ids, **override) -> torch.Tensor:
    cfg = LlamaConfig.from_hf(path)
    if override:
        from dataclasses import replace
        cfg = replace(cfg, **override)
    model = LlamaForCausalLM(cfg)
    load_weights(model, path)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("style", ["5x", "4x"])
def test_both_key_styles_give_transformers_logits(saved, name, style):
    new, old, ref, ids = saved[name]
    path = new if style == "5x" else old
    cfg = LlamaConfig.from_hf(path)
    for key, want in CASES[name][2].items():
        assert getattr(cfg, key) == want, (name, style, key, getattr(cfg, key), want)
    # transformers itself reads the 4.x file as the same model
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(path, ids), ref, atol=ATOL, rtol=0)
    plain = ours(path, ids, rope_theta=10000.0, rope_scaling=None)
    assert (plain - ref).abs().max() > 1e-2, "the rope settings do not change these logits"


@pytest.mark.parametrize("name", list(CASES))
def test_written_config_reads_back_in_transformers(saved, name, tmp_path):
    """to_hf() -> config.json: transformers builds the same model (same logits, same rope block),
    and our reader gives back the same LlamaConfig."""
    new, _, ref, ids = saved[name]
    cfg = LlamaConfig.from_hf(new)
    written = cfg.to_hf()
    assert LlamaConfig.from_hf(written) == cfg
    (tmp_path / "config.json").write_text(json.dumps(written))
    shutil.copy(new / "model.safetensors", tmp_path / "model.safetensors")
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.rope_parameters["rope_theta"] == cfg.rope_theta
    assert back.rope_parameters["rope_type"] == (cfg.rope_scaling or {"rope_type": "default"})[
        "rope_type"]
    assert back.tie_word_embeddings == cfg.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=ATOL, rtol=0)


BASE = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("extra,match", [
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                          "sliding_attention": {"rope_theta": 1e4}}}, "per layer type"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default",
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear"}}, "needs factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "gpt2"}, "not supported"),
    ({"hidden_size": None}, "lacks hidden_size"),
])
def test_unsupported_settings_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**BASE, **extra})


def test_family_defaults_for_missing_keys():
    """Keys a file omits take transformers' defaults for the family, not ours."""
    llama = LlamaConfig.from_hf(BASE)
    assert llama.tie_word_embeddings is False and llama.rope_theta == 10000.0
    assert llama.num_key_value_heads == 2 and llama.rms_norm_eps == 1e-6
    mistral = LlamaConfig.from_hf({**BASE, "model_type": "mistral", "num_key_value_heads": 2,
                                   "max_position_embeddings": 8192})
    assert mistral.sliding_window == 4096 and mistral.max_position_embeddings == 8192
    qwen = LlamaConfig.from_hf({**BASE, "model_type": "qwen2", "attention_bias": False, "num_key_value_heads": 2,
                                "use_sliding_window": True, "sliding_window": 64,
                                "max_window_layers": 1})  # every layer below 1 is full: none slides
    assert qwen.attention_bias is True and qwen.sliding_window is None
    l3 = LlamaConfig.from_hf({**BASE, "max_position_embeddings": 4096,
                              "rope_scaling": {k: v for k, v in LLAMA3.items()
                                               if k != "original_max_position_embeddings"}})
    assert l3.rope_scaling["original_max_position_embeddings"] == 4096
