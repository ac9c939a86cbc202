"""Write a directory (or a small file) so that a reader sees the old one or the whole new one.

The one helper behind every checkpoint write (sharded model and training checkpoints, resharding,
HF export, the GGUF conversion cache): fill a staging directory next to the target, then
``publish`` it with a rename. An existing target is moved aside first and deleted only after the
new one is in place, so a process killed at any moment leaves a loadable directory behind (the
old one, or the new one); a leftover staging directory is never read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def staging_dir(target: str | Path, *, suffix: str = ".tmp") -> Path:
    """An empty ``TARGET.tmp`` next to ``target`` (a leftover from a killed write is removed).
    Deterministic, so that every rank of a collective save finds it."""
    target = Path(target)
    tmp = target.parent / f"{target.name}{suffix}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: str | Path, target: str | Path, *, replace: bool = True) -> Path:
    """Rename the filled ``tmp`` to ``target``. ``replace=False``: raise ``FileExistsError`` when
    someone else published ``target`` first (caches filled by concurrent processes)."""
    tmp, target = Path(tmp), Path(target)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0o700
    old = None
    if target.exists():
        if not replace:
            raise FileExistsError(f"{target} appeared while it was being written")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError as e:
        if old is not None:
            old.rename(target)
        raise FileExistsError(f"{target} appeared while it was being written") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_dir(target: str | Path, fill: Callable[[Path], None], *, replace: bool = True) -> Path:
    """Create ``target`` by ``fill(tmp)`` in a private staging directory, then :func:`publish`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(tmp)
        return publish(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace a small file in one step (``latest`` pointers)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)
