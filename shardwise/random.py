"""Dropout under tensor parallelism: the same random numbers across TP ranks, or different ones,
on purpose.

* Activations that every TP rank holds in full (the residual stream) must be dropped identically
  on every rank, or the ranks' copies diverge: use the default generator, seeded the same across
  the TP group (but differently across pipeline stages and data-parallel replicas).
* Activations that each rank holds a different piece of (attention probabilities of its own heads,
  sequence-parallel shards) must use independent streams: ``with tracker.fork():`` switches to a
  generator seeded per TP rank, then restores the default one (Megatron's
  ``get_cuda_rng_tracker().fork()``).

:func:`dropout_like_unsharded` is the third option, used for exact tp-independence in tests: every
rank draws the mask of the *full* tensor with the same generator and keeps its own slice.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .mesh import Mesh

_TP_OFFSET = 2718


class RNGTracker:
    """Named RNG states swapped in and out of the device's default generator."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" \
            else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = self._get()
        torch.manual_seed(seed) if self.device.type == "cpu" else torch.cuda.manual_seed(seed)
        self.states[name] = self._get()
        self._set(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "tensor-parallel") -> Iterator[None]:
        if name not in self.states:
            raise ValueError(f"RNG state {name!r} was never added; known: {sorted(self.states)}")
        saved = self._get()
        self._set(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._get()
            self._set(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"default": self._get(), **{k: v.clone() for k, v in self.states.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._set(state["default"])
        self.states = {k: v.clone() for k, v in state.items() if k != "default"}


def seed_everything(mesh: Mesh, seed: int) -> RNGTracker:
    """Seed the default generator identically across a TP group (differently across PP stages and
    DP replicas) and add a ``"tensor-parallel"`` state that differs per TP rank."""
    default = seed + 100 * mesh.pp_rank + 10_000 * mesh.dp_rank
    torch.manual_seed(default)
    if mesh.device.type == "cuda":
        torch.cuda.manual_seed(default)
    tracker = RNGTracker(mesh.device)
    tracker.add("tensor-parallel", default + _TP_OFFSET + mesh.tp_rank)
    return tracker


def dropout_like_unsharded(x: torch.Tensor, p: float, *, full_size: int, start: int,
                           dim: int = -1, generator: torch.Generator | None = None,
                           training: bool = True) -> torch.Tensor:
    """Dropout of this rank's slice ``[start, start + x.shape[dim])`` of a tensor whose ``dim`` has
    ``full_size`` elements, with the mask the unsharded computation would draw."""
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[dim] = full_size
    keep = torch.rand(shape, generator=generator, device=x.device) >= p
    keep = keep.narrow(dim, start, x.shape[dim])
    return x * keep / (1.0 - p)
