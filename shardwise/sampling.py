"""Choosing the next token from vocabulary-parallel logits, exchanging as little as possible.

Rank r holds logits of vocabulary rows ``[start, stop)`` (padding set to ``-inf``).

* Greedy: each rank sends its best (value, index) per row; the global argmax is the best of those
  (ties go to the lowest index, as ``torch.argmax``). Two numbers per rank per row.
* Temperature sampling without top-k/top-p: the Gumbel-max trick,
  ``argmax_v (z_v / T + G_v)`` with ``G_v = -log(-log U_v)`` is a sample of ``softmax(z / T)``.
  Every rank draws the noise of the *whole* vocabulary from the request's seeded generator and
  keeps its columns, so the sample is the same at any tp; then the parallel argmax above.
* Top-k / top-p: the rows that need them gather their full logits (one row of V floats), filter,
  and use the same Gumbel noise.
* A token mask (structured output): one packed bitmask per row over the *whole* vocabulary,
  ``(n, ceil(V / 32))`` int32, bit ``v % 32`` of word ``v // 32`` set when token ``v`` is allowed
  (llguidance's layout). Every rank unpacks the bits of its own slice and sets the logits of
  disallowed tokens to ``-inf`` before anything else: the sampler stays vocabulary-parallel, and the
  mask is a tensor input of the step (an all-ones row for unconstrained sequences), not control
  flow.
* Log-probabilities (:func:`parallel_logprobs`): each rank's log-sum-exp, chosen logit and top k of
  its slice, exchanged in one gather of ``2 + 2k`` numbers per row and rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels
from .comm import all_gather_last, gather_stacked
from .mesh import ProcessGroup, group_size


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def parallel_argmax(local: torch.Tensor, start: int, group: ProcessGroup | None) -> torch.Tensor:
    """Global argmax over the vocabulary of local logits (n, V_local) -> (n,) int64."""
    val, idx = _row_max(local)
    if group_size(group) == 1:
        return idx + start
    mine = torch.stack([val.double(), (idx + start).double()], dim=-1)  # (n, 2)
    out = gather_stacked(mine, group, group_size(group))  # (t, n, 2)
    vals, idxs = out[..., 0], out[..., 1]                 # (t, n)
    best = vals.max(dim=0).values                         # (n,)
    cand = torch.where(vals == best, idxs, float("inf"))  # lowest index among ties
    return cand.min(dim=0).values.long()


def _row_max(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest logit and its first index (``local.max(dim=-1)``), on the CPU by
    ``shardwise::row_argmax`` once the native kernels are loaded (a vectorised pass: torch's
    max-with-index took 70-200 us a row of 49,152 here)."""
    if local.device.type == "cpu" and local.dim() == 2 and local.shape[1] > 0 and \
            local.dtype in (torch.float32, torch.bfloat16) and kernels.loaded():
        return torch.ops.shardwise.row_argmax(local)
    return local.max(dim=-1)


def gumbel(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Gumbel noise for the whole vocabulary, on the generator's device (the same on every rank
    for the same seed and device type; a seed draws other noise on a GPU than on the CPU)."""
    u = torch.rand(vocab, generator=generator, dtype=torch.float64,
                   device=generator.device).clamp_(1e-20, 1.0 - 1e-16)
    return -torch.log(-torch.log(u))


def _filter(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. row: (V,) already / T."""
    if top_k and top_k < row.numel():
        kth = row.topk(top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_, order = row.sort(descending=True)
        cum = sorted_.softmax(-1).cumsum(-1)
        drop = cum - sorted_.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        row = row.clone()
        row[order[drop]] = float("-inf")
    return row


def mask_words(vocab: int) -> int:
    """Int32 words of one packed token mask over ``vocab`` tokens."""
    return (vocab + 31) // 32


def unpack_mask(mask: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """The allowed tokens ``[start, start + width)`` of packed masks (n, words) -> (n, width) bool.
    Columns beyond the last word (the padded vocabulary) read its last word: they are ``-inf``
    already."""
    idx = torch.arange(start, start + width, device=mask.device)
    word = (idx // 32).clamp_(max=mask.shape[1] - 1)
    bit = (idx % 32).to(mask.dtype)
    return ((mask.index_select(1, word) >> bit) & 1).bool()           # (n, width)


def apply_mask(local: torch.Tensor, mask: torch.Tensor | None, start: int) -> torch.Tensor:
    """Local logits (n, V_local) with the tokens a packed mask (n, words) disallows at ``-inf``."""
    if mask is None:
        return local
    return local.masked_fill(~unpack_mask(mask, start, local.shape[-1]), float("-inf"))


def sample(local: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], *, start: int, vocab: int,
           group: ProcessGroup | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next token for each row of local logits (n, V_local); ``vocab`` is the real size;
    ``mask`` (n, words) int32: the allowed tokens of each row, packed (see the module)."""
    local = apply_mask(local, mask, start)
    if all(p.greedy for p in params):  # no noise to add: the argmax of the logits as they are
        return parallel_argmax(local, start, group)
    n, width = local.shape
    z = local.double()
    filtered = [i for i, p in enumerate(params) if not p.greedy and (p.top_k or p.top_p < 1.0)]
    full = None
    if filtered:
        full = all_gather_last(local[filtered].contiguous(), group)[:, :vocab].double()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        noise = gumbel(vocab, generators[i]).to(z.device)  # drawn where the generator lives
        if full is not None and i in filtered:
            row = _filter(full[filtered.index(i)] / p.temperature, p.top_k, p.top_p) + noise
            z[i] = float("-inf")
            lo, hi = start, min(start + width, vocab)
            if hi > lo:
                z[i, : hi - lo] = row[lo:hi]
        else:
            piece = torch.full((width,), float("-inf"), dtype=z.dtype, device=z.device)
            hi = max(0, min(width, vocab - start))
            piece[:hi] = noise[start:start + hi]
            z[i] = z[i] / p.temperature + piece
    return parallel_argmax(z, start, group)


def parallel_logprobs(local: torch.Tensor, tokens: torch.Tensor, k: int, *, start: int,
                      vocab: int, group: ProcessGroup | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under ``softmax(z)`` from vocabulary-parallel logits (n, V_local).

    Returns the log-probability of ``tokens`` (n,) and the top ``k``: values (n, k) and token ids
    (n, k), ties by the lower id. ``log p_v = z_v - logsumexp(z)`` with
    ``logsumexp(z) = logsumexp_r(logsumexp(z_r))`` over the ranks' slices; the chosen logit comes
    from the rank that owns it. One gather of ``(n, 2 + 2k)`` per rank."""
    n, width = local.shape
    z = local.double()
    hi = max(0, min(width, vocab - start))
    z[:, hi:] = float("-inf")                                          # padded rows never count
    lse = torch.logsumexp(z, dim=-1)                                   # (n,)
    own = (tokens >= start) & (tokens < start + hi)
    col = (tokens - start).clamp(0, max(0, width - 1))
    chosen = torch.where(own, z.gather(1, col[:, None])[:, 0], float("-inf"))  # (n,)
    kk = min(k, width)
    top = z.topk(kk, dim=-1) if kk else None
    vals = top.values if top is not None else z.new_empty(n, 0)
    ids = (top.indices + start).double() if top is not None else z.new_empty(n, 0)
    if kk < k:  # a slice narrower than k: pad with impossible entries
        vals = torch.cat([vals, z.new_full((n, k - kk), float("-inf"))], dim=1)
        ids = torch.cat([ids, z.new_full((n, k - kk), float(vocab))], dim=1)
    mine = torch.cat([lse[:, None], chosen[:, None], vals, ids], dim=1)  # (n, 2 + 2k)
    t = group_size(group)
    every = gather_stacked(mine, group, t) if t > 1 else mine[None]      # (t, n, 2 + 2k)
    total = torch.logsumexp(every[..., 0], dim=0)                        # (n,)
    chosen = every[..., 1].max(dim=0).values - total
    vals = every[..., 2:2 + k].permute(1, 0, 2).reshape(n, t * k)        # (n, t * k)
    ids = every[..., 2 + k:].permute(1, 0, 2).reshape(n, t * k)          # (n, t * k)
    order = torch.argsort(ids, dim=-1, stable=True)                      # lower id first...
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    best = torch.argsort(vals, dim=-1, descending=True, stable=True)[:, :k]  # ...among ties
    return chosen, vals.gather(1, best) - total[:, None], ids.gather(1, best).long()
