"""Selective activation recomputation: cheap element-wise pieces rebuilt in backward.

Megatron-Core's ``layernorm`` and ``moe_act`` recompute modules (``CheckpointWithoutOutput``) run a
cheap function without keeping its output: the function's internals are not saved, and its output,
which the next operation (a matmul) would save for its own backward, is dropped after that
operation's forward and recomputed from the function's inputs just before that backward needs it.
Here the same is done with torch's saved-tensor hooks::

    rc = Recompute()
    with rc:                                   # hooks for everything saved inside
        n = rc(rms_norm, x, weight, eps)       # internals not saved; n marked recomputable
        y = linear(n)                          # linear's saved copy of n -> a recipe
    # backward: linear's backward unpacks the recipe -> rms_norm(x, weight) is recomputed once
    #           (with grad) and serves both linear's backward and rms_norm's own backward.

The inputs of a recomputed function must be tensors that stay stored anyway (the residual stream,
a matmul's output): then nothing is stored twice and only element-wise work runs again, no matmul
and no collective. Saved tensors that are not recomputable go to the enclosing saved-tensor hooks
if there are any (CPU offloading, the memory benchmark's meter), so this composes with them.
Recomputation reproduces the forward bit for bit (same ops, same inputs, the autocast state of
the forward).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch


class _Call:
    """One recomputed call: the function, its inputs, and in backward its rebuilt graph."""

    def __init__(self, fn: Callable, args: tuple, autocast: tuple[bool, torch.dtype, str]) -> None:
        self.fn, self.args, self.autocast = fn, args, autocast
        self.graph: tuple[list, tuple] | None = None  # (detached inputs, outputs with grad)

    def rebuild(self) -> tuple[list, tuple]:
        """Run ``fn`` again with grad on detached inputs (once per backward)."""
        if self.graph is None:
            inputs = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                      for a in self.args]
            enabled, dtype, device = self.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = self.fn(*inputs)
            self.graph = (inputs, out if isinstance(out, tuple) else (out,))
        return self.graph


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return call.fn(*call.args)

    @staticmethod
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 - releases the saved inputs' hooks in order
        inputs, outs = ctx.call.rebuild()
        ctx.call.graph, ctx.call.args = None, ()
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        leaves = [a for a in inputs if torch.is_tensor(a) and a.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                  allow_unused=True) if pairs and leaves else []
        by_id = {id(a): g for a, g in zip(leaves, got)}
        return (None,) + tuple(by_id.get(id(a)) for a in inputs if torch.is_tensor(a))


class _Token:
    """What a consumer saves instead of a recomputable tensor: how to get it back."""

    __slots__ = ("call", "index", "size", "stride", "offset")

    def __init__(self, call: _Call, index: int, t: torch.Tensor, base: torch.Tensor) -> None:
        self.call, self.index = call, index
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - base.storage_offset()


class Recompute:
    """The saved-tensor hooks of one region (a decoder layer) and its recomputable outputs."""

    def __init__(self) -> None:
        self._marked: dict[int, tuple[weakref.ref, _Call, int]] = {}
        self._outer: tuple[Callable, Callable] | None = None
        self._hooks: Any = None

    def __call__(self, fn: Callable, *args: Any):
        """``fn(*args)`` whose internals are not saved and whose output(s) are recomputed for
        any consumer in this region. ``args`` that are tensors get gradients."""
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        state = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        call = _Call(fn, args, state)
        out = _Recomputed.apply(call, *[a for a in args if torch.is_tensor(a)])
        for i, o in enumerate(out if isinstance(out, tuple) else (out,)):
            self._marked[o.untyped_storage().data_ptr()] = (weakref.ref(o), call, i)
        return out

    def _pack(self, t: torch.Tensor) -> Any:
        hit = self._marked.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if hit is not None:
            base = hit[0]()
            if base is not None and base.untyped_storage().data_ptr() == \
                    t.untyped_storage().data_ptr():
                return _Token(hit[1], hit[2], t, base)
        return (self._outer[0](t),) if self._outer else t

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Token):
            out = packed.call.rebuild()[1][packed.index].detach()
            return out.as_strided(packed.size, packed.stride,
                                  out.storage_offset() + packed.offset)
        return self._outer[1](packed[0]) if isinstance(packed, tuple) else packed

    def __enter__(self) -> "Recompute":
        self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._marked.clear()


class NoRecompute:
    """The same interface, storing everything: ``rc(fn, *args)`` is ``fn(*args)``."""

    def __call__(self, fn: Callable, *args: Any):
        return fn(*args)

    def __enter__(self) -> "NoRecompute":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
