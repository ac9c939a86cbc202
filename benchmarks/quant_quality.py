"""Quality of quantized SmolLM2-135M against the fp32 model, teacher-forced (issue 16).

The reference is the fp32 model dequantized from the GGUF (the only real weights here). The
contenders, all at tp=1 with ``--dtype`` activations (default fp32: the weights' error alone):

* ``int8`` (groups of 32, the default), ``int8 per channel`` (``--group 0``) and ``int4 g<G>``:
  ``shardwise convert --quant`` from those fp32 weights (written to
  a temporary sharded checkpoint, then loaded like any checkpoint): quantizing the Q4_1
  file's values again is the honest test of our quantizer;
* ``gguf int4 (q8_0=block|channel)``: the GGUF kept quantized (Q4_1 as int4, its Q8_0
  embedding in its blocks or re-quantized per row). With blocks it should equal the reference
  up to the rounding of scales to the activation dtype (none in fp32).

Over the first ``--tokens`` + 1 tokens of ``benchmarks/data/english.txt`` (plain English prose
written for this benchmark), one forward each; per contender: top-1 agreement of each
position's argmax with the reference's, perplexity of the text and its change, mean
KL(reference || contender) in nats, the largest |logit difference|, and the bytes of weights
held.

    .venv/bin/python benchmarks/quant_quality.py [--tokens 512] [--dtype float32]
        [--groups 128 32] [--json benchmarks/quant_quality.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parent / "data" / "english.txt"
GOALS = {"int8": 0.97, "int4 g128": 0.90}  # issue 16: top-1 agreement


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """(s, V) fp32 logits of one teacher-forced forward over ``ids`` (s,)."""
    from shardwise.layers import gather_logits
    with torch.inference_mode():
        local = model(ids[None])                                     # (1, s, V_local)
        return gather_logits(local, model.lm_head)[0].float()        # (s, V)


def compare(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    """Agreement, perplexity and divergence of ``got`` (s, V) against ``ref`` (s, V)."""
    lp_ref, lp = ref.log_softmax(-1), got.log_softmax(-1)
    nll = -lp.gather(-1, targets[:, None]).mean()
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()
    return {"top1": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "ppl": math.exp(float(nll)), "kl": float(kl),
            "max_abs_logit_diff": float((ref - got).abs().max())}


def contenders(dense_dir: Path, tmp: Path, groups: list[int]):
    """(name, model spec, QuantConfig or None): converted checkpoints are written first."""
    from shardwise.checkpoint.convert import save_quantized
    from shardwise.quant.config import QuantConfig
    out = [("fp32", str(dense_dir), None)]
    for name, q in [("int8", QuantConfig("int8")), ("int8 per channel", QuantConfig("int8", group=0))] + \
            [(f"int4 g{g}", QuantConfig("int4", group=g)) for g in groups]:
        t0 = time.perf_counter()
        path = save_quantized(str(dense_dir), tmp / name.replace(" ", "_"), tp=1, quant=q)
        print(f"convert --quant {q.method} --group {q.group}: {time.perf_counter() - t0:.1f} s",
              flush=True)
        out.append((name, str(path), None))
    out += [(f"gguf int4 (q8_0={m})", "smollm2-135m", QuantConfig("int4", q8_0=m))
            for m in ("block", "channel")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--json")
    args = ap.parse_args()
    from shardwise.checkpoint.source import build_model, load_tokenizer, resolve
    from shardwise.quant.load import weight_bytes
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; torch {torch.__version__}; activations {args.dtype}")
    dense = resolve("smollm2-135m")
    ids = load_tokenizer(dense)(TEXT.read_text())["input_ids"]
    if len(ids) < args.tokens + 1:
        raise SystemExit(f"{TEXT.name} has {len(ids)} tokens, fewer than --tokens + 1")
    ids = torch.tensor(ids[:args.tokens + 1])
    inputs, targets = ids[:-1], ids[1:]
    dtype = getattr(torch, args.dtype)
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec, quant in contenders(dense.weights, Path(tmp), args.groups):
            model = build_model(resolve(spec, dense=quant is None and name == "fp32"),
                                dtype=dtype, quant=quant).eval()
            got = logits_of(model, inputs)
            ref = got if ref is None else ref
            row = {"model": name, "weights_mib": round(weight_bytes(model) / 2**20, 1),
                   **compare(ref, got, targets)}
            rows.append(row)
            del model
    base = rows[0]["ppl"]
    print(f"\n{args.tokens} tokens of {TEXT.name}, teacher-forced; reference fp32 "
          f"(ppl {base:.3f})")
    print(f"{'model':<26}{'weights MiB':>12}{'top-1':>9}{'ppl':>9}{'ppl +%':>8}{'KL nats':>10}"
          f"{'max |dlogit|':>14}  goal")
    for r in rows:
        r["ppl_change_pct"] = 100 * (r["ppl"] / base - 1)
        goal = GOALS.get(r["model"])
        verdict = "" if goal is None else \
            f"top-1 >= {goal:.0%}: {'met' if r['top1'] >= goal else 'MISSED'}"
        print(f"{r['model']:<26}{r['weights_mib']:>12.1f}{100 * r['top1']:>8.1f}%"
              f"{r['ppl']:>9.3f}{r['ppl_change_pct']:>+8.2f}{r['kl']:>10.5f}"
              f"{r['max_abs_logit_diff']:>14.4g}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "dtype": args.dtype,
                                               "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
