"""The digits task: scikit-learn's 8x8 digits and the digit-classifier reward r(x) = log p(target | x).

The data ship with scikit-learn (`sklearn.datasets.load_digits`, 1797 images, no download), scaled from
[0, 16] to [-1, 1], shape (1, 8, 8) (`load_digits_data`). The pretrained model on them, a tiny diffusers UNet,
is trained by `rlft.tasks.digits_unet`; this module is what a YAML task's `digit_classifier` reward needs.

The classifier is trained on the digits,
with a little Gaussian input noise so that it stays calibrated on the slightly noisy samples a chain ends on,
and with an eleventh class, "not a digit" (`NOT_A_DIGIT`), learned from random (white and smoothed) noise
images. Without it a 10-way classifier is confident on noise (measured: mean max-probability 0.84 on clipped
white noise), so log p(target | x) would reward non-digits; with it, p(target | x) is low off the digits.
Training is seeded and takes seconds; its weights are cached (safetensors through `rlft.checkpoint`, written
atomically, with format name and version in the file's metadata) under `$RLFT_CACHE` or `~/.cache/rlft/`, so
every process (Ray workers included) loads the same classifier.

    reward: {type: digit_classifier, target: 3}          # r(x) = log softmax(f(x))[3], differentiable in x
    reward: {type: digit_classifier, target: condition, thickness: 2.0}
        # a conditional task (conditions: {train: [0, 1, ...], num_classes: 10}, one-hot c):
        # r(x, c) = log p(c | x) + thickness * mean ink, mean ink = mean over pixels of (x + 1) / 2 in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

import rlft.checkpoint as checkpoint
from rlft.rewards.base import Reward

#: Image shape of one digit.
DIGIT_SHAPE = (1, 8, 8)
NUM_DIGITS = 10
#: Index of the "not a digit" class (logits have NUM_DIGITS + 1 entries).
NOT_A_DIGIT = NUM_DIGITS
CACHE_ENV = "RLFT_CACHE"
FORMAT = "rlft-digit-classifier"
#: Bump when the architecture or the training recipe changes (invalidates cached weights). 2: eleven classes
#: ("not a digit" added); 1: ten classes.
FORMAT_VERSION = 2


def load_digits_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in [-1, 1]: images (1797, 1, 8, 8) and labels (1797,) int64."""
    from sklearn.datasets import load_digits  # scikit-learn is imported only by whoever needs the data

    data = load_digits()
    images = torch.as_tensor(np.asarray(data.images, dtype=np.float64) / 8.0 - 1.0, dtype=dtype)
    return images.reshape(-1, *DIGIT_SHAPE), torch.as_tensor(data.target, dtype=torch.long)  # (N, 1, 8, 8), (N,)


@dataclass(frozen=True)
class ClassifierTraining:
    """How the cached classifier is trained (part of its cache key)."""

    seed: int = 0
    """Seeds the split, the initialisation and the batches."""
    epochs: int = 20
    """Passes over the training split."""
    batch_size: int = 64
    """Images per optimiser step."""
    lr: float = 3e-3
    """Adam learning rate."""
    input_noise: float = 0.1
    """Std of the Gaussian noise added to training images (robustness to the chain's last noise level)."""
    holdout: float = 0.2
    """Fraction of the 1797 digits kept out of training to measure accuracy."""
    negatives: float = 0.25
    """Noise images ("not a digit") added per batch, as a fraction of the batch size."""


class DigitCNN(nn.Module):
    """Two 3x3 conv layers, a 2x2 pool and an MLP head: (B, 1, 8, 8) -> logits (B, 11). SiLU for smooth gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_DIGITS + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)  # (B, 32, 4, 4)
        return self.fc2(F.silu(self.fc1(h.flatten(1))))


def _split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(holdout * n))
    return perm[n_test:], perm[:n_test]


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose argmax class (of all 11) is the label."""
    return float((net(images).argmax(-1) == labels).float().mean())


def noise_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Non-digits: white or 3x3-smoothed Gaussian noise at random contrast, clipped to [-1, 1], (n, 1, 8, 8)."""
    z = torch.randn((n, 1, 8, 8), generator=generator)
    smooth = F.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    smooth = smooth / smooth.flatten(1).std(-1).clamp_min(1e-6)[:, None, None, None]
    pick = torch.rand((n, 1, 1, 1), generator=generator) < 0.5
    contrast = 0.3 + 1.2 * torch.rand((n, 1, 1, 1), generator=generator)
    offset = 0.5 * torch.randn((n, 1, 1, 1), generator=generator)
    return (torch.where(pick, smooth, z) * contrast + offset).clamp(-1.0, 1.0)


def train_classifier(training: ClassifierTraining = ClassifierTraining()) -> tuple[DigitCNN, float]:
    """Trains the CNN on the training split; returns it (eval mode, frozen) and its held-out accuracy."""
    images, labels = load_digits_data()  # (N, 1, 8, 8), (N,)
    train_idx, test_idx = _split(images.shape[0], training.holdout, training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        net = DigitCNN()
    opt = torch.optim.Adam(net.parameters(), lr=training.lr)
    x_train, y_train = images[train_idx], labels[train_idx]
    torch.set_num_threads(1)  # the net is tiny: one thread is fastest, and much faster on a busy machine
    try:
        with torch.enable_grad():  # the reward may be built inside a no_grad context (e.g. an evaluation)
            _fit_classifier(net, opt, x_train, y_train, training, generator)
    finally:
        torch.set_num_threads(threads)
    net.eval().requires_grad_(False)
    return net, accuracy(net, images[test_idx], labels[test_idx])  # digits only: a "not a digit" answer is wrong


def _fit_classifier(net, opt, x_train, y_train, training: ClassifierTraining, generator: torch.Generator) -> None:
    """Cross-entropy epochs over the digits (with input noise) plus "not a digit" noise images."""
    for _ in range(training.epochs):
        order = torch.randperm(x_train.shape[0], generator=generator)
        for start in range(0, order.numel(), training.batch_size):
            idx = order[start : start + training.batch_size]
            x = x_train[idx] + training.input_noise * torch.randn(x_train[idx].shape, generator=generator)
            m = max(1, int(training.negatives * idx.numel()))
            x = torch.cat([x, noise_images(m, generator)])  # (b + m, 1, 8, 8)
            y = torch.cat([y_train[idx], torch.full((m,), NOT_A_DIGIT)])
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def cache_dir() -> Path:
    """`$RLFT_CACHE`, else `~/.cache/rlft`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlft")


def _cache_file(training: ClassifierTraining) -> Path:
    key = json.dumps({"version": FORMAT_VERSION, **asdict(training)}, sort_keys=True)
    return cache_dir() / f"digit_classifier_{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def save_classifier(net: DigitCNN, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Writes the weights (safetensors, format name and version in its metadata) atomically (`rlft.checkpoint`)."""
    path = Path(path)
    checkpoint.save_module(path, net, metadata={"format": FORMAT, "version": str(FORMAT_VERSION), **(metadata or {})})
    return path


def _file_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise checkpoint.CheckpointError(f"digit classifier weights {path} cannot be read ({err}); the file is damaged") from None


def _check_version(path: Path, meta: dict[str, str]) -> None:
    """A file of another format or version fails with which wrote it and what to do (unmarked files are tried)."""
    fmt, version = meta.get("format"), meta.get("version")
    if fmt is None and version is None:
        return  # plain DigitCNN weights without rlft's metadata: loading decides whether they fit
    if fmt != FORMAT:
        raise checkpoint.CheckpointError(f"{path} is a {fmt!r} file, not {FORMAT!r} weights: pass weights written by save_classifier")
    got = int(version) if str(version).isdigit() else version
    if got == FORMAT_VERSION:
        return
    if isinstance(got, int) and got < FORMAT_VERSION:
        raise checkpoint.CheckpointError(
            f"{path} was written by {FORMAT} version {got} (ten classes, before the 'not a digit' class); this rlft reads "
            f"version {FORMAT_VERSION}: retrain it (omit `path` to train and cache the default classifier, or write new "
            "weights with save_classifier(train_classifier()[0], path))"
        )
    raise checkpoint.CheckpointError(
        f"{path} was written by {FORMAT} version {version!r}; this rlft reads version {FORMAT_VERSION}: upgrade rlft to "
        "the release that wrote it"
    )


def load_classifier(path: str | os.PathLike) -> tuple[DigitCNN, dict[str, str]]:
    """Loads weights written by `save_classifier`; returns the network (eval, frozen) and the file's metadata.

    Raises:
        FileNotFoundError: no file at `path`.
        rlft.checkpoint.CheckpointError (a ValueError): a damaged file, another format or version (naming which
            wrote it and what to do), or weights that do not fit `DigitCNN`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights {str(path)!r} do not exist; omit `path` to train and cache them")
    meta = _file_metadata(path)
    _check_version(path, meta)
    net = DigitCNN()
    checkpoint.load_module(path, net)
    return net.eval().requires_grad_(False), meta


def cached_classifier(training: ClassifierTraining = ClassifierTraining()) -> tuple[DigitCNN, float]:
    """The classifier for `training`, loaded from the cache or trained (and cached) now; with its held-out accuracy."""
    path = _cache_file(training)
    if path.is_file():
        try:
            net, meta = load_classifier(path)
            return net, float(meta.get("holdout_accuracy", "nan"))
        except (ValueError, OSError):
            pass  # a corrupt cache entry is retrained and replaced
    start = time.time()
    net, acc = train_classifier(training)
    save_classifier(net, path, {"holdout_accuracy": repr(acc), "train_seconds": f"{time.time() - start:.2f}"})
    return net, acc


class DigitClassifierReward(Reward):
    """r(x) = log p(target | x) under a CNN trained on the 8x8 digits; x is (B, 1, 8, 8) (or (B, 64)) in [-1, 1].

    p is over the ten digits and "not a digit" (`NOT_A_DIGIT`), so noise-like images get a low reward.
    """

    name = "digit_classifier"
    differentiable = True

    def __init__(self, target: int | str = 0, path: str | None = None, seed: int = 0, thickness: float = 0.0) -> None:
        """
        Args:
            target: the digit to reward, 0..9, or "condition": the task's one-hot condition c (B, 10), r(x, c).
            path: classifier weights (safetensors from `save_classifier`); None trains/caches the default one.
            seed: training seed of the cached classifier (ignored with `path`).
            thickness: weight of the stroke-thickness term, + thickness * mean over pixels of (x + 1) / 2.
        """
        self.conditional = target == "condition"
        if not self.conditional and (isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < NUM_DIGITS):
            raise ValueError(f"target must be a digit 0..9 or 'condition' (got {target!r}); e.g. reward: "
                             "{type: digit_classifier, target: 3}")
        if isinstance(thickness, bool) or not isinstance(thickness, (int, float)) or not math.isfinite(thickness):
            raise ValueError(f"thickness must be a finite number, the weight of the mean ink (got {thickness!r}); e.g. 2.0")
        self.target, self.thickness = target, float(thickness)
        if path is not None:
            self.net, meta = load_classifier(path)
            self.holdout_accuracy = float(meta.get("holdout_accuracy", "nan"))
        else:
            self.net, self.holdout_accuracy = cached_classifier(ClassifierTraining(seed=seed))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, 11): digits 0..9, then "not a digit"."""
        if x.ndim == 2 and x.shape[1] == 64:
            x = x.reshape(-1, 1, 8, 8)
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"reward 'digit_classifier' needs x of shape (B, 1, 8, 8) or (B, 64) (got {tuple(x.shape)})")
        p = next(self.net.parameters())
        return self.net(x.to(device=p.device, dtype=p.dtype))

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        logp = F.log_softmax(self.logits(x), dim=-1)  # (B, 11)
        if self.conditional:
            if cond is None or cond.shape != (x.shape[0], NUM_DIGITS):
                raise ValueError(f"reward digit_classifier with target: condition needs one-hot cond ({x.shape[0]}, "
                                 f"{NUM_DIGITS}) (conditions: {{train: [...], num_classes: 10}}) (got "
                                 f"{None if cond is None else tuple(cond.shape)})")
            r = (logp[:, :NUM_DIGITS] * cond.to(logp)).sum(-1)  # log p(c | x) for one-hot c
        else:
            r = logp[:, self.target]
        if self.thickness:
            r = r + self.thickness * (x.reshape(x.shape[0], -1).to(r) + 1.0).mean(-1) / 2.0
        return r.to(x.dtype)  # (B,)

    def to(self, device: str | torch.device) -> "DigitClassifierReward":
        self.net.to(device)
        return self
