"""The paged KV cache: fixed-size blocks of token slots, and the ``attend`` hook that uses them.

Every rank holds, per layer, two tensors of ``num_blocks * block_size`` slots, each slot the keys
(or values) of *this rank's* KV heads for one token: ``(slots, nkv_local * head_dim)``. A sequence
owns a list of blocks (its *block table*); its token at position ``p`` lives in slot
``table[p // block_size] * block_size + p % block_size``.

Rank 0 decides which block ids a sequence uses (:mod:`.blocks`); the other ranks receive the
tables in each step's plan. One engine step runs every scheduled sequence's new tokens as one flat
row ``(1, T)``: decodes first (one token each), then prefill chunks. :meth:`PagedKVCache.attend`
writes the step's k/v into their slots, then attends

* all decodes at once: keys gathered into ``(n_dec, nkv, L_max, d)`` with a padding mask; with a
  regular GQA layout the ``g`` query heads sharing a KV head are the "query sequence" of one SDPA
  call, so KV heads are never copied ``g`` times;
* each prefill chunk on its own, causal with the offset of the tokens already cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.llama import LlamaForCausalLM


@dataclass
class Chunk:
    """One sequence's share of a step: feed ``tokens`` at positions ``start..start+len-1``."""
    seq_id: int
    tokens: list[int]
    start: int
    blocks: list[int]
    sample: bool  # the chunk ends the known tokens: sample the next one
    forks: list[int] = field(default_factory=list)  # more sequences sampled from the last row
    targets: list[int] | None = None  # prompt logprobs: the prompt tokens its rows predict
    group: int = 0  # expert parallelism: the TP group that runs it (and holds its KV)


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class PagedKVCache:
    """This rank's KV blocks for every layer of ``model`` and the step-local attention metadata."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        dtype = dtype or next(model.parameters()).dtype
        dev = model.inv_freq.device
        self.num_blocks, self.block_size = num_blocks, block_size
        attn = next(iter(model.model.layers.values())).self_attn
        self.nq, self.nkv, self.d = attn.nq, attn.nkv, cfg.dim_per_head
        # g query heads per KV head, laid out contiguously (0 = irregular: use kv_index)
        self.group = attn.kv_group
        slots = num_blocks * block_size
        self.k = {int(i): torch.zeros(slots, self.nkv * self.d, dtype=dtype, device=dev)
                  for i in model.model.layers}
        self.v = {i: torch.zeros_like(t) for i, t in self.k.items()}
        self.device = dev

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def _slots(self, blocks: list[int], lo: int, hi: int) -> list[int]:
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(lo, hi)]

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Set up one step. Returns ids (1, T), positions (1, T) and the flat index of each
        chunk's last token (whose logits are needed when ``chunk.sample``)."""
        ids, pos, slot, last = [], [], [], []
        self.n_dec, dec_slots, dec_lens = 0, [], []
        self.prefills: list[tuple[int, int, torch.Tensor, int]] = []
        for c in chunks:
            n, off = len(c.tokens), len(ids)
            ids += c.tokens
            pos += range(c.start, c.start + n)
            slot += self._slots(c.blocks, c.start, c.start + n)
            last.append(off + n - 1)
            ctx = c.start + n
            if n == 1 and not self.prefills:  # decodes come first in the plan
                self.n_dec += 1
                dec_slots.append(self._slots(c.blocks, 0, ctx))
                dec_lens.append(ctx)
            else:
                keys = torch.tensor(self._slots(c.blocks, 0, ctx), device=self.device)
                self.prefills.append((off, n, keys, c.start))
        self.slot_mapping = torch.tensor(slot, dtype=torch.long, device=self.device)
        if self.n_dec:
            width = max(dec_lens)
            table = torch.zeros(self.n_dec, width, dtype=torch.long)
            for i, s in enumerate(dec_slots):
                table[i, :len(s)] = torch.tensor(s)
            self.dec_table = table.to(self.device)                               # (n_dec, L)
            lens = torch.tensor(dec_lens).unsqueeze(1)
            mask = torch.arange(width).unsqueeze(0) < lens                        # (n_dec, L)
            self.dec_mask = mask.view(self.n_dec, 1, 1, width).to(self.device)
        dev = self.device
        # (1, T): T may be 0 (an EP group without a sequence this step still runs its layers)
        return (torch.tensor([ids], dtype=torch.long, device=dev),
                torch.tensor([pos], dtype=torch.long, device=dev), last)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block ``src`` into block ``dst`` for each pair, in every layer."""
        if not pairs:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in pairs for i in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + i for _, d in pairs for i in range(bs)], device=self.device)
        for cache in (*self.k.values(), *self.v.values()):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(n, L) slots -> (n, nkv, L, d)."""
        n, L = slots.shape
        return cache.index_select(0, slots.reshape(-1)).view(n, L, self.nkv, self.d).transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_index: torch.Tensor | None) -> torch.Tensor:
        """The model's attention hook. q (1, nq, T, d); k, v (1, nkv, T, d) -> (1, nq, T, d)."""
        T = q.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1).reshape(T, -1))
        vc.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1).reshape(T, -1))
        out = torch.empty_like(q)
        n, g = self.n_dec, self.group
        if n:
            keys, vals = self._gather(kc, self.dec_table), self._gather(vc, self.dec_table)
            qd = q[0, :, :n].transpose(0, 1)                                      # (n, nq, d)
            if g:  # the g heads of each KV group form the query "sequence"
                qd = qd.reshape(n, self.nkv, g, self.d)                           # (n, nkv, g, d)
            else:
                qd = qd.unsqueeze(2)                                              # (n, nq, 1, d)
                keys, vals = keys.index_select(1, kv_index), vals.index_select(1, kv_index)
            o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=self.dec_mask)
            out[0, :, :n] = o.reshape(n, self.nq, self.d).transpose(0, 1)
        for off, s, slots, start in self.prefills:
            keys, vals = self._gather(kc, slots[None]), self._gather(vc, slots[None])
            if not g:
                keys, vals = keys.index_select(1, kv_index), vals.index_select(1, kv_index)
            L = slots.numel()
            mask = torch.ones(s, L, dtype=torch.bool, device=q.device).tril(start)
            out[:, :, off:off + s] = F.scaled_dot_product_attention(
                q[:, :, off:off + s], keys, vals, attn_mask=mask, enable_gqa=g > 1)
        return out
