"""Model presets, each with its source. Shapes come from the publishers' configs, model cards or papers.

``published_params`` is the count printed by the source (exact where the source gives it, e.g. the
bf16 safetensors index ``total_size / 2``; otherwise the rounded figure the paper or card prints).
Tests compare the counts computed from the shapes (``ModelSpec.total_params``) against these.
"""
from __future__ import annotations

from ._names import lookup
from .models import ModelSpec, from_hf_config

_HF = "Hugging Face config.json of {} ; count: model.safetensors.index.json total_size / 2 (bf16)"
_QWEN = "Qwen2.5 model card and config.json (Qwen/{}); card prints {} parameters"
_NARAYANAN = ("Narayanan et al. 2021, 'Efficient Large-Scale Language Model Training on GPU Clusters "
              "Using Megatron-LM', Table 1 (V=51200, s=2048); printed size {}B")
_KORTHIKANTI = ("Korthikanti et al. 2022, 'Reducing Activation Recomputation in Large Transformer "
                "Models', Table 3 (V=51200, s=2048)")


def _llama(name, h, l, a, kv, f, v, *, tied=False, seq=4096, src="", n=None, hd=0, bias="none"):
    return ModelSpec(name=name, hidden=h, layers=l, heads=a, kv_heads=kv, ffn=f, vocab=v, head_dim=hd,
                     tied_embeddings=tied, seq_len=seq, source=src, published_params=n, bias=bias)


def _moe(name, h, l, a, kv, f, v, e, k, *, seq, src, n, active, hd=0, qk="none"):
    return ModelSpec(name=name, hidden=h, layers=l, heads=a, kv_heads=kv, ffn=f, vocab=v, head_dim=hd,
                     seq_len=seq, source=src, published_params=n, experts=e, top_k=k, qk_norm=qk,
                     published_active=active)


_MIXTRAL = ("Jiang et al. 2024, 'Mixtral of Experts', Table 1 (dim {}, {} layers, {} heads, {} KV heads, "
            "hidden_dim {}, vocab {}, 8 experts, top-2) and mistralai/{} config.json; Mistral AI prints "
            "{} total, {} active parameters per token")
_QWEN3 = ("Qwen/{} model card and config.json: {} parameters in total, {} activated ({} "
          "non-embedding); {} layers, {} Q / {} KV heads of 128, {} experts of width {}, {} activated")


def _gpt(name, h, l, a, *, v=51200, s=2048, src="", n=None):
    return ModelSpec(name=name, hidden=h, layers=l, heads=a, kv_heads=a, ffn=4 * h, vocab=v,
                     gated_mlp=False, tied_embeddings=True, bias="all", norm="layer", positions=s,
                     seq_len=s, dropout=True, source=src, published_params=n)


_ENTRIES: list[ModelSpec] = [
    # Llama 2 (Touvron et al. 2023; meta-llama/Llama-2-*-hf)
    _llama("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, src=_HF.format("meta-llama/Llama-2-7b-hf"),
           n=6_738_415_616),
    _llama("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, src=_HF.format("meta-llama/Llama-2-13b-hf"),
           n=13_015_864_320),
    _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, src=_HF.format("meta-llama/Llama-2-70b-hf"),
           n=68_976_648_192),
    # Llama 3 / 3.1 / 3.2 (Llama Team 2024, 'The Llama 3 Herd of Models', Table 3; HF configs)
    _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, seq=8192,
           src=_HF.format("meta-llama/Meta-Llama-3-8B"), n=8_030_261_248),
    _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, seq=8192,
           src=_HF.format("meta-llama/Meta-Llama-3-70B"), n=70_553_706_496),
    _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, seq=8192,
           src=_HF.format("meta-llama/Llama-3.1-8B"), n=8_030_261_248),
    _llama("llama-3.1-70b", 8192, 80, 64, 8, 28672, 128256, seq=8192,
           src=_HF.format("meta-llama/Llama-3.1-70B"), n=70_553_706_496),
    _llama("llama-3.1-405b", 16384, 126, 128, 8, 53248, 128256, seq=8192,
           src=_HF.format("meta-llama/Llama-3.1-405B") + "; Llama 3 paper Table 3: 126 layers, "
           "16384 model dim, 53248 FFN, 128 heads, 8 KV heads", n=405_853_388_800),
    _llama("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, tied=True, seq=8192, hd=64,
           src=_HF.format("meta-llama/Llama-3.2-1B") + "; model card: 1.23B", n=1_235_814_400),
    _llama("llama-3.2-3b", 3072, 28, 24, 8, 8192, 128256, tied=True, seq=8192, hd=128,
           src=_HF.format("meta-llama/Llama-3.2-3B") + "; model card: 3.21B", n=3_212_749_824),
    # Mistral 7B (Jiang et al. 2023, Table 1; mistralai/Mistral-7B-v0.1)
    _llama("mistral-7b", 4096, 32, 32, 8, 14336, 32000, seq=8192,
           src=_HF.format("mistralai/Mistral-7B-v0.1") + "; paper Table 1", n=7_241_732_096),
    # Qwen2.5 (Qwen Team 2024): cards print total and non-embedding counts
    _llama("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, tied=True, bias="qkv",
           src=_QWEN.format("Qwen2.5-0.5B", "0.49B (0.36B non-embedding)"), n=0.49e9),
    _llama("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, tied=True, bias="qkv",
           src=_QWEN.format("Qwen2.5-1.5B", "1.54B (1.31B non-embedding)"), n=1.54e9),
    _llama("qwen2.5-3b", 2048, 36, 16, 2, 11008, 151936, tied=True, bias="qkv",
           src=_QWEN.format("Qwen2.5-3B", "3.09B (2.77B non-embedding)"), n=3.09e9),
    _llama("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, bias="qkv",
           src=_QWEN.format("Qwen2.5-7B", "7.61B (6.53B non-embedding)"), n=7.61e9),
    _llama("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, bias="qkv",
           src=_QWEN.format("Qwen2.5-14B", "14.7B (13.1B non-embedding)"), n=14.7e9),
    _llama("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, bias="qkv",
           src=_QWEN.format("Qwen2.5-72B", "72.7B (70.0B non-embedding)"), n=72.7e9),
    # SmolLM2 (Allal et al. 2025; HuggingFaceTB/SmolLM2-135M)
    _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied=True, seq=2048,
           src=_HF.format("HuggingFaceTB/SmolLM2-135M") + " (F32 weights: total_size / 4)",
           n=134_515_008),
    # Mixtures of experts: total and active (per token) counts as their publishers print them
    _moe("mixtral-8x7b", 4096, 32, 32, 8, 14336, 32000, 8, 2, seq=32768, n=46.7e9, active=12.9e9,
         src=_MIXTRAL.format(4096, 32, 32, 8, 14336, 32000, "Mixtral-8x7B-v0.1", "46.7B", "12.9B")),
    _moe("mixtral-8x22b", 6144, 56, 48, 8, 16384, 32768, 8, 2, seq=65536, n=141e9, active=39e9,
         src=_MIXTRAL.format(6144, 56, 48, 8, 16384, 32768, "Mixtral-8x22B-v0.1", "141B", "39B")),
    _moe("qwen3-30b-a3b", 2048, 48, 32, 4, 768, 151936, 128, 8, hd=128, qk="head", seq=32768,
         n=30.5e9, active=3.3e9,
         src=_QWEN3.format("Qwen3-30B-A3B", "30.5B", "3.3B", "29.9B", 48, 32, 4, 128, 768, 8)),
    _moe("qwen3-235b-a22b", 4096, 94, 64, 4, 1536, 151936, 128, 8, hd=128, qk="head", seq=32768,
         n=235e9, active=22e9,
         src=_QWEN3.format("Qwen3-235B-A22B", "235B", "22B", "234B", 94, 64, 4, 128, 1536, 8)),
    _moe("olmoe-1b-7b", 2048, 16, 16, 16, 1024, 50304, 64, 8, qk="full", seq=4096, n=6.9e9,
         active=1.3e9, src="Muennighoff et al. 2024, 'OLMoE: Open Mixture-of-Experts Language Models', "
         "Table 1 (6.9B total, 1.3B active; 16 layers, hidden 2048, 64 experts of width 1024, top-8) and "
         "allenai/OLMoE-1B-7B-0924 config.json (q/k RMSNorm over all heads, vocab 50304)"),
    # GPT-3 (Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, 96 heads, context 2048;
    # GPT-2 BPE vocabulary of 50257)
    _gpt("gpt3-175b", 12288, 96, 96, v=50257, src="Brown et al. 2020, 'Language Models are Few-Shot "
         "Learners', Table 2.1 (n_params 175.0B)", n=175.0e9),
    # Megatron-LM weak-scaling study (Narayanan et al. 2021, Table 1)
    _gpt("megatron-gpt-1.7b", 2304, 24, 24, src=_NARAYANAN.format(1.7), n=1.7e9),
    _gpt("megatron-gpt-3.6b", 3072, 30, 32, src=_NARAYANAN.format(3.6), n=3.6e9),
    _gpt("megatron-gpt-7.5b", 4096, 36, 32, src=_NARAYANAN.format(7.5), n=7.5e9),
    _gpt("megatron-gpt-18.4b", 6144, 40, 48, src=_NARAYANAN.format(18.4), n=18.4e9),
    _gpt("megatron-gpt-39.1b", 8192, 48, 64, src=_NARAYANAN.format(39.1), n=39.1e9),
    _gpt("megatron-gpt-76.1b", 10240, 60, 80, src=_NARAYANAN.format(76.1), n=76.1e9),
    _gpt("megatron-gpt-145.6b", 12288, 80, 96, src=_NARAYANAN.format(145.6), n=145.6e9),
    _gpt("megatron-gpt-310.1b", 16384, 96, 128, src=_NARAYANAN.format(310.1), n=310.1e9),
    _gpt("megatron-gpt-529.6b", 20480, 105, 128,
         src=_NARAYANAN.format(529.6) + "; = the 530B row of " + _KORTHIKANTI, n=529.6e9),
    _gpt("megatron-gpt-1t", 25600, 128, 160,
         src=_NARAYANAN.format(1008.0) + "; = the 1T row of " + _KORTHIKANTI, n=1008.0e9),
    # Korthikanti et al. 2022, Table 3 (the 530B and 1T rows are the entries above)
    _gpt("megatron-gpt-22b", 6144, 48, 64, src=_KORTHIKANTI + " (22B)", n=22e9),
    _gpt("megatron-gpt-175b", 12288, 96, 96, src=_KORTHIKANTI + " (175B, GPT-3 shape)", n=175e9),
]

MODELS: dict[str, ModelSpec] = {m.name: m for m in _ENTRIES}
MODEL_ALIASES: dict[str, str] = {
    "megatron-gpt-530b": "megatron-gpt-529.6b",
    "megatron-gpt-1008b": "megatron-gpt-1t",
    "gpt-3-175b": "gpt3-175b",
    "gpt3": "gpt3-175b",
    "llama-2-70b-hf": "llama-2-70b",
    "mistral-7b-v0.1": "mistral-7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mixtral-8x22b-v0.1": "mixtral-8x22b",
    "olmoe-1b-7b-0924": "olmoe-1b-7b",
}


def get_model(name_or_path: str) -> ModelSpec:
    """A catalog id (``llama-2-70b``) or a path to an HF ``config.json`` (or its directory)."""
    path = name_or_path
    if path.endswith(".json") or "/" in path or path.startswith("."):
        import os

        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.exists(path):
            return from_hf_config(path)
        if path.endswith(".json"):
            raise ValueError(f"model config {path!r} does not exist")
    return lookup("model", name_or_path, MODELS, MODEL_ALIASES)
