"""Compiled against eager: the same decode steps through both, side by side.

:func:`compare_compiled` feeds ``len(prompts)`` sequences (a batch bucket with padding rows when
that is not a power of two) through an eager and a compiled :class:`~shardwise.serve.step.StaticStep`
over two caches of one model: the prompts (one mixed step), then ``steps`` greedy decode steps,
each step fed with its own tokens. It reports the largest logit difference while the tokens
agree, whether every greedy token agrees, and the collectives each side issued per decode step
(the :class:`~shardwise.ledger.Ledger`), plus dynamo's graph and break counts for the compiled
side. fp32 on CPU agrees to about 1e-6 (inductor fuses and reorders a few reductions); the
default tolerance of 1e-4 matches the unsharded-vs-sharded check of ``shardwise verify``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import comm
from ..comm import Ledger
from ..sampling import SamplingParams, sample
from .kv import Chunk, PagedKVCache, blocks_for
from .step import StaticStep, StepOptions


@dataclass
class Comparison:
    max_abs_diff: float
    tokens_equal: bool
    eager_tokens: list[list[int]]
    compiled_tokens: list[list[int]]
    eager_collectives: dict[str, int]
    compiled_collectives: dict[str, int]
    graphs: int                       # dynamo's unique graphs (for the compiled side)
    graph_breaks: int
    buckets: list[int] = field(default_factory=list)
    cpp_wrapper: bool = False         # the compiled side through inductor's C++ wrapper
    native_all_reduce: bool = False   # the all-reduces by shardwise::shm_all_reduce (C++)

    @property
    def collectives_equal(self) -> bool:
        return self.eager_collectives == self.compiled_collectives

    def ok(self, atol: float = 1e-4) -> bool:
        return (self.max_abs_diff <= atol and self.tokens_equal and self.collectives_equal
                and self.graph_breaks == 0)


def _run(step: StaticStep, prompts: list[list[int]], steps: int, group) -> tuple[list, list, dict]:
    head = step.model.lm_head
    bs = step.cache.block_size
    per = blocks_for(max(len(p) for p in prompts) + steps + 1, bs)
    blocks = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    greedy = [SamplingParams()] * len(prompts)
    pick = lambda lg: sample(lg, greedy, [None] * len(prompts), start=head.start,  # noqa: E731
                             vocab=head.num_embeddings, group=group).tolist()
    toks = pick(step([Chunk(i, p, 0, blocks[i], True) for i, p in enumerate(prompts)]))
    lens, logits, out = [len(p) for p in prompts], [], [[t] for t in toks]
    with Ledger() as ledger:
        for _ in range(steps):
            lg = step([Chunk(i, [toks[i]], lens[i], blocks[i], True) for i in range(len(prompts))])
            logits.append(lg.float().clone())
            toks = pick(lg)
            for i, t in enumerate(toks):
                out[i].append(t)
                lens[i] += 1
    counts = {k: v // max(1, steps) for k, v in ledger.counts().items()}
    return logits, out, counts


@torch.inference_mode()
def compare_compiled(model, group, prompts: list[list[int]], *, steps: int = 8,
                     block_size: int = 16) -> Comparison:
    """Eager vs compiled decode of ``prompts`` on this rank (every rank of ``group`` calls it)."""
    from torch._dynamo.utils import counters
    n = len(prompts)
    per = blocks_for(max(len(p) for p in prompts) + steps + 1, block_size)
    sides: dict[bool, Any] = {}
    for compiled in (False, True):
        cache = PagedKVCache(model, n * per, block_size)
        pow2 = 1 << max(0, n - 1).bit_length()  # n = 3 runs in bucket 4: one padding row
        # no CUDA graphs: a replayed graph issues its collectives without the ledger seeing them
        step = StaticStep(model, cache, StepOptions(compile=compiled, max_seqs=pow2,
                                                    cuda_graphs=False))
        before = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
        sides[compiled] = (*_run(step, prompts, steps, group), step)
        after = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    (le, te, ce, _), (lc, tc, cc, stc) = sides[False], sides[True]
    diff, fed_e, fed_c = 0.0, list(zip(*te)), list(zip(*tc))
    for j, (a, b) in enumerate(zip(le, lc)):
        if fed_e[j] != fed_c[j]:  # the sequences diverged: later logits are not comparable
            break
        diff = max(diff, float((a - b).abs().max()))
    return Comparison(diff, te == tc, te, tc, ce, cc, after[0] - before[0],
                      after[1] - before[1], sorted(stc.graphs),
                      stc.options.cpp_wrapper and stc.device.type == "cpu",
                      comm.native_all_reduce(group))
