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

Prefix caching (:mod:`.blocks`): at admission a sequence takes the registered blocks of its longest
cached prefix and starts with ``cached`` set past them; after every step the blocks its KV has
filled are registered. A request that wants its prompt's log-probabilities (``echo``) looks
nothing up: it needs the logits of every prompt position.

Several samples of one prompt (``n > 1``) are one *leader* and its *followers*. Only the leader is
queued and prefilled; its admission also reserves the followers' blocks (the leader's full prompt
blocks, shared, and a block of their own for the partial last block). The step that ends the
leader's prompt samples the followers too, from the same last row of logits, and copies the
leader's partial block into theirs after the forward (:attr:`StepPlan.copies`); from then on
each follower is an ordinary sequence. ``n`` samples cost one prefill.

With a sliding ``window`` on every layer (``PagedKVCache.window``), each step first frees the
blocks that lie wholly before ``cached - window + 1`` (no later query reads them; their table
entries become ``FREED``: a block the prefix cache registered stays findable until evicted), and
a prompt takes blocks chunk by chunk instead of all at admission, so a sequence holds about
``(window + chunk) / block_size`` blocks at any length. Followers then share the leader's live
prompt blocks when they fork, not at admission (the leader's early blocks may be gone by then).

Longrope (``long_after``: the original context): a sequence longer than it is rotated with the
long frequencies, all of its tokens (``Chunk.long_rope``). The step where it grows past it, it
is preempted (its cache was rotated with the short ones) and recomputed from its first token, as
transformers drops its cache there. Its blocks are neither looked up nor registered in the
prefix cache, whose blocks hold keys rotated with the short frequencies.

Structured output: a sequence with a grammar (:class:`.grammar.Constraint`) gets its token mask in
every plan that samples it (:attr:`StepPlan.masks`), and a sampled token advances its grammar; a
complete grammar finishes the sequence ("stop").

A step that raises (on every rank alike: the same plan, the same code) fails no request blindly:
when it ran one sequence, that sequence fails; otherwise its sequences become *suspects* and run
one per step until each has either succeeded alone (and rejoins the batch) or failed alone.
"""
from __future__ import annotations

import sys
from collections import deque

from .blocks import BlockPool, extend_hashes
from .kv import FREED, Chunk, blocks_for
from .sequence import Request, SamplerSpec, Sequence, StepPlan

__all__ = ["Request", "SamplerSpec", "Scheduler", "Sequence", "StepPlan"]


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_seqs: int = 32,
                 max_batched_tokens: int = 256, prefix_caching: bool = True,
                 window: int | None = None, long_after: int | None = None) -> None:
        self.alloc = BlockPool(num_blocks, block_size, caching=prefix_caching)
        self.block_size, self.max_seqs, self.budget = block_size, max_seqs, max_batched_tokens
        self.window, self.long_after = window, long_after
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._drop: list[int] = []
        self.preemptions = 0
        self.suspects: set[int] = set()  # sequences of a failed step, retried one per step
        self.hit_tokens = 0      # prompt tokens taken from the prefix cache at admission
        self.query_tokens = 0    # prompt tokens of admitted sequences
        self.prefill_tokens = 0  # prompt tokens that ran through the model

    # ------------------------------------------------------------------ requests in and out
    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (with its ``followers``, the other samples of its prompt)."""
        self.waiting.append(seq)

    def cancel(self, seq_id: int) -> bool:
        for queue_ in (self.waiting, self.running):
            for s in queue_:
                if s.id == seq_id:
                    queue_.remove(s)
                    self._release(s)
                    return True
                for f in s.followers:
                    if f.id == seq_id:
                        s.followers.remove(f)
                        self._release(f)
                        return True
        return False

    def _release(self, seq: Sequence) -> list[Sequence]:
        """Give back ``seq``'s blocks and sampler, and those of its unforked followers."""
        self.suspects.discard(seq.id)
        self._free_blocks(seq)
        if seq.registered:
            self._drop.append(seq.id)
            seq.registered = False
        gone = seq.followers
        seq.followers = []
        for f in gone:
            self._release(f)
        return gone

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def seats(self) -> int:
        """Sequences running or reserved to run (unforked followers)."""
        return sum(1 + len(s.followers) for s in self.running)

    def blocks_needed(self, n_tokens: int) -> int:
        """The most blocks one sequence of ``n_tokens`` ever holds (with a window on every
        layer: its window, a chunk and a block of slack, however long it grows)."""
        need = blocks_for(n_tokens, self.block_size)
        if self.window is None:
            return need
        return min(need, blocks_for(self.window + self.budget, self.block_size) + 1)

    # ------------------------------------------------------------------ blocks
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

    def _admit(self, seq: Sequence, first: int) -> bool:
        """Take the cached prefix and the blocks of ``seq`` (and its followers'); or nothing.
        ``first``: the most tokens its first chunk runs (a windowed prompt takes only those)."""
        bs, n = self.block_size, len(seq.tokens)
        self._needs_long_rope(seq)
        if self.alloc.caching and seq.spec.prompt_logprobs is None and not seq.long_rope:
            extend_hashes(seq.hashes, seq.tokens, n - 1, bs)
            seq.blocks = self.alloc.lookup(seq.hashes, seq.tokens, limit=n - 1)
        seq.cached = seq.reused = len(seq.blocks) * bs
        seq.indexed = len(seq.blocks)
        if self.window is not None:  # only what its first chunk reads
            self._free_outside_window(seq)
        end = n + 1 if self.window is None else seq.cached + min(n - seq.cached, first)
        if self._grow(seq, end) and self._reserve_followers(seq):
            self.hit_tokens += seq.reused
            self.query_tokens += n
            return True
        self._free_blocks(seq)
        seq.cached, seq.reused, seq.indexed = 0, 0, 0
        return False

    def _reserve_followers(self, leader: Sequence) -> bool:
        """Followers own a block for the partial last prompt block; they share the leader's
        full prompt blocks at admission, or with a window when they fork (:meth:`_fork`)."""
        full, part = divmod(len(leader.prompt), self.block_size)
        for i, f in enumerate(leader.followers):
            own = self.alloc.allocate(1) if part else []
            if own is None:
                for g in leader.followers[:i]:
                    self._free_blocks(g)
                return False
            shared = self.alloc.share(leader.blocks[:full]) if self.window is None else []
            f.blocks = shared + own
        return True

    def _index(self, seq: Sequence) -> None:
        """Register the blocks ``seq``'s KV has filled in the prefix cache."""
        end = seq.cached // self.block_size
        if self.alloc.caching and end > seq.indexed and not seq.long_rope:
            extend_hashes(seq.hashes, seq.tokens, seq.cached, self.block_size)
            self.alloc.register(seq.blocks[:end], seq.hashes[:end], seq.tokens,
                                start=max(seq.indexed, seq.freed))
            seq.indexed = end

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.cached, seq.indexed = 0, 0
        for f in seq.followers:  # reserved again with the leader
            self._free_blocks(f)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ------------------------------------------------------------------ one step
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
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if (self.seats + 1 + len(seq.followers) > self.max_seqs
                    or not self._admit(seq, budget)):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.pending, budget)
            picked.append((seq, n))
            budget -= n
        return self._plan(picked)

    def _plan(self, picked: list[tuple[Sequence, int]]) -> StepPlan:
        plan = StepPlan()
        for seq, n in picked:
            if seq not in self.running:
                continue
            c = Chunk(seq.id, seq.tokens[seq.cached:seq.cached + n], seq.cached, list(seq.blocks),
                      sample=seq.cached + n == len(seq.tokens), long_rope=seq.long_rope)
            if seq.spec.prompt_logprobs is not None and seq.cached + 1 < len(seq.prompt):
                c.targets = seq.prompt[seq.cached + 1:seq.cached + n + 1]
            samplers = [seq] + (seq.followers if c.sample else [])
            c.forks = [f.id for f in samplers[1:]]
            part = len(seq.prompt) % self.block_size
            for s in samplers:
                if not s.registered:
                    plan.new[s.id] = s.spec
                    s.registered = True
                if c.sample and s.grammar is not None:
                    plan.masks[s.id] = s.grammar.mask()
                if s is not seq and part:
                    plan.copies.append((seq.blocks[len(seq.prompt) // self.block_size],
                                        s.blocks[-1]))
            plan.chunks.append(c)
        plan.chunks.sort(key=lambda c: len(c.tokens) > 1)  # decodes first, stable
        plan.drop, self._drop = self._drop, []
        return plan

    def update(self, plan: StepPlan,
               sampled: dict[int, int]) -> list[tuple[Sequence, int, str | None]]:
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
            self.prefill_tokens += max(0, min(len(seq.prompt), c.start + len(c.tokens)) - c.start)
            seq.cached = c.start + len(c.tokens)
            self._index(seq)
            if c.seq_id not in sampled:
                continue
            group = [seq]
            if c.forks:
                group += self._fork(seq, c.forks)
            out += [(s, sampled[s.id], self._take(s, sampled[s.id])) for s in group]
        return out

    def _fork(self, leader: Sequence, ids: list[int]) -> list[Sequence]:
        """The followers sampled with the leader's last prompt row become running sequences."""
        forked = [f for f in leader.followers if f.id in ids]
        leader.followers = [f for f in leader.followers if f.id not in ids]
        full = len(leader.prompt) // self.block_size
        at = self.running.index(leader) + 1
        for f in forked:
            f.cached, f.hashes, f.indexed = leader.cached, leader.hashes[:full], full
            f.long_rope = leader.long_rope
            if self.window is not None:  # the leader's live full prompt blocks, shared now
                live = self.alloc.share(leader.blocks[leader.freed:full])
                f.blocks = [FREED] * leader.freed + live + f.blocks
                f.freed = leader.freed
        self.running[at:at] = forked
        return forked

    def _take(self, seq: Sequence, tok: int) -> str | None:
        """Append a sampled token; returns the finish reason (and releases) when it ends."""
        reason = None
        if tok in seq.eos_ids:
            reason = "stop"
        else:
            seq.output.append(tok)
            if seq.grammar is not None and self._complete(seq, tok):
                reason = "stop"
            elif len(seq.output) >= seq.max_tokens:
                reason = "length"
        if reason:
            self.running.remove(seq)
            self._release(seq)
        return reason

    @staticmethod
    def _complete(seq: Sequence, tok: int) -> bool:
        try:
            return seq.grammar.advance(tok)
        except ValueError as e:  # cannot happen: the mask allowed the token
            print(f"shardwise engine: sequence {seq.id}: {e}", file=sys.stderr, flush=True)
            return True

    def prompt_logprobs(self, plan: StepPlan, found: dict[int, list]) -> list[tuple[int, list]]:
        """``(seq id, entries)`` of the prompt log-probabilities a step computed (entry i is
        for prompt position ``chunk.start + 1 + i``), for the sequence and its unforked
        followers, without those reported before a preemption made the sequence recompute
        them."""
        out = []
        for c in plan.chunks:
            seq = next((s for s in self.running if s.id == c.seq_id), None)
            entries = found.get(c.seq_id)
            if seq is None or not entries:
                continue
            fresh = entries[max(0, seq.lp_done - (c.start + 1)):]
            seq.lp_done = max(seq.lp_done, c.start + 1 + len(entries))
            if fresh:
                out += [(s.id, fresh) for s in (seq, *seq.followers)]
        return out

    def fail_step(self, plan: StepPlan) -> list[Sequence]:
        """A step raised: returns the sequences that fail now (released) -- the step's only
        sequence and its unforked followers -- or none, making the step's sequences suspects to
        retry one by one."""
        seqs = [s for s in self.running if any(c.seq_id == s.id for c in plan.chunks)]
        if len(seqs) != 1:
            self.suspects |= {s.id for s in seqs}
            return []
        self.running.remove(seqs[0])
        return seqs + self._release(seqs[0])
