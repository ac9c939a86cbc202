"""What the scheduler moves around: a request, its sequences and their samplers, one step's plan.

Rank 0 builds these (:mod:`.scheduler`); a :class:`StepPlan` is what it broadcasts to the other
ranks each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .kv import Chunk


@dataclass
class SamplerSpec:
    """What every rank needs to sample a sequence's tokens identically."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first


@dataclass
class Request:
    """One submission to the engine: a prompt and its ``n`` samples (ids and samplers)."""
    ids: list[int]
    prompt: list[int]
    specs: list[SamplerSpec]
    max_tokens: int
    eos_ids: list[int]
    grammar: str | None = None   # an llguidance grammar (:mod:`.grammar`) for every sample


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    spec: SamplerSpec
    max_tokens: int
    eos_ids: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    freed: int = 0            # leading blocks freed as outside the window
    cached: int = 0
    long_rope: bool = False   # its cache is (to be) rotated with longrope's long frequencies
    registered: bool = False  # the workers hold its sampler
    grammar: Any = None       # its structured-output constraint (rank 0)
    followers: list["Sequence"] = field(default_factory=list)  # n > 1: forked after prefill
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks
    indexed: int = 0          # leading blocks registered in the prefix cache
    reused: int = 0           # tokens taken from the prefix cache at its last admission
    lp_done: int = 1          # prompt positions whose log-probabilities were reported

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.cached


@dataclass
class StepPlan:
    """What rank 0 broadcasts each step."""
    chunks: list[Chunk] = field(default_factory=list)
    new: dict[int, SamplerSpec] = field(default_factory=dict)
    drop: list[int] = field(default_factory=list)
    masks: dict[int, bytes] = field(default_factory=dict)  # seq id -> packed allowed tokens
    copies: list[tuple[int, int]] = field(default_factory=list)  # after the forward: src -> dst
    stop: bool = False
