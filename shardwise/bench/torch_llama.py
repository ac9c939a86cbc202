"""A plain PyTorch Llama-like model (torchtitan's module names) and PyTorch's own tensor
parallelism applied to it: the contenders shardwise is measured against.

The model is what a user writes without a TP library: separate ``wq/wk/wv/wo`` and SwiGLU
``w1/w2/w3`` linears, RMSNorm, rotary embeddings, an untied output head, and a small contiguous KV
cache for decoding. :func:`parallelize` applies ``torch.distributed.tensor.parallel`` as
torchtitan's ``apply_tp`` does (``torchtitan/models/llama3/infra/parallelize.py``):

* ``tok_embeddings``: ``RowwiseParallel(input_layouts=Replicate())`` -- vocabulary-parallel rows,
  output all-reduced;
* per block: ``wq, wk, wv, w1, w3`` ``ColwiseParallel``; ``wo, w2`` ``RowwiseParallel``;
* ``output``: ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)``, the loss
  computed under ``loss_parallel()`` -- vocabulary-parallel logits, as torchtitan's loss parallel.

One difference from torchtitan: no sequence parallelism (torchtitan shards norms and the
residual stream along the sequence with ``SequenceParallel``); shardwise's contender runs without
it too, so both issue two all-reduces per layer in forward and two in backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StepModelConfig:
    """The benchmark's model and batch (issue 7: hidden 1024, 8 heads, 4 layers, SwiGLU 2816,
    vocabulary 8192, sequence 256, batch 4; decode: batch 8, one token, 128 cached)."""

    vocab: int = 8192
    hidden: int = 1024
    heads: int = 8
    kv_heads: int = 8
    layers: int = 4
    ffn: int = 2816
    seq: int = 256
    batch: int = 4
    decode_batch: int = 8
    decode_context: int = 128

    def llama_config(self):
        from ..models.config import LlamaConfig
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.ffn, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           max_position_embeddings=max(self.seq, self.decode_context + 1),
                           tie_word_embeddings=False)


STEP_PRESETS = {
    "issue7": StepModelConfig(),
    "tiny": StepModelConfig(vocab=256, hidden=64, heads=4, kv_heads=2, layers=2, ffn=160, seq=16,
                            batch=2, decode_batch=2, decode_context=8),
}


def rope(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin (b, s, 1, d) for positions (b, s), rotate-half layout."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = positions.float().unsqueeze(-1) * inv                   # (b, s, d/2)
    ang = torch.cat((ang, ang), dim=-1).unsqueeze(2)               # (b, s, 1, d)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: StepModelConfig) -> None:
        super().__init__()
        self.head_dim = c.hidden // c.heads
        self.wq = nn.Linear(c.hidden, c.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden, c.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(c.hidden, c.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(c.heads * self.head_dim, c.hidden, bias=False)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x, cos, sin, start: int | None) -> torch.Tensor:
        b, s, _ = x.shape
        # -1: the local head count after ColwiseParallel shards wq/wk/wv (torchtitan does the same)
        q = apply_rope(self.wq(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, kv_local, s, d)
        if start is not None:  # decoding: write into the cache, attend to all cached keys
            ck, cv = self.cache
            ck[:, :, start:start + s], cv[:, :, start:start + s] = k, v
            k, v = ck[:, :, :start + s], cv[:, :, :start + s]
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=start is None and s > 1)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, c: StepModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(c.hidden, c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.hidden, bias=False)
        self.w3 = nn.Linear(c.hidden, c.ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: StepModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(c.hidden, eps=1e-5)
        self.attention = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.hidden, eps=1e-5)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin, start):
        h = x + self.attention(self.attention_norm(x), cos, sin, start)
        return h + self.feed_forward(self.ffn_norm(h))


class TorchLlama(nn.Module):
    def __init__(self, c: StepModelConfig) -> None:
        super().__init__()
        self.config = c
        self.tok_embeddings = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.hidden, eps=1e-5)
        self.output = nn.Linear(c.hidden, c.vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)

    def forward(self, ids: torch.Tensor, start: int | None = None):
        """``ids`` (b, s); ``start``: cached positions before these tokens (decode), or None."""
        b, s = ids.shape
        pos = torch.arange(s).expand(b, s) + (start or 0)
        cos, sin = rope(pos, self.config.hidden // self.config.heads)
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h, cos, sin, start)
        return self.output(self.norm(h))

    def allocate_cache(self, batch: int, max_len: int, tp: int = 1) -> None:
        """Per-layer K/V buffers of the rank's KV heads: (batch, kv_heads / tp, max_len, d)."""
        c = self.config
        shape = (batch, c.kv_heads // tp, max_len, c.hidden // c.heads)
        for layer in self.layers:
            layer.attention.cache = (torch.zeros(shape), torch.zeros(shape))


def parallelize(model: TorchLlama, tp: int) -> TorchLlama:
    """Apply torchtitan's TP plan (without sequence parallelism) over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    c = model.config
    if c.heads % tp or c.kv_heads % tp:
        raise ValueError(f"PyTorch TP needs tp to divide heads ({c.heads}) and KV heads "
                         f"({c.kv_heads}); got tp={tp}")
    mesh = init_device_mesh("cpu", (tp,))
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    })
    for block in model.layers:
        parallelize_module(block, mesh, {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
        })
    return model
