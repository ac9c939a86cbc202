"""The step plan on the wire: one flat int64 tensor that rank 0 broadcasts each step.

A :class:`~.scheduler.StepPlan` is a few lists of integers (token ids, positions, block tables,
sequence ids), a few sampler settings and, for structured output, packed token masks. Encoded as
one ``int64`` vector it travels with two ``dist.broadcast`` calls (its length, then the vector) on
whatever backend the TP group has: gloo from CPU memory, NCCL from the GPU, where a pickled object
(``broadcast_object_list``) would cost a pickle, a size exchange and host copies on every rank.

Layout (every field one int64 unless said)::

    header   stop, n_chunks, n_new, n_drop, n_masks, n_copies
    chunk    seq_id, start, flags (1: sample, 2: long_rope), group (expert parallelism),
             n_tokens, n_blocks, n_forks, n_targets (-1: None),
             tokens[n_tokens], blocks[n_blocks], forks[n_forks], targets[n_targets]
    new      seq_id, temperature (float64 bits), top_k, top_p (float64 bits),
             seed_hi, seed_lo (seed = hi * 2**32 + lo), logprobs (-1: None), prompt_logprobs (-1)
    drop     seq_id
    mask     seq_id, n_words, the int32 words two to an int64 (the last padded with 0)
    copy     src, dst
"""
from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from .kv import Chunk
from .scheduler import SamplerSpec, StepPlan

_NONE = -1


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


def _opt(x: int | None) -> int:
    return _NONE if x is None else int(x)


def encode(plan: StepPlan) -> torch.Tensor:
    """``plan`` as a 1-D int64 tensor (CPU)."""
    out = [int(plan.stop), len(plan.chunks), len(plan.new), len(plan.drop), len(plan.masks),
           len(plan.copies)]
    for c in plan.chunks:
        targets = c.targets if c.targets is not None else []
        out += [c.seq_id, c.start, int(c.sample) | int(c.long_rope) << 1, c.group,
                len(c.tokens), len(c.blocks), len(c.forks),
                _NONE if c.targets is None else len(targets)]
        out += c.tokens
        out += c.blocks
        out += c.forks
        out += targets
    for sid, sp in plan.new.items():
        seed = int(sp.seed)
        out += [sid, _f2i(sp.temperature), int(sp.top_k), _f2i(sp.top_p), seed >> 32,
                seed & 0xFFFFFFFF, _opt(sp.logprobs), _opt(sp.prompt_logprobs)]
    out += plan.drop
    for sid, packed in plan.masks.items():
        words = torch.frombuffer(bytearray(packed), dtype=torch.int32)
        if words.numel() % 2:
            words = torch.cat([words, words.new_zeros(1)])
        out += [sid, len(packed) // 4, *words.view(torch.int64).tolist()]
    for src, dst in plan.copies:
        out += [src, dst]
    return torch.tensor(out, dtype=torch.int64)


def decode(buf: torch.Tensor) -> StepPlan:
    """The :class:`StepPlan` that :func:`encode` wrote into ``buf``."""
    v = buf.tolist()
    stop, n_chunks, n_new, n_drop, n_masks, n_copies = v[:6]
    at = 6

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return v[at - n:at]

    plan = StepPlan(stop=bool(stop))
    for _ in range(n_chunks):
        sid, start, flags, group, nt, nb, nf, ntg = take(8)
        tokens, blocks, forks = take(nt), take(nb), take(nf)
        targets = None if ntg == _NONE else take(ntg)
        plan.chunks.append(Chunk(sid, tokens, start, blocks, sample=bool(flags & 1),
                                 long_rope=bool(flags & 2), forks=forks, targets=targets,
                                 group=group))
    for _ in range(n_new):
        sid, temp, top_k, top_p, hi, lo, lp, plp = take(8)
        plan.new[sid] = SamplerSpec(temperature=_i2f(temp), top_k=top_k, top_p=_i2f(top_p),
                                    seed=(hi << 32) | lo, logprobs=None if lp == _NONE else lp,
                                    prompt_logprobs=None if plp == _NONE else plp)
    plan.drop = take(n_drop)
    for _ in range(n_masks):
        sid, n_words = take(2)
        words = torch.tensor(take((n_words + 1) // 2), dtype=torch.int64).view(torch.int32)
        plan.masks[sid] = words[:n_words].numpy().tobytes()
    plan.copies = [tuple(take(2)) for _ in range(n_copies)]
    return plan


def broadcast(plan: StepPlan | None, group, device: torch.device) -> StepPlan:
    """Rank 0 of ``group`` sends ``plan``; every rank returns it. Two broadcasts from ``device``
    (the group's: the GPU under NCCL, the CPU under gloo): the length, then the vector."""
    if plan is not None:
        body = encode(plan)
        size = torch.tensor([body.numel()], dtype=torch.int64)
        body = body.to(device)
    else:
        size, body = torch.zeros(1, dtype=torch.int64), None
    size = size.to(device)
    src = dist.get_global_rank(group, 0)
    dist.broadcast(size, src=src, group=group)
    if body is None:
        body = torch.empty(int(size.item()), dtype=torch.int64, device=device)
    dist.broadcast(body, src=src, group=group)
    return plan if plan is not None else decode(body.cpu())
