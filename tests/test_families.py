"""Every family of ``shardwise.models.families`` against transformers, at tp 1-4.

Each family is a small random model built once per module with transformers and saved as a Hugging
Face directory: 4 layers, 6 query heads and 2 KV heads of 16 dimensions, so that at tp=4 the heads
split 2 + 2 + 1 + 1 (not divisible) and each KV head is held by two ranks (KV heads fewer than tp).
Every family feature is switched on with non-default values that bite on 12-token inputs: windows
of 5-7 tokens (Qwen2/3 only from ``max_window_layers`` on), soft-caps of 2-3 on scores of that size,
a query scale from ``query_pre_attn_scalar``, Gemma 3's own rope bases (linear scaling on its global
layers), Phi-3's partial rotary (0.5) and longrope whose original context (8) the inputs exceed.

Tolerance: fp32, absolute 1e-4 on logits, loss and each rank's gradient slice of a whole model.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from tp_checks import compare_with_hf, hf_model_worker, hf_reference

ATOL = 1e-4
VOCAB, SEQ, NEW = 131, 12, 32
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=70, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {  # name: (transformers config class, its settings)
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "gemma2": ("Gemma2Config", dict(query_pre_attn_scalar=24, sliding_window=5,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(
        query_pre_attn_scalar=20, sliding_window=6, final_logit_softcapping=3.0,
        tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})),
    "phi3": ("Phi3Config", dict(  # Phi-3 derives head_dim from hidden / heads
        hidden_size=96, sliding_window=7, original_max_position_embeddings=8,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "factor": 8.0, "original_max_position_embeddings": 8,
                         "short_factor": [1.0, 1.1, 1.3, 1.6],
                         "long_factor": [2.0, 2.5, 3.0, 4.0]})),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)),
}
ALL_SLIDING = {"phi3": 7, "mistral": 5}  # every layer slides: the paged cache frees blocks


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (HF directory, transformers model)}, built once."""
    out = {}
    for i, (name, (cls, kw)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        cfg = getattr(transformers, cls)(**{**BASE, **kw})
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # norms away from their init so that a misplaced norm shows
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def _build(path, group, *, sequence_parallel=False):
    from shardwise.checkpoint.hf import load_weights
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig.from_hf(path), group=group,
                             sequence_parallel=sequence_parallel)
    load_weights(model, path)
    return model


def _group(tp):
    from shardwise.mesh import subgroup
    group = subgroup(list(range(tp)))
    return group if torch.distributed.get_rank() < tp else False


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_gradient_slices_match_transformers(pool, saved, name):
    path, hf = saved[name]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    tgt = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    ref = hf_reference(hf, ids, tgt)
    for tp, sp in [(1, False), (2, False), (3, False), (4, False), (2, True), (4, True)]:
        for res in [r for r in pool.run(hf_model_worker, str(path), tp, ids, tgt, sp) if r]:
            compare_with_hf(res, ref, atol=ATOL, where=f"{name} tp={tp} sp={sp}")


def generate_worker(path, tp, prompts, n, block, chunk):
    """Greedy tokens through the contiguous cache (all prompts as one batch) and through the
    serving engine's paged cache and scheduler (every rank schedules alike): each prompt, a second
    sample of the first (forked from its prefill), then the first again for ``n // 4`` tokens
    (its first block from the prefix cache). Also the most blocks a sequence held, the prompt
    tokens the prefix cache gave the last run, and the free blocks at the end."""
    from shardwise.layers import gather_logits
    from shardwise.models.cache import KVCache
    from shardwise.serve.engine import Runner
    from shardwise.serve.kv import FREED, PagedKVCache
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
    from shardwise.serve.step import StepOptions
    if (group := _group(tp)) is False:
        return None
    model = _build(path, group).eval()
    with torch.inference_mode():
        cache, seq = KVCache(model, len(prompts), len(prompts[0]) + n), torch.tensor(prompts)
        ids = seq
        for _ in range(n):
            if cache.restart_for_long_rope(cache.length + ids.shape[1]):  # as generate does
                ids = seq
            logits = model(ids, cache.positions(len(prompts), ids.shape[1]), attend=cache.attend,
                           rows=[-1])
            cache.advance(ids.shape[1])
            ids = gather_logits(logits[:, -1], model.lm_head).argmax(-1, keepdim=True)  # (b, 1)
            seq = torch.cat([seq, ids], 1)
        contiguous = seq[:, len(prompts[0]):].tolist()
        blocks = 24
        paged = PagedKVCache(model, blocks, block)
        # eager steps: the families' semantics, not compilation (tests/test_compiled_step.py)
        runner = Runner(model, group, paged, options=StepOptions(compile=False, max_seqs=8))
        sched = Scheduler(blocks, block, max_batched_tokens=chunk, window=paged.window,
                          long_after=paged.long_after)
        seqs = [Sequence(i, list(p), SamplerSpec(), n) for i, p in enumerate(prompts)]
        seqs[0].followers = [Sequence(len(seqs), list(prompts[0]), SamplerSpec(), n)]
        seqs += seqs[0].followers
        held = 0
        for batch in (seqs[:len(prompts)], [Sequence(len(seqs), list(prompts[0]), SamplerSpec(),
                                                     n // 4)]):
            hit = sched.hit_tokens  # the prefix cache's tokens for the last batch
            for s in batch:
                sched.add(s)
            while sched.has_work():
                plan = sched.schedule()
                held = max([held] + [sum(b != FREED for b in s.blocks) for s in sched.running])
                sched.update(plan, runner.execute(plan).sampled)
        seqs += batch
    return (contiguous, [s.output for s in seqs], held, sched.hit_tokens - hit,
            sched.alloc.num_free)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_transformers(pool, saved, name):
    """32 greedy tokens, contiguous and paged cache (with a forked second sample and a prefix
    cache hit), at tp 1, 3 and 4 (heads split 2+2+2 and 2+2+1+1, KV heads shared by ranks; tp=2,
    the even split, is left to the logits test for the suite's budget); the paged cache of a
    model whose every layer slides holds a window's worth of blocks, not the whole sequence."""
    from shardwise.serve.kv import blocks_for
    path, hf = saved[name]
    prompts = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=NEW, min_new_tokens=NEW)[:, 6:].tolist()
    block, chunk = 4, 4  # the 6-token prompts prefill in two chunks
    for tp in (1, 3, 4):
        for res in [r for r in pool.run(generate_worker, str(path), tp, prompts.tolist(), NEW,
                                        block, chunk) if r]:
            contiguous, paged, held, hit, free = res
            assert contiguous == ref, f"{name} tp={tp} contiguous cache"
            assert paged == ref + [ref[0], ref[0][:NEW // 4]], f"{name} tp={tp} paged cache"
            assert hit == block, f"{name} tp={tp}: the prefix cache gave {hit} tokens"
            assert free == 24, f"{name} tp={tp}: blocks leaked"
            whole = blocks_for(6 + NEW, block)
            if name in ALL_SLIDING:
                assert held <= blocks_for(ALL_SLIDING[name] + chunk, block) + 1 < whole, held
            else:
                assert held == whole, held


def save_worker(path, out, tp):
    from shardwise.checkpoint.convert import save_model
    if (group := _group(tp)) is False:
        return None
    save_model(_build(path, group), out, group=group)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_loads_in_transformers_with_the_same_logits(pool, saved, tmp_path, name):
    """Saved sharded at tp=3 (Phi-3's fused tensors as several pieces per rank), exported to an
    HF directory: transformers loads it and gives the original logits, its config reads back as
    the same model; the shards also load into one process."""
    from shardwise.checkpoint.convert import export_hf
    from shardwise.checkpoint.sharded import load_model
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    path, hf = saved[name]
    pool.run(save_worker, str(path), str(tmp_path / "tp3"), 3)
    export_hf(tmp_path / "tp3", tmp_path / "hf")
    assert LlamaConfig.from_hf(tmp_path / "hf") == LlamaConfig.from_hf(path)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(merged) is type(hf)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-5, rtol=0)
        one = LlamaForCausalLM(LlamaConfig.from_hf(tmp_path / "tp3"))  # the tp=3 shards in one
        load_model(one, tmp_path / "tp3")                                # process
        torch.testing.assert_close(one(ids), ref, atol=ATOL, rtol=0)


def _v4_style(cfg: dict) -> dict:
    """The same model in transformers 4.x's keys: ``rope_theta`` + ``rope_scaling``, Phi-3's
    top-level ``partial_rotary_factor``, Gemma 3's ``rope_local_base_freq`` and
    ``sliding_window_pattern``, Qwen's ``max_window_layers`` instead of ``layer_types``."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    types = cfg.pop("layer_types", None)
    if "full_attention" in rope:  # Gemma 3
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        cfg["sliding_window_pattern"] = types.index("full_attention") + 1
        rope = rope["full_attention"]
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    key = "type" if cfg["model_type"] == "phi3" else "rope_type"  # as the Hub's files spell it
    cfg["rope_scaling"] = None if kind == "default" else {key: kind, **rope}
    return cfg


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_config_in_transformers_4_keys_reads_as_the_same_model(saved, tmp_path, name):
    from shardwise.models.config import LlamaConfig
    path, hf = saved[name]
    v5 = json.loads((path / "config.json").read_text())
    v4 = _v4_style(v5)
    assert "rope_parameters" not in v4 and "layer_types" not in v4
    assert LlamaConfig.from_hf(v4) == LlamaConfig.from_hf(v5)
    (tmp_path / "config.json").write_text(json.dumps(v4))  # transformers agrees on the meaning
    for f in path.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_config_errors_name_the_numbers():
    from shardwise.models.config import LlamaConfig
    ok = dict(vocab_size=16, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
    cases = [
        (dict(model_type="phi3", partial_rotary_factor=0.5,
              rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                            "long_factor": [1.0] * 2, "original_max_position_embeddings": 8}),
         "longrope short_factor has 4 values; the rotary dimension 4 needs 2"),
        (dict(model_type="gemma2", hidden_act="gelu_pytorch_tanh", sliding_window=4,
              layer_types=("sliding_attention",)), "layer_types must name 2 layers"),
        (dict(model_type="gemma2", hidden_act="silu"), "hidden_act 'silu' is not supported for "
                                                      "gemma2"),
        (dict(partial_rotary_factor=0.1), "rotary dimension of 0 of head_dim 8"),
        (dict(model_type="gpt2"), "architecture 'gpt2' is not supported"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            LlamaConfig(**{**ok, **kw})
    raw = {**ok, "model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="rope type 'linear' on sliding-window layers"):
        LlamaConfig.from_hf(raw)


def train_worker(cfgs, rows):
    from shardwise.mesh import Mesh
    from shardwise.train.loop import train_on_mesh
    return [train_on_mesh(c, c.model, rows, Mesh.init(c.tp, c.pp, c.dp))["losses"] for c in cfgs]


def test_training_layouts_match_one_process(pool, saved, tmp_path):
    """Gemma 3 (embeddings tied across the pipeline, q/k norms, windows, two rope bases) trains
    at tp=2 x pp=2 with sequence parallelism, and at tp=2 x dp=2 with selective recomputation
    (its q/k norms and GeGLU rebuilt in backward), to the one-process losses (1e-4 per step,
    every step clipped)."""
    from shardwise.checkpoint.source import ModelSource
    from shardwise.mesh import Mesh
    from shardwise.models.config import LlamaConfig
    from shardwise.train.config import TrainConfig
    from shardwise.train.loop import train_on_mesh
    path, _ = saved["gemma3"]
    src = ModelSource("gemma3", LlamaConfig.from_hf(path), path, None)
    rows = torch.randint(0, VOCAB, (8, SEQ + 1), generator=torch.Generator().manual_seed(4))

    def cfg(name, tp=1, pp=1, dp=1, **kw):
        return TrainConfig(model=src, tp=tp, pp=pp, dp=dp, global_batch=2, seq_len=SEQ, steps=3,
                           lr=1e-2, warmup=1, max_grad_norm=0.05, save=False, progress=False,
                           out_dir=str(tmp_path / name), **kw)
    ref = train_on_mesh(cfg("ref"), src, rows, Mesh.init(1))
    assert all(r["clip_coef"] < 1 for r in ref["records"])
    layouts = {"tp2-pp2-sp": cfg("tp2-pp2-sp", 2, 2, sequence_parallel=True, schedule="gpipe"),
               "tp2-dp2-selective": cfg("tp2-dp2-selective", 2, dp=2, recompute="selective")}
    got = pool.run(train_worker, list(layouts.values()), rows)[0]
    for name, losses in zip(layouts, got):
        assert max(abs(a - b) for a, b in zip(ref["losses"], losses)) < ATOL, (name, losses)


def test_verify_names_no_stage(pool, saved):
    """``shardwise verify`` on every family at tp=3: each stage within tolerance, collectives
    as in theory (the family features add none)."""
    from shardwise.verify import verify
    for name, (path, _) in saved.items():
        rep = verify(str(path), 3, seq=SEQ, pool=pool)
        assert rep.ok, (name, [(s.name, s.max_abs_diff, s.collectives) for s in rep.stages])


def test_attention_paths_agree_with_the_definition():
    """The soft-capped path (query blocks past 512, causal blocks reading only their keys) and
    the SDPA path against the formula written out, with windows, GQA and gradients."""
    from shardwise.models.attention import AttnParams, attention, self_attention, visible
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 600, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 600, 8, generator=g, requires_grad=True) for _ in range(2))
    pos = torch.arange(600)
    for params in (AttnParams(0.3), AttnParams(0.3, softcap=2.0), AttnParams(0.3, window=37),
                   AttnParams(0.3, softcap=2.0, window=37)):
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * params.scale
        if params.softcap:
            scores = params.softcap * torch.tanh(scores / params.softcap)
        scores = scores.masked_fill(~visible(pos, pos, params.window), float("-inf"))
        want = scores.softmax(-1) @ v.repeat_interleave(2, 1)
        got = self_attention(q, k, v, params)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=str(params))
        dq, dk = torch.autograd.grad((got * want.detach()).sum(), (q, k))
        eq, ek = torch.autograd.grad((want * want.detach()).sum(), (q, k))
        torch.testing.assert_close((dq, dk), (eq, ek), atol=1e-4, rtol=0, msg=str(params))
    with torch.no_grad():  # a cache's queries: the last 50 positions against all keys
        p = AttnParams(0.3, softcap=2.0, window=37)
        got = attention(q[:, :, 550:], k, v, p, mask=visible(pos[550:], pos, 37))
        torch.testing.assert_close(got, self_attention(q, k, v, p)[:, :, 550:], atol=1e-5,
                                   rtol=0)


def test_a_window_bounds_the_blocks_a_request_needs():
    """Admission and the server's capacity count what a sequence holds at its longest: with a
    window on every layer, a window, a chunk and a block, not its whole length."""
    from shardwise.serve.admit import admission_error
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
    windowed, full = Scheduler(6, 4, max_batched_tokens=8, window=5), Scheduler(6, 4)
    assert (windowed.blocks_needed(1000), full.blocks_needed(1000)) == (5, 250)
    seq = Sequence(0, [1] * 100, SamplerSpec(), 900)
    kw = dict(vocab=8, context=4096, num_blocks=6, block_size=4)
    assert admission_error(seq, need=windowed.blocks_needed(1000), **kw) is None
    assert "need 250 KV blocks but the cache has 6" in admission_error(
        seq, need=full.blocks_needed(1000), **kw)


def test_a_windowed_prefix_hit_holds_only_the_window():
    """With a window on every layer, a prefix-cache hit keeps only the blocks its first query
    reads (the others go back to the cache, still findable), and n = 2 samples fork sharing the
    leader's live blocks; everything is released at the end."""
    from shardwise.serve.kv import FREED
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
    sched = Scheduler(12, 4, max_batched_tokens=8, window=5)
    prompt = list(range(3, 23))                                       # 20 tokens: 5 blocks

    def run(seq):
        sched.add(seq)
        while sched.has_work():
            plan = sched.schedule()
            for s in sched.running:  # never more than the window, a chunk and a block
                assert sum(b != FREED for b in s.blocks) <= 5, s.blocks
            sched.update(plan, {i: 7 for c in plan.chunks if c.sample for i in (c.seq_id,
                                                                                *c.forks)})
    run(Sequence(0, prompt, SamplerSpec(), 3))
    second = Sequence(1, prompt + [9], SamplerSpec(), 2)
    second.followers = [Sequence(2, prompt + [9], SamplerSpec(), 2)]
    sched.add(second)
    plan = sched.schedule()
    # blocks 0-4 (20 tokens) cached; the first query (position 20) reads 16..20: blocks 4, 5
    assert (second.reused, second.blocks[:4]) == (20, [FREED] * 4), second.blocks
    assert plan.chunks[0].start == 20 and plan.chunks[0].forks == [2]
    sched.update(plan, {1: 7, 2: 8})
    follower = second.followers[0] if second.followers else sched.running[-1]
    assert follower.id == 2 and follower.blocks[:4] == [FREED] * 4
    assert follower.blocks[4] == second.blocks[4] and follower.blocks[5] != second.blocks[5]
    while sched.has_work():
        plan = sched.schedule()
        sched.update(plan, {c.seq_id: 7 for c in plan.chunks if c.sample})
    assert sched.alloc.num_used == 0 and sched.alloc.num_cached > 0


def test_gemma3_multimodal_checkpoint_runs_its_language_model(pool, saved, tmp_path):
    """Gemma 3 4B and larger ship as ``Gemma3ForConditionalGeneration`` (``model_type`` gemma3,
    the text model's config in ``text_config``, its tensors under ``language_model.``, no
    final soft-cap): the language model loads from it, at tp=1 and tp=3, with transformers'
    text-only logits."""
    from dataclasses import replace
    from shardwise.checkpoint.hf import load_weights
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    path, text = saved["gemma3"]
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, image_size=16,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             patch_size=8)
    cfg = transformers.Gemma3Config(text_config={**text.config.to_dict(),
                                                 "final_logit_softcapping": None},
                                    vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                    eoi_token_index=VOCAB - 2)
    torch.manual_seed(6)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    assert LlamaConfig.from_hf(tmp_path) == replace(LlamaConfig.from_hf(path),
                                                    final_logit_softcapping=None)
    ids = torch.randint(0, VOCAB - 3, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        model = LlamaForCausalLM(LlamaConfig.from_hf(tmp_path))
        load_weights(model, tmp_path)
        torch.testing.assert_close(model(ids), ref, atol=ATOL, rtol=0)
    got = [r for r in pool.run(hf_model_worker, str(tmp_path), 3, ids, ids) if r]
    torch.testing.assert_close(got[0][0], ref, atol=ATOL, rtol=0)
