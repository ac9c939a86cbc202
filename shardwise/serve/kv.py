"""The paged KV cache: fixed-size blocks of token slots, and the ``attend`` hook that uses them.

Every rank holds, per layer, two tensors of ``num_blocks * block_size`` slots plus one *null slot*
(the last row), each slot the keys (or values) of *this rank's* KV heads for one token:
``(slots + 1, nkv_local * head_dim)``. A sequence owns a list of blocks (its *block table*); its
token at position ``p`` lives in slot ``table[p // block_size] * block_size + p % block_size``.
Rank 0 decides which block ids a sequence uses (:mod:`.blocks`); the other ranks receive the
tables in each step's plan. The null slot is where the padding rows of a static step (``shardwise.serve.step``) write
and where padded key positions point: always finite, always masked.

A step with prefill chunks runs every scheduled sequence's new tokens as one flat row ``(1, T)``
(eager): decodes first (one token each), then prefill chunks. :meth:`PagedKVCache.attend` writes
the step's k/v into their slots, then attends

* all decodes at once: on the CPU each row's keys read where they lie
  (``shardwise::paged_decode``, :attr:`PagedKVCache.paged`, as in the compiled decode step);
  else keys gathered into ``(n_dec, nkv, L_max, d)`` with a padding mask, and with a regular
  GQA layout the ``g`` query heads sharing a KV head are the "query sequence" of one SDPA
  call, so KV heads are never copied ``g`` times;
* each prefill chunk on its own, causal with the offset of the tokens already cached: on the CPU
  its keys read where they lie too (``shardwise::prefill_attention``: no gathered copy, no mask,
  the keys after a query never scored; 4.2x ``scaled_dot_product_attention`` in bf16 and 2.5x
  in fp32 on a 241-token chunk, benchmarks/RESULTS.md); else keys gathered, then SDPA with the
  chunk's mask (none when the chunk starts the prompt: plain causal).

A sliding-window layer (window ``W``) gathers only the keys its queries can see: a decode the
last ``W`` positions, a prefill chunk from ``start - W + 1`` on. The step's tables and masks are
built once per window size in :meth:`PagedKVCache.prepare` and shared by every layer of that
size. When *every* layer slides (Mistral, Phi-3 with a window, Qwen2 from layer 0), a block
that lies wholly before ``cached - W + 1`` is never read again: the scheduler frees it
(:attr:`PagedKVCache.window`), so a sequence holds at most ``ceil((W + chunk) / block) + 1``
blocks however long it grows. Models that mix window and full layers (Gemma 2 and 3, Qwen2 with
``max_window_layers > 0``) keep every block, since their full layers read them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.attention import AttnParams, attention, first_visible, visible
from ..models.llama import LlamaForCausalLM

FREED = -1
"""A block-table entry whose block was freed (wholly outside the window)."""


@dataclass
class Chunk:
    """One sequence's share of a step: feed ``tokens`` at positions ``start..start+len-1``."""
    seq_id: int
    tokens: list[int]
    start: int
    blocks: list[int]
    sample: bool  # the chunk ends the known tokens: sample the next one
    long_rope: bool = False  # longrope: the sequence is past the original context
    forks: list[int] = field(default_factory=list)  # more sequences sampled from the last row
    targets: list[int] | None = None  # prompt logprobs: the prompt tokens its rows predict
    group: int = 0  # expert parallelism: the TP group that runs it (and holds its KV)


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


@dataclass
class _WindowView:
    """One window size's share of a step: decode tables and masks, prefill key slots and masks."""
    dec_table: torch.Tensor | None = None   # (n_dec, L) slots
    dec_mask: torch.Tensor | None = None    # (n_dec, 1, 1, L) padding
    dec_lens: torch.Tensor | None = None    # (n_dec,) keys per decode row
    # off, n, key slots, mask (None: plain causal, or read in place), first query's key index
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None, int]] | None = None


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
        windows = {layer.self_attn.params.window for layer in model.model.layers.values()}
        self.windows = sorted(windows, key=lambda w: -1 if w is None else w)
        # blocks before the window can be freed only when no layer reads them
        self.window = cfg.sliding_window if None not in windows and len(windows) == 1 else None
        slots = num_blocks * block_size
        self.null_slot = slots
        self.k = {int(i): torch.zeros(slots + 1, self.nkv * self.d, dtype=dtype, device=dev)
                  for i in model.model.layers}
        self.v = {i: torch.zeros_like(t) for i, t in self.k.items()}
        self.device, self.dtype, self.long_after = dev, dtype, model.long_after
        self.long_rope: torch.Tensor | None = None  # (1, T): the model's ``long_rope``
        # decode rows and prompt chunks read the cache in place (``shardwise::paged_decode``,
        # ``shardwise::prefill_attention``; set by the engine's step,
        # :class:`~shardwise.serve.step.StepOptions`), else gathered, then SDPA
        self.paged = False
        self.kv_of = torch.arange(self.nq, device=dev) // self.group if self.group else None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def _slots(self, blocks: list[int], lo: int, hi: int) -> list[int]:
        bs = self.block_size
        out = [blocks[p // bs] * bs + p % bs for p in range(lo, hi)]
        if lo < hi and blocks[lo // bs] == FREED:
            raise RuntimeError(f"position {lo} lies in a freed block")
        return out

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Set up one step. Returns ids (1, T), positions (1, T) and the flat index of each
        chunk's last token (whose logits are needed when ``chunk.sample``)."""
        ids, pos, slot, last, long = [], [], [], [], []
        self.n_dec, decodes, prefills = 0, [], []
        for c in chunks:
            n, off = len(c.tokens), len(ids)
            ids += c.tokens
            long += [c.long_rope] * n
            pos += range(c.start, c.start + n)
            slot += self._slots(c.blocks, c.start, c.start + n)
            last.append(off + n - 1)
            if n == 1 and not prefills:  # decodes come first in the plan
                self.n_dec += 1
                decodes.append(c)
            else:
                prefills.append((off, c))
        self.slot_mapping = torch.tensor(slot, dtype=torch.long, device=self.device)
        self.views = {w: self._view(w, decodes, prefills) for w in self.windows}
        dev = self.device
        self.long_rope = None if self.long_after is None else torch.tensor([long], dtype=torch.bool,
                                                                         device=dev)
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

    def _view(self, window: int | None, decodes: list[Chunk],
              prefills: list[tuple[int, Chunk]]) -> _WindowView:
        view, dev = _WindowView(prefills=[]), self.device
        if decodes:  # query at position start reads keys [lo, start]
            spans = [(first_visible(c.start, window), c.start + 1) for c in decodes]
            width = max(hi - lo for lo, hi in spans)
            table = torch.zeros(len(decodes), width, dtype=torch.long)
            for i, (c, (lo, hi)) in enumerate(zip(decodes, spans)):
                table[i, :hi - lo] = torch.tensor(self._slots(c.blocks, lo, hi))
            view.dec_table = table.to(dev)                                          # (n_dec, L)
            lens = torch.tensor([hi - lo for lo, hi in spans]).unsqueeze(1)
            mask = torch.arange(width).unsqueeze(0) < lens                          # (n_dec, L)
            view.dec_mask = mask.view(len(decodes), 1, 1, width).to(dev)
            view.dec_lens = lens.view(-1).to(dev)
        for off, c in prefills:
            n, lo = len(c.tokens), first_visible(c.start, window)
            keys = torch.tensor(self._slots(c.blocks, lo, c.start + n), device=dev)
            if self.paged or (c.start == 0 and (window is None or window >= n)):
                mask = None  # read in place (the kernel's own causal rule), or plain causal
            else:
                mask = visible(torch.arange(c.start, c.start + n, device=dev),
                               torch.arange(lo, c.start + n, device=dev), window)  # (n, L)
            view.prefills.append((off, n, keys, mask, c.start - lo))
        return view

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(n, L) slots -> (n, nkv, L, d)."""
        n, L = slots.shape
        return cache.index_select(0, slots.reshape(-1)).view(n, L, self.nkv, self.d).transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_index: torch.Tensor | None, params: AttnParams) -> torch.Tensor:
        """The model's attention hook. q (1, nq, T, d); k, v (1, nkv, T, d) -> (1, nq, T, d)."""
        T = q.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        width = self.nkv * self.d  # T may be 0: an EP group without a sequence this step
        kc.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1).reshape(T, width))  # (T, nkv d)
        vc.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1).reshape(T, width))
        out = torch.empty_like(q)
        n, g = self.n_dec, self.group
        view = self.views[params.window]
        if n and self.paged:  # each decode row's keys read where they lie
            qd = q[0, :, :n].transpose(0, 1).contiguous()                         # (n, nq, d)
            kv_of = self.kv_of if kv_index is None else kv_index
            o = torch.ops.shardwise.paged_decode(qd, kc, vc, view.dec_table, view.dec_lens, kv_of,
                                                 params.scale, params.softcap or 0.0)
            out[0, :, :n] = o.transpose(0, 1)
        elif n:
            keys, vals = self._gather(kc, view.dec_table), self._gather(vc, view.dec_table)
            qd = q[0, :, :n].transpose(0, 1)                                      # (n, nq, d)
            if g:  # the g heads of each KV group form the query "sequence"
                qd = qd.reshape(n, self.nkv, g, self.d)                           # (n, nkv, g, d)
            else:
                qd = qd.unsqueeze(2)                                              # (n, nq, 1, d)
                keys, vals = keys.index_select(1, kv_index), vals.index_select(1, kv_index)
            o = attention(qd, keys, vals, params, mask=view.dec_mask)
            out[0, :, :n] = o.reshape(n, self.nq, self.d).transpose(0, 1)
        for off, s, slots, mask, q_start in view.prefills:
            if self.paged:  # query i reads keys up to q_start + i (and its window), in place
                kv_of = self.kv_of if kv_index is None else kv_index
                out[0, :, off:off + s] = torch.ops.shardwise.prefill_attention(
                    q[0, :, off:off + s], kc, vc, slots, kv_of, q_start, params.window or 0,
                    params.scale, params.softcap or 0.0)
                continue
            keys, vals = self._gather(kc, slots[None]), self._gather(vc, slots[None])
            if not g:
                keys, vals = keys.index_select(1, kv_index), vals.index_select(1, kv_index)
            out[:, :, off:off + s] = attention(q[:, :, off:off + s], keys, vals, params, mask=mask,
                                               causal=mask is None)
        return out
