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

Activation recomputation (:meth:`LlamaForCausalLM.set_recompute`): ``"full"`` reruns each layer in
backward (torch's non-reentrant checkpoint; its collectives run again); ``"selective"`` rebuilds
only the element-wise pieces (:mod:`.recompute`): both RMSNorms and the final norm, rope with the
KV-head expansion, and SwiGLU. A layer then stores its input and the residual after attention,
the QKV output, the attention output (with its log-sum-exp) and the gate/up output; no matmul or
collective runs twice.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM``; fused weights carry
pieces naming their HF tensors (``shardwise.shards``), so checkpoints map one to one.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                      VocabParallelEmbedding)
from ..mesh import ProcessGroup, group_rank, group_size
from ..partition import HeadLayout, Partition
from ..shards import Piece
from .config import LlamaConfig
from .recompute import NoRecompute, Recompute

RECOMPUTE = ("none", "selective", "full")


def compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype autocast would compute in (itself without autocast): a recomputed
    piece hands the next matmul what it would have cast and saved anyway."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind) and t.is_floating_point():
        return t.to(torch.get_autocast_dtype(kind))
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def norm_for_matmul(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return compute_dtype(rms_norm(x, weight, eps))


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
    rs = cfg.rope_scaling  # validated by LlamaConfig: None, linear or llama3
    if rs is None:
        return inv.float()
    if rs["rope_type"] == "linear":
        return (inv / rs["factor"]).float()
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long waves: divide
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)  # in between: interpolate
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float()


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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` out of place on heads-first ``x`` (b, heads, s, d); cos, sin as
    :meth:`LlamaForCausalLM.rope` gives them, (b, s, 1, d/2)."""
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)      # (b, 1, s, d/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_qk(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_dtype(rotate(q, cos, sin)), compute_dtype(rotate(k, cos, sin))


def rope_qk_expand(q, k, v, cos, sin, kv_index) -> tuple[torch.Tensor, ...]:
    """Rope on q and k, then K and V expanded to one head per local query head."""
    q, k = rope_qk(q, k, cos, sin)
    return q, expand_kv(k, kv_index), expand_kv(compute_dtype(v), kv_index)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(b, heads, s, d) -> (b, s, heads x d): a view when attention wrote its output in
    (b, s, heads, d) order, as the flash kernels do (CPU included)."""
    b, n, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, n * d)      # (b, s, heads x d)


def swiglu(gate_up: torch.Tensor, local: int) -> torch.Tensor:
    gate, up = gate_up.split(local, dim=-1)
    return F.silu(gate) * up


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
                attend: Attend, rc: Recompute | NoRecompute = NoRecompute()) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        b, s, _ = qkv.shape
        index = None if self.kv_group == 1 else self.kv_index
        if not torch.is_grad_enabled():  # inference: rope in place on the fused QKV output
            heads = qkv.view(b, s, self.nq + 2 * self.nkv, self.d)  # (b, s, nq + 2 nkv, d)
            qk = apply_rope(heads[:, :, : self.nq + self.nkv], cos, sin)  # q and k heads
            q = qk[:, :, : self.nq].transpose(1, 2)                   # (b, nq, s, d)
            k = qk[:, :, self.nq:].transpose(1, 2)                    # (b, nkv, s, d)
            v = heads[:, :, self.nq + self.nkv:].transpose(1, 2)      # (b, nkv, s, d)
            out = attend(self.layer, q, k, v, index)                  # (b, nq, s, d)
            return self.o_proj(merge_heads(out))                      # (b, s, nq x d)
        q, k, v = qkv.split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q = q.view(b, s, self.nq, self.d).transpose(1, 2)   # (b, nq, s, d)
        k = k.view(b, s, self.nkv, self.d).transpose(1, 2)  # (b, nkv, s, d)
        v = v.view(b, s, self.nkv, self.d).transpose(1, 2)  # (b, nkv, s, d)
        if isinstance(rc, Recompute) and index is not None:  # training: expand here, recomputed
            q, k, v = rc(rope_qk_expand, q, k, v, cos, sin, index)  # (b, nq, s, d) each
            index = None
        else:  # KV heads stay unexpanded for attend (KV caches store them so)
            q, k = rc(rope_qk, q, k, cos, sin)
        out = attend(self.layer, q, k, v, index)            # (b, nq, s, d)
        return self.o_proj(merge_heads(out))                # (b, s, nq x d) into o_proj

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

    def forward(self, x: torch.Tensor, rc: Recompute | NoRecompute = NoRecompute()) -> torch.Tensor:
        return self.down_proj(rc(swiglu, self.gate_up_proj(x), self.local))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, group: ProcessGroup | None, *,
                 sequence_parallel: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, layer, group, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, group, **kw)
        self.recompute = "none"

    def forward(self, x, cos, sin, attend: Attend = causal_attend) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, attend, use_reentrant=False)
        return self._forward(x, cos, sin, attend)

    def _forward(self, x, cos, sin, attend: Attend) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the residual add folded into the norm
            a = self.self_attn(self.input_layernorm(x), cos, sin, attend)
            y, h = self.post_attention_layernorm(a, residual=x)   # h = x + a, y = norm(h)
            return h + self.mlp(y)
        selective = self.recompute == "selective" and torch.is_grad_enabled()
        with Recompute() if selective else NoRecompute() as rc:
            n1, n2 = self.input_layernorm, self.post_attention_layernorm
            h = x + self.self_attn(rc(norm_for_matmul, x, n1.weight, n1.eps), cos, sin, attend, rc)
            return h + self.mlp(rc(norm_for_matmul, h, n2.weight, n2.eps), rc)


class LlamaBackbone(nn.Module):
    """Embedding, the layers ``[first, last)`` this pipeline stage runs, and the final norm;
    the embedding and the norm are ``None`` on stages that do not hold them."""

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
        tied = cfg.tie_word_embeddings
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(group))  # validate
        # The slice this stage holds: the embedding on the first stage (and, tied, on the last
        # too: the head's weight there is the same logical parameter, its gradient summed over
        # both stages by the training loop); the final norm and the head on the last stage.
        self.model = LlamaBackbone(cfg, group, layers, has_embed=self.first or (self.last and tied),
                                   has_norm=self.last, sequence_parallel=sequence_parallel,
                                   pad_multiple=pad_multiple, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, group=group, pad_multiple=pad_multiple,
            tied_to=self.model.embed_tokens if tied else None,
            sequence_parallel=sequence_parallel, dtype=dtype, device=device) if self.last else None
        self.register_buffer("inv_freq", rope_frequencies(cfg).to(device), persistent=False)
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
        norm = self.model.norm
        with Recompute() if self.recompute == "selective" and torch.is_grad_enabled() \
                else NoRecompute() as rc:
            return self.lm_head(rc(norm_for_matmul, h, norm.weight, norm.eps))
