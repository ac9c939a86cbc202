"""Measurements: collectives (``bench comm``), the TP training and decode step against PyTorch's
tensor parallelism and single-process baselines (``bench step``), serving (``bench serve``)."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """This machine's CPU model name (every benchmark prints it: the development VM's CPU changes
    between sessions)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
