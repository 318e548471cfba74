"""A learned reward: an MLP oracle on the flattened input, trained on labelled data as ELEGANT does.

ELEGANT §8 / App. F.1 (Table 5) learn the reward r of the biological tasks with an MLP on the flattened
one-hot input (Linear 500 -> ReLU -> Linear 200 -> ReLU -> Linear 1), trained on part of the data, so that the
nominal r is an imperfect oracle of a genuine r*. `train_oracle` fits such a regressor (inputs and targets
standardised inside the model, Adam with weight decay, early stopping on a validation split);
`save_oracle`/`load_oracle` store it as rlft.json + model.safetensors through `rlft.checkpoint` (atomic, no
pickles; directories of the earlier config.json layout still load);
`MLPOracleReward` (registry name `mlp_oracle`) serves it as a differentiable reward, optionally beside a
genuine reward r* given as a nested reward spec.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

import rlft.checkpoint as checkpoint
from rlft.rewards.base import Reward, build_reward

FORMAT = "rlft-mlp-oracle"
#: 2: `rlft.checkpoint`'s rlft.json; 1: the same {"oracle", "metrics"} in config.json, no format/version keys
FORMAT_VERSION = 2
LEGACY_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VAL_CORR = "val_corr"
VAL_MSE = "val_mse"
EPOCHS = "epochs"


@dataclass(frozen=True)
class OracleConfig:
    """The architecture of an MLP oracle (what `load_oracle` needs to rebuild it)."""

    input_shape: tuple[int, ...]
    """Event shape of one input x (it is flattened)."""
    hidden: tuple[int, ...] = (500, 200)
    """Hidden layer widths (ELEGANT Table 5: 500, 200)."""
    activation: Literal["relu", "silu"] = "relu"
    """Nonlinearity between layers (Table 5: ReLU; SiLU gives smooth reward gradients)."""

    def __post_init__(self) -> None:
        if not self.input_shape or any(int(s) < 1 for s in self.input_shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes (got {self.input_shape})")
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1 (got {self.hidden})")
        if self.activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu' (got {self.activation!r})")


class MLPOracle(nn.Module):
    """x (B, *input_shape) -> r (B,): standardise, MLP on the flattened input, un-standardise."""

    def __init__(self, config: OracleConfig) -> None:
        super().__init__()
        self.config = config
        dim = math.prod(config.input_shape)
        act = {"relu": nn.ReLU, "silu": nn.SiLU}[config.activation]
        layers: list[nn.Module] = []
        for width in config.hidden:
            layers += [nn.Linear(dim, width), act()]
            dim = width
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)
        d = math.prod(config.input_shape)
        self.register_buffer("x_mean", torch.zeros(d))
        self.register_buffer("x_std", torch.ones(d))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # (B, D)
        if flat.shape[1] != self.x_mean.numel():
            raise ValueError(
                f"mlp_oracle expects inputs of shape (B, {', '.join(map(str, self.config.input_shape))}) "
                f"({self.x_mean.numel()} features), got {tuple(x.shape)}"
            )
        z = (flat.to(self.x_mean.dtype) - self.x_mean) / self.x_std
        return (self.net(z).squeeze(-1) * self.y_std + self.y_mean).to(x.dtype)


# -- training -------------------------------------------------------------------------------------


def _as_tensor(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().to(torch.float32).cpu()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN/inf values; clean the data before training the oracle")
    return t


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def train_oracle(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    hidden: int | Sequence[int] = (500, 200),
    layers: int = 2,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 256,
    patience: int = 30,
    activation: Literal["relu", "silu"] = "relu",
) -> tuple[MLPOracle, dict[str, float]]:
    """Fits an MLP oracle r ~ y on (x, y) by mean-squared error, with early stopping on a validation split.

    Args:
        x: inputs (n, ...) (one-hot sequences, vectors, images); flattened.
        y: labels (n,).
        hidden: widths of the hidden layers, or one width repeated `layers` times.
        layers: number of hidden layers when `hidden` is an int.
        epochs: maximum passes over the training split.
        lr, weight_decay: AdamW settings.
        val_fraction: held-out fraction (seeded permutation) for early stopping and the reported figures.
        seed: seeds the split, the initialisation and the minibatch order.
        batch_size: minibatch size.
        patience: epochs without a better validation MSE before stopping (the best weights are kept).
        activation: "relu" (Table 5) or "silu".
    Returns:
        (oracle in eval mode, {"val_corr": Pearson correlation, "val_mse": MSE on the validation split, "epochs": run}).
    """
    xt, yt = _as_tensor(x, "x"), _as_tensor(y, "y").reshape(-1)
    n = xt.shape[0]
    if yt.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {yt.shape[0]} labels; they must match")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 2:
        raise ValueError(f"need at least 2 training rows after holding out {n_val} for validation (n = {n})")
    widths = tuple([int(hidden)] * int(layers)) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr, x_val, y_val = xt[tr_idx], yt[tr_idx], xt[val_idx], yt[val_idx]

    torch.manual_seed(seed)  # nn.Linear's initialisation
    model = MLPOracle(OracleConfig(tuple(xt.shape[1:]), widths, activation))
    flat = x_tr.reshape(x_tr.shape[0], -1)
    model.x_mean.copy_(flat.mean(0))
    model.x_std.copy_(flat.std(0).clamp_min(1e-6))  # constant features (one-hot columns never set) stay finite
    model.y_mean.copy_(y_tr.mean())
    model.y_std.copy_(y_tr.std().clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def val_mse() -> float:
        model.eval()
        with torch.no_grad():
            return float((model(x_val) - y_val).pow(2).mean())

    best, best_state, since, run = math.inf, None, 0, 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=gen)
        for start in range(0, order.numel(), batch_size):
            b = order[start : start + batch_size]
            # loss in standardised units so lr does not depend on the label scale
            loss = ((model(x_tr[b]) - y_tr[b]) / model.y_std).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        run = epoch + 1
        mse = val_mse()
        if mse < best:
            best, since = mse, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(x_val)
    return model, {VAL_CORR: _pearson(pred, y_val), VAL_MSE: float((pred - y_val).pow(2).mean()), EPOCHS: run}


# -- save / load ----------------------------------------------------------------------------------


def save_oracle(oracle: MLPOracle, path: str | os.PathLike, metrics: dict[str, float] | None = None) -> Path:
    """Writes DIR/rlft.json (format, version, architecture, metrics) + DIR/model.safetensors, atomically."""
    target = Path(path)
    cfg = asdict(oracle.config)
    cfg["input_shape"], cfg["hidden"] = list(cfg["input_shape"]), list(cfg["hidden"])
    with checkpoint.atomic_dir(target) as tmp:
        checkpoint.write_state(tmp, FORMAT, FORMAT_VERSION, {"oracle": cfg, "metrics": metrics or {}})
        checkpoint.save_module(tmp / WEIGHTS_FILE, oracle)
    return target


def read_oracle_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a saved oracle, {"oracle": architecture, "metrics": ...}, of any format version.

    Version 1 (rlft before `rlft.checkpoint`) wrote the same two keys, without format and version, to
    config.json; it is read as is.
    """
    root = Path(path)
    legacy = root / LEGACY_CONFIG_FILE
    if not (root / checkpoint.STATE_FILE).is_file() and legacy.is_file():
        try:
            state = json.loads(legacy.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise checkpoint.CheckpointError(f"{legacy} cannot be read ({err}); re-create the oracle with save_oracle") from None
        if not isinstance(state, dict) or "oracle" not in state:
            raise checkpoint.CheckpointError(
                f"{legacy} holds no 'oracle' entry: it was not written by save_oracle (format {FORMAT!r} version 1); "
                "re-create the oracle with save_oracle"
            )
        return {"format": FORMAT, "version": 1, **state}
    return checkpoint.read_state(root, FORMAT, FORMAT_VERSION)


def load_oracle(path: str | os.PathLike) -> MLPOracle:
    """Rebuilds an oracle written by `save_oracle` (this version, or version 1's config.json layout); no unpickling."""
    root = Path(path)
    if not (root / WEIGHTS_FILE).is_file() or not any((root / n).is_file() for n in (checkpoint.STATE_FILE, LEGACY_CONFIG_FILE)):
        raise FileNotFoundError(
            f"mlp_oracle path {str(root)!r} must hold {checkpoint.STATE_FILE} (or {LEGACY_CONFIG_FILE}, version 1) and "
            f"{WEIGHTS_FILE} (written by save_oracle)"
        )
    raw = read_oracle_state(root)["oracle"]
    model = MLPOracle(OracleConfig(tuple(raw["input_shape"]), tuple(raw["hidden"]), raw.get("activation", "relu")))
    checkpoint.load_module(root / WEIGHTS_FILE, model)
    return model.eval()


def load_labelled(data: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Labelled data for the oracle: an .npz with arrays `x` and `y`, or a directory holding x.npy and y.npy."""
    p = Path(data)
    if p.is_dir():
        if not ((p / "x.npy").is_file() and (p / "y.npy").is_file()):
            raise FileNotFoundError(f"mlp_oracle data directory {str(p)!r} must hold x.npy and y.npy")
        return np.load(p / "x.npy", allow_pickle=False), np.load(p / "y.npy", allow_pickle=False)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"mlp_oracle data {str(p)!r} must hold arrays 'x' and 'y' (has {sorted(f.files)})")
            return f["x"], f["y"]
    raise FileNotFoundError(f"mlp_oracle data {str(p)!r} must be an .npz file (x, y) or a directory with x.npy and y.npy")


# -- the reward -----------------------------------------------------------------------------------


class MLPOracleReward(Reward):
    """r(x) = the MLP oracle (differentiable); r*(x) = a nested genuine reward when `true_reward` is given.

    YAML: `reward: {type: mlp_oracle, path: DIR}` (from `save_oracle`), or `{type: mlp_oracle, data: FILE.npz}`
    to train on the fly, optionally with `true_reward: {type: quadratic, ...}`.
    """

    name = "mlp_oracle"

    def __init__(
        self,
        path: str | None = None,
        data: str | None = None,
        true_reward: dict | None = None,
        hidden: list[int] | None = None,
        epochs: int = 300,
        seed: int = 0,
        model: Any = None,
    ) -> None:
        if (path is None) == (data is None):
            raise ValueError("mlp_oracle needs exactly one of `path` (a saved oracle directory) or `data` (labelled .npz to train on)")
        if path is not None:
            self.oracle = load_oracle(path)
            self.train_metrics: dict[str, float] = {}
        else:
            x, y = load_labelled(data)
            kwargs: dict[str, Any] = {"epochs": epochs, "seed": seed}
            if hidden is not None:
                kwargs["hidden"] = tuple(hidden)
            self.oracle, self.train_metrics = train_oracle(x, y, **kwargs)
        self.oracle.requires_grad_(False)
        self._true: Reward | None = None
        if true_reward is not None:
            context = {"model": model} if model is not None else {}
            self._true = build_reward(true_reward, path="reward.true_reward", **context)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.oracle(x)

    @property
    def has_true_reward(self) -> bool:
        return self._true is not None

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return self._true(x) if self._true is not None else self(x)

    def to(self, device: str | torch.device) -> "MLPOracleReward":
        self.oracle.to(device)
        if self._true is not None:
            self._true = self._true.to(device)
        return self
