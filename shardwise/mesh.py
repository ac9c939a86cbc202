"""The TP x EP x DP x PP grid of ranks and its process groups.

The grid is one line, ``torch.arange(world).view(pp, dp, ep, tp)``: TP innermost, so the ranks of a
tensor-parallel group are neighbours (one node, the fastest links), then expert parallelism, then
data parallelism, then pipeline stages outermost (Megatron-LM's order tp-ep-dp-pp). For world 8
with tp=2, pp=2, dp=2 (ep=1)::

    pp stage 0: dp 0 -> ranks [0, 1]   dp 1 -> ranks [2, 3]
    pp stage 1: dp 0 -> ranks [4, 5]   dp 1 -> ranks [6, 7]

TP groups are the rows ``[0,1] [2,3] [4,5] [6,7]``, DP groups ``[0,2] [1,3] [4,6] [5,7]`` and PP
groups ``[0,4] [1,5] [2,6] [3,7]``.

Expert parallelism (``ep``) places ``ep`` TP groups side by side that run different tokens through
the dense layers (data-parallel there) and split the experts of every mixture-of-experts layer
between them, exchanging tokens with all-to-alls (:mod:`shardwise.models.moe`). EP groups are the
ranks with the same (pp, dp, tp) coordinates: for tp=2, ep=2 (world 4) TP groups ``[0,1] [2,3]``,
EP groups ``[0,2] [1,3]``. With ``ep=1`` the grid, the groups and every rank's coordinates are
those of the TP x PP x DP grid.

This module is the one place that reads the launcher's environment (torchrun's RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): :func:`launch_env`. Everything else
receives a :class:`Mesh`, a group or a :class:`LaunchEnv`. A group of one rank is represented by
``None``: every collective is a no-op on it.

The device follows the mesh (:func:`pick_device`): ``cuda:LOCAL_RANK`` with NCCL when CUDA is
present, the CPU with gloo (and shardwise's shared-memory collectives) otherwise; ``"cpu"`` or
``"cuda"`` overrides the choice, and asking for CUDA where there is none is an error that says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@dataclass(frozen=True)
class LayoutOnly:
    """Stands in for a process group when only the layout matters: building rank ``rank``'s
    shard of a model of ``size`` ranks in one process (resharding, memory accounting). Any
    collective on it fails."""

    size: int
    rank: int


def group_size(group: "ProcessGroup | LayoutOnly | None") -> int:
    if group is None:
        return 1
    return group.size if isinstance(group, LayoutOnly) else dist.get_world_size(group)


def group_rank(group: "ProcessGroup | LayoutOnly | None") -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, LayoutOnly) else dist.get_rank(group)


_SUBGROUPS: dict[tuple[int, ...], ProcessGroup | None] = {}


def subgroup(ranks: list[int] | tuple[int, ...]) -> ProcessGroup | None:
    """A process group over ``ranks`` (cached). Every rank of the world must call this in the same
    order, members or not (torch.distributed's rule). A group of one rank is ``None``."""
    key = tuple(ranks)
    if key not in _SUBGROUPS:
        use = len(key) > 1 and dist.is_initialized()
        _SUBGROUPS[key] = dist.new_group(list(key)) if use else None
    return _SUBGROUPS[key]


def forget_groups() -> None:
    """Drop the cached subgroups (after ``dist.destroy_process_group``, before a new world)."""
    _SUBGROUPS.clear()


def grid(tp: int, pp: int, dp: int, ep: int = 1) -> torch.Tensor:
    """``(pp, dp, tp)`` tensor of global ranks, TP innermost; with ``ep > 1`` a
    ``(pp, dp, ep, tp)`` tensor (EP between TP and DP)."""
    g = torch.arange(tp * ep * pp * dp).view(pp, dp, ep, tp)
    return g[:, :, 0, :] if ep == 1 else g


def validate(tp: int, pp: int, dp: int, world_size: int, ep: int = 1) -> None:
    for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: each parallel degree must be an integer >= 1")
    n = tp * pp * dp * ep
    if n != world_size:
        eps = f" x ep={ep}" if ep > 1 else ""
        raise ValueError(
            f"tp={tp}{eps} x pp={pp} x dp={dp} = {n} but the world has {world_size} "
            f"processes: launch {n} processes or choose degrees whose product is {world_size}")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, or :func:`shardwise.launch.spawn`) told this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launched: bool = False  # RANK / WORLD_SIZE were set: the launcher owns the processes


def launch_env() -> LaunchEnv:
    """torchrun's environment (a world of one process without it)."""
    env = os.environ
    launched = "RANK" in env or "WORLD_SIZE" in env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    return LaunchEnv(rank, world, local_rank, int(env.get("LOCAL_WORLD_SIZE", str(world))),
                     launched)


def under_launcher() -> bool:
    """Launched by torchrun (or another launcher that sets RANK / WORLD_SIZE)? Entry points then
    run as this rank instead of spawning workers of their own."""
    return launch_env().launched


DEVICES = ("auto", "cpu", "cuda")


def pick_device(want: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: ``cuda:local_rank`` (one rank per
    GPU; the ranks of a node beyond its GPUs share them round-robin) or the CPU.

    ``want``: "auto" (CUDA when present), "cpu" or "cuda" (a ValueError when CUDA is absent)."""
    if want not in DEVICES:
        raise ValueError(f"--device {want!r}: use one of {', '.join(DEVICES)}")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise ValueError(f"--device cuda but CUDA is not available: {why}; use --device cpu "
                         "(or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def pick_dtype(name: str, device: torch.device, *, quantized: bool = False) -> torch.dtype:
    """``name`` ("auto", "float32", "bfloat16", "float16") as a dtype; "auto" is bfloat16 on a
    GPU (half the bytes a decode step reads, the format checkpoints ship in) and float32 on the
    CPU (exact comparisons with the unsharded model), except for ``quantized`` weights on a CPU
    with AVX512-BF16: their activations in bfloat16 (the int4 kernel's dot products)."""
    if name == "auto":
        if device.type == "cpu" and quantized:
            from .kernels import _cpu_flags
            return torch.bfloat16 if " avx512_bf16" in _cpu_flags() else torch.float32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return dtype


@dataclass
class Mesh:
    """Process groups of a TP x EP x DP x PP grid (TP innermost) and this rank's coordinates."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: ProcessGroup | None = None
    pp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    ep: int = 1
    ep_group: ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.ep * self.pp * self.dp

    @property
    def position(self) -> tuple[int, int, int, int]:
        """``(pp_rank, dp_rank, ep_rank, tp_rank)`` of this rank."""
        r, t, e = self.rank, self.tp, self.ep
        return r // (self.dp * e * t), (r // (e * t)) % self.dp, (r // t) % e, r % t

    @property
    def coords(self) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of this rank (:attr:`position` adds the ep rank)."""
        p, d, _, t = self.position
        return p, d, t

    @property
    def tp_rank(self) -> int:
        return self.coords[2]

    @property
    def ep_rank(self) -> int:
        return self.position[2]

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    def _lines(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For each dimension: every group of the grid (rows) and this rank's group."""
        g = grid(self.tp, self.pp, self.dp, self.ep).view(self.pp, self.dp, self.ep, self.tp)
        p, d, e, t = self.position
        return {"tp": (g.reshape(-1, self.tp), g[p, d, e, :]),
                "ep": (g.permute(0, 1, 3, 2).reshape(-1, self.ep), g[p, d, :, t]),
                "dp": (g.permute(0, 2, 3, 1).reshape(-1, self.dp), g[p, :, e, t]),
                "pp": (g.permute(1, 2, 3, 0).reshape(-1, self.pp), g[:, d, e, t])}

    def ranks(self, dim: str) -> list[int]:
        """Global ranks of this rank's group along ``dim`` ("tp", "ep", "dp" or "pp")."""
        return self._lines()[dim][1].tolist()

    @classmethod
    def init(cls, tp: int = 1, pp: int = 1, dp: int = 1, *, ep: int = 1, device: str = "auto",
             backend: str | None = None, timeout_s: float = 300.0) -> "Mesh":
        """Join (or start) the default process group and build the grid's groups.

        Reads torchrun's environment; without it, a world of one process needs no process group.
        ``device`` (:func:`pick_device`): "auto", "cpu" or "cuda". The backend follows the
        device: NCCL on CUDA, gloo on the CPU (``backend`` overrides it).
        """
        env = launch_env()
        validate(tp, pp, dp, env.world, ep)
        dev = pick_device(device, env.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if env.world > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
            kw = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend, rank=env.rank, world_size=env.world,
                                    timeout=timedelta(seconds=timeout_s), **kw)
        mesh = cls(tp=tp, pp=pp, dp=dp, ep=ep, rank=env.rank, local_rank=env.local_rank, device=dev)
        mesh._build_groups()
        return mesh

    def _build_groups(self) -> None:
        # Every rank creates every group, in the same order (torch.distributed's rule); the EP
        # groups only when there are any, so that an ep=1 world creates what it always did.
        for dim, (rows, mine) in self._lines().items():
            if dim == "ep" and self.ep == 1:
                continue
            for row in rows.tolist():
                group = subgroup(row)
                if row == mine.tolist():
                    setattr(self, f"{dim}_group", group)

    def __repr__(self) -> str:
        p, d, e, t = self.position
        eps = f", ep={self.ep}" if self.ep > 1 else ""
        epr = f", ep_rank={e}" if self.ep > 1 else ""
        return (f"Mesh(tp={self.tp}{eps}, pp={self.pp}, dp={self.dp}, rank={self.rank} "
                f"-> pp_rank={p}, dp_rank={d}{epr}, tp_rank={t}, device={self.device})")
