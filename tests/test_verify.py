"""``shardwise verify``: a clean run passes, a corrupted shard is named, the CLI exits non-zero."""
import json

import pytest

from shardwise.launch import WorkerPool
from shardwise.verify import EXIT_EXCEEDED, expected_collectives, format_report, verify


@pytest.fixture(scope="module")
def pool2():
    with WorkerPool(2, timeout_s=300) as p:
        yield p


def test_clean_run_passes_with_theoretical_collectives(pool2):
    rep = verify("tiny", 2, pool=pool2)
    assert rep.ok and rep.first_exceeding is None
    names = [s.name for s in rep.stages]
    assert names == ["embed_tokens", "layers.0", "layers.1", "logits"]
    for s in rep.stages:
        assert s.max_abs_diff < 1e-5
        assert s.collectives == s.expected
    assert rep.stages[1].collectives == {"all_reduce": 2}
    assert len(rep.ranks) == 2 and all(r["param_bytes"] > 0 for r in rep.ranks)
    assert "OK" in format_report(rep)
    json.dumps(rep.to_json())


def test_sequence_parallel_counts(pool2):
    rep = verify("tiny", 2, sequence_parallel=True, pool=pool2)
    assert rep.ok
    assert rep.stages[1].collectives == {"all_gather": 2, "reduce_scatter": 2}
    assert rep.stages[0].collectives == {"reduce_scatter": 1}


@pytest.mark.parametrize("layer,rank", [(1, 1), (0, 0)])
def test_corrupted_shard_is_named(pool2, layer, rank):
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    rep = verify("tiny", 2, corrupt=(name, rank), pool=pool2)
    assert not rep.ok
    assert rep.first_exceeding == f"layers.{layer}"
    bad = [s.name for s in rep.stages if s.exceeds]
    assert bad[0] == f"layers.{layer}" and "logits" in bad
    assert f"layers.{layer} is the first stage" in format_report(rep)


def test_expected_collectives_theory():
    assert expected_collectives("layers.3", 1, False) == {}
    assert expected_collectives("layers.3", 4, False) == {"all_reduce": 2}
    assert expected_collectives("logits", 4, True) == {"all_gather": 1}


def test_cli_json_and_exit_code(capsys):
    from shardwise.cli import main
    assert main(["verify", "--model", "tiny", "--tp", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["tp"] == 1 and out["first_exceeding"] is None
    assert main(["verify", "--model", "tiny", "--tp", "1", "--atol", "-1", "--rtol", "0"]) \
        == EXIT_EXCEEDED
    assert main(["verify", "--model", "no-such-model", "--tp", "1"]) == 2
