"""Where a run writes: local directories and cloud URIs (s3://, gs://, file://) alike, every file whole.

Local files are written through `rlft.files.atomic_path` (a temporary file renamed over the target), cloud
objects with a single PUT; reads and listings go through `pyarrow.fs` for URIs. Also the experiment
directory's name (`experiment_path`), JSON encoding of results, and the run's log lines (stderr).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

from rlft.config import ConfigError
from rlft.files import atomic_path
from rlft.run_config import RunConfig


def experiment_path(run: RunConfig, stem: str, resume: bool) -> str:
    """The experiment directory: `run.name`, else `<stem>_<date-time>` (with --resume: the newest restorable one)."""
    root = run.storage_path
    if resume:
        if run.name:
            return join(root, run.name)
        from ray import tune

        candidates = sorted((n for n in list_dirs(root) if n.startswith(f"{stem}_")), reverse=True)
        for name in candidates:
            if tune.Tuner.can_restore(join(root, name)):
                return join(root, name)
        raise ConfigError(f"--resume found no experiment {stem}_* under {root}; give --name NAME (or run.name)")
    if run.name:
        path = join(root, run.name)
        if exists(path):
            raise ConfigError(f"experiment {path} already exists; pass --resume to continue it or choose another run.name")
        return path
    base = f"{stem}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while exists(join(root, name)):
        n += 1
        name = f"{base}-{n}"
    return join(root, name)


def uri(path: str, like: str) -> str:
    """Tune's filesystem path as a URI with the scheme of `like` (unchanged for local storage)."""
    if "://" not in like or "://" in path:
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI."""
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(target: str):
    import pyarrow.fs

    if "://" in target:
        return pyarrow.fs.FileSystem.from_uri(target)
    return pyarrow.fs.LocalFileSystem(), target


def exists(target: str) -> bool:
    """Whether a local path or a URI exists."""
    if "://" not in target:
        return os.path.exists(target)
    import pyarrow.fs

    fs, path = _filesystem(target)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def list_dirs(root: str) -> list[str]:
    """Names of the directories directly under `root` (none when it does not exist)."""
    if "://" not in root:
        return [p.name for p in Path(root).iterdir() if p.is_dir()] if os.path.isdir(root) else []
    import pyarrow.fs

    fs, path = _filesystem(root)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [os.path.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory]


def write_bytes(target: str, data: bytes) -> None:
    """Writes a file atomically: rename of a temporary file locally, a single object PUT on cloud storage."""
    if "://" not in target:
        atomic_write(target, data)
        return
    fs, path = _filesystem(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # needed by file://, harmless on object stores
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(target: str) -> bytes:
    """The bytes of a local file or an object; a missing local file is a ConfigError (a wrong experiment path)."""
    if "://" not in target:
        if not os.path.isfile(target):
            raise ConfigError(f"{target} does not exist; is this an experiment directory written by rlft?")
        return Path(target).read_bytes()
    fs, path = _filesystem(target)
    with fs.open_input_stream(path) as f:
        return f.read()


def atomic_write(path: str, data: bytes) -> None:
    """Writes and fsyncs a temporary file beside `path`, then renames it over `path`."""
    with atomic_path(path, prefix=".tmp_", suffix="") as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def dumps(obj: Any) -> bytes:
    """Indented JSON bytes (tensors and numpy scalars as numbers)."""
    return json.dumps(obj, indent=1, default=json_default).encode()


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)`: scalars via .item(), arrays via .tolist(), anything else as its str."""
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def log(message: str) -> None:
    """One progress line on stderr (stdout holds only the --json object)."""
    print(message, file=sys.stderr, flush=True)
