"""Quantized checkpoints (``shardwise convert --quant``) reloaded at another tp; the planner's
int8/int4 serving memory against what the loader holds; the ``--quant`` options of the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from quant_checks import run_source
from shardwise.cli import main
from shardwise.mesh import LayoutOnly
from shardwise.models.config import PRESETS
from shardwise.models.llama import LlamaForCausalLM
from shardwise.planner.memory import quantized_weight_bytes, serving_memory
from shardwise.planner.models import ModelSpec
from shardwise.quant.config import QuantConfig
from shardwise.quant.load import load_quantized, weight_bytes
from shardwise.quant.qtensor import QTensor, n_groups

IDS = torch.tensor([[1, 5, 9, 77, 3, 120, 64]])
REL = 1e-5


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method,group", [("int4", 32), ("int8", 128)])
def test_quantized_checkpoint_reloads_at_another_tp(pool, tmp_path, method, group):
    """Saved at tp=2 (and resharded to tp=3), loaded at tp 1-3: the logits of the model
    quantized on load at tp=1 (the same values: quantization runs on the full tensors)."""
    quant = QuantConfig(method, group=group)
    want = run_source("tiny", 1, quant, IDS)["logits"]
    out = tmp_path / "q-tp2"
    assert main(["convert", "--model", "tiny", "--quant", method, "--group", str(group),
                 "--tp", "2", "--out", str(out)]) == 0
    meta = json.loads((out / "shardwise.json").read_text())
    assert meta["quant"]["method"] == method and meta["layout"]["tp"] == 2
    assert main(["convert", "--from", str(out), "--tp", "3", "--out", str(tmp_path / "q3")]) == 0
    for spec in (str(out), str(tmp_path / "q3")):
        for tp in (1, 3):
            res = [r for r in pool.run(run_source, spec, tp, None, IDS) if r]
            assert rel_err(res[0]["logits"], want) < REL, (spec, tp)


def _zeros_reader(name, shape, dim, a, b, method, group):
    """Quantized tensors of the requested shapes (values do not change the bytes held)."""
    n, k = shape
    g = group or k  # 0: int8 per row
    rows, cols, off = (b - a, k, 0) if dim == 0 else (n, b - a, a % g)
    ng = n_groups(cols, g, off)
    q = torch.zeros(rows, cols, dtype=torch.int8 if method == "int8" else torch.uint8)
    return QTensor(method, q, torch.ones(rows, ng),
                   None if method == "int8" else torch.zeros(rows, ng), g, off)


@pytest.mark.parametrize("method,tp", [("int8", 2), ("int4", 1), ("int4", 3)])
def test_planner_prices_what_the_loader_holds(method, tp):
    """SmolLM2-135M's shape in bf16: the planner's weight bytes within 5% of the runtime forms
    the loader builds on rank 0 (int8 in groups of 32; int4: groups of 128 running as kernel
    groups of 64)."""
    cfg = PRESETS["smollm2-135m-config"]
    spec = ModelSpec("smollm2", hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
                     heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                     ffn=cfg.intermediate_size, vocab=cfg.vocab_size, tied_embeddings=True)
    model = LlamaForCausalLM(cfg, group=LayoutOnly(tp, 0), quant=QuantConfig(method),
                             dtype=torch.bfloat16)
    load_quantized(model, _zeros_reader, dtype=torch.bfloat16)
    held = weight_bytes(model)
    planned = serving_memory(spec, tp=tp, pp=1, batch=1, prompt=1, output=1, precision=method,
                             kv_bytes=2, capacity=0).weights
    assert planned == quantized_weight_bytes(spec, tp=tp, pp=1, precision=method)
    assert abs(planned / held - 1) < 0.05, (planned, held)


def test_cli_quant_options_and_training_refusal(tmp_path, capsys):
    assert main(["verify", "--model", "tiny", "--tp", "2", "--quant", "int4", "--group", "32",
                 "--no-compile"]) == 0
    assert "OK: every stage within tolerance" in capsys.readouterr().out
    out = tmp_path / "q"
    assert main(["convert", "--model", "tiny", "--quant", "int8", "--tp", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    (tmp_path / "data.txt").write_text("hello world " * 50)
    code = main(["train", "--model", str(out), "--tp", "1", "--steps", "1",
                 "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is quantized (int8): training needs float" in err[0]
    assert main(["convert", "--from", str(out), "--quant", "int4", "--to-hf",
                 str(tmp_path / "hf")]) == 2
    assert main(["generate", "--model", str(out), "--quant", "int4", "--prompt", "x"]) == 2
    assert "is a int8 checkpoint" in capsys.readouterr().err
