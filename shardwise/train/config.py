"""The training configuration and every check that can run before a worker starts.

:func:`validate` raises ``ValueError`` (or ``FileNotFoundError``) naming the numbers, so that bad
input fails in the launching process, not as a hang or a stack trace in worker 3 of 8.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.source import ModelSource
from ..mesh import validate as validate_degrees
from ..partition import HeadLayout, stage_layers  # noqa: F401 - re-exported

SCHEDULES = ("gpipe", "1f1b")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class TrainConfig:
    """One training run. ``model`` is a ``--model`` spec (preset, HF dir, GGUF) or a resolved
    :class:`ModelSource` (tests pass custom shapes this way).

    Batch arithmetic: ``global_batch = micro_batch x dp x accumulation``; a step sees
    ``global_batch x seq_len`` tokens; under PP the ``accumulation`` micro-batches of a replica
    are the pipeline's micro-batches.
    """

    model: str | ModelSource = "debug"
    data: list[str] = field(default_factory=list)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    micro_batch: int = 1
    global_batch: int = 8
    seq_len: int = 128
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False
    recompute: str = "none"        # none | selective (norms, rope, SwiGLU) | full (whole layers)
    zero: int = 0                  # 0: DDP; 1: AdamW states sharded over DP; 2: + gradients
    out_dir: str = "runs/train"
    save_every: int = 0            # 0: save only at the end
    save: bool = True              # False: no checkpoints at all (quick experiments)
    resume: str | None = None      # checkpoint root (with ``latest``) or one step directory
    peak_tflops: float = 0.0       # per device; 0: MFU is not reported
    progress: bool = True
    workers: int | None = None     # processes launched / in the torchrun world (default tp*pp*dp)
    crash_during_save_at: int | None = None  # fault injection: the last rank SIGKILLs itself

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def accumulation(self) -> int:
        """Micro-batches per replica per step."""
        return self.global_batch // (self.micro_batch * self.dp)


def check_moe_pipeline(mc, pp: int) -> None:
    """A mixture of experts' load-balancing loss (transformers' definition) pools the routing
    of every MoE layer before it multiplies counts by probabilities, so it couples the layers of
    all pipeline stages; it is not built across stages: raise ValueError for pp > 1 unless its
    weight is 0."""
    if pp > 1 and getattr(mc, "num_experts", 0) and mc.router_aux_loss_coef:
        raise ValueError(
            f"pp={pp} with a mixture of experts whose load-balancing loss has weight "
            f"router_aux_loss_coef={mc.router_aux_loss_coef}: that loss pools the routing of "
            "the MoE layers of every stage and is not built across pipeline stages; use pp=1 "
            "(tp and dp combine freely), or set router_aux_loss_coef to 0 in config.json")


def validate(cfg: TrainConfig, source: ModelSource, *, world: int | None = None) -> None:
    """Every check that needs no worker. ``world``: processes that will run (torchrun's
    WORLD_SIZE, or the workers this launcher starts)."""
    world = cfg.workers if world is None and cfg.workers is not None else world
    validate_degrees(cfg.tp, cfg.pp, cfg.dp, cfg.world if world is None else world)
    if getattr(source, "quant", None) is not None:
        raise ValueError(f"{source.name} is quantized ({source.quant.method}): training needs "
                         "float weights; train its fp32/bf16 source and quantize after "
                         "(shardwise convert --quant)")
    mc = source.config
    if cfg.pp > mc.num_hidden_layers:
        raise ValueError(f"pp={cfg.pp} but the model has {mc.num_hidden_layers} layers: each "
                         f"pipeline stage needs at least one layer; use pp <= {mc.num_hidden_layers}")
    HeadLayout(mc.num_attention_heads, mc.num_key_value_heads, cfg.tp)  # raises with the numbers
    check_moe_pipeline(mc, cfg.pp)
    for name in ("micro_batch", "global_batch", "seq_len", "steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be >= 1")
    if cfg.global_batch % (cfg.micro_batch * cfg.dp):
        raise ValueError(
            f"global batch {cfg.global_batch} is not divisible by micro-batch {cfg.micro_batch} "
            f"x dp {cfg.dp} = {cfg.micro_batch * cfg.dp}: use a global batch that is a multiple "
            f"of {cfg.micro_batch * cfg.dp}")
    if cfg.pp > 1 and cfg.schedule == "1f1b" and cfg.accumulation < cfg.pp:
        raise ValueError(
            f"the 1F1B schedule needs at least pp={cfg.pp} micro-batches per replica but global "
            f"batch {cfg.global_batch} / (micro-batch {cfg.micro_batch} x dp {cfg.dp}) = "
            f"{cfg.accumulation}: raise the global batch or use --schedule gpipe")
    if cfg.sequence_parallel and cfg.seq_len % cfg.tp:
        raise ValueError(f"sequence parallelism splits the sequence over tp={cfg.tp} ranks but "
                         f"seq_len={cfg.seq_len} is not a multiple of {cfg.tp}")
    if cfg.seq_len > mc.max_position_embeddings:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's "
                         f"{mc.max_position_embeddings} positions")
    if cfg.recompute not in RECOMPUTE:
        raise ValueError(f"recompute {cfg.recompute!r}: use one of {', '.join(RECOMPUTE)}")
    if cfg.zero not in (0, 1, 2):
        raise ValueError(f"--zero {cfg.zero}: use 0 (plain DDP), 1 (optimizer states sharded "
                         "over dp) or 2 (optimizer states and gradients)")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if cfg.max_grad_norm < 0 or cfg.lr <= 0 or cfg.warmup < 0:
        raise ValueError("lr must be > 0, warmup and max_grad_norm >= 0")
    if not cfg.data:
        raise ValueError("no training data: give one or more text files with --data")
    for f in cfg.data:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"data file {f} does not exist or is not a file")
        if not os.access(p, os.R_OK):
            raise FileNotFoundError(f"data file {f} is not readable (permission denied)")
    if cfg.resume is not None:
        from ..checkpoint.sharded import checkpoint_kind
        if checkpoint_kind(cfg.resume) != "train":  # FileNotFoundError when nothing is complete
            raise ValueError(f"{cfg.resume} is a model checkpoint (no step or optimizer state): "
                             "start from it with --model DIR; --resume continues a training run")
