"""Atomic file writes: a temporary file beside the target, renamed over it only once it is complete.

Every file rlft writes that a crash must not leave half-written (results, checkpoints' state, plots, model and
classifier weights) goes through `atomic_path`, so the temporary file's mode is fixed in one place: mkstemp
creates it 0600, and a results directory shared on a cluster must be readable like any file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, prefix: str | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path` (mode 0666 & ~umask); renames it over `path` when the block ends
    normally, removes it when the block raises. `prefix` defaults to ".<name>."."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
