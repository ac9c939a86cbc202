"""CUDA graphs of the decode step: one captured graph per (batch bucket, KV width), replayed
with its inputs copied into static buffers.

A decode step (:class:`~.step.StaticStep`) is ``decode(ids (B,), pos (B,), slots (B,),
table (B, L), lens (B,)) -> logits (B, V / t)``, a function of static shapes whose only state is
the preallocated KV cache it writes in place. On a GPU, a batch-1 step of a 1B model is hundreds
of small kernels: launching them from Python costs more than running them. A CUDA graph records
the kernels once (the collectives included: NCCL calls are captured too) and replays them with
one launch; it reads its inputs from the addresses it was captured with, hence
:class:`StaticInputs`: the five inputs of a bucket are views of one int64 device buffer,
``[ids | pos | slots | lens | table]`` = ``B * (4 + L)`` values, filled each step by one copy from
a pinned host buffer.

Capture: the step runs twice on a side stream first (torch.compile's traces, cuBLAS workspaces,
NCCL's first-use setup happen outside the graph), then once under capture. Every rank captures
the same bucket at the same step (the same plan everywhere), so captured collectives pair up.
These runs write the step's own keys and values to the step's own slots: running them twice
writes the same values again. Graphs share one memory pool (their intermediates are never live
at once) and are captured lazily; steps wider than :data:`MAX_WIDTH` keys run uncaptured (their
attention reads dominate the step; a graph per width would hold large intermediates).
"""
from __future__ import annotations

from typing import Callable

import torch

MAX_WIDTH = 8192


class StaticInputs:
    """The static input buffers of one ``(B, L)`` bucket on ``device``."""

    def __init__(self, B: int, L: int, device: torch.device) -> None:
        self.B, self.L = B, L
        n = B * (4 + L)
        self.flat = torch.zeros(n, dtype=torch.int64, device=device)
        pinned = device.type == "cuda"
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None
        head = self.flat[: 4 * B].view(4, B)                            # (4, B)
        self.ids, self.pos, self.slots, self.lens = head.unbind(0)
        self.table = self.flat[4 * B:].view(B, L)                       # (B, L)

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        """The decode function's arguments: ``(ids, pos, slots, table, lens)``."""
        return self.ids, self.pos, self.slots, self.table, self.lens

    def fill(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
             table: torch.Tensor, lens: torch.Tensor) -> None:
        """Copy a step's inputs (CPU tensors of this bucket's shapes) into the buffers: one
        host-to-device copy."""
        if table.shape != (self.B, self.L):
            raise ValueError(f"a step of shape {tuple(table.shape)} in the ({self.B}, {self.L}) "
                             "bucket's buffers")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        B = self.B
        h = self.host
        h[:B], h[B:2 * B], h[2 * B:3 * B], h[3 * B:4 * B] = ids, pos, slots, lens
        h[4 * B:].view(B, self.L).copy_(table)
        self.flat.copy_(h, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()


class CudaGraphs:
    """Captured decode steps by ``(B, L)``; :meth:`run` replays (capturing on first use)."""

    def __init__(self, fn: Callable[..., torch.Tensor], device: torch.device,
                 prepare: Callable[[StaticInputs], None] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.fn, self.device, self.prepare = fn, device, prepare
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, StaticInputs,
                                                 torch.Tensor]] = {}

    def fits(self, L: int) -> bool:
        return L <= MAX_WIDTH

    def run(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
            table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The step's logits ``(B, V / t)``: a view of the graph's static output, valid until
        the next replay of any graph."""
        key = tuple(table.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, pos, slots, table, lens)
        graph, static, out = self.graphs[key]
        static.fill(ids, pos, slots, table, lens)
        graph.replay()
        return out

    def _capture(self, *inputs: torch.Tensor):
        B, L = inputs[3].shape
        static = StaticInputs(B, L, self.device)
        static.fill(*inputs)
        if self.prepare is not None:
            self.prepare(static)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static.args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's own threads (HTTP, tokenizing) may run beside a capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.fn(*static.args)
        return graph, static, out
