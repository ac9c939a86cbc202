"""llama.cpp as a benchmark contender: build it once, cached outside the repository, and find it.

The source is the copy of llama.cpp vendored in the ``llama-cpp-python`` sdist on PyPI (a pinned,
reproducible snapshot reachable through pip alone)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xf llama_cpp_python-0.3.36.tar.gz; cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DBUILD_SHARED_LIBS=OFF [GCC 12: -DCMAKE_C_FLAGS/-DCMAKE_CXX_FLAGS="-fno-tree-dse -fno-dse"]
    cmake --build build -j --target llama-bench llama-server llama-quantize

GCC 12 miscompiles ggml's AMX kernels (dead-store elimination drops a tile configuration store:
SIGILL at the first AMX instruction); ``-fno-tree-dse -fno-dse`` avoids it. The build takes about
4 minutes of 2 cores: run it under ``cpulock bench``. ``python benchmarks/llama_cpp.py`` builds
(or reports the cached build) and prints the binaries; :func:`binaries` returns them, or ``None``
with the reason, so a benchmark skips the contender with a message where it cannot build.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.path.expanduser("~/.cache/shardwise")) / f"llama.cpp-{VERSION}"
TARGETS = ("llama-bench", "llama-server", "llama-quantize")


def _bin(name: str) -> Path:
    return CACHE / "build" / "bin" / name


def binaries() -> tuple[dict[str, Path] | None, str]:
    """The built binaries by name, or ``None`` and why not (never builds)."""
    found = {t: _bin(t) for t in TARGETS}
    missing = [t for t, p in found.items() if not p.is_file()]
    if missing:
        return None, (f"llama.cpp {VERSION} is not built ({', '.join(missing)} missing under "
                      f"{CACHE}): run `cpulock bench python benchmarks/llama_cpp.py`")
    return found, ""


def _gcc_major() -> int | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\bgcc\b.*?(\d+)\.\d+", out, re.IGNORECASE) or re.search(r"\) (\d+)\.", out)
    return int(m.group(1)) if m and "clang" not in out.lower() else None


def _source() -> Path:
    """Download the sdist with pip (once) and unpack its vendored llama.cpp into the cache."""
    src = CACHE / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(CACHE), f"llama-cpp-python=={VERSION}"], check=True)
    tar = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tf.extractall(src, members=[m for m in members if m.name], filter="data")
    tar.unlink()
    return src


def build() -> dict[str, Path]:
    """Build the three targets (a no-op when cached). Raises ``RuntimeError`` naming the step."""
    got, _ = binaries()
    if got:
        return got
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"cannot build llama.cpp: {tool} is not installed")
    src = _source()
    flags = "-fno-tree-dse -fno-dse" if _gcc_major() == 12 else ""
    cfg = ["cmake", "-S", str(src), "-B", str(CACHE / "build"), "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
           f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    for cmd in (cfg, ["cmake", "--build", str(CACHE / "build"), "-j", str(os.cpu_count() or 1),
                      "--target", *TARGETS]):
        if subprocess.run(cmd).returncode:
            raise RuntimeError(f"building llama.cpp failed at: {' '.join(cmd)}")
    got, why = binaries()
    if not got:
        raise RuntimeError(why)
    return got


def gguf_at(precision: str, source: Path) -> Path:
    """SmolLM2's GGUF re-quantized to ``F32``, ``BF16`` or ``Q8_0`` (cached beside the build);
    ``Q4_1``: the file itself."""
    kind = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16",
            "int8": "Q8_0", "Q8_0": "Q8_0", "int4": "Q4_1", "Q4_1": "Q4_1"}[precision]
    if kind == "Q4_1" and source.stem.endswith("Q4_1"):
        return source
    out = CACHE / "models" / f"{source.stem}-{kind}.gguf"
    if not out.is_file():
        got, why = binaries()
        if not got:
            raise RuntimeError(why)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([str(got["llama-quantize"]), "--allow-requantize", str(source), str(tmp),
                        kind], check=True, capture_output=True)
        tmp.replace(out)
    return out


if __name__ == "__main__":
    try:
        for name, path in build().items():
            print(f"{name}: {path}")
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        print(f"llama.cpp contender unavailable: {e}", file=sys.stderr)
        sys.exit(1)
