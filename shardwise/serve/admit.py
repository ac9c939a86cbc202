"""Rank 0's last word on a request before it reaches the scheduler, and the per-request sampler.

The HTTP server checks every field first; this is the engine's own check, for any caller of the
engine (the server, a benchmark, a test), so that nothing a request carries can raise inside a
step on the workers: token ids within the vocabulary, a length that fits the context and the KV
cache, and a sampler that can be built (:func:`make_sampler` is the one the workers use).
"""
from __future__ import annotations

import torch

from ..sampling import SamplingParams
from .kv import blocks_for
from .scheduler import SamplerSpec, Sequence


def make_sampler(spec: SamplerSpec, device: torch.device | str = "cpu"
                 ) -> tuple[SamplingParams, torch.Generator]:
    """The sampling parameters and the seeded generator of one sequence, on the engine's
    ``device`` (its noise is drawn there; every rank's generator draws the same); raises
    ValueError or RuntimeError on values that cannot be used, e.g. a seed outside torch's 64-bit
    range."""
    params = SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                            seed=spec.seed)
    return params, torch.Generator(device=device).manual_seed(spec.seed)


def admission_error(seq: Sequence, *, vocab: int, context: int, num_blocks: int,
                    block_size: int, need: int | None = None,
                    max_seqs: int | None = None) -> str | None:
    """Why ``seq`` (with its followers: the other samples of its prompt) cannot run on this
    engine, or ``None``. ``need``: the blocks it holds at its longest when that is not its whole
    length (``Scheduler.blocks_needed``: a window's worth when every layer slides)."""
    n, samples = len(seq.prompt), 1 + len(seq.followers)
    if n == 0:
        return "the prompt is empty"
    bad = next((t for t in seq.prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
    if bad is not None:
        return f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})"
    if not isinstance(seq.max_tokens, int) or seq.max_tokens < 1:
        return f"max_tokens={seq.max_tokens!r} must be an integer >= 1"
    if n + seq.max_tokens > context:
        return (f"{n} prompt + {seq.max_tokens} new tokens exceed the model's context of "
                f"{context} tokens")
    if need is None:  # the blocks it holds at its longest (``Scheduler.blocks_needed``)
        need = blocks_for(n + seq.max_tokens, block_size)
    if need > num_blocks:
        return (f"{n} prompt + {seq.max_tokens} new tokens need {need} KV blocks but the cache "
                f"has {num_blocks}")
    # a windowed prompt starts with a chunk's blocks, never more than it holds at its longest
    start = min(blocks_for(n + 1, block_size), need) + (samples - 1) * (n % block_size > 0)
    if start > num_blocks:
        return (f"n={samples} samples of a {n}-token prompt need {start} KV blocks to start but "
                f"the cache has {num_blocks}")
    if max_seqs is not None and samples > max_seqs:
        return f"n={samples} samples exceed the {max_seqs} sequences a step runs (--max-seqs)"
    for s in (seq, *seq.followers):
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(s.spec, name)
            if k is not None and not (isinstance(k, int) and 0 <= k <= vocab):
                return f"{name}={k!r} must be in [0, {vocab}]"
        try:
            make_sampler(s.spec)
        except (ValueError, RuntimeError, TypeError, OverflowError) as e:
            return f"invalid sampling parameters: {e}"
    return None
