"""Planner catalogs held to published numbers: parameter counts, the seed's sizes, HF configs."""
import json

import pytest

from shardwise.planner.gpus import GPUS, get_gpu, intra_link
from shardwise.planner.memory import GiB, matrix_bytes
from shardwise.planner.model_catalog import MODELS, get_model
from shardwise.partition import split_sizes
from shardwise.planner.models import kv_heads_per_rank, layer_params_per_rank

# Exact counts: each checkpoint's model.safetensors.index.json total_size / 2 (bf16) on the Hub.
EXACT = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,  # "68.98B": the name rounds
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
}
# Printed by the Qwen2.5 model cards: (total, non-embedding), billions.
QWEN_CARDS = {"qwen2.5-0.5b": (0.49, 0.36), "qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-3b": (3.09, 2.77),
              "qwen2.5-7b": (7.61, 6.53), "qwen2.5-14b": (14.7, 13.1), "qwen2.5-72b": (72.7, 70.0)}
# Narayanan et al. 2021, Table 1, "Number of parameters (billion)", printed to one decimal.
NARAYANAN = {"megatron-gpt-1.7b": 1.7, "megatron-gpt-3.6b": 3.6, "megatron-gpt-7.5b": 7.5,
             "megatron-gpt-18.4b": 18.4, "megatron-gpt-39.1b": 39.1, "megatron-gpt-76.1b": 76.1,
             "megatron-gpt-145.6b": 145.6, "megatron-gpt-310.1b": 310.1,
             "megatron-gpt-529.6b": 529.6, "megatron-gpt-1t": 1008.0}


@pytest.mark.parametrize("name,count", EXACT.items())
def test_llama_family_counts_within_1_percent(name, count):
    got = MODELS[name].total_params()
    assert abs(got / count - 1) < 0.01, (name, got, count)


def test_llama_2_70b_is_68_98b_not_70b():
    assert round(get_model("llama-2-70b").total_params() / 1e9, 2) == 68.98


@pytest.mark.parametrize("name,card", QWEN_CARDS.items())
def test_qwen_cards(name, card):
    m = MODELS[name]
    assert abs(m.total_params() / 1e9 / card[0] - 1) < 0.01
    assert abs(m.non_embedding_params() / 1e9 / card[1] - 1) < 0.01


@pytest.mark.parametrize("name,printed", NARAYANAN.items())
def test_narayanan_table1_counts(name, printed):
    m = MODELS[name]
    assert round(m.total_params() / 1e9, 1) == printed
    # and the paper's closed form P = 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)), + final LayerNorm 2h
    l, h, V, s = m.layers, m.hidden, m.vocab, m.positions
    closed = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert m.total_params() == pytest.approx(closed + 2 * h, rel=1e-12)


def test_gpt3_and_korthikanti_sizes():
    assert abs(get_model("gpt3-175b").total_params() / 175.0e9 - 1) < 0.01  # Brown et al. Table 2.1
    for name, size in (("megatron-gpt-22b", 22e9), ("megatron-gpt-175b", 175e9),
                       ("megatron-gpt-530b", 530e9), ("megatron-gpt-1t", 1e12)):
        assert abs(get_model(name).total_params() / size - 1) < 0.01, name


def test_every_entry_cites_a_source():
    assert all(len(m.source) > 20 for m in MODELS.values())
    assert all(len(g.source) > 20 for g in GPUS.values())


def test_seed_numbers():
    assert matrix_bytes(8192, 8192, 2) == 128 * 2**20  # 128 MiB
    w = get_model("llama-2-70b").total_params() * 2  # 16-bit
    assert 135e9 < w < 142e9  # "about 140 GB"
    assert w > get_gpu("a100").memory_bytes > 80e9  # more than one 80 GB A100


def test_gpu_short_forms_and_link_rates():
    assert get_gpu("a100").name == "a100-80gb-sxm" and get_gpu("H100").name == "h100-sxm"
    # bidirectional totals 600 / 900 GB/s -> 300 / 450 per direction; ring bound below that
    a, h = intra_link(get_gpu("a100"), "nvlink", 8), intra_link(get_gpu("h100"), "nvlink", 8)
    assert (a.peak_GBps, h.peak_GBps) == (300, 450)
    assert 0.6 * 300 < a.busbw_GBps < 0.85 * 300
    p4, p5 = intra_link(get_gpu("a100-80gb-pcie"), "pcie", 8), intra_link(get_gpu("h100-pcie"), "pcie", 8)
    assert (p4.peak_GBps, p5.peak_GBps) == (32, 64) and p4.busbw_GBps / 32 < a.busbw_GBps / 300
    # a PCIe card's NVLink bridge joins pairs only
    assert intra_link(get_gpu("a100-80gb-pcie"), "nvlink", 2).kind == "nvlink"
    assert intra_link(get_gpu("a100-80gb-pcie"), "nvlink", 4).kind == "pcie"


def test_head_partitions():
    assert split_sizes(9, 2) == [5, 4]
    assert split_sizes(3, 4, empty_ok=True) == [1, 1, 1, 0]  # a layout the planner rules out
    smol = get_model("smollm2-135m")  # 9 query heads, 3 KV heads
    assert kv_heads_per_rank(smol, 3) == 1
    assert kv_heads_per_rank(smol, 2) == 2  # rank 0 has q heads 0-4 -> KV heads 0, 1
    llama = get_model("llama-2-70b")  # 8 KV heads
    assert kv_heads_per_rank(llama, 8) == 1 and kv_heads_per_rank(llama, 16) == 1
    per = [layer_params_per_rank(llama, t) for t in (1, 2, 4, 8)]
    assert per == sorted(per, reverse=True) and per[0] == llama.layer_params()


def _write(tmp_path, cfg, name="model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d / "config.json")


def test_hf_config_llama_2_70b(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
           "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096}
    m = get_model(_write(tmp_path, cfg, "Llama-2-70b-hf"))
    assert m.name == "Llama-2-70b-hf"
    assert abs(m.total_params() / 68.98e9 - 1) < 0.01
    assert m.total_params() == MODELS["llama-2-70b"].total_params()


def test_hf_config_variants(tmp_path):
    qwen = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
            "tie_word_embeddings": True}
    assert get_model(_write(tmp_path, qwen, "q")).total_params() == MODELS["qwen2.5-0.5b"].total_params()
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
            "n_positions": 1024}
    assert round(get_model(_write(tmp_path, gpt2, "g")).total_params() / 1e6) == 124  # GPT-2 small: 124M
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
               "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2}
    m = get_model(_write(tmp_path, mixtral, "m"))
    assert (m.experts, m.top_k, m.total_params()) == (8, 2, MODELS["mixtral-8x7b"].total_params())
    qwen3 = dict(qwen, model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8,
                 moe_intermediate_size=768, intermediate_size=6144, mlp_only_layers=[0])
    with pytest.raises(ValueError, match="dense layers between MoE layers"):
        get_model(_write(tmp_path, qwen3, "d"))
    with pytest.raises(ValueError, match="missing num_hidden_layers"):
        get_model(_write(tmp_path, {"hidden_size": 8}, "bad"))
    with pytest.raises(ValueError, match="does not exist"):
        get_model(str(tmp_path / "nope" / "config.json"))


def test_unknown_names_suggest_closest():
    with pytest.raises(ValueError, match="closest: llama-2-7b"):
        get_model("llama-2-7")
    with pytest.raises(ValueError, match="unknown GPU 'h1000'.*h100"):
        get_gpu("h1000")
