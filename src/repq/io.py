"""Atomic file output: write to a temp file beside the target, then rename, so a crash never leaves a
half-written file and an existing one is replaced only by a complete new version."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def input_file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as an input file ("is empty", "is a directory", "not found"), or None."""
    if not str(path).strip():
        return "is empty"
    if Path(path).is_dir():
        return "is a directory"
    if not Path(path).is_file():
        return "not found"
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(file)` on a temp file in the target folder, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), binary=False)
