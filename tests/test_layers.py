"""Every sharded layer against the unsharded computation in one process, at tp in {1, 2, 3, 4}.

Tolerance: absolute 1e-5 for single layers in fp32 (a sum of t partial products reassociates the
float additions; observed differences are ~1e-6), 1e-4 for a whole model.
"""
import pytest
import torch
import torch.nn.functional as F

from tp_checks import compare, reference, run_case

TPS = (1, 2, 3, 4)
LAYER_ATOL = 1e-5
MODEL_ATOL = 1e-4
SMALL = dict(vocab_size=61, hidden_size=36, intermediate_size=50, num_hidden_layers=2,
             num_attention_heads=9, num_key_value_heads=3)


def check(pool, case, atol=LAYER_ATOL, tps=TPS):
    ref = reference(case)
    for tp in tps:
        results = pool.run(run_case, case, tp)
        compare(case, results, ref, atol=atol)
    return ref


@pytest.mark.parametrize("gather", [False, True])
def test_column_parallel_linear(pool, gather):
    check(pool, {"kind": "column", "kw": {"in": 12, "out": 10, "bias": True, "gather": gather}})


@pytest.mark.parametrize("parallel", [True, False])
def test_row_parallel_linear(pool, parallel):
    check(pool, {"kind": "row", "kw": {"in": 10, "out": 12, "bias": True, "parallel": parallel}})


@pytest.mark.parametrize("vocab", [49152, 50257])
def test_vocab_parallel_embedding_padded(pool, vocab):
    check(pool, {"kind": "embedding", "kw": {"vocab": vocab, "dim": 4}, "seq": 64}, tps=(3, 4))


def test_vocab_parallel_embedding_small(pool):
    check(pool, {"kind": "embedding", "kw": {"vocab": 7, "dim": 5}})


def test_mlp_block(pool):
    check(pool, {"kind": "mlp", "kw": SMALL})


@pytest.mark.parametrize("kv", [1, 3, 9])
def test_attention_mlp_block_uneven_heads(pool, kv):
    """9 query heads: 5+4 on 2 ranks, 3+2+2+2 on 4; KV heads sharded or replicated."""
    check(pool, {"kind": "layer", "kw": dict(SMALL, num_key_value_heads=kv)})


def test_attention_mlp_block_with_qkv_bias(pool):
    check(pool, {"kind": "layer", "kw": dict(SMALL, attention_bias=True, model_type="qwen2")})


def test_sequence_parallel_block(pool):
    check(pool, {"kind": "layer", "kw": SMALL, "sp": True, "seq": 12})


def test_whole_model_loss_and_grads(pool):
    check(pool, {"kind": "model", "kw": SMALL, "loss": True}, atol=MODEL_ATOL)
    check(pool, {"kind": "model", "kw": dict(SMALL, tie_word_embeddings=False), "loss": True,
                 "sp": True, "seq": 12, "smoothing": 0.1}, atol=MODEL_ATOL)


def test_mlp_ledger_pins_communication(pool):
    """Column then row: one all-reduce forward, one backward; SP: one all-gather + one
    reduce-scatter each way. No other collective."""
    for tp in (2, 3):
        res = [r for r in pool.run(run_case, {"kind": "mlp", "kw": SMALL}, tp) if r]
        for r in res:
            assert r["fwd"] == {"all_reduce": 1}, r["fwd"]
            assert r["bwd"] == {"all_reduce": 1}, r["bwd"]
        res = [r for r in pool.run(run_case, {"kind": "mlp", "kw": SMALL, "sp": True, "seq": 12},
                                   tp) if r]
        for r in res:
            assert r["fwd"] == {"all_gather": 1, "reduce_scatter": 1}, r["fwd"]
            assert r["bwd"] == {"all_gather": 1, "reduce_scatter": 1}, r["bwd"]


def test_layer_ledger_two_all_reduces_each_way_plus_shared_kv(pool):
    """A decoder layer: 2 all-reduces forward, 2 backward; a layout with shared KV heads adds
    exactly one reduction (in finalize_grads); a sharded layout adds none."""
    sharded = {"kind": "layer", "kw": dict(SMALL, num_attention_heads=6, num_key_value_heads=3,
                                           hidden_size=36)}
    for r in [r for r in pool.run(run_case, sharded, 3) if r]:
        assert (r["fwd"], r["bwd"], r["fin"]) == ({"all_reduce": 2}, {"all_reduce": 2}, {})
    shared = {"kind": "layer", "kw": SMALL}  # 9 heads / 3 KV on 2 ranks: KV head 1 on both
    for r in [r for r in pool.run(run_case, shared, 2) if r]:
        assert (r["fwd"], r["bwd"], r["fin"]) == ({"all_reduce": 2}, {"all_reduce": 2},
                                                  {"all_reduce": 1})


def _ce_case(vocab, tp, smoothing, seed):
    return {"vocab": vocab, "tp": tp, "smoothing": smoothing, "seed": seed}


def ce_worker(vocab, tp, smoothing):
    """Vocab-parallel CE on this rank's slice of padded logits; returns loss and local grad."""
    from shardwise.layers import VocabParallelEmbedding
    from shardwise.loss import vocab_parallel_cross_entropy
    from shardwise.mesh import subgroup
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    logits, target = _ce_data(vocab)
    emb = VocabParallelEmbedding(vocab, 1, group=group)  # only for its partition
    padded = F.pad(logits, (0, emb.partition.padded - vocab))
    local = padded[..., emb.start:emb.stop].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group=group, vocab_start=emb.start,
                                        vocab_size=vocab, ignore_index=-100,
                                        label_smoothing=smoothing)
    loss.backward()
    return loss.detach(), local.grad, emb.start, emb.stop


def _ce_data(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 5, vocab, generator=g) * 4
    target = torch.randint(0, vocab, (3, 5), generator=g)
    target[1, 2:] = -100
    return logits, target


@pytest.mark.parametrize("vocab", [49152, 50257])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_vocab_parallel_cross_entropy(pool, vocab, smoothing):
    logits, target = _ce_data(vocab)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, vocab), target.view(-1), ignore_index=-100,
                          label_smoothing=smoothing)
    ref.backward()
    for tp in (1, 3, 4):
        for r in [r for r in pool.run(ce_worker, vocab, tp, smoothing) if r]:
            loss, grad, start, stop = r
            torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-6)
            expect = F.pad(full.grad, (0, stop - vocab))[..., start:stop] if stop > vocab \
                else full.grad[..., start:stop]
            torch.testing.assert_close(grad, expect, atol=1e-5, rtol=0)
