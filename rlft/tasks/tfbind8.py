"""TFBind8 as a fine-tuning task: a continuous VP diffusion on one-hot DNA 8-mers, a learned reward, the exact one.

ELEGANT §8.1-8.2 and App. F.1 (Tables 3-5): x is an 8-mer as an 8x4 one-hot array; the pretrained model is a
continuous VP diffusion trained on *all* sequences (design-bench's 65,792 rows: every 8-mer, palindromes
twice), decoded by argmax; the nominal reward r is an MLP oracle (Table 5's shape, `rlft.tasks.oracle`)
trained on half of the data; the genuine reward r* is the exact binding score of the decoded sequence.

- `pretrained_model`: trains the sequence score network once with the core trainer
  (`rlft.models.pretrain.train_scorenet`, arch "seq") into a cache directory ($RLFT_CACHE or ~/.cache/rlft)
  and loads it as a `ScoreNetChain`; the data do not depend on the transcription factor.
- `learned_oracle`: trains (once per scores table and settings, cached) the MLP oracle on a random half of
  the 65,536 sequences and states its Pearson correlation with r* on the other, held-out half.
- Rewards in the registry: ``tfbind8_learned`` (r = oracle of x, differentiable; r* = lookup of argmax(x))
  and ``tfbind8_exact`` (r = r* = lookup), each with an optional raw ``scores`` file of another factor.
- The exact optimum: the sequence space is enumerable, so the tilted target
  p_tar(s) = p_base(s) exp(r(s)/alpha) / C over the data distribution (or any base distribution over the
  65,536 sequences, e.g. the pretrained model's empirical one) is computed exactly (`tilted_distribution`).

Notation: s a sequence (token ids, (8,)), x its one-hot or a continuous state (8, 4), r `reward`,
r* `true_reward`, alpha the KL weight, p_base the untilted law over sequences (65536,).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlft.models import pretrain
from rlft.models.scorenet import ScoreNetChain, load_scorenet, save_scorenet
from rlft.rewards.base import Reward
from rlft.tasks.oracle import load_oracle, read_oracle_state, save_oracle, train_oracle
from rlft.tasks.tfbind8_data import (  # noqa: F401  (the encoding is part of this module's surface)
    ALPHABET_SIZE,
    EVENT_SHAPE,
    NUM_SEQUENCES,
    SEQ_LEN,
    all_sequences,
    data_distribution,
    decode,
    decode_index,
    encode_index,
    load_table,
    one_hot,
    pretraining_data,
    sequence_index,
)

CACHE_ENV = "RLFT_CACHE"
#: Pearson correlation of r with r* on the held-out half (oracle metrics key)
HELDOUT_CORR = "heldout_corr"
#: the same over the held-out sequences whose r* is in the top 10 % (how well r ranks the good ones)
HELDOUT_TOP_CORR = "heldout_top10_corr"


# -- settings (each is part of its cache key) -------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings:
    """Training budget and shape of the sequence score network (ELEGANT Table 4: a 64-wide transformer)."""

    steps: int = 4000
    """Denoising-score-matching optimiser steps."""
    batch_size: int = 256
    """Sequences per step."""
    lr: float = 2e-3
    """Peak Adam learning rate (cosine-decayed)."""
    hidden: int = 64
    """Transformer model width."""
    depth: int = 1
    """Transformer layers (1 keeps back-propagation through 50 steps cheap on a CPU; the data are i.i.d. per position)."""
    seed: int = 0
    """Seed of initialisation and batches."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PretrainSettings.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class OracleSettings:
    """How the nominal reward r is learned (ELEGANT App. F.1: half of the data, Table 5's MLP)."""

    split: Literal["random", "visible"] = "random"
    """``random``: a seeded random half of the 65,536 sequences; ``visible``: design-bench's y <= median half."""
    epochs: int = 100
    """Maximum epochs (early stopping on 20 % of the training half)."""
    patience: int = 10
    """Epochs without a better validation error before stopping."""
    hidden: tuple[int, ...] = (500, 200)
    """Hidden widths (Table 5: 500, 200)."""
    seed: int = 0
    """Seeds the split, initialisation and minibatches."""
    output: Literal["sigmoid", "linear"] = "sigmoid"
    """``sigmoid`` (Table 5's last layer): r = sigmoid(MLP), fitted to logit(clip(y, 0.01, 0.99)), so r is
    bounded in (0, 1) like y; ``linear``: r = MLP fitted to y (unbounded off the one-hot simplex)."""

    def __post_init__(self) -> None:
        if self.output not in ("sigmoid", "linear"):
            raise ValueError(f"oracle output must be 'sigmoid' or 'linear' (got {self.output!r})")
        if self.split not in ("random", "visible"):
            raise ValueError(f"oracle split must be 'random' or 'visible' (got {self.split!r})")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.epochs < 1 or self.patience < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"oracle epochs, patience and hidden widths must be >= 1 (got {self})")


# -- cache ------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where built models live: `cache_dir`, else $RLFT_CACHE, else ~/.cache/rlft; then /tfbind8."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlft"
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(root)))) / "tfbind8"


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock, so that concurrent trials build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the pretrained model ---------------------------------------------------------------------------


def pretrained_dir(cache_dir: str | os.PathLike | None = None, settings: PretrainSettings = PretrainSettings()) -> Path:
    """The cache directory of the score network trained with `settings`."""
    return cache_root(cache_dir) / f"scorenet-{_key({'v': 1, **asdict(settings)})}"


def pretrained_model(
    num_steps: int = 50,
    cache_dir: str | os.PathLike | None = None,
    settings: PretrainSettings = PretrainSettings(),
    progress: bool = True,
):
    """The pretrained TFBind8 chain (a `ScoreNetChain` with K = num_steps), trained on first use and cached.

    Training uses one torch thread (small nets run many times faster so on a shared CPU).
    """
    target = pretrained_dir(cache_dir, settings)
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "model.safetensors").is_file():
            net = pretrain.train_scorenet(
                pretraining_data(), arch="seq", steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                hidden=settings.hidden, depth=settings.depth, seed=settings.seed, device="cpu", num_threads=1,
                progress=progress,
            )
            save_scorenet(net, target)
    return load_scorenet(target, num_steps=num_steps)


def build_tfbind8_model(cfg, num_steps: int) -> ScoreNetChain:
    """The registry's `model: {type: tfbind8}` builder: `pretrained_model` for a `rlft.config` TFBind8 model config."""
    settings = PretrainSettings(steps=cfg.pretrain_steps, hidden=cfg.hidden, depth=cfg.depth)
    return pretrained_model(num_steps, cache_dir=cfg.cache_dir, settings=settings)


# -- the learned oracle -----------------------------------------------------------------------------


def _table_digest(table: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()[:16]


def oracle_split(table: np.ndarray, settings: OracleSettings) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) into the 65,536 sequences."""
    if settings.split == "visible":
        keep = table <= np.percentile(table, 50)
        return np.flatnonzero(keep), np.flatnonzero(~keep)
    perm = np.random.default_rng(settings.seed).permutation(NUM_SEQUENCES)
    return np.sort(perm[: NUM_SEQUENCES // 2]), np.sort(perm[NUM_SEQUENCES // 2 :])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


class BoundedOracle(torch.nn.Module):
    """r(x) = sigmoid(MLP(x)) (or the MLP itself for output="linear"), (B, 8, 4) -> (B,)."""

    def __init__(self, mlp: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.mlp, self.output = mlp, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


def learned_oracle(
    scores: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    settings: OracleSettings = OracleSettings(),
    table: np.ndarray | None = None,
):
    """The MLP oracle r of the task (trained on first use and cached per scores table) and its metrics.

    Returns:
        (oracle `BoundedOracle` in eval mode, metrics) with metrics `heldout_corr` (Pearson r vs r* on the held-out
        half), `heldout_top10_corr` (the same on held-out sequences with r* in the top 10 %), `fit_val_corr` (on the
        early-stopping split, in the fitted (logit) space), `train_size`.
    """
    table = load_table(scores) if table is None else table
    target = cache_root(cache_dir) / f"oracle-{_key({'v': 1, 'table': _table_digest(table), **asdict(settings)})}"
    with _locked(target.with_name(target.name + ".lock")):
        if not (target / "model.safetensors").is_file():
            train_idx, held_idx = oracle_split(table, settings)
            x = all_sequences()
            y_train = table[train_idx].astype(np.float64)
            if settings.output == "sigmoid":
                y_train = np.clip(y_train, 0.01, 0.99)
                y_train = np.log(y_train / (1.0 - y_train))  # logit: the MLP fits the pre-sigmoid value
            with _one_thread():
                mlp, fit = train_oracle(
                    x[train_idx], y_train.astype(np.float32), hidden=settings.hidden, epochs=settings.epochs,
                    patience=settings.patience, seed=settings.seed,
                )
                with torch.no_grad():
                    pred = BoundedOracle(mlp, settings.output)(x[held_idx]).double().numpy()
            y = table[held_idx].astype(np.float64)
            top = y >= np.percentile(table, 90)
            metrics = {
                **{f"fit_{k}": v for k, v in fit.items()},
                HELDOUT_CORR: _pearson(pred, y),
                HELDOUT_TOP_CORR: _pearson(pred[top], y[top]) if top.sum() > 2 else float("nan"),
                "train_size": int(len(train_idx)), "heldout_size": int(len(held_idx)), "split": settings.split,
            }
            save_oracle(mlp, target, metrics)
    metrics = read_oracle_state(target)["metrics"]
    return BoundedOracle(load_oracle(target), settings.output).eval().requires_grad_(False), metrics


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- rewards ----------------------------------------------------------------------------------------


class _Lookup:
    """r*(x) = table[index of argmax(x)] on the device of x."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = torch.as_tensor(np.asarray(table, dtype=np.float32))  # (65536,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.table.device != x.device:
            self.table = self.table.to(x.device)
        return self.table[sequence_index(x.detach())].to(x.dtype)


class TFBind8ExactReward(Reward):
    """r = r* = the exact binding score of the argmax-decoded sequence (not differentiable).

    YAML: ``reward: {type: tfbind8_exact}`` (SIX6, shipped) or ``{type: tfbind8_exact, scores: FILE}``.
    """

    name = "tfbind8_exact"
    differentiable = False

    def __init__(self, scores: str | None = None) -> None:
        self.lookup = _Lookup(load_table(scores))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(x)


class TFBind8LearnedReward(Reward):
    """r = the MLP oracle on the (continuous) state x, differentiable, in (0, 1); r* = exact score of argmax(x).

    YAML: ``reward: {type: tfbind8_learned}``; ``scores: FILE`` for another factor, ``split: visible`` for
    design-bench's lower half, ``cache_dir`` to keep the trained oracle elsewhere. `metrics` holds the oracle's
    held-out correlation.
    """

    name = "tfbind8_learned"

    def __init__(
        self,
        scores: str | None = None,
        split: Literal["random", "visible"] = "random",
        epochs: int = 100,
        seed: int = 0,
        output: Literal["sigmoid", "linear"] = "sigmoid",
        cache_dir: str | None = None,
    ) -> None:
        table = load_table(scores)
        self.settings = OracleSettings(split=split, epochs=epochs, seed=seed, output=output)
        self.oracle, self.metrics = learned_oracle(cache_dir=cache_dir, settings=self.settings, table=table)
        self.lookup = _Lookup(table)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != EVENT_SHAPE:
            raise ValueError(f"reward 'tfbind8_learned' needs states of shape (B, 8, 4) (got {tuple(x.shape)})")
        return self.oracle(x)

    def true_reward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(x)

    def decoded(self, x: torch.Tensor) -> torch.Tensor:
        """r of the argmax-decoded one-hot sequence (what r says about the sequence a user would synthesise), (B,)."""
        return self.oracle(one_hot(decode(x)).to(device=x.device, dtype=x.dtype))

    def to(self, device: str | torch.device) -> "TFBind8LearnedReward":
        self.oracle.to(device)
        return self


# -- the exact optimum over sequences ---------------------------------------------------------------


def empirical_distribution(x: torch.Tensor) -> np.ndarray:
    """Law of the argmax-decoded sequences of states x (n, 8, 4), float64 (65536,)."""
    counts = np.bincount(sequence_index(x).cpu().numpy(), minlength=NUM_SEQUENCES).astype(np.float64)
    return counts / counts.sum()


def tilted_distribution(base: np.ndarray, rewards: np.ndarray, alpha: float) -> np.ndarray:
    """p_tar(s) = base(s) exp(r(s)/alpha) / C over the 65,536 sequences (float64, stable in log space).

    Args:
        base: the untilted law (65536,) (sums to 1; zeros allowed).
        rewards: r(s) for every sequence (65536,).
        alpha: KL weight > 0.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for the tilted target (got {alpha})")
    base = np.asarray(base, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(base) + np.asarray(rewards, dtype=np.float64) / alpha
    logits -= logits[np.isfinite(logits)].max()
    p = np.exp(logits)
    return p / p.sum()


def optimal_objective(base: np.ndarray, rewards: np.ndarray, alpha: float) -> float:
    """J* = alpha log sum_s base(s) exp(r(s)/alpha) (Donsker-Varadhan), exact over sequences."""
    r = np.asarray(rewards, dtype=np.float64)
    keep = np.asarray(base) > 0
    z = np.log(np.asarray(base, dtype=np.float64)[keep]) + r[keep] / alpha
    m = z.max()
    return float(alpha * (m + np.log(np.exp(z - m).sum())))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) over sequences (inf when p puts mass where q has none)."""
    keep = p > 0
    if np.any(q[keep] <= 0):
        return float("inf")
    return float((p[keep] * np.log(p[keep] / q[keep])).sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """TV(p, q) = 1/2 sum_s |p(s) - q(s)|."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def tv_floor(target: np.ndarray, n: int, repeats: int = 8, seed: int = 0) -> float:
    """Mean TV between the empirical law of n exact draws from `target` and `target` itself.

    An n-sample learner cannot be closer than this on average; report its TV beside it.
    """
    rng = np.random.default_rng(seed)
    tvs = [total_variation(rng.multinomial(n, target) / n, target) for _ in range(repeats)]
    return float(np.mean(tvs))
