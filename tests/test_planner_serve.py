"""Serving Llama-2-70B on 8 A100s: NVLink (SXM) against PCIe, the case the planner issue asks for."""
import pytest

from shardwise.planner.gpus import default_interconnect, get_gpu
from shardwise.planner.model_catalog import get_model
from shardwise.planner.report import explain, to_json
from shardwise.planner.search import Cluster, ServeRequest, plan


def _plan(gpu_name, **kw):
    gpu = get_gpu(gpu_name)
    cluster = Cluster(gpu, 8, 8, default_interconnect(gpu), gpu.network_gbps)
    return plan(get_model("llama-2-70b"), cluster, ServeRequest(1024, 256, 16, **kw))


@pytest.fixture(scope="module")
def sxm():
    return _plan("a100-80gb-sxm")


@pytest.fixture(scope="module")
def pcie():
    return _plan("a100-80gb-pcie")


def _find(p, tp, pp, dp):
    return next(c for c in p.candidates + p.rejected if (c.layout.tp, c.layout.pp, c.layout.dp) == (tp, pp, dp))


def test_sxm_fits_with_tp_inside_the_node(sxm):
    best = sxm.best
    assert (best.layout.tp, best.layout.pp, best.layout.dp) == (8, 1, 1)
    assert best.memory.total < get_gpu("a100-80gb-sxm").memory_bytes
    assert sxm.cluster.within_node(best.layout.tp, 1)
    why = " ".join(explain(sxm))
    assert "inside one node on nvlink" in why
    assert "more than one 80 GiB" in why and "at least 2 GPUs" in why


def test_70b_needs_at_least_two_gpus_per_copy(sxm):
    assert all(c.layout.tp * c.layout.pp >= 2 for c in sxm.candidates)
    one = _find(sxm, 1, 1, 8)
    assert one.reason.startswith("out of memory") and "weights 128.5 GiB" in one.reason


def test_pcie_spends_a_larger_share_of_decode_in_all_reduce(sxm, pcie):
    a, b = _find(sxm, 8, 1, 1), _find(pcie, 8, 1, 1)
    sa, sb = a.time.decode_comm_share, b.time.decode_comm_share
    # NVLink: 160 all-reduces of 16 x 8192 bf16 at 225 GB/s, 8 us each -> ~13% of a 12.6 ms step.
    # PCIe gen4: same messages at 16 GB/s, 30 us each -> ~45% of a 21 ms step.
    assert 0.08 < sa < 0.2 and 0.35 < sb < 0.6 and sb > 2.5 * sa
    assert b.time.tpot_s > 1.5 * a.time.tpot_s  # predicted latency rises with the same layout
    assert b.time.decode_memory_s == pytest.approx(a.time.decode_memory_s * 2039 / 1935, rel=0.01)


def test_pcie_changes_the_ranking(sxm, pcie):
    # On PCIe, tp=8's all-reduces (prefill ones most of all) cost more than halving the weights
    # read per GPU saves: two tp=4 replicas now give more throughput, tp=8 keeps the lowest TPOT.
    assert (pcie.best.layout.tp, pcie.best.layout.dp) == (4, 2)
    tp8 = _find(pcie, 8, 1, 1)
    assert pcie.candidates.index(tp8) > 0 and sxm.candidates.index(_find(sxm, 8, 1, 1)) == 0
    assert tp8.time.tpot_s == min(c.time.tpot_s for c in pcie.candidates)
    assert any("lowest TPOT" in s for s in explain(pcie))


def test_latency_target_on_pcie_brings_tp8_back():
    p = _plan("a100-80gb-pcie", tpot_target_s=0.025)
    assert (p.best.layout.tp, p.best.layout.dp) == (8, 1)
    assert any("TPOT" in c.reason and "target" in c.reason for c in p.rejected)


def test_json_shape(sxm):
    j = to_json(sxm)
    assert j["layout"] == {"tp": 8, "pp": 1, "dp": 1, "micro_batch": 16}
    for k in ("memory_per_gpu_gib", "ttft_s", "tpot_s", "throughput", "candidates", "rejected",
              "explanation", "decode_allreduce_share"):
        assert k in j
    assert all("reason" in r for r in j["rejected"]) and j["candidates"][0]["layout"] == j["layout"]
