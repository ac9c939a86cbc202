"""KV block ids on rank 0: reference counts, and the prefix cache that shares full blocks.

A block holds ``block_size`` token slots on every rank (:mod:`.kv`); this module only decides which
ids a sequence uses. A block is *free* (on the free list), *held* (its reference count, the number
of sequences whose block table lists it, is above zero) or *cached* (no sequence holds it, but it
keeps the KV of a full block of tokens that a later request may reuse).

Prefix caching. A *full* block is content-addressed by the hash of every token up to its end: the
chain ``h_i = blake2b(h_{i-1} || tokens of block i)`` (128 bits), so equal hashes mean equal
prefixes, not merely equal blocks; a lookup also compares the block's own tokens and its parent's
hash. When a sequence's KV fills a block (its prompt, or later its generated tokens), the block is
registered under its hash. A new request walks its tokens block by block and reuses the longest
run of registered blocks (their reference counts go up; the same physical block serves every
sequence that shares the prefix), and prefills only the rest. The hit stops one token short of
the prompt, so at least one token runs and gives the logits to sample from (vLLM's rule): a prompt
of exactly ``k`` cached blocks reuses ``k - 1`` and recomputes the last one.

Partial blocks are never shared: the block that holds a sequence's last, incomplete
``n % block_size`` tokens is private to it, and a sequence only ever writes KV at positions past
what it reused, so a shared block is never written and copy-on-write is never needed. (The
``n > 1`` samples of one prompt get a *copy* of the leader's partial block; see :mod:`.scheduler`.)
When a second sequence fills a block whose hash is already registered, the first registration
stays and the second block remains private, freed when its sequence ends.

Eviction. A cached block with no holder is evictable. Allocation takes never-used free blocks first,
then evicts cached blocks least recently released first (a sequence releases its blocks last to
first, so a prefix's tail goes before its head, which other prompts are likelier to share).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

ROOT = b""  # the parent hash of a sequence's first block


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block given its parent's hash: 128-bit BLAKE2b of both."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockPool:
    """Free list, reference counts and the prefix cache (rank 0 only)."""

    def __init__(self, num_blocks: int, block_size: int, *, caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free = list(range(num_blocks - 1, -1, -1))        # never-cached blocks, a stack
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self._by_hash: dict[bytes, int] = {}
        self._meta: dict[int, tuple[bytes, bytes, tuple[int, ...]]] = {}  # hash, parent, tokens
        self.evictions = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (held or not)."""
        return len(self._by_hash)

    # ------------------------------------------------------------------ holding and releasing
    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks held once each, or ``None`` (and nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)  # the least recently released
                self._forget(b)
                self.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def share(self, blocks: list[int]) -> list[int]:
        """Hold ``blocks`` once more (another sequence lists them); returns them."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        return list(blocks)

    def free(self, blocks: list[int]) -> None:
        """Release one hold on each block, last to first; unheld blocks become free, or
        evictable when registered."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            assert self._refs[b] >= 0, f"block {b} released more often than held"
            if self._refs[b] == 0:
                if b in self._meta:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def _forget(self, b: int) -> None:
        h, _, _ = self._meta.pop(b)
        del self._by_hash[h]

    # ------------------------------------------------------------------ the prefix cache
    def lookup(self, hashes: list[bytes], tokens: list[int], *, limit: int) -> list[int]:
        """Hold and return the registered blocks of the longest cached prefix of ``tokens``
        covering at most ``limit`` tokens; ``hashes`` are the chain hashes of its full blocks."""
        bs, out, parent = self.block_size, [], ROOT
        if not self.caching:
            return out
        for i, h in enumerate(hashes[:limit // bs]):
            b = self._by_hash.get(h)
            if b is None or self._meta[b][1:] != (parent, tuple(tokens[i * bs:(i + 1) * bs])):
                break
            out.append(b)
            parent = h
        return self.share(out)

    def register(self, blocks: list[int], hashes: list[bytes], tokens: list[int], *,
                 start: int = 0) -> None:
        """Make the full blocks ``blocks[i]`` (hash ``hashes[i]``), ``i >= start``, findable by
        later lookups."""
        if not self.caching:
            return
        bs = self.block_size
        for i in range(start, min(len(blocks), len(hashes))):
            b, h = blocks[i], hashes[i]
            if h not in self._by_hash and b not in self._meta:
                self._by_hash[h] = b
                self._meta[b] = (h, hashes[i - 1] if i else ROOT,
                                 tuple(tokens[i * bs:(i + 1) * bs]))


def extend_hashes(hashes: list[bytes], tokens: list[int], n_tokens: int, block_size: int) -> None:
    """Append to ``hashes`` the chain hashes of the full blocks among ``tokens[:n_tokens]``."""
    bs = block_size
    for i in range(len(hashes), n_tokens // bs):
        hashes.append(chain_hash(hashes[-1] if hashes else ROOT, tokens[i * bs:(i + 1) * bs]))
