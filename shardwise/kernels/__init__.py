"""Native kernels, built on first use for this machine and cached outside the package.

``linear.cpp`` holds the dense products of inference, which stream each weight once (AVX-512
fp32, AVX512-BF16 bf16; bf16 products of 4 rows or more on AMX tiles where the CPU has them,
``shardwise::linear_amx()``, switched with ``shardwise::set_linear_amx`` or
``SHARDWISE_AMX=0``): ``shardwise::linear_tiled`` over weights laid out in 16-row tiles
(:class:`Tiled`, what the inference engines hold: :func:`tile_weights`) for any number of rows
(``shardwise::linear_tiled_swiglu``: a SiLU MLP's gate/up product with the activation fused in),
and ``shardwise::linear`` over row-major weights for the few rows of a decode step (a weight
that cannot be tiled). ``qlinear.cpp`` is the quantized product (:mod:`shardwise.quant.native`),
``attention.cpp`` attention over the paged KV cache where the keys lie (decode rows:
``shardwise::paged_decode``, :class:`shardwise.serve.step.StaticStep`; prompt chunks:
``shardwise::prefill_attention``, :meth:`shardwise.serve.kv.PagedKVCache.attend`), ``shm.cpp``
the shared-memory all-reduce of :mod:`shardwise.shm` without Python in the loop
(``shardwise::shm_all_reduce``), ``sample.cpp`` the greedy pick over a row of logits
(``shardwise::row_argmax``, :mod:`shardwise.sampling`);
``pieces.cpp`` the eager step's RMSNorm, SiLU-and-multiply and rope (:func:`native_pieces`);
``simd.h`` what they share. They are compiled as two translation units (``small.cpp`` holds
all but ``linear.cpp``) with the C++ compiler torch.compile already needs on CPU
(``-march=native -fopenmp``; the build directory is keyed by the source and this CPU's flags)
through ``torch.utils.cpp_extension``; its threads are torch's intra-op threads (the one OpenMP
runtime torch loaded). Where it cannot be built or the CPU lacks the instructions,
:func:`linear` is plain ``F.linear``.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# two translation units: linear.cpp, and small.cpp, which includes the other five (torch's headers
# are parsed once for them: 14 s of a file's build here)
SOURCES = tuple(Path(__file__).with_name(f) for f in ("linear.cpp", "small.cpp"))
HEADERS = tuple(Path(__file__).with_name(f) for f in (
    "simd.h", "qlinear.cpp", "attention.cpp", "shm.cpp", "sample.cpp", "pieces.cpp"))
MAX_ROWS = 16          # above this many rows a GEMM (oneDNN/MKL) wins: F.linear
_STATE: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_dir() -> Path:
    """One build per source, CPU, torch and *place*: ninja rebuilds everything when the paths in
    its commands change, so two checkouts (or two venvs) sharing a directory would each rebuild
    it (minutes) every time the other had loaded last."""
    where = f"{Path(__file__).resolve().parent}|{Path(torch.__file__).resolve().parent}"
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + _cpu_flags().encode() +
                         torch.__version__.encode() + where.encode()).hexdigest()[:16]
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
        torch.library.register_fake("shardwise::linear_tiled")(_tfake)
        torch.library.register_fake("shardwise::linear_tiled_swiglu")(_gfake)
        torch.library.register_fake("shardwise::paged_decode")(_pfake)
        torch.library.register_fake("shardwise::prefill_attention")(_pafake)
        torch.library.register_fake("shardwise::qlinear")(_qfake)
        torch.library.register_fake("shardwise::shm_all_reduce")(_sfake)
        torch.library.register_fake("shardwise::row_argmax")(_afake)
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
    if not kinds:
        return "native dense kernels: no dtype on this CPU (F.linear)"
    layout = "tiled weights" if os.environ.get("SHARDWISE_TILED", "1") != "0" else \
        "row-major weights (SHARDWISE_TILED=0)"
    amx = "; bf16 products of 4+ rows on AMX tiles" if torch.ops.shardwise.linear_amx() and \
        "bf16" in kinds and "tiled" in layout else ""
    return f"native dense kernels for {', '.join(kinds)}: {layout}{amx}"


def enable() -> frozenset[torch.dtype]:
    """Route the few-row products of inference through ``shardwise::linear`` from now on (in this
    process), for the dtypes this CPU supports; returns them. Called by the inference engines
    before they compile anything, so that a traced :func:`linear` reads a settled global."""
    global _ENABLED, _MKLDNN, _PIECES
    if load():
        _ENABLED = frozenset(dt for dt in (torch.float32, torch.bfloat16)
                             if torch.ops.shardwise.linear_supported(dt))
        _PIECES = True
    _MKLDNN = torch.backends.mkldnn.is_available()  # read here: dynamo cannot trace the call
    return _ENABLED


_ENABLED: frozenset[torch.dtype] = frozenset()
_MKLDNN = False
_PIECES = False


def native_pieces(x: torch.Tensor) -> bool:
    """Whether :mod:`shardwise.models.pieces` runs ``x``'s RMSNorm, SiLU-and-multiply and rope as
    one native pass each (``pieces.cpp``): eager inference on the CPU in fp32 or bf16, once
    :func:`enable`d. Under autograd and under torch.compile (whose graphs fuse the torch
    composition themselves) the pieces stay torch operators."""
    return _PIECES and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
        and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


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


class WeightForm(nn.Module):
    """The runtime form of one rank's ``(n, k)`` weight, what a layer multiplies with in place of
    its ``weight`` parameter (set as the layer's ``qweight``): quantized forms
    (:class:`shardwise.quant.kernels.QuantizedWeight`) and the dense :class:`Tiled`.
    ``linear(x, bias)``: ``x W^T + bias`` for ``x`` (..., k) in the activation dtype;
    ``rows(ids)``: the rows ``W[ids]`` (an embedding lookup); ``dequantize()``: the whole weight.
    Inference only: there is no backward."""

    form = "?"
    no_backward = "runtime weight forms are for inference and have no backward"

    def __init__(self, n: int, k: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.n, self.k, self.dtype = n, k, dtype
        self.pieces = None  # the float parameter's pieces (shardwise.shards)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(self.no_backward)
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.k).to(self.dtype).contiguous())  # (tokens, k)
        y = y.view(*lead, self.n)                                        # (..., n)
        return y if bias is None else y + bias

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.dequantize(self.dtype))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.form} weights are not looked up by row")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.form}, n={self.n}, k={self.k}, dtype={self.dtype}"


class Tiled(WeightForm):
    """A dense fp32 or bf16 weight in ``shardwise::linear_tiled``'s tiles of 16 rows, column-major
    inside: fp32 ``(n/16, k, 16)``, bf16 ``(n/16, k/2, 32)`` (column pairs, the operand of a bf16
    dot product). Same bytes as the row-major weight; each thread streams its tiles as one
    sequential read (benchmarks/RESULTS.md, issue 10: 1.3-1.5x the row-major kernel's bandwidth in
    bf16), and every row count runs on it (a unit of tiles is read from memory once and serves
    all the rows from cache).

    ``swiglu=True`` (a fused gate/up weight, gate rows first, both a multiple of 16 rows): the
    tiles alternate gate, up (``shardwise::linear_tiled_swiglu``'s layout) and :meth:`linear`
    returns SwiGLU's ``silu(gate) * up``, (..., n / 2), in the same pass over the weight;
    :meth:`rows` and :meth:`dequantize` still give the weight's own rows."""

    def __init__(self, weight: torch.Tensor, swiglu: bool = False) -> None:
        n, k = weight.shape
        super().__init__(n, k, weight.dtype)
        self.form = "bf16-tiled" if weight.dtype == torch.bfloat16 else "fp32-tiled"
        self.swiglu = swiglu
        self.order = None  # SwiGLU: the weight's row at each row of the tiled order
        if swiglu:
            if n % 32:
                raise ValueError(f"a SwiGLU tiling needs gate and up in 16s of rows; got {n} rows")
            self.form += "-swiglu"
            j = torch.arange(n, device=weight.device)
            pair, lane = j // 32, j % 32  # 16 rows of gate, then the same 16 of up, ...
            self.order = torch.where(lane < 16, pair * 16 + lane, n // 2 + pair * 16 + lane - 16)
        w = weight.detach()
        self.register_buffer("w", _tile(w if self.order is None else w[self.order]))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(self.no_backward)
        if self.swiglu:
            if bias is not None:
                bias = bias[self.order]
            return torch.ops.shardwise.linear_tiled_swiglu(x.to(self.dtype), self.w, bias)
        return torch.ops.shardwise.linear_tiled(x.to(self.dtype), self.w, bias)  # any leading dims

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight: tiled row ``p``, tile ``p // 16``, lane ``p % 16``."""
        p = ids if self.order is None else torch.argsort(self.order)[ids]
        t, lane = p // 16, p % 16
        return self.w.view(self.n // 16, -1, 16, self.w.shape[2] // 16)[t, :, lane].reshape(
            *ids.shape, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(torch.arange(self.n, device=self.w.device)).to(dtype)


def _tile(w: torch.Tensor) -> torch.Tensor:
    """(n, k) -> :class:`Tiled`'s layout (a new tensor)."""
    n, k = w.shape
    p = 2 if w.dtype == torch.bfloat16 else 1
    return w.reshape(n // 16, 16, k // p, p).transpose(1, 2).reshape(n // 16, k // p, 16 * p) \
        .contiguous()


def tileable(w: torch.Tensor) -> bool:
    """Whether :class:`Tiled` takes ``w`` here (kernels built, its dtype supported on this CPU,
    rows in 16s, columns even)."""
    return (w.dim() == 2 and w.device.type == "cpu" and not w.is_meta and w.dtype in _ENABLED
            and w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0 and w.numel() > 0)


@torch.no_grad()
def tile_weights(model: nn.Module, swiglu: bool = True) -> int:
    """Lay out the dense weights of ``model``'s sharded linears, embedding and head as
    :class:`Tiled` (their ``qweight``; the ``weight`` parameter is dropped, so each is held once;
    a SiLU MLP's gate/up in its SwiGLU form, the activation fused into the product, unless
    ``swiglu=False``):
    for the inference engines, after :func:`enable`. Returns the bytes tiled. Skipped (the
    weight stays row-major) where a weight does not fit, for models with experts (their layers
    read weights directly), and with ``SHARDWISE_TILED=0`` in the environment (for comparing the
    two layouts)."""
    if os.environ.get("SHARDWISE_TILED", "1") == "0" or not _ENABLED:
        return 0
    from ..layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, \
        VocabParallelEmbedding
    if getattr(getattr(getattr(model, "config", None), "arch", None), "mlp", None) == "moe":
        return 0
    from ..models.mlp import MLP
    kinds = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)
    # SwiGLU MLPs: gate and up tiled in pairs, the activation in their product's epilogue
    fused = {id(m.gate_up_proj) for m in model.modules()
             if swiglu and isinstance(m, MLP) and m.act is F.silu and m.local % 16 == 0}
    done = 0
    for module in model.modules():
        w = module._parameters.get("weight") if isinstance(module, kinds) else None
        if w is None or getattr(module, "qweight", None) is not None or not tileable(w):
            continue
        form = Tiled(w, swiglu=id(module) in fused)
        form.pieces = getattr(w, "pieces", None)
        del module.weight
        module.qweight = form
        done += form.nbytes()
    return done


def _fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def _tfake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (w.shape[0] * 16,))


def _gfake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (w.shape[0] * 8,))


def _pfake(q, k_cache, v_cache, table, lens, kv_of, scale, softcap) -> torch.Tensor:
    return q.new_empty(q.shape)


def _pafake(q, k_cache, v_cache, slots, kv_of, q_start, window, scale, softcap) -> torch.Tensor:
    return q.new_empty(q.shape)


def _qfake(x, q, scale, zero, group, bits, bias=None) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (q.shape[0] * 16,))


def _sfake(x, group) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _afake(x) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[:1]), x.new_empty(x.shape[:1], dtype=torch.long)


def loaded() -> bool:
    """Whether the kernels are loaded in this process already (never starts a build)."""
    return bool(_STATE.get("ok"))


def paged_decode_available() -> bool:
    """Whether ``shardwise::paged_decode`` (decode attention over the paged KV cache) is built
    (any CPU: it needs no particular instructions)."""
    return load()


def qlinear_available() -> bool:
    """Whether ``shardwise::qlinear`` (grouped int8/int4 weights, :mod:`shardwise.quant`) runs
    on this CPU."""
    return load() and bool(torch.ops.shardwise.qlinear_supported())
