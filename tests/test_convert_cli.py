"""``shardwise convert``: save at tp=2, reshard to 1, merge to HF; transformers agrees."""
import subprocess
import sys

import torch
import transformers


def cli(*args):
    out = subprocess.run([sys.executable, "-m", "shardwise.cli", "convert", *args],
                         capture_output=True, text=True, timeout=300)
    return out


def test_convert_round_trip(tmp_path):
    assert cli("--model", "tiny", "--tp", "2", "--out", str(tmp_path / "tp2")).returncode == 0
    assert cli("--from", str(tmp_path / "tp2"), "--tp", "1", "--out",
               str(tmp_path / "tp1")).returncode == 0
    out = cli("--from", str(tmp_path / "tp1"), "--to-hf", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    from shardwise.checkpoint.source import build_model, resolve
    ours = build_model(resolve("tiny"))  # the same seed-0 weights the workers initialised
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
    bad = cli("--from", str(tmp_path / "missing"), "--to-hf", str(tmp_path / "x"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = cli("--model", "tiny", "--tp", "5", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "tp=5 but the model has 4 query heads" in bad.stderr
