"""Mixture-of-experts layers against transformers' own, and sharded against one process.

Block level: ``MoEBlock`` equals transformers' Mixtral, Qwen3-MoE and OLMoE sparse-MoE blocks
(output, input gradient, every weight gradient, the load-balancing loss and its gradient) in one
process. Then over tp x ep ranks (``moe_checks``): tensor-parallel experts at tp 2-4, whole experts
within the TP group, expert parallelism beside TP at ep 2 and 4 (uneven expert counts), tp x ep,
sequence parallelism; the collectives per MoE layer pinned by the ledger for each mode.

Tolerances: 1e-5 for one block in fp32 (partial sums reassociate, ~1e-6 observed).
"""
import pytest
import torch

from moe_checks import compare, reference, run_case
from shardwise.models.moe import MIXTRAL_NAMES, MoEBlock, MoEConfig, load_balancing_loss

BLOCK_ATOL = 1e-5


def _hf_block(kind: str, **kw):
    """A transformers MoE block with random weights (std 0.3: routing far from ties)."""
    if kind == "mixtral":
        from transformers import MixtralConfig as C
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
    elif kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
    else:
        from transformers import OlmoeConfig as C
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B
    cfg = C(**kw)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = B(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def _ours_from(ref, cfg: MoEConfig) -> MoEBlock:
    ours = MoEBlock(cfg, None)
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        for e, ex in ours.experts.items():
            ex.gate_up_proj.weight.copy_(ref.experts.gate_up_proj[int(e)])
            ex.down_proj.weight.copy_(ref.experts.down_proj[int(e)])
    return ours


BLOCKS = {
    "mixtral": (dict(hidden_size=16, intermediate_size=24, num_local_experts=5,
                     num_experts_per_tok=2), dict(norm_topk_prob=True, names=MIXTRAL_NAMES)),
    "qwen3_moe": (dict(hidden_size=16, moe_intermediate_size=12, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=True), dict(norm_topk_prob=True)),
    "qwen3_moe-raw": (dict(hidden_size=16, moe_intermediate_size=12, num_experts=8,
                           num_experts_per_tok=3, norm_topk_prob=False), dict(norm_topk_prob=False)),
    "olmoe": (dict(hidden_size=16, intermediate_size=8, num_experts=64, num_experts_per_tok=8),
              dict(norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_block_equals_transformers(name):
    """Output, dx, the router's and every expert's gradient, the aux loss and its gradient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    hf_kw, kw = BLOCKS[name]
    ref = _hf_block(name.split("-")[0], **hf_kw)
    E = ref.gate.weight.shape[0]
    width = ref.experts.down_proj.shape[-1]
    cfg = MoEConfig(16, width, E, ref.gate.top_k, **kw)
    ours = _ours_from(ref, cfg)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    r = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    aux_ref = load_balancing_loss_func((ref.gate(xr.view(-1, 16))[0],), E, cfg.top_k)
    ((ref(xr) * r).sum() + 0.5 * aux_ref).backward()
    y = ours(xo)
    share, value = load_balancing_loss(ours)
    ((y * r).sum() + 0.5 * share).backward()
    assert value == pytest.approx(aux_ref.item(), rel=1e-6)
    torch.testing.assert_close(y, ref(x), atol=BLOCK_ATOL, rtol=0)
    torch.testing.assert_close(xo.grad, xr.grad, atol=BLOCK_ATOL, rtol=0)
    torch.testing.assert_close(ours.gate.weight.grad, ref.gate.weight.grad, atol=BLOCK_ATOL, rtol=0)
    unused = 0
    for e, ex in ours.experts.items():
        for mine, theirs in ((ex.gate_up_proj.weight, ref.experts.gate_up_proj),
                             (ex.down_proj.weight, ref.experts.down_proj)):
            unused += mine.grad is None  # no token chose it: no gradient (theirs: zeros)
            got = torch.zeros_like(mine) if mine.grad is None else mine.grad
            torch.testing.assert_close(got, theirs.grad[int(e)], atol=BLOCK_ATOL, rtol=0)
    assert unused == 0 or name == "olmoe"  # 14 tokens x top-8 leave some of 64 experts idle


CFG = dict(hidden_size=16, intermediate_size=12, num_experts=6, top_k=2, norm_topk_prob=True)
TP_AR = {"all_reduce": 1}
A2A = {"all_to_all": 3}, {"all_to_all": 2}  # forward (counts, dispatch, combine), backward
# (case, tp, ep, forward collectives, backward collectives) per MoE layer
MODES = [
    ({"cfg": CFG}, 2, 1, TP_AR, TP_AR),                          # tensor-parallel experts
    ({"cfg": CFG}, 3, 1, TP_AR, TP_AR),                          # 12 columns over 3
    ({"cfg": CFG, "expert_tp": 1}, 4, 1, TP_AR, TP_AR),          # whole experts within TP: 2+2+1+1
    ({"cfg": CFG}, 1, 2, A2A[0], A2A[1]),                        # EP beside TP
    ({"cfg": dict(CFG, num_experts=5)}, 1, 4, A2A[0], A2A[1]),   # 5 experts on 4 ranks
    ({"cfg": CFG}, 2, 2, {**TP_AR, **A2A[0]}, {**TP_AR, **A2A[1]}),                    # tp x ep
    ({"cfg": CFG, "expert_tp": 1}, 2, 2, {**TP_AR, **A2A[0]}, {**TP_AR, **A2A[1]}),    # 4 slots
    ({"cfg": CFG, "sp": True}, 2, 2, {"all_gather": 1, "reduce_scatter": 1, **A2A[0]},
     {"all_gather": 1, "reduce_scatter": 1, **A2A[1]}),         # tp x ep, sequence parallel
]


@pytest.mark.parametrize("case,tp,ep,fwd,bwd", MODES,
                         ids=lambda v: None if isinstance(v, (dict, int)) else str(v))
def test_block_sharded_equals_one_process(pool, case, tp, ep, fwd, bwd):
    """Outputs, input gradients, each rank's expert-gradient slices, the router's gradient
    summed over the ranks and the load-balancing loss, at 1e-5; the collectives per layer."""
    ref = reference(case, ep)
    results = pool.run(run_case, case, tp, ep)
    compare(case, results, ref, tp, ep, atol=BLOCK_ATOL)
    for res in results[:tp * ep]:
        assert res["fwd"] == fwd and res["bwd"] == bwd, (res["where"], res["fwd"], res["bwd"])
        # the aux loss pools its statistics over the EP group: one all-reduce per forward
        assert res["aux_calls"] == ({"all_reduce": 1} if ep > 1 else {})


# ------------------------------------------------------------------------ whole models
MODEL_ATOL = 1e-4
VOCAB, SEQ = 97, 10
BASE = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
            output_router_logits=True)
MODELS = {  # transformers class, settings (6 query heads over 2 KV heads: tp=4 replicates them)
    "mixtral": ("MixtralConfig", dict(hidden_size=32, head_dim=8, intermediate_size=24,
                                      num_local_experts=5, num_experts_per_tok=2,
                                      router_aux_loss_coef=0.02)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, head_dim=8, intermediate_size=40,
                                         moe_intermediate_size=12, num_experts=6,
                                         num_experts_per_tok=3, norm_topk_prob=True,
                                         num_hidden_layers=3, mlp_only_layers=[1])),
    "olmoe": ("OlmoeConfig", dict(hidden_size=48, intermediate_size=16, num_experts=64,
                                  num_experts_per_tok=8, clip_qkv=1.5)),  # OLMoE-shaped
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{family: (HF directory, transformers model)}: random weights, saved once."""
    import transformers
    out = {}
    for i, (name, (cls, kw)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        cfg = getattr(transformers, cls)(**{**BASE, **kw})
        cfg._experts_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # norms away from 1 so that a misplaced one shows
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (str(path), model)
    return out


def _checkpoint_grads(name: str, hf) -> dict[str, torch.Tensor]:
    """transformers' gradients under the checkpoint's names (per-expert tensors)."""
    module = "block_sparse_moe" if name == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj",
                                                                      "down_proj")
    out = {}
    for n, p in hf.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if n.endswith("experts.gate_up_proj"):
            base = n[:-len("gate_up_proj")].replace(".mlp.", f".{module}.")
            width = g.shape[1] // 2
            for e in range(g.shape[0]):
                out[f"{base}{e}.{gate}.weight"] = g[e, :width]
                out[f"{base}{e}.{up}.weight"] = g[e, width:]
        elif n.endswith("experts.down_proj"):
            base = n[:-len("down_proj")].replace(".mlp.", f".{module}.")
            for e in range(g.shape[0]):
                out[f"{base}{e}.{down}.weight"] = g[e]
        else:
            out[n.replace(".mlp.gate.", f".{module}.gate.")] = g
    return out


def _reference(name, hf, ids, tgt):
    hf.zero_grad()
    out = hf(ids, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.view(-1, VOCAB), tgt.view(-1),
                                           reduction="sum")
    coef = hf.config.router_aux_loss_coef
    (ce + coef * out.aux_loss).backward()
    return out.logits.detach(), out.aux_loss.item(), _checkpoint_grads(name, hf), coef


LAYOUTS = [(1, 1, None), (2, 1, None), (3, 1, None), (4, 1, None), (1, 2, None), (2, 2, None),
           (1, 4, None)]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_equals_transformers_at_tp_ep_and_both(pool, hf_models, name):
    """Logits (1e-4), the load-balancing loss, every rank's gradient slice: tp 1-4 (tensor-
    parallel experts), ep 2 and 4 (batch rows split over the EP groups), tp 2 x ep 2; for
    Mixtral also whole experts within the TP group and sequence parallelism."""
    from moe_checks import model_case
    from shardwise.shards import assemble_local
    path, hf = hf_models[name]
    g = torch.Generator().manual_seed(3)
    ids, tgt = torch.randint(0, VOCAB, (4, SEQ), generator=g), torch.randint(0, VOCAB, (4, SEQ),
                                                                          generator=g)
    logits, aux, grads, coef = _reference(name, hf, ids, tgt)

    def read(n, shape, dim, start, stop):
        assert tuple(grads[n].shape) == tuple(shape), (n, grads[n].shape, shape)
        return grads[n].narrow(dim, start, stop - start)

    layers = hf.config.num_hidden_layers
    moe_layers = layers - len(getattr(hf.config, "mlp_only_layers", []))
    per_layer = 2 + (name == "olmoe")  # attention and MLP; OLMoE's full-width q/k statistics
    extra = [(4, 1, 1), (2, 2, 1), (2, 2, "sp")] if name == "mixtral" else []
    for tp, ep, etp in LAYOUTS + extra:
        sp = etp == "sp"
        results = pool.run(model_case, path, tp, ep, ids, tgt, coef, None if sp else etp, sp)
        where = f"{name} tp={tp} ep={ep} expert_tp={etp}"
        for res in [r for r in results if r is not None]:
            if not sp:  # per step: the embedding's all-reduce forward, the head's f backward
                ar = {"all_reduce": 1 + per_layer * layers} if tp > 1 else {}
                assert res["fwd"] == {**ar, **({"all_to_all": 3 * moe_layers} if ep > 1 else {})}
                assert res["bwd"] == {**ar, **({"all_to_all": 2 * moe_layers} if ep > 1 else {})}
            a, b = res["rows"]
            torch.testing.assert_close(res["logits"], logits[a:b], atol=MODEL_ATOL, rtol=0,
                                       msg=lambda m: f"{where} logits: {m}")
            assert res["aux"] == pytest.approx(aux, rel=1e-5), where
            for n, (grad, pieces) in res["grads"].items():
                local = grad.clone()
                if pieces:
                    local.pieces = pieces
                torch.testing.assert_close(grad, assemble_local(n, local, read), atol=MODEL_ATOL,
                                           rtol=0, msg=lambda m: f"{where} grad {n}: {m}")


def train_worker(cfgs, rows):
    from shardwise.mesh import Mesh
    from shardwise.train.loop import train_on_mesh
    return [train_on_mesh(c, c.model, rows, Mesh.init(c.tp, c.pp, c.dp))["losses"] for c in cfgs]


def test_moe_trains_to_the_one_process_losses(pool, hf_models, tmp_path):
    """Mixtral (load-balancing loss in every micro-batch's loss, experts some micro-batches leave
    idle) trains at tp=2 x dp=2 (two micro-batches) and tp=2 x dp=2 under ZeRO-2 to the
    one-process losses (1e-4 per step, every step clipped); pp > 1 is refused with the reason."""
    from shardwise.checkpoint.source import ModelSource
    from shardwise.mesh import Mesh
    from shardwise.models.config import LlamaConfig
    from shardwise.train.config import TrainConfig
    from shardwise.train.loop import train_on_mesh
    path, _ = hf_models["mixtral"]
    src = ModelSource("mixtral", LlamaConfig.from_hf(path), path, None)
    rows = torch.randint(0, VOCAB, (8, SEQ + 1), generator=torch.Generator().manual_seed(4))

    def cfg(name, tp=1, pp=1, dp=1, **kw):
        return TrainConfig(model=src, tp=tp, pp=pp, dp=dp, global_batch=4, seq_len=SEQ, steps=2,
                           lr=1e-2, warmup=1, max_grad_norm=0.05, save=False, progress=False,
                           out_dir=str(tmp_path / name), **kw)
    ref = train_on_mesh(cfg("ref"), src, rows, Mesh.init(1))
    assert all(r["clip_coef"] < 1 for r in ref["records"])
    layouts = {"tp2-dp2": cfg("tp2-dp2", 2, dp=2, micro_batch=1),
               "tp2-dp2-zero2": cfg("tp2-dp2-zero2", 2, dp=2, zero=2)}
    got = pool.run(train_worker, list(layouts.values()), rows)[0]
    for name, losses in zip(layouts, got):
        assert max(abs(a - b) for a, b in zip(ref["losses"], losses)) < MODEL_ATOL, (name, losses)
    from shardwise.train.config import check_moe_pipeline
    with pytest.raises(ValueError, match=r"pp=2 .* router_aux_loss_coef=0.02"):
        check_moe_pipeline(src.config, 2)


def test_verify_passes_on_moe_families(pool, hf_models):
    """``shardwise verify`` at tp=3: every stage within tolerance, and the collectives as in
    its theory (OLMoE: one all-reduce more per layer for its full-width q/k norm)."""
    from shardwise.verify import verify
    for name, (path, _) in hf_models.items():
        rep = verify(path, 3, seq=SEQ, pool=pool)
        assert rep.ok, (name, [(s.name, s.max_abs_diff, s.collectives) for s in rep.stages])
        per_layer = rep.stages[1].collectives
        assert per_layer == {"all_reduce": 3 if name == "olmoe" else 2}, (name, per_layer)
