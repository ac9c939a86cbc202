"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), tensor-parallel.

Per layer, with t ranks, rank r owning query heads ``[q0, q1)`` and KV heads ``[k0, k1)``
(:class:`~shardwise.partition.HeadLayout`)::

    h   = x + o_proj( attention( rope(q), rope(k), v ) )      qkv_proj: column, o_proj: row
    out = h + down_proj( silu(gate(h')) * up(h') )            gate_up_proj: column, down_proj: row

with RMSNorm before each. Forward costs exactly two all-reduces per layer (after o_proj and
down_proj), backward two more (the *f* before qkv_proj and gate_up_proj). With sequence
parallelism each becomes an all-gather plus a reduce-scatter along the sequence. A layout where
several ranks hold the same KV head costs one more reduction of those heads' weight gradients
per step (:func:`finalize_grads`).

Module and parameter names follow Hugging Face's ``LlamaForCausalLM``; fused weights carry
pieces naming their HF tensors (``shardwise.shards``), so checkpoints map one to one.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                      VocabParallelEmbedding)
from ..mesh import ProcessGroup, group_rank, group_size
from ..partition import HeadLayout, Partition
from ..shards import Piece
from .config import LlamaConfig


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in fp32 and cast back before the weight
    multiplies (Hugging Face's order, so bf16 rounds as transformers does).

    ``norm(x, residual)`` first adds the residual stream and returns ``(norm(x + residual),
    x + residual)``: the add and the norm are one pass in a compiled step.
    """

    def __init__(self, dim: int, eps: float, *, sequence_parallel: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.eps, self.shape = eps, (dim,)
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        if sequence_parallel:  # each rank sees only its sequence shard: the grad is partial
            self.weight.sequence_parallel_partial = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual                                   # the new residual stream
        if x.dtype == torch.float32:
            y = F.rms_norm(x, self.shape, self.weight, self.eps)
        else:
            y = self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)
        return y if residual is None else (y, x)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, with Llama 3's scaling (or linear) when configured."""
    d = cfg.dim_per_head
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / rs["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long waves: divide
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)  # in between: interpolate
        return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float()
    raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x_i, x_{i+d/2})`` in place (HF's rotate-half layout)::

        x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin

    x: (b, s, heads, d), a view into the fused QKV output; cos, sin: (b, s, 1, d/2). Returns x,
    or a new tensor when autograd records (training). Bit-identical to
    ``x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin)``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    t = x1 * sin
    x1.mul_(cos).sub_(x2 * sin)
    x2.mul_(cos).add_(t)
    return x


class Attend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_index: torch.Tensor | None) -> torch.Tensor: ...


def expand_kv(k: torch.Tensor, kv_index: torch.Tensor | None) -> torch.Tensor:
    """(b, kv_local, s, d) -> (b, q_local, s, d): each local query head's KV head."""
    return k if kv_index is None else k.index_select(1, kv_index)


def causal_attend(layer: int, q, k, v, kv_index) -> torch.Tensor:
    """Plain causal attention over the given keys (training and one-shot prefill)."""
    return F.scaled_dot_product_attention(q, expand_kv(k, kv_index), expand_kv(v, kv_index),
                                          is_causal=q.shape[2] > 1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool, dtype=None, device=None) -> None:
        super().__init__()
        self.layer, self.group = layer, group
        self.layout = HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(group))
        r, d = group_rank(group), cfg.dim_per_head
        (q0, q1), (k0, k1) = self.layout.q_range(r), self.layout.kv_range(r)
        self.nq, self.nkv, self.d, self.k0 = q1 - q0, k1 - k0, d, k0
        H, KV = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        pieces = [Piece("q_proj", 0, q0 * d, q1 * d, H), Piece("k_proj", 0, k0 * d, k1 * d, KV),
                  Piece("v_proj", 0, k0 * d, k1 * d, KV)]
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, pieces, group=group,
                                             bias=cfg.attention_bias,
                                             sequence_parallel=sequence_parallel,
                                             dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(H, cfg.hidden_size, group=group,
                                        in_pieces=[Piece("", 1, q0 * d, q1 * d, H)],
                                        sequence_parallel=sequence_parallel,
                                        dtype=dtype, device=device)
        idx = self.layout.kv_index(r)
        regular = idx == [i // (self.nq // self.nkv) for i in range(self.nq)] \
            and self.nq % self.nkv == 0
        self.kv_group = self.nq // self.nkv if regular else 0
        self.register_buffer("kv_index", torch.tensor(idx, device=device), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        b, s, _ = qkv.shape
        heads = qkv.view(b, s, self.nq + 2 * self.nkv, self.d)  # (b, s, nq + 2 nkv, d)
        qk = apply_rope(heads[:, :, : self.nq + self.nkv], cos, sin)  # q and k heads, in place
        q = qk[:, :, : self.nq].transpose(1, 2)                   # (b, nq, s, d)
        k = qk[:, :, self.nq:].transpose(1, 2)                    # (b, nkv, s, d)
        v = heads[:, :, self.nq + self.nkv:].transpose(1, 2)      # (b, nkv, s, d)
        index = None if self.kv_group == 1 else self.kv_index
        out = attend(self.layer, q, k, v, index)            # (b, nq, s, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.nq * self.d))

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
        return items


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, group: ProcessGroup | None, *, sequence_parallel: bool,
                 dtype=None, device=None) -> None:
        super().__init__()
        n = cfg.intermediate_size
        i0, i1 = Partition(n, group_size(group), unit="MLP columns").range(group_rank(group))
        self.local = i1 - i0
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [Piece("gate_proj", 0, i0, i1, n), Piece("up_proj", 0, i0, i1, n)],
            group=group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(n, cfg.hidden_size, group=group,
                                           in_pieces=[Piece("", 1, i0, i1, n)],
                                           sequence_parallel=sequence_parallel,
                                           dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.local, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, layer, group, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, group, **kw)

    def forward(self, x, cos, sin, attend: Attend = causal_attend) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, attend)
        y, h = self.post_attention_layernorm(a, residual=x)   # h = x + a, y = norm(h)
        return h + self.mlp(y)


class LlamaBackbone(nn.Module):
    """Embedding, the layers ``[first, last)`` this pipeline stage runs, and the final norm."""

    def __init__(self, cfg: LlamaConfig, group, layers: range, *, has_embed: bool, has_norm: bool,
                 sequence_parallel: bool, pad_multiple: int, dtype=None, device=None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, group=group, pad_multiple=pad_multiple,
            sequence_parallel=sequence_parallel, dtype=dtype, device=device) if has_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, group,
                                                          sequence_parallel=sequence_parallel,
                                                          dtype=dtype, device=device)
                                     for i in layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sequence_parallel,
                            dtype=dtype, device=device) if has_norm else None


class LlamaForCausalLM(nn.Module):
    """A tensor-parallel Llama-family causal LM (or one pipeline stage of it).

    ``forward(ids)`` returns *vocabulary-parallel* logits ``(b, s, V_pad / t)``; use
    :func:`shardwise.layers.gather_logits` for the full ones and
    :func:`shardwise.loss.vocab_parallel_cross_entropy` for the loss. A stage without the
    embedding takes hidden states instead of ids; a stage without the head returns hidden states.
    """

    def __init__(self, cfg: LlamaConfig, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, layers: range | None = None,
                 pad_multiple: int = 1, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config, self.group, self.sequence_parallel = cfg, group, sequence_parallel
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.first = layers.start == 0
        self.last = layers.stop == cfg.num_hidden_layers
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(group))  # validate
        self.model = LlamaBackbone(cfg, group, layers, has_embed=self.first or (
            self.last and cfg.tie_word_embeddings), has_norm=self.last,
            sequence_parallel=sequence_parallel, pad_multiple=pad_multiple, dtype=dtype,
            device=device)
        self.lm_head = ParallelLMHead(self.model.embed_tokens, tied=cfg.tie_word_embeddings,
                                      sequence_parallel=sequence_parallel) if self.last else None
        self.register_buffer("inv_freq", rope_frequencies(cfg).to(device), persistent=False)

    @property
    def vocab_start(self) -> int:
        return self.model.embed_tokens.start

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (b, s, 1, d/2) for positions (b, s) (:func:`apply_rope`)."""
        ang = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # (b, s, d/2)
        ang = ang.unsqueeze(2)                                                 # (b, s, 1, d/2)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                attend: Attend = causal_attend,
                rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """``x``: token ids (b, s) on the first stage, else hidden states (b, s[/t], h).
        ``positions``: (b, s) absolute positions, default ``0..s-1``. ``rows``: positions along
        the sequence whose logits are wanted (the last token of each sequence when sampling);
        the norm and the vocabulary projection then run on those rows only."""
        h = self.model.embed_tokens(x) if self.first else x
        s = x.shape[1] * (group_size(self.group) if self.sequence_parallel and not self.first else 1)
        if positions is None:
            positions = torch.arange(s, device=h.device).expand(x.shape[0], s)
        cos, sin = self.rope(positions, h.dtype)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin, attend)
        if not self.last:
            return h
        if rows is not None:
            if self.sequence_parallel:
                raise ValueError("selecting rows needs the full sequence: not with sequence "
                                 "parallelism (use it for training)")
            h = h[:, rows]                                            # (b, n_rows, hidden)
        return self.lm_head(self.model.norm(h))
