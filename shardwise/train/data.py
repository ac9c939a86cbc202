"""Training data: text files tokenized with the model's tokenizer, packed, sharded across DP.

Packing: the documents' tokens are concatenated, each followed by EOS, into one stream ``T`` and
cut into ``N = (len(T) - 1) // s`` rows of ``s + 1`` tokens with stride ``s``: row ``i`` is
``T[i s : i s + s + 1]``, input ``row[:-1]``, target ``row[1:]``. No padding, so every micro-batch
has exactly ``b x s`` targets and the mean of micro-batch means is the global-batch mean.

Order and sharding are a pure function of ``(seed, step)``: global sample ``g = step x G + j``
(``j < G``) is row ``perm_e[g mod N]`` of epoch ``e = g // N`` (a seeded permutation per epoch);
DP replica ``d`` takes ``j`` in ``[d G / dp, (d + 1) G / dp)``. Resuming needs only the step.
A model without a tokenizer whose vocabulary covers 256 ids (the ``tiny`` preset) reads UTF-8 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.source import ModelSource


def tokenize_files(paths: list[str], source: ModelSource) -> list[int]:
    """The packed token stream of ``paths`` (each file one document, EOS after each)."""
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise FileNotFoundError(f"cannot read data file {p}: {e.strerror}") from None
    cfg = source.config
    if source.tokenizer is None:
        if cfg.vocab_size < 256:
            raise ValueError(f"model {source.name!r} has no tokenizer and a vocabulary of "
                             f"{cfg.vocab_size} < 256: cannot fall back to UTF-8 bytes")
        eos = cfg.eos_ids[0] if cfg.eos_ids else 0
        stream: list[int] = []
        for t in texts:
            stream += list(t.encode("utf-8")) + [eos]
        return stream
    from ..checkpoint.source import load_tokenizer
    tok = load_tokenizer(source)
    eos = tok.eos_token_id if tok.eos_token_id is not None else (cfg.eos_ids or [0])[0]
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [eos]
    return stream


@dataclass
class PackedData:
    rows: torch.Tensor  # (N, seq_len + 1) int64
    seed: int = 0

    @classmethod
    def from_stream(cls, stream: list[int], seq_len: int, *, seed: int = 0) -> "PackedData":
        n = (len(stream) - 1) // seq_len
        if n < 1:
            raise ValueError(f"the data has {len(stream)} tokens: at least seq_len + 1 = "
                             f"{seq_len + 1} are needed for one training sequence")
        t = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
        rows = t.unfold(0, seq_len + 1, seq_len).contiguous()  # (n, seq_len + 1)
        return cls(rows, seed)

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def batch(self, step: int, *, global_batch: int, dp: int, dp_rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, targets)``, each ``(global_batch / dp, seq_len)``: replica ``dp_rank``'s share
        of step ``step`` (0-based)."""
        per = global_batch // dp
        first = step * global_batch + dp_rank * per
        idx = []
        perms: dict[int, torch.Tensor] = {}
        for g in range(first, first + per):
            e = g // self.num_rows
            if e not in perms:
                perms[e] = self._perm(e)
            idx.append(int(perms[e][g % self.num_rows]))
        rows = self.rows[idx]  # (per, s + 1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
