"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE) with tensor- and expert-parallel experts.

For T tokens ``x`` (T, h), E experts of width I and top-k routing (every family the same way; only
the normalisation differs)::

    logits = x W_r^T                      (T, E)   router: replicated on every rank
    p      = softmax(logits) in fp32      (T, E)
    w, e   = top-k(p)                     (T, k)   w / sum(w) when the family renormalises
    y_t    = sum_i w_ti down_e(silu(gate_e(x_t)) * up_e(x_t))      e = e_ti

Where the experts live, for a TP group of t ranks and an EP group of ``ep`` such TP groups side by
side (:class:`ExpertLayout`): each expert is split over ``expert_tp`` ranks of its TP group
(gate/up by columns, down by rows: ``expert_tp = t`` is tensor parallelism inside every expert),
and the t / expert_tp blocks of a TP group and the ep groups hold different experts, E split over
``ep x t / expert_tp`` slots as evenly as possible (8 experts on 3 slots: 3 + 3 + 2).

The block is one tensor-parallel region, whatever the layout::

    x  = f(x)                      enter: identity forward, all-reduce of dx backward
    ...  router, experts of this rank's slot, each weighted by its w_ti: a partial sum
    y  = g(partial)                leave: all-reduce forward

so it costs one all-reduce forward and one backward, as a dense MLP (with sequence parallelism an
all-gather and a reduce-scatter). Inside, a rank computes its share of every token's output: the
experts of its slot, its columns of them. With ``ep > 1`` the tokens of the ep groups differ, so a
token routed to an expert of another group travels there and back (``all_to_all_single`` over the
EP group, counts first, then the rows; the way back reuses the counts)::

    forward    counts (1) + dispatch rows (1) + combine rows (1)     all-to-alls per MoE layer
    backward   combine rows (1) + dispatch rows (1)

The router runs inside the region, so its gradient follows the block's partial-sum convention:
each rank's gradient of w covers its experts only; dx of the router is summed by the entry's
all-reduce with the experts' dx, and the router weight's gradient is completed once per step
(``tp_partial_grad``, :func:`~shardwise.layers.finalize_grads`). The load-balancing loss is
computed alike on every TP rank, so its gradient enters scaled by 1 / t.

Load balancing (Switch Transformer's loss, as transformers' ``load_balancing_loss_func`` defines
it for these families): over the L MoE layers and T tokens of a forward, with ``C_e`` the top-k
selections of expert e and ``P_e`` the router probabilities summed over tokens and layers::

    aux = E sum_e (C_e / (L T)) (P_e / (L T))

With ``ep > 1`` the forward's tokens are those of the whole EP group: C and T are summed over it
(one all-reduce of E + 1 numbers per forward) and each rank returns its share
``E sum_e C_e P_e^(rank) / (L T)^2``; the shares sum to ``aux``.

Checkpoint names are the families' own (``mlp.gate.weight``, ``mlp.experts.3.gate_proj.weight``;
Mixtral ``block_sparse_moe.experts.3.w1.weight``): each expert is a module of the rank's experts
keyed by its global index, whose weights carry pieces of the per-expert tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..layers import _mark
from ..mesh import ProcessGroup, group_rank, group_size
from ..partition import Partition
from ..shards import Piece
from .pieces import glu

GLU_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE MLP. ``norm_topk_prob``: the top-k probabilities are divided by their sum
    (Mixtral always; Qwen3-MoE and OLMoE by their config). ``names``: the checkpoint names of
    each expert's gate, up and down tensors. ``aux_loss_coef``: the load-balancing loss's
    weight in the training loss (the config's ``router_aux_loss_coef``)."""

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu
    names: tuple[str, str, str] = GLU_NAMES
    aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top-{self.top_k} routing over {self.num_experts} experts: "
                             f"use 1 <= num_experts_per_tok <= {self.num_experts}")


@dataclass(frozen=True)
class ExpertParallel:
    """How a model's experts are placed: ``group`` the EP group (the ranks with the same TP rank
    in ``ep`` TP groups that run different tokens; ``None``: no expert parallelism beside TP);
    ``expert_tp`` the ranks each expert is split over inside a TP group (``None``: all of them;
    1: whole experts, expert parallelism within the TP group)."""

    group: ProcessGroup | None = None
    expert_tp: int | None = None


@dataclass(frozen=True)
class ExpertLayout:
    """Which experts, and which of their columns, the rank at (``ep_rank``, ``tp_rank``) holds.

    Slot ``ep_rank x blocks + tp_rank // expert_tp`` (``blocks = tp / expert_tp``) owns a range of
    experts (:class:`~shardwise.partition.Partition` of ``num_experts`` over ``ep x blocks``
    slots); inside it the rank owns columns ``[i0, i1)`` of each expert's ``intermediate``
    (split over ``expert_tp``)."""

    num_experts: int
    intermediate: int
    tp: int = 1
    ep: int = 1
    expert_tp: int | None = None

    def __post_init__(self) -> None:
        etp = self.etp
        if etp < 1 or self.tp % etp:
            ok = ", ".join(str(d) for d in range(1, self.tp + 1) if self.tp % d == 0)
            raise ValueError(f"expert_tp={etp} does not divide tp={self.tp}: each expert's "
                             f"ranks must tile the TP group; use expert_tp in {{{ok}}}")
        if self.slots > self.num_experts:
            raise ValueError(
                f"ep={self.ep} x tp/expert_tp={self.blocks} = {self.slots} expert slots but the "
                f"model has {self.num_experts} experts: each slot needs one; use at most "
                f"{self.num_experts} slots (a larger expert_tp or a smaller ep)")
        Partition(self.intermediate, etp, unit="expert MLP columns")

    @property
    def etp(self) -> int:
        return self.tp if self.expert_tp is None else self.expert_tp

    @property
    def blocks(self) -> int:
        return self.tp // self.etp

    @property
    def slots(self) -> int:
        return self.ep * self.blocks

    @property
    def partition(self) -> Partition:
        return Partition(self.num_experts, self.slots, unit="experts")

    def slot(self, ep_rank: int, tp_rank: int) -> int:
        return ep_rank * self.blocks + tp_rank // self.etp

    def experts(self, ep_rank: int, tp_rank: int) -> range:
        return range(*self.partition.range(self.slot(ep_rank, tp_rank)))

    def columns(self, tp_rank: int) -> tuple[int, int]:
        return Partition(self.intermediate, self.etp,
                         unit="expert MLP columns").range(tp_rank % self.etp)


class _Weight(nn.Module):
    """A bare weight ``(rows, cols)`` with its pieces; the owner applies it."""

    def __init__(self, rows: int, cols: int, pieces: list[Piece], dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))
        _mark(self.weight, pieces)


class Expert(nn.Module):
    """Columns ``[i0, i1)`` of one expert: ``down(act(gate(x)) * up(x))`` without a collective
    (a partial sum when the expert is split)."""

    def __init__(self, cfg: MoEConfig, cols: tuple[int, int], *, dtype=None, device=None) -> None:
        super().__init__()
        (i0, i1), n, h = cols, cfg.intermediate_size, cfg.hidden_size
        gate, up, down = cfg.names
        self.local, self.act = i1 - i0, cfg.act
        self.gate_up_proj = _Weight(2 * self.local, h, [Piece(gate, 0, i0, i1, n),
                                                        Piece(up, 0, i0, i1, n)], dtype, device)
        self.down_proj = _Weight(h, self.local, [Piece(down, 1, i0, i1, n)], dtype, device)

    def forward(self, x: torch.Tensor, rc) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_proj.weight)                  # (n, 2 x local)
        return F.linear(rc(glu, gate_up, self.local, self.act), self.down_proj.weight)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``k`` backward."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.k, None


def route(logits: torch.Tensor, top_k: int, normalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs (T, E) fp32, weights (T, k) fp32, experts (T, k))`` of router logits (T, E)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, experts


@dataclass
class RouterStats:
    """One MoE layer's routing in one forward: router probabilities summed over the tokens
    (E,) fp32 with their gradient, top-k selections per expert (E,) and the token count."""

    probs: torch.Tensor
    counts: torch.Tensor
    tokens: int


class MoEBlock(nn.Module):
    """The MoE MLP of one decoder layer (module docstring): ``(b, s, h) -> (b, s, h)``, the row
    -parallel output summed over the TP group (reduce-scattered under sequence parallelism)."""

    def __init__(self, cfg: MoEConfig, group: ProcessGroup | None, *,
                 experts: ExpertParallel = ExpertParallel(), sequence_parallel: bool = False,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.cfg, self.group, self.ep_group = cfg, group, experts.group
        self.sequence_parallel = sequence_parallel
        tp, r = group_size(group), group_rank(group)
        self.layout = ExpertLayout(cfg.num_experts, cfg.intermediate_size, tp,
                                   group_size(experts.group), experts.expert_tp)
        ep_rank = group_rank(experts.group)
        mine = self.layout.experts(ep_rank, r)
        self.first = mine.start
        self.gate = _Weight(cfg.num_experts, cfg.hidden_size, None, dtype, device)
        if tp > 1:  # a partial sum over the TP group: completed by finalize_grads
            self.gate.weight.tp_partial_grad = True
        cols = self.layout.columns(r)
        self.experts = nn.ModuleDict({str(e): Expert(cfg, cols, dtype=dtype, device=device)
                                      for e in mine})
        # expert -> the EP rank that holds it for this rank's block (-1: another block's)
        block = r // self.layout.etp
        dest = torch.full((cfg.num_experts,), -1, dtype=torch.long)
        starts = torch.zeros(self.layout.ep + 1, dtype=torch.long)
        for j in range(self.layout.ep):
            held = self.layout.experts(j, block * self.layout.etp)
            dest[held.start:held.stop] = j
            starts[j], starts[j + 1] = held.start, held.stop
        self.register_buffer("dest", dest.to(device), persistent=False)
        self.register_buffer("dest_start", starts[:-1].to(device), persistent=False)
        self.per_slot = max(self.layout.partition.sizes)
        self.router_stats: RouterStats | None = None

    def forward(self, x: torch.Tensor, rc=None) -> torch.Tensor:
        from .recompute import NoRecompute
        rc = rc or NoRecompute()
        x = comm.gather_seq(x, self.group) if self.sequence_parallel \
            else comm.copy_to_tp(x, self.group)
        b, s, h = x.shape
        flat = x.reshape(-1, h)                                               # (T, h)
        logits = F.linear(flat, self.gate.weight)                             # (T, E)
        probs, weights, experts = route(logits, self.cfg.top_k, self.cfg.norm_topk_prob)
        if torch.is_grad_enabled():
            self._record(probs, experts)
        mine = self.dest[experts] >= 0                                        # (T, k)
        if self.layout.ep == 1:
            out = self._local(flat, weights.to(x.dtype), experts, mine, rc)
        else:
            out = self._exchange(flat, weights.to(x.dtype), experts, mine, rc)
        out = out.view(b, s, h)                                               # (b, s, h)
        return comm.reduce_scatter_seq(out, self.group) if self.sequence_parallel \
            else comm.reduce_from_tp(out, self.group)

    def _record(self, probs: torch.Tensor, experts: torch.Tensor) -> None:
        """The load-balancing statistics; their gradient enters scaled by 1 / t (replicated)."""
        t = group_size(self.group)
        scaled = _ScaleGrad.apply(probs, 1.0 / t) if t > 1 else probs
        counts = torch.bincount(experts.reshape(-1), minlength=self.cfg.num_experts)
        self.router_stats = RouterStats(scaled.sum(0), counts.float(), probs.shape[0])

    def _by_expert(self, experts: torch.Tensor, mine: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's assignments sorted by expert: ``(flat index into (T, k), token, expert)``."""
        k = experts.shape[1]
        flat = mine.reshape(-1).nonzero().squeeze(1)                          # (n,)
        ids = experts.reshape(-1)[flat]
        order = torch.argsort(ids, stable=True)
        flat, ids = flat[order], ids[order]
        return flat, flat // k, ids

    def _run(self, rows: torch.Tensor, ids: torch.Tensor, rc) -> torch.Tensor:
        """Rows (n, h) sorted by expert id ``ids`` (n,), all of this rank's experts -> (n, h)."""
        counts = torch.bincount(ids - self.first, minlength=len(self.experts)).tolist()
        outs, start = [], 0
        for (name, expert), n in zip(self.experts.items(), counts):
            if n:
                outs.append(expert(rows[start:start + n], rc))
            start += n
        return torch.cat(outs) if outs else rows * 0                          # (n, h)

    def _local(self, flat, weights, experts, mine, rc) -> torch.Tensor:
        """``ep == 1``: every token is here; run the rank's experts on their tokens."""
        idx, token, ids = self._by_expert(experts, mine)
        y = self._run(flat.index_select(0, token), ids, rc)
        y = y * weights.reshape(-1).index_select(0, idx).unsqueeze(1)
        return torch.zeros_like(flat).index_add(0, token, y)                 # (T, h)

    def _exchange(self, flat, weights, experts, mine, rc) -> torch.Tensor:
        """``ep > 1``: send each assignment to the EP rank holding its expert, run what arrives,
        send the outputs back (module docstring)."""
        ep, m = self.layout.ep, self.per_slot
        idx, token, ids = self._by_expert(experts, mine)
        dest = self.dest[ids]
        # (ep, m): how many of this rank's rows go to each expert of each EP rank
        send = torch.zeros(ep * m, dtype=torch.long, device=flat.device)
        send.index_add_(0, dest * m + ids - self.dest_start[dest], torch.ones_like(ids))
        recv = comm.exchange_counts(send.view(ep, m), self.ep_group)         # (ep, m)
        send_rows, recv_rows = send.view(ep, m).sum(1).tolist(), recv.sum(1).tolist()
        rows = comm.all_to_all(flat.index_select(0, token), self.ep_group,
                               out_splits=recv_rows, in_splits=send_rows)    # (n_in, h)
        # arrivals are grouped by source rank, then expert: regroup by expert for the matmuls
        local = recv[:, :len(self.experts)]                                  # (ep, experts)
        src = torch.arange(ep, device=flat.device).repeat_interleave(local.sum(1))
        exp = torch.arange(local.shape[1], device=flat.device).repeat(ep)
        exp = exp.repeat_interleave(local.reshape(-1))                       # (n_in,)
        order = torch.argsort(exp * ep + src, stable=True)
        y = self._run(rows.index_select(0, order), exp[order] + self.first, rc)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        y = comm.all_to_all(y.index_select(0, back), self.ep_group,
                            out_splits=send_rows, in_splits=recv_rows)       # (n_out, h)
        y = y * weights.reshape(-1).index_select(0, idx).unsqueeze(1)
        return torch.zeros_like(flat).index_add(0, token, y)                 # (T, h)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def load_balancing_loss(model: nn.Module, *, group: ProcessGroup | None = None
                        ) -> tuple[torch.Tensor, float] | None:
    """This rank's share of the load-balancing loss of the last forward (module docstring) and
    the whole loss's value, or ``None`` without MoE layers. ``group``: the EP group (the ranks
    whose tokens make up the forward); the stats of every MoE layer are consumed."""
    stats = [m.router_stats for m in moe_blocks(model) if m.router_stats is not None]
    for m in moe_blocks(model):
        m.router_stats = None
    if not stats:
        return None
    E = stats[0].probs.numel()
    probs = torch.stack([s.probs for s in stats]).sum(0)                     # (E,)
    counts = torch.stack([s.counts for s in stats]).sum(0)                   # (E,)
    rows = float(sum(s.tokens for s in stats))                               # L x T
    summed = torch.cat([counts, probs.detach(), counts.new_tensor([rows])])
    if group_size(group) > 1:
        summed = comm.all_reduce(summed, group)
    counts_all, probs_all, rows_all = summed[:E], summed[E:2 * E], float(summed[-1])
    share = E * (counts_all * probs).sum() / rows_all ** 2
    value = float(E * (counts_all * probs_all).sum() / rows_all ** 2)
    return share, value

