"""Checkpoints are data: safetensors for tensors, JSON for everything else, one format version per directory.

Every saver in rlft (learners, score networks, oracles, classifiers, LoRA adapters, trial checkpoints) writes
through this module, so that

- a directory holds `rlft.json` = {"format": NAME, "version": N, ...state} beside `*.safetensors` files;
- loading never unpickles: tensors come from safetensors, the rest from JSON;
- a directory is replaced atomically (`atomic_dir`): written beside the target and renamed over it, so a crash
  leaves either the old directory or the new one, never half of one;
- a reader checks the format name and version, and a directory written by another format or a newer version
  fails with a message that says which wrote it and what to do (`read_state`);
- optimiser state travels as tensors plus JSON param groups (`optimizer_tensors` / `load_optimizer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlft.files import atomic_path

STATE_FILE = "rlft.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, damaged, or written by another format or version."""


# -- tensors --------------------------------------------------------------------------------------------


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (detached, on the CPU, contiguous) to one safetensors file, atomically."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()} or None)


def load_tensors(path: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Reads a safetensors file; a missing or damaged file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated headers and bodies
        raise CheckpointError(f"checkpoint file {path} cannot be read ({err}); it is damaged or not a safetensors file") from None
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def save_module(path: str | os.PathLike, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """`save_tensors` of a module's state dict."""
    save_tensors(path, module.state_dict(), metadata)


def load_module(path: str | os.PathLike, module: torch.nn.Module, device: str | torch.device | None = None) -> None:
    """Loads a module's state dict saved by `save_module`; shape mismatches name the file and the parameter."""
    state = load_tensors(path, device)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"checkpoint file {path} does not fit this network ({' '.join(first[:3])}); it was written for a network of "
            "another size (another task dimension or learner width/depth): build the task and learner it was written with"
        ) from None


# -- JSON state with a format name and version ------------------------------------------------------------


def write_state(directory: str | os.PathLike, fmt: str, version: int, state: dict[str, Any], name: str = STATE_FILE) -> None:
    """Writes {"format": fmt, "version": version, **state} as JSON, atomically."""
    out = Path(directory)
    payload = {"format": fmt, "version": int(version), **state}
    with atomic_path(out / name) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=_json_default))


def read_state(
    directory: str | os.PathLike, fmt: str, version: int, name: str = STATE_FILE, legacy: dict[str, int] | None = None
) -> dict[str, Any]:
    """Reads and checks what `write_state` wrote.

    Args:
        directory: the checkpoint directory.
        fmt: the format name this reader understands.
        version: the newest version it understands (older ones are returned for the caller to upgrade).
        name: the JSON file's name.
        legacy: {older file name: its version}: state files of earlier rlft releases, read when `name` is absent.
    Raises:
        CheckpointError: missing or damaged file, another format, or a newer version (says which and what to do).
    """
    src = Path(directory)
    path = src / name
    if not path.is_file():
        for old, _ in (legacy or {}).items():
            if (src / old).is_file():
                path = src / old
                break
        else:
            if not src.is_dir():
                raise CheckpointError(f"checkpoint directory {src} does not exist")
            raise CheckpointError(f"{src} holds no {fmt} checkpoint ({name} is missing; files: {sorted(p.name for p in src.iterdir())[:8]})")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint state {path} cannot be read ({err}); the checkpoint is damaged: use an earlier one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state {path} is not a JSON object; the checkpoint is damaged: use an earlier one")
    found = state.get("format")
    if found != fmt:
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {fmt!r}: load it with the learner or model that wrote it")
    got = state.get("version")
    if not isinstance(got, int) or got > version:
        raise CheckpointError(
            f"{path} was written by {fmt} version {got!r}; this rlft reads versions up to {version}: "
            "upgrade rlft to the release that wrote it"
        )
    return state


# -- optimiser state -------------------------------------------------------------------------------------


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as flat tensors ('{prefix}.{param}.{key}') and its param groups as JSON-safe dicts."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{prefix}.{idx}.{key}"] = torch.as_tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str, groups: list[dict], device: Any) -> None:
    """Restores what `optimizer_tensors` produced (entries of other prefixes are ignored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head != prefix:
            continue
        idx, _, key = rest.partition(".")
        # Adam keeps `step` as a CPU scalar tensor; moments live with the parameters
        state.setdefault(int(idx), {})[key] = value if key == "step" else value.to(device)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- nested state (RLlib learner states) ------------------------------------------------------------------


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Splits a nested state (dicts, lists, arrays, tensors, scalars) into arrays keyed by their path and a JSON
    skeleton that references them, so it can be saved as safetensors + JSON (`unflatten_state` inverts it)."""
    tensors: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {"__dict__": [[json.dumps(k), walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, torch.Tensor):
            node = node.detach().cpu().numpy()
        if isinstance(node, np.ndarray):
            tensors[path] = np.ascontiguousarray(node)
            return {"__tensor__": path}
        if isinstance(node, (np.floating, np.integer, np.bool_)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path} as data (safetensors/JSON)")

    return tensors, walk(state, prefix)


def unflatten_state(tensors: dict[str, Any], meta: Any) -> Any:
    """The nested state `flatten_state` split into `tensors` (arrays or tensors, by path) and `meta`."""
    if isinstance(meta, dict) and "__dict__" in meta:
        return {json.loads(k): unflatten_state(tensors, v) for k, v in meta["__dict__"]}
    if isinstance(meta, dict) and "__list__" in meta:
        return [unflatten_state(tensors, v) for v in meta["__list__"]]
    if isinstance(meta, dict) and "__tensor__" in meta:
        return tensors[meta["__tensor__"]]
    return meta


# -- whole directories -------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; when the block ends normally it replaces `path`
    (an existing directory there is removed only after the new one is complete); when it raises, the
    temporary directory is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
