"""The engine step as a graph: bucketed shapes over a preallocated paged KV cache, compiled into
two graphs, the collectives inside them.

A *decode step* (every scheduled sequence feeds one token) is the function::

    decode(ids (B,), positions (B,), slots (B,), table (B, L), lens (B,)) -> logits (B, V / t)

* ``B``, the **batch bucket**: the smallest of :func:`batch_buckets` (1, 2, 4, ..., max_seqs)
  that holds the step's sequences. Rows past the real ones are padding: token 0 at position 0,
  written to the cache's null slot, attending to the null slot only (finite values, logits
  dropped).
* ``L``, the **KV-width bucket** (the gathered keys per row): the smallest power of two >= 64
  that holds the step's longest context. A row's key positions past its own length point to the
  null slot and are masked.
* The KV cache (:class:`~shardwise.serve.kv.PagedKVCache`) is allocated once; a step writes its
  new keys and values into it in place, inside the graph.

Under ``torch.compile`` (``fullgraph=True``) ``L`` is a symbolic dimension, and so is ``B`` above
1: two graphs serve every bucket, the batch of one (dynamo specializes a size of 1) and one graph
for every batch bucket above it. (A graph per batch bucket, as before, cost a server 2.3x the
start-up for no faster step: benchmarks/RESULTS.md.) Batches and widths stay bucketed all the
same: the buckets bound the padding, and on a CUDA device each ``(B, L)`` bucket is also captured
as a CUDA graph (:mod:`.graphs`, with static input buffers) and replayed, so a step costs one
launch instead of hundreds. Graphs compile (and capture) lazily on first use, or at once with
:meth:`StaticStep.warmup`; inductor's on-disk cache makes the second start fast.

A step with prefill chunks (*mixed*: prompts being fed, plus the decodes of the same step) runs
eager as one flat row ``(1, T)`` (:meth:`PagedKVCache.attend`): its matmuls over T rows dominate
it, and compiling it would add graphs per token bucket for little (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .. import comm, kernels
from ..models.attention import attention
from .graphs import CudaGraphs
from .kv import Chunk, PagedKVCache

MIN_WIDTH = 64


def batch_buckets(max_seqs: int, budget: int = 8) -> list[int]:
    """The batch buckets: powers of ``r`` from 1, then ``max_seqs`` itself, with the smallest
    ratio ``r`` in 2, 4, 8, ... that keeps the count within ``budget`` (each is a CUDA graph per
    KV width on a GPU; on the CPU they share two compiled graphs)."""
    if max_seqs < 1 or budget < 1:
        raise ValueError(f"max_seqs={max_seqs} and budget={budget} must be >= 1")
    ratio = 2
    while True:
        out, b = [], 1
        while b < max_seqs:
            out.append(b)
            b *= ratio
        out.append(max_seqs)
        if len(out) <= budget or budget == 1:
            return out[-budget:] if len(out) > budget else out
        ratio *= 2


def width_bucket(n: int, limit: int) -> int:
    """The KV width for a longest context of ``n`` tokens: the next power of two >= 64, at most
    ``limit`` (the cache's context)."""
    if n > limit:
        raise ValueError(f"a context of {n} tokens exceeds the limit of {limit}")
    w = MIN_WIDTH
    while w < n:
        w *= 2
    return min(w, max(limit, 1))


def _own_code(method):
    """``method`` bound to a private copy of its code object: dynamo keeps its compiled graphs
    (and their guards, and its limit of 8 per code object) per code object, so each step's
    graphs belong to that step and its one model."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(method.__self__):x}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name,
                                               fn.__defaults__, fn.__closure__), method.__self__)


# The model's parameters never change under a step: checking them on every call (hundreds of
# tensor guards, about 1 ms a step) buys nothing once the graphs are the step's own (_own_code).
_COMPILE_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


@dataclass(frozen=True)
class StepOptions:
    """How the engine runs its steps.

    ``compile``: decode steps through ``torch.compile`` (False: the same static-shape function,
    eager). ``cuda_graphs``: on a CUDA device, capture each decode bucket as a CUDA graph and
    replay it (compiled or eager alike; the CPU has no graphs to capture). ``max_seqs``: the
    largest batch bucket. ``max_graphs``: the most batch buckets (:func:`batch_buckets`).
    ``max_context``: the widest KV width (the model's context by default). ``freezing``:
    inductor's freezing (weights folded in as constants, linears prepacked for oneDNN); off by
    default: measured 0.90-0.96x the unfrozen decode speed (the decode products are shardwise's
    own kernels, which it does not prepack) and a 2-2.7x slower warm start (the folding is redone
    at every start); benchmarks/RESULTS.md, issue 10. ``shared_graph``: one compiled graph for
    every batch bucket above 1 (False: a graph per bucket; same step speed, 2x the compile).
    ``paged_attention``: on the CPU, attention reads the paged cache in place
    (``shardwise::paged_decode``, also for the decode rows of mixed steps, and
    ``shardwise::prefill_attention`` for their prompt chunks; False: the keys gathered, then
    SDPA). ``cpp_wrapper``: inductor's C++ wrapper on the CPU (the graph's ~300 kernel and
    operator calls made from C++ rather than from a generated Python function):
    1.09x the decode step of SmolLM2 in bf16 for 20-40 s more compile per cold graph (a warm
    start is faster); benchmarks/RESULTS.md, issue 10. ``SHARDWISE_CPP_WRAPPER=0`` in the
    environment makes False the default (the test suite does, for its compile time budget; its
    compiled == eager check at tp=1 runs the C++ wrapper).
    """

    compile: bool = True
    cuda_graphs: bool = True
    max_seqs: int = 32
    max_graphs: int = 8
    max_context: int | None = None
    freezing: bool = False
    shared_graph: bool = True
    paged_attention: bool = True
    cpp_wrapper: bool = field(default_factory=lambda: os.environ.get(
        "SHARDWISE_CPP_WRAPPER", "1") != "0")


class StaticStep:
    """One rank's step function over its shard of the model and its paged KV cache."""

    def __init__(self, model, cache: PagedKVCache, options: StepOptions = StepOptions()) -> None:
        self.model, self.cache, self.options = model, cache, options
        self.device = cache.device
        if self.device.type == "cpu":
            kernels.enable()  # before anything is traced: the decode products' kernel
            kernels.tile_weights(model)  # dense weights in its tiles (held once)
            comm.prepare(model.group)  # its all-reduces as the C++ operator where they can
        self.buckets = batch_buckets(options.max_seqs, options.max_graphs)
        # decode attention over the paged cache in place (CPU; else gathered, then SDPA)
        self.paged = self.device.type == "cpu" and options.paged_attention and \
            cache.dtype in (torch.float32, torch.bfloat16) and kernels.paged_decode_available()
        cache.paged = self.paged  # the flat step's decode rows and prompt chunks too
        self.limit = min(options.max_context or model.config.max_position_embeddings,
                         cache.num_blocks * cache.block_size)
        self._decode_fn = self._decode
        # The static decode reads every key of a row up to its length: no sliding windows, and
        # longrope's restart needs the flat step; such models run every step eager (flat).
        # A mixture of experts routes with data-dependent shapes (and all-to-alls): eager too.
        self.static = model.long_after is None and model.config.arch.mlp != "moe" and all(
            layer.self_attn.params.window is None for layer in model.model.layers.values())
        if options.compile and self.static:
            self._decode_fn = torch.compile(_own_code(self._decode), fullgraph=True,
                                            dynamic=False, options=_COMPILE_OPTIONS
                                            | {"freezing": options.freezing, "cpp_wrapper":
                                               options.cpp_wrapper and self.device.type == "cpu"})
        self.graphs: set[int] = set()  # batch buckets run so far (compiled once each)
        self.cuda = CudaGraphs(self._decode_fn, self.device, prepare=self._mark) \
            if options.cuda_graphs and self.device.type == "cuda" and self.static else None

    @property
    def graph_count(self) -> int:
        """Graphs ready: CUDA graphs captured, else compiled graphs (the batch of one, and one
        for every bucket above; eager: 0)."""
        if self.cuda is not None:
            return len(self.cuda.graphs)
        if not self.options.compile:
            return 0
        return (1 in self.graphs) + any(b > 1 for b in self.graphs)

    def _mark(self, static) -> None:
        """The KV width is a symbolic dimension of the compiled graph."""
        if self.options.compile:
            torch._dynamo.mark_dynamic(static.table, 1)

    # ------------------------------------------------------------------ the graph
    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        B, L = table.shape
        mask = (torch.arange(L, device=table.device) < lens.unsqueeze(1)).view(B, 1, 1, L)
        cache = self.cache

        def attend(layer: int, q, k, v, kv_index, params):
            """q (B, nq, 1, d); k, v (B, nkv, 1, d) -> (B, nq, 1, d)."""
            kc, vc = cache.k[layer], cache.v[layer]
            kc.index_copy_(0, slots, k.reshape(B, -1))            # (B, nkv * d)
            vc.index_copy_(0, slots, v.reshape(B, -1))
            if self.paged:  # the keys read where they lie, each once per KV head
                kv_of = cache.kv_of if kv_index is None else kv_index
                o = torch.ops.shardwise.paged_decode(q.reshape(B, cache.nq, cache.d), kc, vc,
                                                     table, lens, kv_of, params.scale,
                                                     params.softcap or 0.0)
                return o.view(B, cache.nq, 1, cache.d)
            keys = kc[table].view(B, L, cache.nkv, cache.d).transpose(1, 2)  # (B, nkv, L, d)
            vals = vc[table].view(B, L, cache.nkv, cache.d).transpose(1, 2)
            g = cache.group
            if g:  # the g query heads of each KV head form its query "sequence"
                qd = q.reshape(B, cache.nkv, g, cache.d)                       # (B, nkv, g, d)
            else:
                qd = q
                keys, vals = keys.index_select(1, kv_index), vals.index_select(1, kv_index)
            o = attention(qd, keys, vals, params, mask=mask)  # scale, soft-cap: the layer's
            return o.reshape(B, cache.nq, 1, cache.d)

        return self.model(ids.view(B, 1), pos.view(B, 1), attend)[:, 0]  # (B, V / t)

    # ------------------------------------------------------------------ inputs
    def decode_inputs(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, ...]:
        """Static-shape inputs of a decode step (every chunk one token), on the step's device."""
        return tuple(t.to(self.device) for t in self.host_inputs(chunks))

    def host_inputs(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, ...]:
        """:meth:`decode_inputs` on the CPU: ``ids, pos, slots (B,), table (B, L), lens (B,)``.
        Built in numpy: a few small arrays, where torch's per-operator dispatch cost more than the
        work (1 row 16 us vs 111 us with torch operators, 16 rows 68 vs 188 us, of a ~12 ms
        batch-1 step). Every position past a row's length or its blocks reads the null slot."""
        n = len(chunks)
        B = next((b for b in self.buckets if b >= n), None)
        if B is None:
            raise ValueError(f"{n} sequences in a step exceed max_seqs={self.options.max_seqs}")
        bs, null = self.cache.block_size, self.cache.null_slot
        ctx = [c.start + 1 for c in chunks]
        L = width_bucket(max(ctx), self.limit)
        nb = -(-L // bs)
        table = np.full((B, L), null, dtype=np.int64)
        lane = np.arange(bs, dtype=np.int64)
        for i, c in enumerate(chunks):
            row = (np.asarray(c.blocks[:nb], dtype=np.int64)[:, None] * bs + lane).reshape(-1)
            m = min(ctx[i], row.size)
            table[i, :m] = row[:m]
        table[table < 0] = null  # a block of -1: none
        lens = np.asarray(ctx + [1] * (B - n), dtype=np.int64)
        ids = np.asarray([c.tokens[0] for c in chunks] + [0] * (B - n), dtype=np.int64)
        pos = np.asarray([c.start for c in chunks] + [0] * (B - n), dtype=np.int64)
        slots = table[np.arange(B), np.minimum(pos, L - 1)]
        slots[n:] = null
        return tuple(torch.from_numpy(a) for a in (ids, pos, slots, table, lens))

    # ------------------------------------------------------------------ running
    def __call__(self, chunks: Sequence[Chunk],
                 rows: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Run one step; local logits ``(len(rows), V / t)`` of the wanted rows, each named
        ``(chunk index, token index within the chunk)``; by default the last token of every
        chunk that samples, in order."""
        if rows is None:
            rows = [(i, len(c.tokens) - 1) for i, c in enumerate(chunks) if c.sample]
        if self.static and chunks and all(len(c.tokens) == 1 for c in chunks):
            host = self.host_inputs(chunks)
            self.graphs.add(host[0].shape[0])
            if self.cuda is not None and self.cuda.fits(host[3].shape[1]):
                logits = self.cuda.run(*host)                                  # (B, V / t)
            else:
                args = tuple(t.to(self.device) for t in host)
                torch._dynamo.mark_dynamic(args[3], 1)
                if args[0].shape[0] > 1 and self.options.shared_graph:  # one graph for B > 1
                    for t in args:
                        torch._dynamo.mark_dynamic(t, 0)
                logits = self._decode_fn(*args)                                # (B, V / t)
            picked = [i for i, _ in rows]
            if self.cuda is None and picked == list(range(len(picked))):
                # the graph's output is new every call: a view, not a gathered copy (an index
                # kernel: ~70 us a step with the caches cold after the weights, a slice ~8 us)
                return logits[:len(picked)]
            return logits[picked]  # a copy (CUDA graphs replay into the same output)
        ids, pos, last = self.cache.prepare(list(chunks))
        flat = [last[i] + 1 - len(chunks[i].tokens) + j for i, j in rows]
        return self.model(ids, pos, self.cache.attend, rows=flat,
                          long_rope=self.cache.long_rope)[0]

    def warmup(self) -> None:
        """Compile (or load from the cache) every batch bucket's graph now, and on CUDA capture
        each at the narrowest KV width (eager on the CPU, or a model the static step does not
        serve: nothing)."""
        if not self.static or (not self.options.compile and self.cuda is None):
            return
        for B in self.buckets:
            chunks = [Chunk(-1, [0], 0, [0], True) for _ in range(B)]
            self(chunks)
