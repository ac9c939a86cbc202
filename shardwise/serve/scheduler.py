"""Continuous batching on rank 0: which sequences run in the next step, and with which tokens.

Every step has a token budget (``max_batched_tokens``). Running sequences that decode take one
token each first, so a long prompt never stalls them; then prompts still being prefilled take
chunks of what is left; then waiting requests are admitted, in arrival order, while fewer than
``max_seqs`` run and the free blocks cover the whole prompt (its blocks are taken at admission, so
a prefill never runs out). Decodes take a new block when they cross a block boundary; when none is
free the most recently admitted sequence is preempted: its blocks are freed and it goes back to
the head of the queue, to be recomputed from its prompt and the tokens it already produced.

A sequence's tokens are ``prompt + output``; ``cached`` of them have KV in the cache, and each step
feeds ``tokens[cached:cached + n]``. When a chunk reaches the last known token the step samples
the next one.

With a sliding ``window`` on every layer (``PagedKVCache.window``), each step first frees the
blocks that lie wholly before ``cached - window + 1`` (no later query reads them; their table
entries become ``FREED``), and a prompt takes blocks chunk by chunk instead of all at admission,
so a sequence holds about ``(window + chunk) / block_size`` blocks at any length.

Longrope (``long_after``: the original context): a sequence longer than it is rotated with the
long frequencies, all of its tokens (``Chunk.long_rope``). The step where it grows past it, it
is preempted (its cache was rotated with the short ones) and recomputed from its first token, as
transformers drops its cache there.

A step that raises (on every rank alike: the same plan, the same code) fails no request blindly:
when it ran one sequence, that sequence fails; otherwise its sequences become *suspects* and run
one per step until each has either succeeded alone (and rejoins the batch) or failed alone.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv import FREED, BlockAllocator, Chunk, blocks_for


@dataclass
class SamplerSpec:
    """What every rank needs to sample a sequence's tokens identically."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    spec: SamplerSpec
    max_tokens: int
    eos_ids: frozenset[int] = frozenset()
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    freed: int = 0            # leading blocks freed as outside the window
    cached: int = 0
    long_rope: bool = False   # its cache is (to be) rotated with longrope's long frequencies
    registered: bool = False  # the workers hold its sampler

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.output) - self.cached


@dataclass
class StepPlan:
    """What rank 0 broadcasts each step."""
    chunks: list[Chunk] = field(default_factory=list)
    new: dict[int, SamplerSpec] = field(default_factory=dict)
    drop: list[int] = field(default_factory=list)
    stop: bool = False


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_seqs: int = 32,
                 max_batched_tokens: int = 256, window: int | None = None,
                 long_after: int | None = None) -> None:
        self.alloc = BlockAllocator(num_blocks)
        self.block_size, self.max_seqs, self.budget = block_size, max_seqs, max_batched_tokens
        self.window, self.long_after = window, long_after
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._drop: list[int] = []
        self.preemptions = 0
        self.suspects: set[int] = set()  # sequences of a failed step, retried one per step

    # ------------------------------------------------------------------ requests in and out
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq_id: int) -> bool:
        for s in self.waiting:
            if s.id == seq_id:
                self.waiting.remove(s)
                self._release(s)
                return True
        for s in self.running:
            if s.id == seq_id:
                self.running.remove(s)
                self._release(s)
                return True
        return False

    def _free_blocks(self, seq: Sequence) -> None:
        self.alloc.free([b for b in seq.blocks if b != FREED])
        seq.blocks, seq.freed = [], 0

    def _free_outside_window(self, seq: Sequence) -> None:
        """Free the blocks wholly before the first position the next query can read."""
        dead = min(len(seq.blocks), max(0, seq.cached - self.window + 1) // self.block_size)
        if dead > seq.freed:
            self.alloc.free(seq.blocks[seq.freed:dead])
            seq.blocks[seq.freed:dead] = [FREED] * (dead - seq.freed)
            seq.freed = dead

    def _needs_long_rope(self, seq: Sequence) -> bool:
        """Has the sequence just grown past longrope's original context? (Then it is marked:
        all its tokens take the long frequencies from now on.)"""
        if self.long_after is None or seq.long_rope or len(seq.tokens) <= self.long_after:
            return False
        seq.long_rope = True
        return True

    def _release(self, seq: Sequence) -> None:
        self.suspects.discard(seq.id)
        self._free_blocks(seq)
        if seq.registered:
            self._drop.append(seq.id)
            seq.registered = False

    def blocks_needed(self, n_tokens: int) -> int:
        """The most blocks one sequence of ``n_tokens`` ever holds (with a window on every
        layer: its window, a chunk and a block of slack, however long it grows)."""
        need = blocks_for(n_tokens, self.block_size)
        if self.window is None:
            return need
        return min(need, blocks_for(self.window + self.budget, self.block_size) + 1)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        need = blocks_for(n_tokens, self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.alloc.allocate(need)
        if got is None:
            return False
        seq.blocks += got
        return True

    def _grow_or_preempt(self, seq: Sequence, n_tokens: int) -> None:
        """Blocks for ``n_tokens`` positions, preempting the latest sequences until they fit
        (``seq`` itself last: then it leaves ``running``)."""
        while not self._grow(seq, n_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                break

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.cached = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> StepPlan:
        self.suspects &= {s.id for s in self.running}  # preempted suspects rejoin as others do
        if self.suspects:
            seq = next(s for s in self.running if s.id in self.suspects)
            n = min(seq.pending, self.budget)
            if self._grow(seq, seq.cached + n):  # the failed step held these blocks already
                return self._plan([(seq, n)])
            self.suspects.discard(seq.id)
        budget = self.budget
        picked: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if self._needs_long_rope(seq) and seq.cached:
                self._preempt(seq)  # rotated with the short frequencies: recompute it all
            elif self.window is not None:
                self._free_outside_window(seq)
        decodes = [s for s in self.running if s.pending == 1]
        prefills = [s for s in self.running if s.pending > 1]
        for seq in decodes:
            if seq not in self.running:
                continue  # preempted below for an earlier one
            self._grow_or_preempt(seq, seq.cached + 1)
            if seq in self.running and budget > 0:
                picked.append((seq, 1))
                budget -= 1
        for seq in prefills:
            if budget <= 0:
                break
            if seq not in self.running:
                continue
            n = min(seq.pending, budget)
            if self.window is not None:  # windowed prompts take blocks chunk by chunk
                self._grow_or_preempt(seq, seq.cached + n)
                if seq not in self.running:
                    continue
            picked.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            first = min(seq.pending, budget)
            if not self._grow(seq, len(seq.tokens) + 1 if self.window is None else first):
                break
            self.waiting.popleft()
            self.running.append(seq)
            self._needs_long_rope(seq)
            n = min(seq.pending, budget)
            picked.append((seq, n))
            budget -= n
        return self._plan(picked)

    def _plan(self, picked: list[tuple[Sequence, int]]) -> StepPlan:
        plan = StepPlan()
        for seq, n in picked:
            if seq not in self.running:
                continue
            if not seq.registered:
                plan.new[seq.id] = seq.spec
                seq.registered = True
            toks = seq.tokens[seq.cached:seq.cached + n]
            plan.chunks.append(Chunk(seq.id, toks, seq.cached, list(seq.blocks),
                                     sample=seq.cached + n == len(seq.prompt) + len(seq.output),
                                     long_rope=seq.long_rope))
        plan.chunks.sort(key=lambda c: len(c.tokens) > 1)  # decodes first, stable
        plan.drop, self._drop = self._drop, []
        return plan

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[tuple[Sequence, int, str | None]]:
        """Advance after a step; ``sampled`` maps seq id -> new token. Returns
        ``(seq, token, finish_reason)`` for every sampled token (finished ones released)."""
        by_id = {s.id: s for s in self.running}
        if len(plan.chunks) == 1:  # a suspect that ran alone and succeeded rejoins the batch
            self.suspects.discard(plan.chunks[0].seq_id)
        out = []
        for c in plan.chunks:
            seq = by_id.get(c.seq_id)
            if seq is None:
                continue
            seq.cached = c.start + len(c.tokens)
            if c.seq_id not in sampled:
                continue
            tok = sampled[c.seq_id]
            reason = None
            if tok in seq.eos_ids:
                reason = "stop"
            else:
                seq.output.append(tok)
                if len(seq.output) >= seq.max_tokens:
                    reason = "length"
            if reason:
                self.running.remove(seq)
                self._release(seq)
            out.append((seq, tok, reason))
        return out

    def fail_step(self, plan: StepPlan) -> list[Sequence]:
        """A step raised: returns the sequences that fail now (released) -- the step's only
        sequence -- or none, making the step's sequences suspects to retry one by one."""
        seqs = [s for s in self.running if any(c.seq_id == s.id for c in plan.chunks)]
        if len(seqs) != 1:
            self.suspects |= {s.id for s in seqs}
            return []
        self.running.remove(seqs[0])
        self._release(seqs[0])
        return seqs
