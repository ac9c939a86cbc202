"""The one decoder of every family (``shardwise.models.families``), tensor-parallel.

Per layer, with t ranks, rank r owning query heads ``[q0, q1)`` and KV heads ``[k0, k1)``
(:class:`~shardwise.partition.HeadLayout`)::

    h   = x + o_proj( attention( rope(q), rope(k), v ) )      qkv_proj: column, o_proj: row
    out = h + down_proj( silu(gate(h')) * up(h') )            gate_up_proj: column, down_proj: row

with RMSNorm before each (Gemma: and after each, ``sandwich_norms``). Forward costs exactly two
all-reduces per layer (after o_proj and down_proj), backward two more (the *f* before qkv_proj
and gate_up_proj). What a family changes -- q/k norms, the norm's ``1 + w``, the activation,
soft-caps, windows, rope variants -- is read from its :class:`~.families.ArchSpec` and the
config when a layer is built; none of it adds a collective. With sequence
parallelism each becomes an all-gather plus a reduce-scatter along the sequence. A layout where
several ranks hold the same KV head costs one more reduction of those heads' weight gradients
per step (:func:`finalize_grads`).

Activation recomputation (:meth:`LlamaForCausalLM.set_recompute`): ``"full"`` reruns each layer in
backward (torch's non-reentrant checkpoint; its collectives run again); ``"selective"`` rebuilds
only the element-wise pieces (:mod:`.pieces`, :mod:`.recompute`): the RMSNorms before attention,
the MLP and the head, q/k norms and rope with the KV-head expansion, and the gated activation. A
layer then stores its input and the residual after attention, the QKV output, the attention output
(with its log-sum-exp) and the gate/up output; no matmul or collective runs twice.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM``; fused weights carry
pieces naming their HF tensors (``shardwise.shards``), so checkpoints map one to one (Phi-3's
checkpoint is fused itself: the pieces name row ranges of its ``qkv_proj`` / ``gate_up_proj``).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                      VocabParallelEmbedding)
from ..mesh import ProcessGroup, group_rank, group_size
from ..partition import HeadLayout
from ..shards import Piece
from .attention import AttnParams, self_attention
from . import qk_norm
from .config import LlamaConfig
from .mlp import MLP, MLPS
from .moe import ExpertParallel
from .pieces import merge_heads, norm_for_matmul, rms_norm, rope_qk, rope_qk_expand
from .qk_norm import ShardedNorm, full_width_qk, owned_columns
from .recompute import NoRecompute, Recompute
from .rope import apply_rope, attention_factor, cos_sin, rope_frequencies, rope_tables

__all__ = ["Attend", "Attention", "DecoderLayer", "LlamaForCausalLM", "MLP", "MLPS", "RECOMPUTE",
           "RMSNorm", "apply_rope", "causal_attend", "expand_kv", "rope_frequencies"]
RECOMPUTE = ("none", "selective", "full")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` times ``w`` (Llama: in x's dtype) or ``1 + w`` (Gemma,
    ``offset=1``: in float32, then cast; the weight starts at 0). ``partial_grad``: each rank
    sees only part of what the weight scales (its sequence shard, or its heads for a q/k norm),
    so its gradient is a partial sum that :func:`~shardwise.layers.finalize_grads` completes."""

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, partial_grad: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset, dtype=dtype, device=device))
        self.weight.init_fill = 1.0 - offset
        if partial_grad:
            self.weight.tp_partial_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)

    def for_matmul(self, x: torch.Tensor, rc: Recompute | NoRecompute) -> torch.Tensor:
        """The norm feeding a matmul: recomputed in backward under selective recomputation."""
        return rc(norm_for_matmul, x, self.weight, self.eps, self.offset)


class Attend(Protocol):
    """How a layer attends: ``q`` (b, nq, s, d), ``k``, ``v`` (b, nkv, s, d) of the new tokens,
    ``kv_index`` (each local query head's KV head, ``None`` for a regular grouping) and the
    layer's :class:`~.attention.AttnParams` (scale, soft-cap, window) -> (b, nq, s, d). Training
    attends over the given keys (:func:`causal_attend`); the caches add the cached ones."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_index: torch.Tensor | None, params: AttnParams) -> torch.Tensor: ...


def expand_kv(k: torch.Tensor, kv_index: torch.Tensor | None) -> torch.Tensor:
    """(b, kv_local, s, d) -> (b, q_local, s, d): each local query head's KV head."""
    return k if kv_index is None else k.index_select(1, kv_index)


def causal_attend(layer: int, q, k, v, kv_index, params: AttnParams) -> torch.Tensor:
    """Causal attention over the given keys (training and one-shot prefill)."""
    return self_attention(q, expand_kv(k, kv_index), expand_kv(v, kv_index), params)


def qkv_pieces(cfg: LlamaConfig, q: tuple[int, int], kv: tuple[int, int]) -> list[Piece]:
    """This rank's rows of q, k and v: heads ``q`` and KV heads ``kv`` (``[start, stop)``), in
    separate ``q_proj`` / ``k_proj`` / ``v_proj`` tensors, or in one fused ``qkv_proj``."""
    d = cfg.dim_per_head
    H, KV = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    (q0, q1), (k0, k1) = q, kv
    if cfg.arch.fused_checkpoint:  # rows [q | k | v] of one (H + 2 KV, hidden) tensor
        n = H + 2 * KV
        return [Piece("", 0, q0 * d, q1 * d, n), Piece("", 0, H + k0 * d, H + k1 * d, n),
                Piece("", 0, H + KV + k0 * d, H + KV + k1 * d, n)]
    return [Piece("q_proj", 0, q0 * d, q1 * d, H), Piece("k_proj", 0, k0 * d, k1 * d, KV),
            Piece("v_proj", 0, k0 * d, k1 * d, KV)]


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads::

        q, k, v = split(x W_qkv^T)               (b, s, nq|nkv|nkv, d)
        q, k    = q_norm(q), k_norm(k)           per head, when the family has them (OLMoE:
                                                 over all heads, :mod:`.qk_norm`; then clip_qkv)
        q, k    = rope(q), rope(k)               on the first rotary_dim dims of each head
        out     = o_proj(attend(q, k, v))        scale, soft-cap and window from AttnParams
    """

    def __init__(self, cfg: LlamaConfig, layer: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool, dtype=None, device=None, quant=None) -> None:
        super().__init__()
        self.layer, self.group = layer, group
        self.layout = HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(group))
        r, d = group_rank(group), cfg.dim_per_head
        (q0, q1), (k0, k1) = self.layout.q_range(r), self.layout.kv_range(r)
        self.nq, self.nkv, self.d, self.k0 = q1 - q0, k1 - k0, d, k0
        H = cfg.num_attention_heads * d
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, qkv_pieces(cfg, (q0, q1), (k0, k1)),
                                             group=group, bias=cfg.attention_bias,
                                             sequence_parallel=sequence_parallel,
                                             dtype=dtype, device=device, quant=quant)
        self.o_proj = RowParallelLinear(H, cfg.hidden_size, group=group,
                                        in_pieces=[Piece("", 1, q0 * d, q1 * d, H)],
                                        sequence_parallel=sequence_parallel,
                                        dtype=dtype, device=device, quant=quant)
        arch = cfg.arch
        self.qk_norm, self.qk_norm_all = arch.qk_norm and not arch.qk_norm_all, arch.qk_norm_all
        if self.qk_norm_all:  # OLMoE: one weight over all heads, sharded like q and k
            KV, eps = cfg.num_key_value_heads * d, cfg.rms_norm_eps
            self.q_norm = ShardedNorm(q0 * d, q1 * d, H, eps, dtype=dtype, device=device)
            self.k_norm = ShardedNorm(k0 * d, k1 * d, KV, eps, dtype=dtype, device=device)
            self.register_buffer("k_owned", owned_columns(self.layout, r, d).to(device),
                                 persistent=False)
            self.widths, self.clip = (H, KV), cfg.clip_qkv
        if self.qk_norm:  # one weight for all heads: each rank's gradient covers its heads only
            kw = dict(offset=arch.norm_offset, partial_grad=True, dtype=dtype, device=device)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.params = AttnParams(scale=cfg.attn_scale, window=cfg.window_of(layer),
                                 softcap=cfg.attn_logit_softcapping if arch.attn_softcap else None)
        idx = self.layout.kv_index(r)
        regular = idx == [i // (self.nq // self.nkv) for i in range(self.nq)] \
            and self.nq % self.nkv == 0
        self.kv_group = self.nq // self.nkv if regular else 0
        self.register_buffer("kv_index", torch.tensor(idx, device=device), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend, rc: Recompute | NoRecompute = NoRecompute()) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        if self.qk_norm_all:
            q, k, v = full_width_qk(self, q, k, v, rc)
        q = q.view(b, s, self.nq, self.d).transpose(1, 2)   # (b, nq, s, d)
        k = k.view(b, s, self.nkv, self.d).transpose(1, 2)  # (b, nkv, s, d)
        v = v.view(b, s, self.nkv, self.d).transpose(1, 2)  # (b, nkv, s, d)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                 self.q_norm.offset) if self.qk_norm else ()
        index = None if self.kv_group == 1 else self.kv_index
        if isinstance(rc, Recompute) and index is not None:  # training: expand here, recomputed
            q, k, v = rc(rope_qk_expand, q, k, v, cos, sin, index, *norms)  # (b, nq, s, d) each
            index = None
        else:  # KV heads stay unexpanded for attend (KV caches store them so)
            q, k = rc(rope_qk, q, k, cos, sin, *norms)
        out = attend(self.layer, q, k, v, index, self.params)  # (b, nq, s, d)
        return self.o_proj(merge_heads(out))                   # (b, s, nq x d) into o_proj

    def grad_sync_items(self) -> list[tuple[int, torch.Tensor | None]]:
        """For every KV head held by several ranks (same list on every rank): the numel of its
        k and v weight (and bias) gradient rows and this rank's view of them, or ``None``."""
        items: list[tuple[int, torch.Tensor | None]] = []
        hidden = self.qkv_proj.in_features
        params = [(self.qkv_proj.weight, hidden)]
        if self.qkv_proj.bias is not None:
            params.append((self.qkv_proj.bias, 1))
        for head in self.layout.shared_kv_heads():
            held = 0 <= head - self.k0 < self.nkv
            for which in (0, 1):  # k, v
                row = self.nq * self.d + which * self.nkv * self.d + (head - self.k0) * self.d
                for p, width in params:
                    view = None
                    if held:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        view = p.grad.narrow(0, row, self.d)
                    items.append((self.d * width, view))
        return items + (qk_norm.grad_items(self) if self.qk_norm_all else [])


class DecoderLayer(nn.Module):
    """``h = x + attn(norm(x))``, ``out = h + mlp(norm(h))``; with ``sandwich_norms`` (Gemma)
    the attention and MLP outputs are normed too, before the residual add."""

    def __init__(self, cfg: LlamaConfig, layer: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool = False, experts: ExpertParallel = ExpertParallel(),
                 dtype=None, device=None, quant=None) -> None:
        super().__init__()
        arch = cfg.arch
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device, quant=quant)

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=arch.norm_offset,
                           partial_grad=sequence_parallel, dtype=dtype, device=device)
        self.sandwich = arch.sandwich_norms
        self.rope_table = "local" if cfg.rope_local_theta is not None \
            and cfg.window_of(layer) is not None else "global"
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, group, **kw)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; Gemma: after attention
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        mlp = MLPS[arch.mlp](cfg, group, layer=layer, **kw,
                             **({"experts": experts} if arch.mlp == "moe" else {}))
        setattr(self, arch.mlp_module, mlp)  # the checkpoint's name (Mixtral: block_sparse_moe)
        if arch.mlp_module != "mlp":
            object.__setattr__(self, "mlp", mlp)  # the same module, not registered twice
        self.recompute = "none"

    def forward(self, x, cos, sin, attend: Attend = causal_attend) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, attend, use_reentrant=False)
        return self._forward(x, cos, sin, attend)

    def _forward(self, x, cos, sin, attend: Attend) -> torch.Tensor:
        selective = self.recompute == "selective" and torch.is_grad_enabled()
        with Recompute() if selective else NoRecompute() as rc:
            a = self.self_attn(self.input_layernorm.for_matmul(x, rc), cos, sin, attend, rc)
            if self.sandwich:
                h = x + self.post_attention_layernorm(a)
                m = self.mlp(self.pre_feedforward_layernorm.for_matmul(h, rc), rc)
                return h + self.post_feedforward_layernorm(m)
            h = x + a
            return h + self.mlp(self.post_attention_layernorm.for_matmul(h, rc), rc)


class LlamaBackbone(nn.Module):
    """Embedding, the layers ``[first, last)`` this pipeline stage runs, and the final norm;
    the embedding and the norm are ``None`` on stages that do not hold them."""

    def __init__(self, cfg: LlamaConfig, group, layers: range, *, has_embed: bool, has_norm: bool,
                 sequence_parallel: bool, pad_multiple: int, experts: ExpertParallel,
                 dtype=None, device=None, quant=None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, group=group, pad_multiple=pad_multiple,
            sequence_parallel=sequence_parallel, dtype=dtype, device=device,
            quant=quant) if has_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, group,
                                                          sequence_parallel=sequence_parallel,
                                                          experts=experts, dtype=dtype,
                                                          device=device, quant=quant)
                                     for i in layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.arch.norm_offset,
                            partial_grad=sequence_parallel, dtype=dtype,
                            device=device) if has_norm else None


class LlamaForCausalLM(nn.Module):
    """A tensor-parallel causal LM of any registered family (or one pipeline stage of it).

    ``forward(ids)`` returns *vocabulary-parallel* logits ``(b, s, V_pad / t)``; use
    :func:`shardwise.layers.gather_logits` for the full ones and
    :func:`shardwise.loss.vocab_parallel_cross_entropy` for the loss. A stage without the
    embedding takes hidden states instead of ids; a stage without the head returns hidden states.
    ``experts``: where a mixture of experts' experts live (:class:`~.moe.ExpertParallel`: the EP
    group and each expert's TP degree; default: every expert split over the TP group).
    """

    def __init__(self, cfg: LlamaConfig, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, layers: range | None = None,
                 pad_multiple: int = 1, experts: ExpertParallel = ExpertParallel(),
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, quant=None) -> None:
        super().__init__()
        self.config, self.group, self.sequence_parallel = cfg, group, sequence_parallel
        self.quant = quant  # a QuantConfig: the matmul weights are filled by quant.load
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.first = layers.start == 0
        self.last = layers.stop == cfg.num_hidden_layers
        tied = cfg.tie_word_embeddings
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(group))  # validate
        # The slice this stage holds: the embedding on the first stage (and, tied, on the last
        # too: the head's weight there is the same logical parameter, its gradient summed over
        # both stages by the training loop); the final norm and the head on the last stage.
        self.model = LlamaBackbone(cfg, group, layers, has_embed=self.first or (self.last and tied),
                                   has_norm=self.last, sequence_parallel=sequence_parallel,
                                   pad_multiple=pad_multiple, experts=experts, dtype=dtype,
                                   device=device, quant=quant)
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, group=group, pad_multiple=pad_multiple,
            tied_to=self.model.embed_tokens if tied else None,
            sequence_parallel=sequence_parallel,
            softcap=cfg.final_logit_softcapping if cfg.arch.final_softcap else None,
            dtype=dtype, device=device, quant=quant) if self.last else None
        self.embed_scale = cfg.hidden_size ** 0.5 if cfg.arch.embed_scale else 1.0
        for name, inv in rope_tables(cfg).items():
            self.register_buffer(name, inv.to(device), persistent=False)
        rs = cfg.rope_scaling
        self.long_after = rs["original_max_position_embeddings"] \
            if rs is not None and rs["rope_type"] == "longrope" else None
        self.rope_scale = attention_factor(cfg)
        self.recompute = "none"

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation in training: ``"none"``, ``"selective"`` or ``"full"``."""
        if mode not in RECOMPUTE:
            raise ValueError(f"recompute {mode!r}: use one of {', '.join(RECOMPUTE)}")
        self.recompute = mode
        for layer in self.model.layers.values():
            layer.recompute = mode

    @property
    def vocab_start(self) -> int:
        """First vocabulary row of this rank's partition (the head's, or the embedding's)."""
        holder = self.lm_head or self.model.embed_tokens
        if holder is None:
            raise ValueError("a middle pipeline stage holds no vocabulary rows")
        return holder.start

    def rope(self, positions: torch.Tensor, dtype: torch.dtype,
             long_rope: torch.Tensor | None = None) -> dict[str, tuple]:
        """``{"global" | "local": (cos, sin)}``, each (b, 1, s, rotary_dim), for positions (b, s).

        Longrope: a token takes the long frequencies when ``long_rope`` (bool, (b, s)) says so;
        by default every token of a row whose last position reaches the original context (the
        sequence is longer than it: transformers' rule)."""
        inv = self.inv_freq
        if self.long_after is not None:
            if long_rope is None:
                long_rope = positions.amax(-1, keepdim=True) >= self.long_after   # (b, 1)
            inv = torch.where(long_rope.unsqueeze(-1), self.inv_freq_long, inv)  # (b, s|1, r/2)
        tables = {"global": cos_sin(positions, inv, dtype, self.rope_scale)}
        if hasattr(self, "inv_freq_local"):
            tables["local"] = cos_sin(positions, self.inv_freq_local, dtype)
        return tables

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                attend: Attend = causal_attend,
                rows: torch.Tensor | list[int] | None = None, *,
                long_rope: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: token ids (b, s) on the first stage, else hidden states (b, s[/t], h).
        ``positions``: (b, s) absolute positions, default ``0..s-1``. ``rows``: positions along
        the sequence whose logits are wanted (the last token of each sequence when sampling);
        the norm and the vocabulary projection then run on those rows only. ``long_rope``:
        longrope's choice per token when a row holds several sequences (:meth:`rope`)."""
        h = self.model.embed_tokens(x) if self.first else x
        if self.first and self.embed_scale != 1.0:  # Gemma: the scale rounded to h's dtype
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        s = x.shape[1] * (group_size(self.group) if self.sequence_parallel and not self.first else 1)
        if positions is None:
            positions = torch.arange(s, device=h.device).expand(x.shape[0], s)
        tables = self.rope(positions, h.dtype, long_rope)
        for layer in self.model.layers.values():
            h = layer(h, *tables[layer.rope_table], attend)
        if not self.last:
            return h
        if rows is not None:
            if self.sequence_parallel:
                raise ValueError("selecting rows needs the full sequence: not with sequence "
                                 "parallelism (use it for training)")
            h = h[:, rows]                                            # (b, n_rows, hidden)
        with Recompute() if self.recompute == "selective" and torch.is_grad_enabled() \
                else NoRecompute() as rc:
            return self.lm_head(self.model.norm.for_matmul(h, rc))
