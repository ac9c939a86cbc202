"""Bad input fails before any worker starts; the CLI end to end; fine-tuning SmolLM2 at tp=3."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shardwise.checkpoint.source import ModelSource
from shardwise.models.config import LlamaConfig
from shardwise.train.cli import main
from shardwise.train.config import TrainConfig
from shardwise.train.run import prepare

MC = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)
SRC = ModelSource("tiny4", MC, None, None)

TEXT = ("The quick brown fox jumps over the lazy dog. Tensor parallelism splits each weight "
        "matrix across devices, pipeline parallelism splits the layers, and data parallelism "
        "splits the batch. ") * 4


@pytest.fixture
def data(tmp_path) -> Path:
    f = tmp_path / "data.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture
def no_spawn(monkeypatch):
    import shardwise.launch

    def refuse(*a, **k):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(shardwise.launch, "spawn", refuse)


@pytest.mark.parametrize("kw, match", [
    (dict(tp=2, workers=3), r"tp=2 x pp=1 x dp=1 = 2 but the world has 3"),
    (dict(pp=5), r"pp=5 but the model has 4 layers"),
    (dict(global_batch=6, micro_batch=2, dp=2), r"global batch 6 is not divisible by micro-batch 2 x dp 2"),
    (dict(tp=5), r"tp=5 but the model has 4 query heads"),
    (dict(pp=4, global_batch=2), r"1F1B schedule needs at least pp=4 micro-batches .* = 2"),
    (dict(sequence_parallel=True, tp=2, seq_len=15), r"seq_len=15 is not a multiple of 2"),
])
def test_bad_layouts_fail_before_workers(data, no_spawn, kw, match):
    with pytest.raises(ValueError, match=match):
        prepare(TrainConfig(**{"model": SRC, "data": [str(data)], "seq_len": 16, **kw}))


def test_unreadable_data_fails_before_workers(tmp_path, no_spawn):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(TrainConfig(model=SRC, data=[str(tmp_path / "missing.txt")]))
    with pytest.raises(FileNotFoundError, match="not a file"):
        prepare(TrainConfig(model=SRC, data=[str(tmp_path)]))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    with pytest.raises(ValueError, match="at least seq_len"):
        prepare(TrainConfig(model=SRC, data=[str(tiny)], seq_len=16))


def test_cli_errors_exit_2_quickly(data, tmp_path, no_spawn, capsys):
    t = time.perf_counter()
    assert main(["--model", "tiny", "--data", str(data), "--tp", "2", "--pp", "3"]) == 2
    assert main(["--model", "tiny", "--data", str(tmp_path / "nope.txt")]) == 2
    assert main(["--model", "nonexistent-model", "--data", str(data)]) == 2
    assert main(["--model", "tiny", "--data", str(data), "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pp=3 but the model has 2 layers" in err and "nope.txt does not exist" in err
    assert "no complete checkpoint" in err
    assert time.perf_counter() - t < 30


def test_cli_runs_in_process(data, tmp_path, capsys):
    """One process end to end: log, plot, checkpoint, summary line."""
    out = tmp_path / "run"
    rc = main(["--model", "tiny", "--data", str(data), "--steps", "3", "--seq-len", "32",
               "--global-batch", "2", "--out", str(out), "--no-progress", "--peak-tflops", "1"])
    assert rc == 0
    recs = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and "mfu" in recs[0] and recs[0]["mfu"] > 0
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest").is_file()
    assert "loss" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_smollm2_at_tp3_lowers_loss(tmp_path):
    """SmolLM2-135M, tp=3 (3 query heads and 1 KV head per rank), 3 steps on one short text:
    each step's global batch is the whole text, so the step losses are losses on that text."""
    from shardwise.train.run import train
    f = tmp_path / "text.txt"
    f.write_text("Shardwise is a small library for tensor parallelism. It splits the attention "
                 "heads and the MLP columns of each transformer layer across ranks, and joins "
                 "the partial results with one all-reduce per block. " * 2)
    cfg = TrainConfig(model="smollm2-135m", data=[str(f)], tp=3, seq_len=64, micro_batch=1,
                      global_batch=1, steps=3, lr=1e-4, warmup=0, min_lr=1e-4, save=False,
                      progress=False, out_dir=str(tmp_path / "run"))
    src, packed = prepare(cfg)
    assert packed.num_rows == 1, packed.num_rows
    res = train(cfg)
    losses = res["losses"]
    print("smollm2 tp=3 losses", losses)
    assert losses[-1] < losses[0] - 0.1, losses
