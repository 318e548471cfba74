"""The working_dir package of a Ray job: the project's files plus the submitted config, as one zip.

`rlft submit` (`rlft.jobs.submit`) ships this package as the job's `working_dir`, so the cluster runs the
same code and the merged, validated config (`rlft_job/<name>.yaml`). The zip is deterministic (sorted
entries, fixed timestamps): an unchanged project and config give the same bytes and Ray reuses its
cached upload.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

#: directory inside the job package that holds the submitted (merged, validated) config
JOB_CONFIG_DIR = "rlft_job"
#: directory names never packaged (anywhere in the tree)
EXCLUDED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "node_modules", ".whl", "mlruns", "wandb",
})
#: directory names never packaged at the project's top level (build outputs, local results)
EXCLUDED_TOP_DIRS = frozenset({"runs", "build", "dist", JOB_CONFIG_DIR})
#: file suffixes never packaged
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
#: the installed (or checked-out) rlft package directory
_RLFT_DIR = Path(__file__).resolve().parents[1]


def project_root() -> Path | None:
    """The rlft checkout (the directory holding pyproject.toml above `rlft/`), or None if rlft is installed."""
    root = _RLFT_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "rlft").is_dir() else None


def _package_sources(root: Path | None) -> list[tuple[Path, str]]:
    """(directory, name inside the package) pairs: the whole checkout, or the installed packages."""
    if root is not None:
        return [(root, "")]
    sources = [(_RLFT_DIR, "rlft")]
    try:
        import envs

        sources.append((Path(envs.__file__).resolve().parent, "envs"))
    except ImportError:
        pass
    return sources


def _is_excluded(rel: Path, is_dir: bool, excluded_paths: set[Path]) -> bool:
    name = rel.name
    if is_dir and (name in EXCLUDED_DIRS or name.endswith(".egg-info")):
        return True
    if is_dir and len(rel.parts) == 1 and name in EXCLUDED_TOP_DIRS:
        return True
    if not is_dir and name.endswith(EXCLUDED_SUFFIXES):
        return True
    return rel in excluded_paths


def build_package(
    destination: str | os.PathLike,
    config_name: str,
    config_text: str,
    *,
    root: Path | None = None,
    exclude: Sequence[str] = (),
    include: Sequence[str | os.PathLike] = (),
) -> Path:
    """Writes the job's working_dir package: the project's files plus `rlft_job/<config_name>`.

    The zip is deterministic (sorted entries, fixed timestamps), so an unchanged project and config
    give the same package and Ray reuses its cached upload.

    Args:
        destination: path of the .zip to write.
        config_name: file name of the config inside `rlft_job/` (e.g. `alpha_sweep.yaml`).
        config_text: the merged, validated YAML.
        root: the directory to package (default: the rlft checkout, else the installed rlft/envs packages).
        exclude: extra paths relative to the root to leave out (e.g. large local data).
        include: extra local files or directories to add at the package's top level under their names.
    Returns:
        The path of the written zip.
    """
    destination = Path(destination)
    sources = _package_sources(root if root is not None else project_root())
    excluded_paths = {Path(p) for p in exclude}
    entries: dict[str, Path] = {}
    for base, prefix in sources:
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base)
            dirnames[:] = sorted(d for d in dirnames if not _is_excluded(rel_dir / d, True, excluded_paths))
            for name in filenames:
                rel = rel_dir / name
                path = Path(dirpath) / name
                if _is_excluded(rel, False, excluded_paths) or not path.is_file() or path == destination:
                    continue
                entries[str(Path(prefix) / rel)] = path
    for item in include:
        item = Path(item).expanduser()
        if not item.exists():
            raise FileNotFoundError(f"--include {item} does not exist")
        if item.is_file():
            entries[item.name] = item
            continue
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
            for name in filenames:
                path = Path(dirpath) / name
                entries[str(Path(item.name) / path.relative_to(item))] = path
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (entries[arcname].stat().st_mode & 0o777 | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[arcname].read_bytes())
        info = zipfile.ZipInfo(f"{JOB_CONFIG_DIR}/{config_name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, config_text)
    return destination
