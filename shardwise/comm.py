"""Differentiable collectives, named by their forward/backward pair, and the collective ledger.

Megatron-LM's names, for a tensor-parallel group of t ranks:

==========================  =====================  =====================
function                    forward                backward
==========================  =====================  =====================
``copy_to_tp``   (*f*)      identity               all-reduce
``reduce_from_tp`` (*g*)    all-reduce             identity
``gather_from_tp``          all-gather (last dim)  split (keep own slice)
``scatter_to_tp``           split (last dim)       all-gather
``gather_seq``              all-gather (seq dim)   reduce-scatter
``reduce_scatter_seq``      reduce-scatter (seq)   all-gather
``scatter_seq``             split (seq dim)        all-gather
``sum_partial``             all-reduce             all-reduce
``all_to_all``              all-to-all (dim 0)     all-to-all (splits swapped)
==========================  =====================  =====================

``sum_partial`` is for a statistic every rank holds part of whose consumers are partial too (the
mean square of q over all heads when each rank holds some heads): both directions sum.
``all_to_all`` exchanges rows of uneven counts (expert parallelism): rank r sends rows
``[sum(in_splits[:j]), ...)`` to rank j; its backward sends the gradients back the same way.

Each backward is its dual's forward. Every function takes its group explicitly and returns its
input unchanged when the group has one rank (``None``). Sizes along the last dimension may differ
by rank (uneven head splits): pass ``sizes``. Sequence-parallel splits must be even.

The :class:`~shardwise.ledger.Ledger` (re-exported here) counts every collective issued through
``torch.distributed`` while it is active, so code here calls ``dist.<op>`` at call time; the
shared-memory path reports its collectives to it directly. The shared-memory path has no
all-to-all: ``all_to_all`` and ``exchange_counts`` always use torch.distributed (gloo or NCCL).
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .ledger import Ledger, Tally, Unrecorded, record  # noqa: F401 - re-exported
from .mesh import ProcessGroup, group_rank, group_size
from . import shm
from .shm import PeerError

# --------------------------------------------------------------------------- backends
# CPU groups whose ranks share a host use shared memory (shardwise.shm); everything else, and
# every group when disabled with configure(shared_memory=False), uses torch.distributed.

_SETTINGS = {"shared_memory": True, "capacity": 8 << 20, "timeout_s": 300.0, "native": True}
_SHM: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # group -> shm or None


def configure(*, shared_memory: bool | None = None, capacity: int | None = None,
              timeout_s: float | None = None, native: bool | None = None) -> None:
    """Choose the collective path for groups set up from now on (existing ones keep theirs).
    ``native``: shared-memory sums by the C++ operator once the kernels are loaded (else Python)."""
    for k, v in (("shared_memory", shared_memory), ("capacity", capacity), ("timeout_s", timeout_s),
                 ("native", native)):
        if v is not None:
            _SETTINGS[k] = v


def use_torch_distributed(group: ProcessGroup) -> None:
    """Pin ``group`` to torch.distributed's own collectives (gloo / NCCL), never shared memory.
    (A rank outside the group gets a placeholder instead of a group: nothing to pin.)"""
    if isinstance(group, ProcessGroup):
        _SHM[group] = None


def _shm_for(group: ProcessGroup | None, x: torch.Tensor):
    if group is None or x.device.type != "cpu":
        return None
    key = group
    if key not in _SHM:  # collective: every rank of the group reaches its first call together
        with Unrecorded():
            ok = _SETTINGS["shared_memory"] and dist.get_backend(group) == "gloo" \
                and shm.same_host(group)
            _SHM[key] = shm.ShmCommunicator(group, capacity=_SETTINGS["capacity"],
                                            timeout_s=_SETTINGS["timeout_s"],
                                            native=_SETTINGS["native"]) if ok else None
    return _SHM[key]


def backend_name(group: ProcessGroup | None) -> str:
    """The path collectives on ``group`` take: "none" (one rank), "shm", or the dist backend."""
    if group_size(group) == 1:
        return "none"
    return "shm" if _SHM.get(group) is not None else dist.get_backend(group)


def all_reduce_(x: torch.Tensor, group: ProcessGroup | None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) of a contiguous tensor; returns ``x``."""
    if group_size(group) == 1:
        return x
    comm = _shm_for(group, x)
    if comm is None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return x
    if comm.native and op == "sum" and x.dtype in NATIVE_DTYPES:
        try:  # counted by the operator itself (the ledger reads its counters)
            x.copy_(torch.ops.shardwise.shm_all_reduce(x, comm.name))
        except RuntimeError as e:
            if str(e).startswith("shared-memory"):
                raise PeerError(str(e).splitlines()[0]) from None
            raise
        return x
    start = time.perf_counter()
    comm.all_reduce(x, op)
    record("all_reduce", x.numel() * x.element_size(), time.perf_counter() - start)
    return x


NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def native_all_reduce(group: ProcessGroup | None) -> bool:
    """Whether ``group``'s all-reduces (sums) run as the C++ operator
    ``shardwise::shm_all_reduce``."""
    return group_size(group) > 1 and group_key(group) in shm.NATIVE


def prepare(group: ProcessGroup | None) -> None:
    """Set up ``group``'s collective path now rather than at its first collective (collective:
    every rank of the group calls it), the native all-reduce included when the kernels are
    loaded. An engine calls it before it compiles a step, so that the graph holds the operator
    that will run: ``shardwise::shm_all_reduce`` where it can, else ``shardwise::all_reduce``."""
    if group_size(group) == 1:
        return
    global _native
    # marked here, not where it is defined: the mark imports dynamo, 1.2 s a process that
    # never compiles (every CLI call, every rank of an eager run)
    _native = torch.compiler.assume_constant_result(_native)
    comm = _shm_for(group, torch.empty(0))
    if comm is not None:
        comm.attach_native()


def _native(key: str) -> bool:
    """Whether ``group``'s sums run in C++ (read once when a graph is traced: :func:`prepare`
    marks it a constant for dynamo)."""
    return key in shm.NATIVE


# --------------------------------------------------------------------------- raw helpers

def all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over ``group`` into a new tensor (the input is left as it was). One operator
    to ``torch.compile`` (``shardwise::all_reduce``): a compiled graph keeps it in place."""
    if group_size(group) == 1:
        return x
    key = group_key(group)
    if x.device.type == "cpu" and x.dtype in NATIVE_DTYPES and _native(key):
        return torch.ops.shardwise.shm_all_reduce(x, key)  # shared memory, no Python
    return torch.ops.shardwise.all_reduce(x, key)


def gather_stacked(x: torch.Tensor, group: ProcessGroup | None, t: int) -> torch.Tensor:
    """``(t, *x.shape)``: every rank's ``x``, stacked in rank order (one collective, one
    operator to ``torch.compile``: ``shardwise::all_gather``)."""
    return torch.ops.shardwise.all_gather(x, group_key(group), t)


# --------------------------------------------------------------------------- graph operators
# torch.compile sees each collective as one custom operator with a fake (shape-only)
# implementation, so a compiled step keeps its collectives inside the graph instead of breaking
# at each of them. At run time the operator calls the path above (shared memory, gloo or NCCL;
# counted by the ledger as before). An operator's schema holds strings, not process groups:
# groups travel by name.

def group_key(group: ProcessGroup) -> str:
    """The name a graph operator uses for ``group`` (torch.distributed's unique group name)."""
    return group.group_name


def _group(key: str) -> ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(key)


@torch.library.custom_op("shardwise::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, group: str) -> torch.Tensor:
    return all_reduce_(x.contiguous().clone(), _group(group))


@_all_reduce_op.register_fake
def _(x: torch.Tensor, group: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("shardwise::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, group: str, t: int) -> torch.Tensor:
    return _gather_stacked(x, _group(group), t)


@_all_gather_op.register_fake
def _(x: torch.Tensor, group: str, t: int) -> torch.Tensor:
    return x.new_empty((t,) + tuple(x.shape))


def _gather_stacked(x: torch.Tensor, group: ProcessGroup, t: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((t * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm = _shm_for(group, x)
    if comm is None:
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, x, group=group)
    else:
        start = time.perf_counter()
        comm.all_gather(out, x)
        record("all_gather", out.numel() * out.element_size(), time.perf_counter() - start)
    return out.view((t,) + tuple(x.shape))


def all_gather_last(x: torch.Tensor, group: ProcessGroup | None,
                    sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension; ``sizes`` for uneven pieces."""
    t = group_size(group)
    if t == 1:
        return x
    width = max(sizes) if sizes else x.shape[-1]
    if x.shape[-1] < width:  # pad uneven pieces to a common width, gather, trim
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    out = gather_stacked(x, group, t)
    pieces = [out[r][..., : (sizes[r] if sizes else width)] for r in range(t)]
    return torch.cat(pieces, dim=-1)


def split_last(x: torch.Tensor, group: ProcessGroup | None,
               sizes: Sequence[int] | None = None) -> torch.Tensor:
    t = group_size(group)
    if t == 1:
        return x
    sizes = list(sizes) if sizes else [x.shape[-1] // t] * t
    if sum(sizes) != x.shape[-1]:
        raise ValueError(f"cannot split a last dimension of {x.shape[-1]} into {sizes}")
    r = group_rank(group)
    start = sum(sizes[:r])
    return x[..., start:start + sizes[r]].contiguous()


def _check_seq(n: int, t: int, dim: int) -> None:
    if n % t:
        raise ValueError(f"sequence parallelism splits dimension {dim} of size {n} over tp={t} "
                         f"ranks: it must be divisible; pad the sequence to {-(-n // t) * t}")


def all_gather_dim(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    t = group_size(group)
    if t == 1:
        return x
    out = gather_stacked(x, group, t)
    # (t, ..., n/t, ...) -> (..., t, n/t, ...) -> (..., n, ...)
    out = out.movedim(0, dim)
    return out.reshape(x.shape[:dim] + (t * x.shape[dim],) + x.shape[dim + 1:])


def reduce_scatter_dim(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    t = group_size(group)
    if t == 1:
        return x
    _check_seq(x.shape[dim], t, dim)
    # (..., n, ...) -> (t, ..., n/t, ...) contiguous so that rank r's piece is one block
    parts = x.reshape(x.shape[:dim] + (t, x.shape[dim] // t) + x.shape[dim + 1:])
    parts = parts.movedim(dim, 0).contiguous()
    out = torch.empty(parts.shape[1:], dtype=x.dtype, device=x.device)
    comm = _shm_for(group, x)
    if comm is None:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, parts.view((-1,) + tuple(parts.shape[2:])), group=group)
    else:
        start = time.perf_counter()
        comm.reduce_scatter(out, parts)
        record("reduce_scatter", parts.numel() * parts.element_size(), time.perf_counter() - start)
    return out


def exchange_counts(counts: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``counts`` (n, ...) int64, row j for rank j of ``group`` -> (n, ...): row j is what rank j
    sent this rank (one ``all_to_all_single``; the layouts of an all-to-all before its payload)."""
    if group_size(group) == 1:
        return counts
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    return out


def _all_to_all_rows(x: torch.Tensor, group: ProcessGroup | None,
                     splits: tuple[tuple[int, ...], tuple[int, ...]]) -> torch.Tensor:
    """Rows ``in_splits[j]`` of ``x`` (in order) to rank j; ``out_splits[j]`` rows from rank j."""
    out_splits, in_splits = splits
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group)
    return out


def _all_to_all_back(dy: torch.Tensor, group: ProcessGroup | None,
                     splits: tuple[tuple[int, ...], tuple[int, ...]]) -> torch.Tensor:
    return _all_to_all_rows(dy, group, (splits[1], splits[0]))


def split_dim(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    t = group_size(group)
    if t == 1:
        return x
    _check_seq(x.shape[dim], t, dim)
    return x.chunk(t, dim=dim)[group_rank(group)].contiguous()


# --------------------------------------------------------------------------- autograd pairs

def _pair(name: str, forward: Callable[..., torch.Tensor],
          backward: Callable[..., torch.Tensor]) -> type[torch.autograd.Function]:
    """An autograd function whose backward is its dual collective: ``forward(x, group, arg)``
    and ``backward(dy, group, arg)``, ``arg`` being the split sizes or the sequence dimension."""
    def fwd(ctx, x, group, arg):
        ctx.group, ctx.arg = group, arg
        return forward(x, group, arg)

    def bwd(ctx, dy):
        return backward(dy, ctx.group, ctx.arg), None, None

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(x: torch.Tensor, group: Any, arg: Any) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group: Any, arg: Any) -> torch.Tensor:
    return all_reduce(x, group)


_CopyToTP = _pair("_CopyToTP", _identity, _sum)
_ReduceFromTP = _pair("_ReduceFromTP", _sum, _identity)
_GatherFromTP = _pair("_GatherFromTP", all_gather_last, split_last)
_ScatterToTP = _pair("_ScatterToTP", split_last, all_gather_last)
_GatherSeq = _pair("_GatherSeq", all_gather_dim, reduce_scatter_dim)
_ReduceScatterSeq = _pair("_ReduceScatterSeq", reduce_scatter_dim, all_gather_dim)
_ScatterSeq = _pair("_ScatterSeq", split_dim, all_gather_dim)
_SumPartial = _pair("_SumPartial", _sum, _sum)
_AllToAll = _pair("_AllToAll", _all_to_all_rows, _all_to_all_back)


def _trivial(group: ProcessGroup | None) -> bool:
    return group_size(group) == 1


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """*f*: identity forward, all-reduce backward. Enters a tensor-parallel region."""
    return x if _trivial(group) else _CopyToTP.apply(x, group, None)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """*g*: all-reduce forward, identity backward. Leaves a tensor-parallel region. Without a
    gradient to carry (inference) it is the bare all-reduce operator."""
    if _trivial(group):
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return all_reduce(x, group)
    return _ReduceFromTP.apply(x, group, None)


def gather_from_tp(x: torch.Tensor, group: ProcessGroup | None,
                   sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All-gather along the last dimension forward; keep own slice backward."""
    return x if _trivial(group) else _GatherFromTP.apply(x, group, tuple(sizes) if sizes else None)


def scatter_to_tp(x: torch.Tensor, group: ProcessGroup | None,
                  sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Keep own slice of the last dimension forward; all-gather backward."""
    return x if _trivial(group) else _ScatterToTP.apply(x, group, tuple(sizes) if sizes else None)


def gather_seq(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: all-gather along ``dim`` forward, reduce-scatter backward."""
    return x if _trivial(group) else _GatherSeq.apply(x, group, dim)


def reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: reduce-scatter along ``dim`` forward, all-gather backward."""
    return x if _trivial(group) else _ReduceScatterSeq.apply(x, group, dim)


def scatter_seq(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Enter sequence parallelism: keep own piece of ``dim`` forward, all-gather backward."""
    return x if _trivial(group) else _ScatterSeq.apply(x, group, dim)


def sum_partial(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-reduce forward and backward: a sum of per-rank parts whose gradient is per-rank too."""
    return x if _trivial(group) else _SumPartial.apply(x, group, None)


def all_to_all(x: torch.Tensor, group: ProcessGroup | None, *, out_splits: Sequence[int],
               in_splits: Sequence[int]) -> torch.Tensor:
    """Send ``in_splits[j]`` consecutive rows of ``x`` to rank j and receive ``out_splits[j]``
    rows from rank j, in rank order: (sum(in_splits), ...) -> (sum(out_splits), ...). Backward
    sends the rows' gradients back (the same call with the splits swapped)."""
    if _trivial(group):
        return x
    return _AllToAll.apply(x, group, (tuple(int(n) for n in out_splits),
                                      tuple(int(n) for n in in_splits)))
