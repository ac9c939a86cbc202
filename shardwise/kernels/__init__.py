"""Native kernels, built on first use for this machine and cached outside the package.

``linear.cpp`` is ``shardwise::linear``, the matrix product of the few rows of a decode step: it
streams each weight once (AVX-512 fp32, AVX512-BF16 bf16). It is compiled with the C++ compiler
torch.compile already needs on CPU (``-march=native -fopenmp``; the build directory is keyed by the
source and this CPU's flags) through ``torch.utils.cpp_extension``; its threads are torch's
intra-op threads (the one OpenMP runtime torch loaded). Where it cannot be built or the CPU
lacks the instructions, :func:`linear` is plain ``F.linear``.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("linear.cpp")
SOURCES = (SOURCE, Path(__file__).with_name("qlinear.cpp"))
MAX_ROWS = 16          # above this many rows a GEMM (oneDNN/MKL) wins: F.linear
_STATE: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_dir() -> Path:
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + _cpu_flags().encode() +
                         torch.__version__.encode()).hexdigest()[:16]
    return Path(os.path.expanduser("~/.cache/shardwise/kernels")) / f"linear-{key}"


def load() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason kept in
    :func:`status`, where that is not possible."""
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    _STATE["ok"], _STATE["why"] = False, ""
    try:
        from torch.utils.cpp_extension import load as cpp_load
        d = build_dir()
        d.mkdir(parents=True, exist_ok=True)
        venv_bin = os.path.dirname(sys.executable)  # ninja from the package `ninja`
        if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        # torch's own build lock is a file that a process killed mid-build leaves behind, and
        # every later load then waits on it forever. An flock dies with its holder: under it,
        # no other process is building here, so a leftover torch lock is stale.
        with open(d / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (d / "lock").unlink(missing_ok=True)
            cpp_load(name="shardwise_kernels", sources=[str(p) for p in SOURCES], build_directory=str(d),
                     extra_cflags=["-O3", "-march=native", "-fopenmp"],
                     # libgomp.so.1 by soname: the process's copy (torch's own) is the one used
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        torch.library.register_fake("shardwise::linear")(_fake)
        torch.library.register_fake("shardwise::qlinear")(_qfake)
        _STATE["ok"] = True
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error: fall back
        _STATE["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
    return bool(_STATE["ok"])


def status() -> str:
    """Which kernels run here, in words."""
    if not load():
        return f"native kernels unavailable ({_STATE['why']}): F.linear"
    kinds = [n for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             if torch.ops.shardwise.linear_supported(dt)]
    return f"native decode linear for {', '.join(kinds) or 'no dtype on this CPU'}"


def enable() -> frozenset[torch.dtype]:
    """Route the few-row products of inference through ``shardwise::linear`` from now on (in this
    process), for the dtypes this CPU supports; returns them. Called by the inference engines
    before they compile anything, so that a traced :func:`linear` reads a settled global."""
    global _ENABLED, _MKLDNN
    if load():
        _ENABLED = frozenset(dt for dt in (torch.float32, torch.bfloat16)
                             if torch.ops.shardwise.linear_supported(dt))
    _MKLDNN = torch.backends.mkldnn.is_available()  # read here: dynamo cannot trace the call
    return _ENABLED


_ENABLED: frozenset[torch.dtype] = frozenset()
_MKLDNN = False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for inference, by the fastest path measured here once :func:`enable`d:
    ``shardwise::linear`` for at most :data:`MAX_ROWS` rows; oneDNN for more rows in fp32
    (MKL's sgemm, F.linear's path, runs well below it on AMD CPUs: benchmarks/RESULTS.md).
    Each is one operator under torch.compile; with a gradient to carry it is ``F.linear``."""
    if x.dtype in _ENABLED and x.device.type == "cpu" and not torch.is_grad_enabled():
        if x.numel() <= MAX_ROWS * x.shape[-1]:
            return torch.ops.shardwise.linear(x, weight, bias)
        # eager only: inductor cannot lower this op on unpacked weights (it packs its own)
        if x.dtype == torch.float32 and _MKLDNN and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def _qfake(x, q, scale, zero, group, bits, bias=None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (q.shape[0] * 16,))


def qlinear_available() -> bool:
    """Whether ``shardwise::qlinear`` (grouped int8/int4 weights, :mod:`shardwise.quant`) runs
    on this CPU."""
    return load() and bool(torch.ops.shardwise.qlinear_supported())
