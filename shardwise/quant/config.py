"""How a model is quantized (:class:`QuantConfig`) and the ``--quant`` options of every command
that loads a model for inference (generate, serve, verify, convert). No torch here."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

METHODS = ("int8", "int4")
GROUPS = (32, 64, 128, 256)  # int4 group sizes torch's kernel takes
Q8_0_MODES = ("channel", "block")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's weights are quantized.

    ``method``: the matmul weights of the decoder layers (``int8`` per output channel, or
    ``int4`` in groups of ``group`` input columns). ``embedding``: the embedding and the LM head
    (``int8`` per row: llama.cpp keeps them at 8 bits or more in its 4-bit files too; a 4-bit
    head costs more quality than the rest of the model). ``q8_0``: how GGUF Q8_0 tensors load:
    ``channel`` re-quantizes their 32-blocks per row (torch's int8 kernel), ``block`` keeps the
    blocks exactly (one int8 kernel call per block column).
    """

    method: str = "int8"
    group: int = 128
    embedding: str = "int8"
    q8_0: str = "channel"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization {self.method!r}: use one of {', '.join(METHODS)}")
        if self.embedding not in METHODS:
            raise ValueError(f"embedding quantization {self.embedding!r}: use one of "
                             f"{', '.join(METHODS)}")
        if self.group not in GROUPS:
            raise ValueError(f"group {self.group}: torch's int4 kernel takes groups of "
                             f"{', '.join(map(str, GROUPS))} columns")
        if self.q8_0 not in Q8_0_MODES:
            raise ValueError(f"q8_0 {self.q8_0!r}: use one of {', '.join(Q8_0_MODES)}")

    def to_json(self) -> dict:
        return {"method": self.method, "group": self.group, "embedding": self.embedding}

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        return cls(method=d["method"], group=int(d.get("group", 128)),
                   embedding=d.get("embedding", "int8"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--quant``, ``--group``, ``--q8-0`` (``--dtype`` stays the activation dtype)."""
    p.add_argument("--quant", choices=METHODS, default=None,
                   help="weight-only quantization of the matmul weights (int8 per channel, "
                        "int4 in groups); a GGUF keeps its Q4_0/Q4_1 as int4 and Q8_0 as int8")
    p.add_argument("--group", type=int, choices=GROUPS, default=128,
                   help="int4: input columns per scale and zero point (default 128)")
    p.add_argument("--q8-0", dest="q8_0", choices=Q8_0_MODES, default="channel",
                   help="GGUF Q8_0 tensors: re-quantized per row for the int8 kernel "
                        "(channel, default) or kept in their blocks of 32 (block)")


def from_args(args: argparse.Namespace) -> QuantConfig | None:
    """The :class:`QuantConfig` the options name, or None without ``--quant``."""
    if getattr(args, "quant", None) is None:
        return None
    return QuantConfig(method=args.quant, group=args.group, q8_0=args.q8_0)
