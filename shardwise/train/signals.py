"""What a training run reports: progress bar, JSONL log, PNG loss curve.

Per step (rank 0 prints and writes; every rank contributes its own numbers):

* ``loss``: the global-batch mean cross-entropy (the same number at any layout);
* ``tokens_per_s = global_batch x seq_len / step_seconds``;
* ``mfu = flops_per_token x tokens_per_s / (world x peak_tflops x 1e12)`` with
  ``flops_per_token = 6 N + 12 l (heads x head_dim) s`` (PaLM's model FLOPs: forward + backward of
  the matmuls, N the matmul parameters, plus attention scores); recomputation is not counted;
* ``comm_fraction`` per rank: seconds inside torch.distributed collectives (the :class:`Ledger`) /
  step seconds. DDP's bucketed all-reduces run in C++ and are not seen by the ledger; TP, PP
  (send/recv), finalize and norm collectives are. Near 1 means the rank mostly waits;
* ``peak_mem_mb`` per rank: peak RSS on CPU (``ru_maxrss``), ``max_memory_allocated`` on GPU;
  ``param_mb``: the rank's parameter bytes (its shard).
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..models.config import LlamaConfig


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 l (heads x head_dim) s``."""
    n = cfg.num_parameters() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.dim_per_head * seq_len
    return 6.0 * n + attn


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def gather_rank_stats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), in rank order."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


class Reporter:
    """Rank 0's progress bar, JSONL log and loss plot; a no-op on other ranks."""

    def __init__(self, out_dir: str | Path, *, active: bool, progress: bool, total: int,
                 start: int, flops_token: float, peak_tflops: float, world: int,
                 tokens_per_step: int) -> None:
        self.active, self.out = active, Path(out_dir)
        self.flops_token, self.peak, self.world = flops_token, peak_tflops, world
        self.tokens_per_step = tokens_per_step
        self.bar = None
        if active:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log = (self.out / "train_log.jsonl").open("a")
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, desc="train", unit="step",
                                dynamic_ncols=True)

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, clip: float,
             seconds: float, per_rank: list[list[float]], extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        """``per_rank``: ``[comm_seconds, step_seconds, peak_mem_bytes, param_bytes]`` by rank."""
        tps = self.tokens_per_step / max(seconds, 1e-9)
        rec: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "clip_coef": clip,
            "step_s": round(seconds, 4), "tokens_per_s": round(tps, 1),
            "comm_fraction": [round(r[0] / max(r[1], 1e-9), 4) for r in per_rank],
            "peak_mem_mb": [round(r[2] / 2**20, 1) for r in per_rank],
            "param_mb": [round(r[3] / 2**20, 2) for r in per_rank],
        }
        if self.peak > 0:
            rec["mfu"] = round(self.flops_token * tps / (self.world * self.peak * 1e12), 6)
        rec.update(extra or {})
        if self.active:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            if self.bar is not None:
                post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:.0f}",
                        "comm": f"{max(rec['comm_fraction']):.0%}",
                        "mem": f"{max(rec['peak_mem_mb']):.0f}MB"}
                if "mfu" in rec:
                    post["mfu"] = f"{rec['mfu']:.1%}"
                self.bar.set_postfix(post, refresh=False)
                self.bar.update(1)
        return rec

    def close(self) -> Path | None:
        if not self.active:
            return None
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        return plot_loss(self.out / "train_log.jsonl", self.out / "loss.png")


def plot_loss(log: Path, png: Path) -> Path | None:
    """Loss against step from a JSONL log (later records of a step win: resumed runs)."""
    by_step: dict[int, float] = {}
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r["loss"]
    if not by_step:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [by_step[s] for s in steps], marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("shardwise train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
