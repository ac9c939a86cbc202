"""Pipeline stages as slices: untied and tied models at pp 2 and 4, with tp and dp, equal one process.

Models: random 4-layer Llamas saved by transformers (one untied, one tied), 4 query heads / 2 KV
heads, hidden 32, vocabulary 256 (UTF-8 bytes), loaded from those directories at every layout, so
the last stage reads ``lm_head.weight`` (untied) or holds the tied copy of the embedding. fp32,
global batch 4 x 16 tokens, 3 steps, max_grad_norm 0.05 so that every step clips (asserted).

Tolerance 1e-4 per step (whole model, fp32; layouts differ only in the order of float sums).
One reference run per model in this process, and one 4-rank spawn that runs every layout.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardwise.checkpoint.source import ModelSource
from shardwise.launch import spawn
from shardwise.models.config import LlamaConfig
from shardwise.train.config import TrainConfig
from shardwise.train.run import prepare, train

TOL = 1e-4
# (name, tied, tp, pp, dp, extra): every layout uses the 4 ranks of one spawn
LAYOUTS = [
    ("untied-pp4", False, 1, 4, 1, {}),
    ("untied-tp2-pp2", False, 2, 2, 1, {"schedule": "gpipe"}),
    ("untied-pp2-dp2", False, 1, 2, 2, {}),
    ("untied-tp2-pp2-sp", False, 2, 2, 1, {"sequence_parallel": True}),
    ("tied-pp4", True, 1, 4, 1, {"schedule": "gpipe"}),
    ("tied-tp2-pp2", True, 2, 2, 1, {}),
    ("tied-pp2-dp2", True, 1, 2, 2, {"schedule": "gpipe"}),
]


def save_hf(path: Path, *, tied: bool) -> ModelSource:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tied,
                                   max_position_embeddings=64, eos_token_id=0)
    torch.manual_seed(1 + tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    source = ModelSource(path.name, LlamaConfig.from_hf(path), path, None)
    assert source.config.tie_word_embeddings is tied
    return source


def make_cfg(tmp: Path, name: str, source: ModelSource, tp=1, pp=1, dp=1, **kw) -> TrainConfig:
    return TrainConfig(model=source, data=[str(tmp / "data.txt")], tp=tp, pp=pp, dp=dp,
                       micro_batch=1, global_batch=4, seq_len=16, steps=3, lr=1e-2, warmup=1,
                       max_grad_norm=0.05, progress=False, save=False, out_dir=str(tmp / name),
                       **kw)


def run_layouts(cfgs: list[TrainConfig], rows: torch.Tensor) -> list[dict]:
    """Worker: the layouts one after another on one process group."""
    from shardwise.mesh import Mesh
    from shardwise.train.loop import train_on_mesh
    out = []
    for cfg in cfgs:
        res = train_on_mesh(cfg, cfg.model, rows, Mesh.init(cfg.tp, cfg.pp, cfg.dp))
        out.append({"losses": res["losses"], "clip": [r["clip_coef"] for r in res["records"]]})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    (tmp / "data.txt").write_text(Path(__file__).read_text())
    sources = {tied: save_hf(tmp / ("tied" if tied else "untied"), tied=tied)
               for tied in (False, True)}
    out = {}
    for tied, src in sources.items():
        res = train(make_cfg(tmp, f"ref-{tied}", src))
        out["ref", tied] = {"losses": res["losses"], "clip": [r["clip_coef"] for r in res["records"]]}
    _, data = prepare(make_cfg(tmp, "x", sources[False]))
    cfgs = [make_cfg(tmp, n, sources[tied], tp, pp, dp, **kw) for n, tied, tp, pp, dp, kw in LAYOUTS]
    for (name, *_), res in zip(LAYOUTS, spawn(run_layouts, 4, cfgs, data.rows)[0]):
        out[name] = res
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_reference_clips_every_step(runs, tied):
    assert all(c < 1 for c in runs["ref", tied]["clip"]), runs["ref", tied]


@pytest.mark.parametrize("name,tied", [(n, t) for n, t, *_ in LAYOUTS])
def test_layout_matches_one_process(runs, name, tied):
    ref, got = runs["ref", tied]["losses"], runs[name]["losses"]
    diff = max(abs(a - b) for a, b in zip(ref, got))
    assert len(got) == len(ref) == 3 and diff < TOL, f"{name}: {got} vs {ref} (max {diff:.2e})"
    assert all(c < 1 for c in runs[name]["clip"]), runs[name]["clip"]


def test_tied_and_untied_differ(runs):
    """The two models are different models: a layout that confused them would fail above."""
    assert abs(runs["ref", True]["losses"][0] - runs["ref", False]["losses"][0]) > 1e-3


def test_stage_slices():
    """Which stage holds the embedding, the final norm and the head, and the head's own rows."""
    from shardwise.mesh import LayoutOnly
    from shardwise.models.llama import LlamaForCausalLM
    for tied in (False, True):
        cfg = LlamaConfig(vocab_size=10, hidden_size=24, intermediate_size=24,
                          num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
                          tie_word_embeddings=tied)
        first, mid, last = (LlamaForCausalLM(cfg, group=LayoutOnly(3, 2), layers=range(i, i + 1),
                                             device="meta") for i in range(3))
        assert first.model.embed_tokens is not None and first.lm_head is None
        assert mid.model.embed_tokens is None and mid.model.norm is None and mid.lm_head is None
        assert last.model.norm is not None and last.lm_head is not None
        # vocabulary 10 on 3 ranks pads to 12: rank 2 owns rows [8, 12), 2 of them real
        assert (last.lm_head.start, last.lm_head.stop, last.lm_head.valid) == (8, 12, 2)
        names = {n for n, _ in last.named_parameters()}
        if tied:  # the last stage holds the embedding's rows for its head: one logical weight
            assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
            assert last.lm_head.local_weight() is last.model.embed_tokens.weight
        else:
            assert last.model.embed_tokens is None and "lm_head.weight" in names
            assert last.lm_head.weight.pieces[0].full == 10
        with pytest.raises(ValueError, match="middle pipeline stage"):
            mid.vocab_start
