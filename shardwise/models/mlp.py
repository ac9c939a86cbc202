"""The MLP slot of a decoder layer: the dense gated MLP and the mixture of experts.

:data:`MLPS` maps :attr:`ArchSpec.mlp <.families.ArchSpec.mlp>` to a builder; the decoder layer
builds its MLP from it and registers it under the family's checkpoint name
(:attr:`ArchSpec.mlp_module`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import ColumnParallelLinear, RowParallelLinear, group_multiple
from ..mesh import ProcessGroup, group_rank, group_size
from ..partition import aligned_sizes
from ..shards import Piece
from .config import LlamaConfig
from .moe import ExpertParallel, MoEBlock, MoEConfig
from .pieces import ACTIVATIONS, glu
from .recompute import NoRecompute, Recompute


class MLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (tanh GELU, Gemma).
    gate and up are one column-parallel weight (from two checkpoint tensors, or Phi-3's fused
    ``gate_up_proj`` whose first half is gate), down is row-parallel."""

    def __init__(self, cfg: LlamaConfig, group: ProcessGroup | None, *, layer: int = 0,
                 sequence_parallel: bool, dtype=None, device=None, quant=None) -> None:
        super().__init__()
        n = cfg.intermediate_size
        # as evenly as possible; on multiples of the int4 group when quantized, so that
        # down_proj's groups do not straddle ranks
        sizes = aligned_sizes(n, group_size(group), multiple=group_multiple(quant),
                              unit="MLP columns")
        i0 = sum(sizes[:group_rank(group)])
        i1 = i0 + sizes[group_rank(group)]
        self.local = i1 - i0
        self.act = ACTIVATIONS[cfg.hidden_act]
        pieces = [Piece("", 0, i0, i1, 2 * n), Piece("", 0, n + i0, n + i1, 2 * n)] \
            if cfg.arch.fused_checkpoint else \
            [Piece("gate_proj", 0, i0, i1, n), Piece("up_proj", 0, i0, i1, n)]
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device, quant=quant)
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, pieces, group=group, **kw)
        self.down_proj = RowParallelLinear(n, cfg.hidden_size, group=group,
                                           in_pieces=[Piece("", 1, i0, i1, n)], **kw)

    def forward(self, x: torch.Tensor, rc: Recompute | NoRecompute = NoRecompute()) -> torch.Tensor:
        if getattr(self.gate_up_proj.qweight, "swiglu", False):  # the product is silu(gate) * up
            return self.down_proj(self.gate_up_proj(x))
        return self.down_proj(rc(glu, self.gate_up_proj(x), self.local, self.act))


def moe_mlp(cfg: LlamaConfig, group: ProcessGroup | None, *, layer: int = 0,
            experts: ExpertParallel = ExpertParallel(), sequence_parallel: bool,
            dtype=None, device=None, quant=None) -> nn.Module:
    """A mixture-of-experts family's MLP: the MoE block, or a dense MLP in the layers its config
    keeps dense (Qwen3-MoE's ``mlp_only_layers`` and ``decoder_sparse_step``)."""
    kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
    if not cfg.moe_layer(layer):
        return MLP(cfg, group, layer=layer, quant=quant, **kw)
    if quant is not None:
        raise ValueError(f"--quant {quant.method}: the experts of a mixture-of-experts model "
                         f"({cfg.model_type}) are not quantized yet; load it without --quant")
    arch = cfg.arch
    moe = MoEConfig(cfg.hidden_size, cfg.expert_width, cfg.num_experts, cfg.num_experts_per_tok,
                    arch.router_norm if arch.router_norm is not None else cfg.norm_topk_prob,
                    act=ACTIVATIONS[cfg.hidden_act], names=arch.expert_names,
                    aux_loss_coef=cfg.router_aux_loss_coef)
    return MoEBlock(moe, group, experts=experts, **kw)


MLPS = {"gated": MLP, "moe": moe_mlp}
"""The MLP slot of a decoder layer, by :attr:`ArchSpec.mlp <.families.ArchSpec.mlp>`. An entry
is built as ``cls(cfg, group, layer=i, sequence_parallel=..., dtype=..., device=..., quant=...)`` (``"moe"``
also ``experts=``: the :class:`~.moe.ExpertParallel` placement) and called as ``mlp(x, rc)``:
hidden states (b, s, h) to (b, s, h) (a row-parallel output, its last collective included);
``rc`` runs the element-wise pieces it wants recomputed."""
