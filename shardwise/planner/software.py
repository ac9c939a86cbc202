"""What the training software does. Kernels and overlaps change the time, not the math.

Presets (``--software NAME``; the validation table's ``software`` column names one):

- ``megatron-2021``: Megatron-LM as run for Narayanan et al. 2021 (Megatron-LM examples/sc21, the
  PyTorch 20.12 container): fused bias+GeLU, bias+dropout+add and scale+mask+softmax kernels (their
  section 4.2); attention scores materialised in memory (no fused attention); tensor-parallel
  all-reduces blocking; pipeline sends blocking, with the scatter/gather optimization (section 4.1:
  each rank sends b s h / t over its own NIC, then an NVLink all-gather); gradients all-reduced after
  the last backward (``--DDP-impl local``: nothing overlapped).
- ``megatron-2021-torch-ddp``: the same with ``--DDP-impl torch``: PyTorch DDP all-reduces gradient
  buckets while the backward pass runs (the pp=1 rows of Narayanan's Table 1).
- ``megatron-2022``: Megatron-LM of Korthikanti et al. 2022: as 2021, plus the all-reduce (or, with
  sequence parallelism, the reduce-scatter) of each column-parallel layer's input gradient overlapped
  with its weight-gradient GEMM (their section 6.2; the all-gather of the input that sequence
  parallelism re-does in the backward overlaps the input-gradient GEMM).
- ``megatron-core`` (default): what Megatron-Core and torchtitan run today: fused attention
  (FlashAttention-2 or cuDNN), the 2022 backward overlap, gradient reduction overlapped with the
  backward (``--overlap-grad-reduce``) and pipeline sends overlapped with compute
  (``--overlap-p2p-communication``). No validation row runs this preset (see docs/planner.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from ._names import lookup


@dataclass(frozen=True)
class Software:
    name: str
    fused_attention: bool  # FlashAttention-style kernel: no s x s scores in memory
    tp_overlap_backward: bool  # input-gradient collective hidden behind the weight-gradient GEMM
    dp_overlap: bool  # gradient reduction runs during the backward pass
    p2p_overlap: bool  # pipeline sends and receives run during compute
    scatter_gather: bool = True  # Narayanan 2021 section 4.1
    description: str = ""


_2021 = "Megatron-LM of Narayanan et al. 2021 (examples/sc21)"
SOFTWARE: dict[str, Software] = {s.name: s for s in (
    Software("megatron-2021", False, False, False, False, description=_2021 + ", --DDP-impl local"),
    Software("megatron-2021-torch-ddp", False, False, True, False, description=_2021 + ", --DDP-impl torch"),
    Software("megatron-2022", False, True, False, False,
             description="Megatron-LM of Korthikanti et al. 2022 (backward TP overlap)"),
    Software("megatron-core", True, True, True, True,
             description="Megatron-Core / torchtitan today: fused attention, TP, DP and p2p overlap"),
)}
DEFAULT_SOFTWARE = "megatron-core"


def get_software(name: str) -> Software:
    return lookup("software", name, SOFTWARE, {})
