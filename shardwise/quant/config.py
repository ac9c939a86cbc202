"""How a model is quantized (:class:`QuantConfig`) and the ``--quant`` options of every command
that loads a model for inference (generate, serve, verify, convert). No torch here."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

METHODS = ("int8", "int4")
GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernel takes (and the native kernels)
DEFAULT_GROUP = {"int8": 32, "int4": 128}  # int8: GGUF Q8_0's blocks; int4: the common g128
Q8_0_MODES = ("channel", "block")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's weights are quantized.

    ``method``: the matmul weights of the decoder layers (``int8`` symmetric or ``int4``
    asymmetric, one scale per ``group`` input columns, by default 32 for int8 (GGUF Q8_0's
    blocks) and 128 for int4; ``group=0``: int8 with one scale per output channel, torch's int8
    kernel's only form). ``embedding``: the embedding and the LM head, in
    the same groups (``int8``: llama.cpp keeps them at 8 bits or more in its 4-bit files too; a
    4-bit head costs more quality than the rest of the model). ``q8_0``: how GGUF Q8_0 tensors
    load: ``block`` keeps their 32-blocks exactly (the native kernel's groups of 32; without it,
    one torch kernel call per block column), ``channel`` re-quantizes them per row.
    """

    method: str = "int8"
    group: int | None = None  # None: DEFAULT_GROUP[method]
    embedding: str = "int8"
    q8_0: str = "block"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization {self.method!r}: use one of {', '.join(METHODS)}")
        if self.group is None:
            object.__setattr__(self, "group", DEFAULT_GROUP[self.method])
        if self.embedding not in METHODS:
            raise ValueError(f"embedding quantization {self.embedding!r}: use one of "
                             f"{', '.join(METHODS)}")
        if self.group not in GROUPS and not (self.group == 0 and self.method == "int8"
                                             and self.embedding == "int8"):
            raise ValueError(f"group {self.group}: the int4 kernels take groups of "
                             f"{', '.join(map(str, GROUPS))} columns (int8 also 0: per channel)")
        if self.q8_0 not in Q8_0_MODES:
            raise ValueError(f"q8_0 {self.q8_0!r}: use one of {', '.join(Q8_0_MODES)}")

    def to_json(self) -> dict:
        return {"method": self.method, "group": self.group, "embedding": self.embedding}

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        return cls(method=d["method"], group=int(d.get("group", DEFAULT_GROUP[d["method"]])),
                   embedding=d.get("embedding", "int8"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--quant``, ``--group``, ``--q8-0`` (``--dtype`` stays the activation dtype)."""
    p.add_argument("--quant", choices=METHODS, default=None,
                   help="weight-only quantization of the matmul weights (int8 or int4, in "
                        "groups of --group columns); a GGUF keeps its Q4_0/Q4_1 as int4 and "
                        "Q8_0 as int8")
    p.add_argument("--group", type=int, choices=(0,) + GROUPS, default=None,
                   help="input columns per scale (and int4 zero point); default 32 for int8 "
                        "(GGUF Q8_0's blocks), 128 for int4; 0: int8 per output channel")
    p.add_argument("--q8-0", dest="q8_0", choices=Q8_0_MODES, default="block",
                   help="GGUF Q8_0 tensors: kept in their blocks of 32 (block, default) or "
                        "re-quantized per row (channel)")


def from_args(args: argparse.Namespace) -> QuantConfig | None:
    """The :class:`QuantConfig` the options name, or None without ``--quant``."""
    if getattr(args, "quant", None) is None:
        return None
    return QuantConfig(method=args.quant, group=args.group, q8_0=args.q8_0)
