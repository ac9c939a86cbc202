"""ZeRO-1 and ZeRO-2 over the data-parallel group: flat buffers, reduce-scatter, all-gather
(Rajbhandari et al. 2020; Megatron-Core's distributed optimizer lays out its buffers the same way).

Layout. The stage's parameters, in reverse order of registration (backward produces their
gradients roughly in that order), are packed into buckets of at most ``bucket_elems`` elements;
each bucket is padded to a multiple of ``dp`` and cut into ``dp`` equal slices, DP rank ``r``
owning slice ``r`` of every bucket::

    flat params  (one fp32 buffer, every parameter a view of it)   P elements on every rank
    AdamW        on views of the owned slices: exp_avg, exp_avg_sq ~P / dp each

Gradients. ZeRO-1 keeps full gradients in one flat buffer (P) and reduce-scatters it after the
backward, the result landing in the owned slices of that buffer. ZeRO-2 keeps only a shard
buffer (the owned slices of every bucket, ~P / dp) and no full gradients: as soon as backward
has produced every gradient of a bucket (a post-accumulate-grad hook per parameter), the bucket
is reduce-scattered into the shard and its gradients freed (in every micro-batch: accumulation
happens in the shard). Parameters whose
gradient another collective completes after backward (sequence-parallel norm weights, KV heads
replicated across TP ranks, the tied embedding under PP) sit in their own buckets, reduced after
that completion (sums commute: completing before or after the DP sum is the same). So do a
mixture of experts' experts: a rank whose tokens chose none of a bucket's experts would never
see it ready, so every rank reduces them together after backward (an expert no rank's token
chose gets a zero gradient, where one process leaves it without one).

Step. ``finish_grads``: TP completion and the tied-embedding sum, the remaining reduce-scatters,
scale by ``1 / (dp x unaveraged micro-batches)``; ``grad_norm``: every element of the model once
(``optim.counted_ranges``) over the owned slices, one all-reduce over the world; ``clip``: the
shard; ``step``: AdamW on the shard, then all-gather every bucket into the flat parameters.
Equal to plain DDP + AdamW up to the order of float sums (AdamW is element-wise).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..layers import finalize_grads
from ..mesh import Mesh
from ..models.moe import moe_blocks
from ..shards import assemble_local, sharded_params
from .optim import (EXP, MeshAdamW, adamw, counted_ranges, embedding_groups, squared_norm,
                    sync_tied_embedding)

# torch 2.13 renames these two (the old names warn); earlier versions have only the old ones
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
BUCKET_ELEMS = 1 << 23  # 32 MiB of fp32 per bucket (DDP buckets 25 MiB, Megatron 40 M elements)


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]          # of each parameter in the flat buffer
    start: int                  # of the bucket in the flat buffer
    size: int                   # padded to a multiple of dp
    shard: int = 0              # where this rank's slice starts in the shard buffer
    deferred: bool = False      # reduced only after finish_grads' TP completion
    ready: set[int] = field(default_factory=set)


def deferred_params(model: nn.Module, mesh: Mesh) -> set[int]:
    """``id`` of every parameter whose gradient a collective completes after backward."""
    out = {id(p) for p in model.parameters() if getattr(p, "tp_partial_grad", False)}
    for block in moe_blocks(model):  # an expert no token chose has no gradient on this rank
        out |= {id(p) for p in block.experts.parameters()}
    for m in model.modules():
        layout = getattr(m, "layout", None)
        if layout is not None and hasattr(m, "qkv_proj") and layout.shared_kv_heads():
            out |= {id(p) for p in m.qkv_proj.parameters()}
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if mesh.pp > 1 and model.config.tie_word_embeddings and emb is not None:
        out.add(id(emb.weight))
    return out


class ZeroAdamW(MeshAdamW):
    """AdamW with optimizer states (``stage`` 1) and gradients (``stage`` 2) sharded over DP.

    ``grad_scale``: the factor applied to the summed gradients (``1 / dp``, times
    ``1 / micro-batches`` when the pipeline schedule does not average them)."""

    def __init__(self, model: nn.Module, mesh: Mesh, *, stage: int, lr: float,
                 betas: tuple[float, float], weight_decay: float, grad_scale: float,
                 bucket_elems: int = BUCKET_ELEMS) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage {stage}: use 1 (optimizer states) or 2 (+ gradients)")
        self.model, self.mesh, self.zero, self.grad_scale = model, mesh, stage, grad_scale
        self.dp, self.group = mesh.dp, mesh.dp_group
        self.emb_group = embedding_groups(mesh)
        self.paths = {id(p): path for path, p, _ in sharded_params(model)}
        params = [p for p in model.parameters() if p.requires_grad]
        late = deferred_params(model, mesh)
        early = self._pack([p for p in reversed(params) if id(p) not in late], False,
                           bucket_elems, 0)
        end = sum(b.size for b in early)
        self.buckets = early + self._pack([p for p in reversed(params) if id(p) in late], True,
                                          bucket_elems, end)
        self._flatten(params)
        self.grad_flat = torch.zeros_like(self.flat) if stage == 1 else None
        shard = sum(b.size for b in self.buckets) // self.dp if stage == 2 else 0
        self.grad_shard = torch.zeros(shard, dtype=self.flat.dtype, device=self.flat.device)
        self._build_optimizer(lr, betas, weight_decay)
        self.counted = counted_ranges(model, mesh)
        if stage == 2:
            self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
            for b in self.buckets:
                if not b.deferred:
                    for p in b.params:
                        p.register_post_accumulate_grad_hook(self._on_grad)

    # ------------------------------------------------------------------------- layout
    def _pack(self, params: list[nn.Parameter], deferred: bool, cap: int,
              start: int) -> list[_Bucket]:
        """Consecutive buckets of at most ``cap`` elements (one parameter may exceed it)."""
        out: list[_Bucket] = []
        group: list[nn.Parameter] = []

        def close() -> None:
            nonlocal start, group
            if group:
                n = sum(p.numel() for p in group)
                offsets = [start + sum(q.numel() for q in group[:i]) for i in range(len(group))]
                out.append(_Bucket(group, offsets, start, -(-n // self.dp) * self.dp,
                                   deferred=deferred))
                start += out[-1].size
                group = []
        for p in params:
            if group and sum(q.numel() for q in group) + p.numel() > cap:
                close()
            group.append(p)
        close()
        return out

    @torch.no_grad()
    def _flatten(self, params: list[nn.Parameter]) -> None:
        """Every parameter becomes a view of one flat buffer (values kept)."""
        ref = params[0]
        self.flat = torch.zeros(sum(b.size for b in self.buckets), dtype=ref.dtype,
                                device=ref.device)
        shard = 0
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                self.flat[off:off + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[off:off + p.numel()].view_as(p)
            b.shard = shard
            shard += b.size // self.dp

    def _owned(self, b: _Bucket) -> tuple[int, int]:
        n = b.size // self.dp
        lo = b.start + self.mesh.dp_rank * n
        return lo, lo + n

    def _grads(self, b: _Bucket) -> torch.Tensor:
        """This rank's slice of bucket ``b``'s reduced gradient (ZeRO-1: inside the flat
        gradient buffer; ZeRO-2: in the shard buffer)."""
        if self.grad_flat is not None:
            return self.grad_flat[slice(*self._owned(b))]
        return self.grad_shard[b.shard:b.shard + b.size // self.dp]

    def _build_optimizer(self, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
        """AdamW over views of the owned slices, one per (parameter, bucket slice) overlap."""
        self.pieces: list[tuple[nn.Parameter, int, int, torch.Tensor]] = []  # param, lo, hi, view
        decay, other = [], []
        for b in self.buckets:
            own_lo, own_hi = self._owned(b)
            for p, off in zip(b.params, b.offsets):
                i, j = max(own_lo, off), min(own_hi, off + p.numel())
                if i >= j:
                    continue
                view = self.flat[i:j]
                view.grad = self._grads(b)[i - own_lo:j - own_lo]
                self.pieces.append((p, i - off, j - off, view))
                (decay if p.dim() >= 2 else other).append(view)
        self.opt = adamw(decay, other, lr=lr, betas=betas, weight_decay=weight_decay)

    # ------------------------------------------------------------------------- gradients
    def zero_grad(self) -> None:
        self.grad_shard.zero_()
        if self.grad_flat is not None:  # ZeRO-1: gradients accumulate in the flat buffer
            self.grad_flat.zero_()
            for b in self.buckets:
                for p, off in zip(b.params, b.offsets):
                    p.grad = self.grad_flat[off:off + p.numel()].view_as(p)
        else:
            for b in self.buckets:
                b.ready.clear()
                for p in b.params:
                    p.grad = None

    def _on_grad(self, p: nn.Parameter) -> None:
        b = self.bucket_of[id(p)]
        b.ready.add(id(p))
        if len(b.ready) == len(b.params):
            self._reduce(b)

    @torch.no_grad()
    def _reduce(self, b: _Bucket) -> None:
        """Reduce-scatter (sum) bucket ``b`` into this rank's shard; ZeRO-2 frees its grads."""
        if self.grad_flat is not None:
            full = self.grad_flat[b.start:b.start + b.size]
        else:
            full = torch.zeros(b.size, dtype=self.flat.dtype, device=self.flat.device)
            for p, off in zip(b.params, b.offsets):
                if p.grad is not None:
                    full[off - b.start:off - b.start + p.numel()] = p.grad.reshape(-1)
                p.grad = None
            b.ready.clear()
        if self.dp > 1:
            part = torch.empty(b.size // self.dp, dtype=full.dtype, device=full.device)
            _REDUCE_SCATTER(part, full, group=self.group)
        else:
            part = full
        if self.grad_flat is not None:
            self._grads(b).copy_(part)  # the sum replaces this rank's own contribution
        else:
            self._grads(b).add_(part)   # accumulates over micro-batches

    @torch.no_grad()
    def finish_grads(self) -> None:
        """After backward: TP completion of the deferred gradients, the remaining reductions,
        the average. Then the shard holds this rank's slices of the DP-mean gradient."""
        finalize_grads(self.model, self.mesh.tp_group)
        sync_tied_embedding(self.model, self.mesh, self.emb_group)
        for b in self.buckets:
            if self.grad_flat is not None or b.deferred or any(p.grad is not None
                                                                for p in b.params):
                self._reduce(b)
            self._grads(b).mul_(self.grad_scale)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global norm from the owned slices; the same number on every rank."""
        sq = torch.zeros((), dtype=torch.float64, device=self.flat.device)
        for p, lo, hi, view in self.pieces:
            sq += squared_norm(view.grad, self.counted[id(p)], lo)
        if dist.is_initialized() and self.mesh.world_size > 1:
            dist.all_reduce(sq)
        return sq.sqrt().float()

    @torch.no_grad()
    def clip(self, coef: float) -> None:
        if coef < 1.0:
            for b in self.buckets:
                self._grads(b).mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the owned slices, then every rank gathers the updated buckets."""
        self.opt.step()
        if self.dp == 1:
            return
        for b in self.buckets:
            lo, hi = self._owned(b)
            _ALL_GATHER(self.flat[b.start:b.start + b.size], self.flat[lo:hi].clone(),
                        group=self.group)

    # ------------------------------------------------------------------------- checkpoints
    def writes_state(self) -> bool:
        return True  # every DP rank holds different slices

    def state_items(self):
        """``(kind, param path, param, (lo, hi), tensor)``: this rank's slices of the moments."""
        for p, lo, hi, view in self.pieces:
            st = self.opt.state.get(view, {})
            for k in EXP:
                if k in st:
                    yield k, self.paths[id(p)], p, (lo, hi), st[k]

    @torch.no_grad()
    def load_state(self, reader, step: float) -> None:
        """This rank's slices of the AdamW moments, from full tensors (any saved layout)."""
        local: dict[tuple[int, str], torch.Tensor] = {}
        for p, lo, hi, view in self.pieces:
            state = {"step": torch.tensor(step)}
            for k in EXP:
                if (id(p), k) not in local:
                    local[(id(p), k)] = assemble_local(self.paths[id(p)], p,
                                                       reader(k)).to(p.dtype).reshape(-1)
                state[k] = local[(id(p), k)][lo:hi].clone()
            self.opt.state[view] = state
