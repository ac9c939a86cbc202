"""A contiguous KV cache for one batch of sequences that advance together (``generate``).

Each rank stores only its KV heads: ``(batch, kv_local, max_len, head_dim)`` per layer. The
serving engine has its own paged cache (``shardwise.serve``); both plug into the model through
the ``attend(layer, q, k, v, kv_index, params)`` hook. A sliding-window layer reads only the
keys inside its window (for a decode step: the last ``W`` positions, sliced, no mask).
"""
from __future__ import annotations

import torch

from .attention import AttnParams, attention, first_visible, visible
from .llama import LlamaForCausalLM, expand_kv


class KVCache:
    def __init__(self, model: LlamaForCausalLM, batch: int, max_len: int,
                 dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")
        dev = model.inv_freq.device
        dtype = dtype or next(model.parameters()).dtype
        self.k, self.v = {}, {}
        for name, layer in model.model.layers.items():
            shape = (batch, layer.self_attn.nkv, max_len, cfg.dim_per_head)
            self.k[int(name)] = torch.zeros(shape, dtype=dtype, device=dev)
            self.v[int(name)] = torch.zeros(shape, dtype=dtype, device=dev)
        self.length, self.max_len, self.device = 0, max_len, dev
        self.long_after, self.long_rope = model.long_after, False

    def restart_for_long_rope(self, total: int) -> bool:
        """Longrope: once the sequences grow to ``total > original context`` tokens, every key
        must be rotated with the long frequencies, but those cached so far used the short ones.
        Returns True when the cache was emptied: feed all ``total`` tokens again (transformers
        drops its cache at the same point). Call before each step."""
        if self.long_after is None or self.long_rope or total <= self.long_after:
            return False
        self.long_rope = True
        restart, self.length = self.length > 0, 0
        return restart

    def positions(self, batch: int, s: int) -> torch.Tensor:
        if self.length + s > self.max_len:
            raise ValueError(f"{self.length} cached + {s} new tokens exceed the cache of "
                             f"{self.max_len} positions")
        return torch.arange(self.length, self.length + s, device=self.device).expand(batch, s)

    def attend(self, layer: int, q, k, v, kv_index, params: AttnParams) -> torch.Tensor:
        s, end = q.shape[2], self.length + q.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        lo = first_visible(self.length, params.window)  # the first query's first key
        keys = expand_kv(self.k[layer][:, :, lo:end], kv_index)   # (b, nq, end - lo, d)
        vals = expand_kv(self.v[layer][:, :, lo:end], kv_index)
        mask = None
        if s > 1:  # query i (position length + i) sees keys up to length + i, within the window
            dev = q.device
            mask = visible(torch.arange(self.length, end, device=dev),
                           torch.arange(lo, end, device=dev), params.window)    # (s, end - lo)
        return attention(q, keys, vals, params, mask=mask)

    def advance(self, s: int) -> None:
        self.length += s
