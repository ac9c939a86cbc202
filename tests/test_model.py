"""The Llama-family model against Hugging Face transformers, checkpoints, and generation.

Tolerance: fp32, absolute 1e-4 on logits, loss and gradients of a whole (small) model.
"""
import json
import subprocess
import sys

import pytest
import torch
import transformers

from shardwise.checkpoint.hf import load_weights
from tp_checks import compare_with_hf, hf_model_worker, hf_reference

ATOL = 1e-4


def make_hf(tmp_path, name, *, heads, kv, tied, qwen=False, vocab=131, hidden=None):
    hidden = hidden or 8 * heads
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden - 5,
              num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
              tie_word_embeddings=tied, max_position_embeddings=64, rope_theta=10000.0)
    if qwen:
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    torch.manual_seed(hash(name) % 1000)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms so that every piece matters
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return path, model


LAYOUTS = [  # (name, heads, kv, tied, qwen): kv < tp, = tp, > tp, uneven, tied/untied, bias
    ("gqa-8-2", 8, 2, True, False),
    ("gqa-6-3-untied", 6, 3, False, False),
    ("uneven-9-3", 9, 3, True, False),
    ("mha-4-4-untied", 4, 4, False, False),
    ("qwen2-6-2-bias", 6, 2, False, True),
]


@pytest.mark.parametrize("name,heads,kv,tied,qwen", LAYOUTS)
def test_matches_transformers(pool, tmp_path, name, heads, kv, tied, qwen):
    path, hf = make_hf(tmp_path, name, heads=heads, kv=kv, tied=tied, qwen=qwen)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 131, (2, 11), generator=g)
    tgt = torch.randint(0, 131, (2, 11), generator=g)
    ref = hf_reference(hf, ids, tgt)
    for tp in (1, 2, 3, 4):
        if tp > heads:
            continue
        for res in [r for r in pool.run(hf_model_worker, str(path), tp, ids, tgt) if r]:
            compare_with_hf(res, ref, atol=ATOL, where=f"{name} tp={tp}")


def test_unsupported_architecture_and_shape_mismatch(tmp_path):
    from shardwise.models.config import LlamaConfig
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                      "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        LlamaConfig.from_hf(tmp_path)
    path, _ = make_hf(tmp_path, "m", heads=4, kv=2, tied=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    from shardwise.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig.from_hf(path))
    with pytest.raises(ValueError, match="gate_proj.weight.*has shape"):
        load_weights(model, path)


def save_worker(path, out, tp):
    from shardwise.checkpoint.convert import save_model
    from shardwise.mesh import subgroup
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    model = LlamaForCausalLM(LlamaConfig.from_hf(path), group=group)
    load_weights(model, path)
    save_model(model, out, group=group)


def logits_worker(ckpt, tp, ids):
    from shardwise.checkpoint.sharded import load_model
    from shardwise.layers import gather_logits
    from shardwise.mesh import subgroup
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    model = LlamaForCausalLM(LlamaConfig.from_hf(f"{ckpt}/config.json"), group=group)
    load_model(model, ckpt)
    with torch.no_grad():
        return gather_logits(model(ids), model.lm_head)


def test_save_merge_reshard(pool, tmp_path):
    """Saved at tp=3, exported: transformers loads it with the same logits; 3 -> 2 -> 1 keeps
    them; a checkpoint loads at any tp (here tp=3 into one process)."""
    from shardwise.checkpoint.convert import export_hf, reshard
    path, hf = make_hf(tmp_path, "src", heads=9, kv=3, tied=False, vocab=50)  # vocab padded at tp=3? 50 -> 51
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    pool.run(save_worker, str(path), str(tmp_path / "tp3"), 3)
    export_hf(tmp_path / "tp3", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-5, rtol=0)
    reshard(tmp_path / "tp3", tmp_path / "tp2", tp=2)
    reshard(tmp_path / "tp2", tmp_path / "tp1", tp=1)
    for ckpt, tp in ((tmp_path / "tp2", 2), (tmp_path / "tp1", 1), (tmp_path / "tp3", 3)):
        got = [r for r in pool.run(logits_worker, str(ckpt), tp, ids) if r is not None]
        torch.testing.assert_close(got[0], ref, atol=ATOL, rtol=0)
    from shardwise.checkpoint.sharded import load_model
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig.from_hf(tmp_path / "tp3"))
    load_model(model, tmp_path / "tp3")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=ATOL, rtol=0)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "shardwise.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases = [
        (["--model", str(tmp_path / "missing.gguf")], "does not exist"),
        (["--model", str(tmp_path / "gpt2")], "not supported"),
        (["--model", "smollm2-135m", "--tp", "12"], "tp=12 but the model has 9 query heads"),
        (["--model", "smollm2-135m", "--max-new-tokens", "9000"], "exceed the context of 8192"),
    ]
    procs = [(args, msg, subprocess.Popen(  # at once: each is mostly the interpreter's start
        [sys.executable, "-m", "shardwise.cli", "generate", "--prompt",
         "What is the capital of France?", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)) for args, msg in cases]
    for args, msg, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        assert msg in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
