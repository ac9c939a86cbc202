"""The planner on mixtures of experts: published total and active counts, what a rank holds under
each expert placement, the all-to-all's price and link, and the tp-vs-ep recommendation."""
import pytest

from shardwise.planner.collectives import alltoall_s
from shardwise.planner.gpus import get_gpu
from shardwise.planner.model_catalog import MODELS, get_model
from shardwise.planner.models import experts_per_rank, layer_params_per_rank
from shardwise.planner.report import experts_choice, placement_kind, to_json, to_text
from shardwise.planner.search import Cluster, ServeRequest, TrainRequest, plan

# (total, active) as the sources print them (model_catalog.py names each source)
PRINTED = {"mixtral-8x7b": (46.7e9, 12.9e9), "mixtral-8x22b": (141e9, 39e9),
           "qwen3-30b-a3b": (30.5e9, 3.3e9), "qwen3-235b-a22b": (235e9, 22e9),
           "olmoe-1b-7b": (6.9e9, 1.3e9)}


@pytest.mark.parametrize("name,printed", PRINTED.items())
def test_total_and_active_counts_match_the_publishers(name, printed):
    m = MODELS[name]
    assert abs(m.total_params() / printed[0] - 1) < 0.01, (name, m.total_params())
    assert abs(m.active_params() / printed[1] - 1) < 0.02, (name, m.active_params())
    assert (m.published_params, m.published_active) == printed and m.source


def test_mixtral_count_from_the_shapes_and_qwen3_non_embedding():
    # Mixtral-8x7B-v0.1: 32 x (attention 41.9M + 8 experts x 176.2M + router + norms) + 2 x 131M
    assert MODELS["mixtral-8x7b"].total_params() == 46_702_792_704
    assert round(MODELS["qwen3-30b-a3b"].non_embedding_params() / 1e9, 1) == 29.9  # the card's


def test_what_a_rank_holds_under_each_placement():
    m = MODELS["mixtral-8x7b"]
    attn = m.attn_params() // 8
    expert = m.expert_params()
    # tensor-parallel experts and whole experts hold the same bytes at tp=8: 1/8 of the experts
    for etp in (None, 1, 2):
        assert layer_params_per_rank(m, 8, 1, etp) == attn + expert + m.router_params() + 2 * m.hidden
    # ep=2 beside tp=4: 4 whole experts' worth per rank, attention over 4 only
    assert layer_params_per_rank(m, 4, 2, None) == m.attn_params() // 4 + expert + \
        m.router_params() + 2 * m.hidden
    assert experts_per_rank(m, 3, 1, 1) == 3  # 8 experts on 3 ranks: 3 + 3 + 2
    assert experts_per_rank(MODELS["qwen3-30b-a3b"], 1, 8) == 16


def test_alltoall_price_and_link():
    assert alltoall_s(8e6, 1, None) == 0.0
    h100 = get_gpu("h100")
    c = Cluster(h100, 16, 8, "nvlink", 400)
    near, far = c.alltoall_link(8, 1), c.alltoall_link(2, 8)
    assert near.kind == "nvlink" and far.kind == "network"
    assert far.busbw_GBps == pytest.approx(400 / 8 * 0.85)  # one NIC, not the node's eight
    assert alltoall_s(8e6, 8, near) == pytest.approx(near.alpha_s + 7 / 8 * 8e6 / (near.busbw_GBps * 1e9))


def _serve(model, concurrency, gpus=8, **pins):
    c = Cluster(get_gpu("h100"), gpus, 8, "nvlink", 400)
    return plan(get_model(model), c, ServeRequest(prompt=1024, output=256, concurrency=concurrency),
                **pins)


def test_mixtral_batch_one_keeps_tensor_parallel_experts():
    """One sequence touches 2 of 8 experts: a whole-expert rank reads a whole expert per step, a
    TP rank 2/8 of one, so decode (bound by reading weights) favours TP experts."""
    p = _serve("mixtral-8x7b", 1)
    assert placement_kind(p.best.layout) == "tp" and p.best.layout.tp == 8
    why = experts_choice(p)
    assert "decode reading weights" in why and "ep within tp" in why, why


def test_qwen3_moe_many_small_experts_prefers_whole_experts():
    """128 experts of 768 columns: tp=8 leaves 96-column GEMMs; whole experts keep them wide."""
    p = _serve("qwen3-30b-a3b", 64)
    assert placement_kind(p.best.layout) == "ep within tp", to_text(p)
    why = experts_choice(p)
    assert why.startswith("Experts: expert parallelism within the TP group") and "prefill" in why
    j = to_json(p)
    assert j["layout"]["etp"] == 1 and j["experts"] == why and j["model"]["active_params"] < 3.4e9


def test_mixtral_training_across_nodes_splits_experts_by_ep():
    c = Cluster(get_gpu("h100"), 64, 8, "nvlink", 400)
    r = TrainRequest(seq=4096, global_batch=256, zero=1)
    p = plan(get_model("mixtral-8x7b"), c, r)
    assert placement_kind(p.best.layout) == "ep" and p.best.layout.ep >= 4, to_text(p)
    assert p.best.time.ep_comm_s > 0
    # pinned to tensor-parallel experts only, the best is slower
    tp_only = plan(get_model("mixtral-8x7b"), c, r, ep=1, expert_tp=8, tp=8)
    assert tp_only.best.throughput < p.best.throughput


def test_pins_and_errors_name_the_numbers():
    with pytest.raises(ValueError, match="has none"):
        _serve("llama-3-8b", 8, ep=2)
    with pytest.raises(ValueError, match=r"ep=4 x tp/expert-tp=8 = 32 expert slots but 8 experts"):
        _serve("mixtral-8x7b", 8, gpus=32, tp=8, ep=4, expert_tp=1)
    p = _serve("mixtral-8x7b", 16, tp=4, ep=2, pp=1, dp=1, expert_tp=1)
    assert p.pinned and p.best.layout.short() == "tp=4 ep=2 expert-tp=1 pp=1 dp=1"
    assert p.best.time.decode_a2a_s > 0
