"""GPU catalog and the links between GPUs.

Peak figures are dense (no 2:4 sparsity) tensor-core rates from each datasheet. Link figures:

- NVLink numbers in datasheets are bidirectional totals per GPU: A100 600 GB/s = 300 GB/s each way,
  H100/H200 900 GB/s = 450 each way, V100 300 = 150 each way.
- PCIe x16 per direction: gen3 ~16 GB/s, gen4 ~32 GB/s, gen5 ~64 GB/s (datasheets print the
  bidirectional 32/64/128).
- The network: one NIC per GPU, e.g. DGX A100 8 x 200 Gb/s HDR (25 GB/s per GPU), DGX H100
  8 x 400 Gb/s NDR (50 GB/s per GPU).

A ring all-reduce of S bytes over n ranks takes  alpha + 2 (n-1)/n x S / B  where B is the achieved
bus bandwidth (nccl-tests' busbw), below the per-direction link rate by an efficiency:

- NVLink 0.75: nccl-tests issue 175 reports 232.5 GB/s busbw on 8 x A100 SXM (0.78 of 300),
  issue 149 ~200 GB/s (0.67).
- PCIe 0.5: NVIDIA/nccl issue 1639, 8 GPUs on PCIe gen5 reach 28 GB/s busbw (0.44 of 64) and 4 GPUs
  35 GB/s (0.55); traffic crosses CPU root complexes.
- network 0.85: nccl-tests issue 119 (84.8-96 GB/s of 100) and issue 175 (86 of 100).

alpha (small-message latency): NVLink 8 us (NVIDIA/nccl issue 1259: ~6 us NVLS on 2 H100s; SGLang
PR 6619: ~7 us at TP4), PCIe 30 us (NVIDIA/nccl issue 1530: ~40 us for 8 bytes over 8 PCIe GPUs),
network 25 us (NCCL's own tuner estimate of 25.2 us for 8 bytes between H100 nodes, nccl issue 1453).

Achievable matmul rate (MAMF, "Maximum Achievable Matmul FLOPS"): the best 16-bit matmul rate found by a
shape search on one GPU, from the comparison table in S. Bekman, "Machine Learning Engineering Open
Book", compute/accelerator/README.md (mamf-finder.py, mean of 100 iterations after 50 warm-ups):
A100 SXM 271.2 of 312 (86.9%), A100 PCIe 252.9 (81.1%), H100 SXM 794.5 of 989 (80.3%). Parts
without a measurement use MAMF_FALLBACK, the lowest NVIDIA ratio in that table (H100 SXM's 80%);
H200 has H100 SXM's compute at the same 700 W and gets its figure. SM counts are from NVIDIA's
architecture whitepapers (A100 108, H100 SXM 132, H100 PCIe 114, V100 80, L40S 142, L4 58, A10 72);
H20's 78 is the count reported by nvidia-smi/deviceQuery listings (NVIDIA publishes none).
"""
from __future__ import annotations

from dataclasses import dataclass

from ._names import lookup

PCIE_GBPS_PER_DIRECTION = {3: 16.0, 4: 32.0, 5: 64.0}
NVLINK_EFFICIENCY = 0.75
PCIE_EFFICIENCY = 0.5
NETWORK_EFFICIENCY = 0.85
ALPHA_S = {"nvlink": 8e-6, "pcie": 30e-6, "network": 25e-6}
MAMF_FALLBACK = 0.80


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # HBM/GDDR capacity as the datasheet prints it (binary GB, as nvidia-smi shows)
    hbm_GBps: float  # memory bandwidth, GB/s
    fp16_tflops: float  # dense tensor-core FP16
    bf16_tflops: float | None  # dense BF16 (None: no BF16 tensor cores)
    fp8_tflops: float | None  # dense FP8 (None: no FP8 tensor cores)
    nvlink_GBps: float  # bidirectional NVLink total per GPU (0: none)
    pcie_gen: int
    network_gbps: float  # default NIC bandwidth per GPU, Gb/s
    form: str  # "sxm" or "pcie"
    nvlink_pairs_only: bool = False  # NVLink bridge joining two PCIe cards
    source: str = ""
    sms: int = 0  # streaming multiprocessors (the wave size of a GEMM; see kernels.py)
    mamf_tflops: float | None = None  # measured Maximum Achievable Matmul FLOP/s, 16-bit (MAMF below)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def matmul_fraction(self) -> float:
        """Best measured 16-bit matmul rate over the datasheet peak (MAMF / peak)."""
        return self.mamf_tflops / self.fp16_tflops if self.mamf_tflops else MAMF_FALLBACK

    def peak_flops(self, precision: str) -> float:
        """Dense tensor-core peak in FLOP/s for 16-bit or fp8 compute (int8/int4 are weight-only)."""
        if precision == "fp8" and self.fp8_tflops:
            return self.fp8_tflops * 1e12
        if precision == "bf16" and self.bf16_tflops:
            return self.bf16_tflops * 1e12
        return self.fp16_tflops * 1e12


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOPS BF16 dense, NVLink 600 GB/s, PCIe gen4"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 989/1979 TFLOPS BF16/FP8 dense, 3.35 TB/s, " \
        "NVLink 900 GB/s; PCIe 756/1513, 2.0 TB/s, NVLink bridge 600 GB/s, PCIe gen5 128 GB/s"
_ENTRIES = [
    GPUSpec("v100-sxm2-32gb", 32, 900, 125, None, None, 300, 3, 50, "sxm",
            source="NVIDIA V100 datasheet: 125 TFLOPS FP16 tensor, 900 GB/s HBM2, NVLink 300 GB/s; "
                   "network: DGX-1 4 x 100 Gb/s EDR for 8 GPUs", sms=80),
    GPUSpec("a100-40gb-sxm", 40, 1555, 312, 312, None, 600, 4, 200, "sxm", source=_A100 + "; 1555 GB/s",
            sms=108, mamf_tflops=271.2),
    GPUSpec("a100-80gb-sxm", 80, 2039, 312, 312, None, 600, 4, 200, "sxm",
            source=_A100 + "; 2039 GB/s; network: DGX A100 8 x 200 Gb/s HDR", sms=108, mamf_tflops=271.2),
    GPUSpec("a100-40gb-pcie", 40, 1555, 312, 312, None, 600, 4, 100, "pcie", True, _A100 + "; 1555 GB/s",
            sms=108, mamf_tflops=252.9),
    GPUSpec("a100-80gb-pcie", 80, 1935, 312, 312, None, 600, 4, 100, "pcie", True, _A100 + "; 1935 GB/s",
            sms=108, mamf_tflops=252.9),
    GPUSpec("h100-sxm", 80, 3350, 989, 989, 1979, 900, 5, 400, "sxm",
            source=_H100 + "; network: DGX H100 8 x 400 Gb/s NDR", sms=132, mamf_tflops=794.5),
    GPUSpec("h100-pcie", 80, 2000, 756, 756, 1513, 600, 5, 200, "pcie", True, _H100, sms=114),
    GPUSpec("h200", 141, 4800, 989, 989, 1979, 900, 5, 400, "sxm",
            source="NVIDIA H200 datasheet (2024): 141 GB HBM3e, 4.8 TB/s, H100 SXM compute, NVLink 900 GB/s",
            sms=132, mamf_tflops=794.5),
    GPUSpec("h20", 96, 4000, 148, 148, 296, 900, 5, 400, "sxm",
            source="NVIDIA HGX H20 product brief (2024): 96 GB HBM3, 4.0 TB/s, 148/296 TFLOPS "
                   "BF16/FP8, NVLink 900 GB/s", sms=78),
    GPUSpec("l40s", 48, 864, 362, 362, 733, 0, 4, 100, "pcie",
            source="NVIDIA L40S datasheet (2023): 48 GB GDDR6, 864 GB/s, 362/733 TFLOPS BF16/FP8 "
                   "dense, PCIe gen4 x16 64 GB/s bidirectional, no NVLink",
            sms=142),
    GPUSpec("l4", 24, 300, 121, 121, 242, 0, 4, 50, "pcie",
            source="NVIDIA L4 datasheet (2023): 24 GB GDDR6, 300 GB/s, 121/242 TFLOPS BF16/FP8 dense", sms=58),
    GPUSpec("a10", 24, 600, 125, 125, None, 0, 4, 50, "pcie",
            source="NVIDIA A10 datasheet (2021): 24 GB GDDR6, 600 GB/s, 125 TFLOPS BF16 dense", sms=72),
    # not a GPU: this project's development machine, so that `shardwise plan --gpu cpu` can be
    # held against `benchmarks/train_memory.py` (its memory model; CPU times are not modelled)
    GPUSpec("cpu", 24, 20, 0.2, 0.2, None, 0, 3, 10, "pcie",
            source="the 2-core development VM (24 GiB RAM; throughput figures are placeholders)"),
]
GPUS: dict[str, GPUSpec] = {g.name: g for g in _ENTRIES}
GPU_ALIASES = {"a100": "a100-80gb-sxm", "h100": "h100-sxm", "v100": "v100-sxm2-32gb",
               "a100-80gb": "a100-80gb-sxm", "a100-40gb": "a100-40gb-sxm", "h100-80gb": "h100-sxm",
               "h200-sxm": "h200", "a100-sxm": "a100-80gb-sxm", "a100-pcie": "a100-80gb-pcie"}


def get_gpu(name: str) -> GPUSpec:
    return lookup("GPU", name, GPUS, GPU_ALIASES)


@dataclass(frozen=True)
class Link:
    """What a collective over one group sees: latency alpha (s) and bus bandwidth (GB/s)."""

    kind: str  # "nvlink" | "pcie" | "network" | "measured"
    alpha_s: float
    busbw_GBps: float
    peak_GBps: float  # per-direction rate before efficiency

    def describe(self) -> str:
        return (f"{self.kind} {self.peak_GBps:g} GB/s per direction, modelled busbw "
                f"{self.busbw_GBps:.0f} GB/s, latency {self.alpha_s * 1e6:.0f} us")


def intra_link(gpu: GPUSpec, interconnect: str, group_size: int) -> Link:
    """The link inside one node for a group of ``group_size`` GPUs."""
    if interconnect == "nvlink" and gpu.nvlink_GBps and (not gpu.nvlink_pairs_only or group_size <= 2):
        peak = gpu.nvlink_GBps / 2
        return Link("nvlink", ALPHA_S["nvlink"], peak * NVLINK_EFFICIENCY, peak)
    peak = PCIE_GBPS_PER_DIRECTION[gpu.pcie_gen]
    return Link("pcie", ALPHA_S["pcie"], peak * PCIE_EFFICIENCY, peak)


def network_link(network_gbps: float, members_per_node: int, intra: Link) -> Link:
    """A group spanning nodes: each node's members drive their own NICs; bounded by the intra link."""
    peak = network_gbps / 8 * members_per_node
    bw = min(peak * NETWORK_EFFICIENCY, intra.busbw_GBps)
    return Link("network", max(ALPHA_S["network"], intra.alpha_s), bw, network_gbps / 8)


def default_interconnect(gpu: GPUSpec) -> str:
    """SXM parts talk over NVLink; PCIe cards (and L40S) over PCIe."""
    return "nvlink" if gpu.form == "sxm" else "pcie"


def check_interconnect(gpu: GPUSpec, interconnect: str) -> None:
    if interconnect not in ("nvlink", "pcie"):
        raise ValueError(f"--interconnect must be nvlink or pcie, got {interconnect!r}")
    if interconnect == "nvlink" and not gpu.nvlink_GBps:
        raise ValueError(f"{gpu.name} has no NVLink: use --interconnect pcie")
