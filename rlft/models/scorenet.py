"""Small trainable score networks, their denoising-score-matching trainer, and the chain they drive.

A network eps_theta(y, s) predicts the noise in y = a(s) x0 + sqrt(1 - a(s)^2) eps (MATH.md §1) and is
trained by denoising score matching in its epsilon form (Ho et al. 2020, eq. 14; Vincent 2011):

    L(theta) = E_{x0 ~ data, s ~ U(s_min T, T), eps ~ N(0, I)} |eps_theta(a(s) x0 + sqrt(1 - a(s)^2) eps, s) - eps|^2

Its score is score_theta(y, s) = -eps_theta(y, s) / sqrt(1 - a(s)^2) (MATH.md §1), and `ScoreNetChain` runs the
same VP chain as the exact `GMMModel` with this score. Two architectures:

- ``mlp``: vectors (D,), residual SiLU MLP with a sinusoidal embedding of the noise time s added per block.
- ``seq``: one-hot sequences (L, A), a small pre-norm transformer over positions with a learned positional
  and a time embedding (the shape of ELEGANT Table 4: hidden 64, a couple of layers).

Checkpoints are data (DESIGN.md): `save_scorenet` writes ``config.json`` + ``model.safetensors`` atomically and
`load_scorenet` rebuilds the chain without unpickling anything.

Notation: x0 data, y noised data, s noise time, a(s)^2 = alpha_bar(s), eps noise, K `num_steps`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from rlft.models.base import CoefficientChain
from rlft.schedule import LevelCoefficients, VPSchedule

ARCHS = ("mlp", "seq")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "rlft-scorenet"
FORMAT_VERSION = 1
PRETRAIN_HINT = "`rlft pretrain --data DATA.npy --out DIR`"
#: Default number of residual blocks (mlp) or transformer layers (seq).
DEFAULT_DEPTH = {"mlp": 3, "seq": 2}


# -- configs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreNetConfig:
    """Architecture of a score network and the VP schedule its noise times refer to."""

    arch: Literal["mlp", "seq"]
    """``mlp`` for vectors (D,), ``seq`` for one-hot sequences (L, A)."""
    event_shape: tuple[int, ...]
    """Shape of one sample: (D,) for ``mlp``, (L, A) for ``seq``."""
    hidden: int = 128
    """Width of the hidden layers (transformer model dimension for ``seq``)."""
    depth: int = 3
    """Residual blocks (``mlp``) or transformer layers (``seq``)."""
    time_dim: int = 64
    """Size of the sinusoidal noise-time embedding (even)."""
    heads: int = 4
    """Attention heads (``seq`` only); must divide ``hidden``."""
    schedule: VPSchedule = field(default_factory=VPSchedule)
    """The VP schedule the network was trained under (its eps is the noise of that schedule's a(s))."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS} (got {self.arch!r})")
        object.__setattr__(self, "event_shape", tuple(int(n) for n in self.event_shape))
        want = 1 if self.arch == "mlp" else 2
        if len(self.event_shape) != want or min(self.event_shape) < 1:
            layout = "(D,)" if self.arch == "mlp" else "(L, A)"
            raise ValueError(f"arch={self.arch!r} needs event_shape {layout} of positive sizes (got {self.event_shape})")
        for name in ("hidden", "depth", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.time_dim < 2 or self.time_dim % 2:
            raise ValueError(f"time_dim must be an even number >= 2 (got {self.time_dim})")
        if self.arch == "seq" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) for arch='seq'")

    def to_dict(self) -> dict:
        return {**asdict(self), "event_shape": list(self.event_shape)}

    @staticmethod
    def from_dict(d: dict) -> "ScoreNetConfig":
        d = dict(d)
        d["schedule"] = VPSchedule(**d.get("schedule", {}))
        d["event_shape"] = tuple(d["event_shape"])
        return ScoreNetConfig(**d)


@dataclass(frozen=True)
class TrainingSummary:
    """What `train_scorenet` did: budget, seed and the DSM loss before and after (same held-out draw)."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    ema_decay: float
    num_data: int
    initial_loss: float
    """DSM loss of the freshly initialised net on a fixed (x0, s, eps) draw."""
    final_loss: float
    """DSM loss of the returned (EMA) net on the same draw."""
    seconds: float
    loss_curve: list[float]
    """Training loss averaged over consecutive windows of steps (about 50 points)."""

    def to_dict(self) -> dict:
        return asdict(self)


# -- networks ---------------------------------------------------------------------------------------


def time_embedding(s: torch.Tensor, dim: int, horizon: float) -> torch.Tensor:
    """Sinusoidal embedding of noise times (DDPM's, on 1000 s / T), shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=s.dtype) / half)  # (half,)
    arg = (1000.0 * s / horizon)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class ScoreNet(nn.Module):
    """Base of the epsilon networks: forward(y (B, *event), s (B,)) -> eps (B, *event)."""

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__()
        self.config = config
        self.summary: TrainingSummary | None = None
        h = config.hidden
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, h), nn.SiLU(), nn.Linear(h, h))

    def embed_time(self, s: torch.Tensor) -> torch.Tensor:
        """(B,) noise times -> (B, hidden)."""
        return self.time_mlp(time_embedding(s, self.config.time_dim, self.config.schedule.T))


class MLPScoreNet(ScoreNet):
    """eps_theta for vectors: input layer, `depth` residual SiLU blocks each fed the time embedding, output."""

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__(config)
        (d,), h = config.event_shape, config.hidden
        self.inp = nn.Linear(d, h)
        self.time_proj = nn.ModuleList([nn.Linear(h, h) for _ in range(config.depth)])
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h)) for _ in range(config.depth)]
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(h, d))

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        temb = self.embed_time(s)  # (B, h)
        h = self.inp(y) + temb
        for proj, block in zip(self.time_proj, self.blocks):
            h = h + block(h + proj(temb))
        return self.out(h)  # (B, D)


class _Block(nn.Module):
    """Pre-norm transformer block (self-attention over positions + MLP), written out so that its numerics
    do not depend on torch's inference fast path (the same x gives the same score with or without grad)."""

    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, h // self.heads)  # (B, L, 3, H, h/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, h/H)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h)  # (B, L, h)
        x = x + self.proj(att)
        return x + self.mlp(self.norm2(x))


class SequenceScoreNet(ScoreNet):
    """eps_theta for one-hot sequences (L, A): embed each position, add positional and time embeddings,
    `depth` transformer blocks, then a per-position linear read-out (ELEGANT Table 4's layout)."""

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__(config)
        (length, alphabet), h = config.event_shape, config.hidden
        self.inp = nn.Linear(alphabet, h)
        self.pos = nn.Parameter(0.02 * torch.randn(length, h))
        self.blocks = nn.ModuleList([_Block(h, config.heads) for _ in range(config.depth)])
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, alphabet))

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = self.inp(y) + self.pos[None] + self.embed_time(s)[:, None]  # (B, L, h)
        for block in self.blocks:
            h = block(h)
        return self.out(h)  # (B, L, A)


def build_network(config: ScoreNetConfig) -> ScoreNet:
    """A freshly initialised network for `config` (uses torch's global RNG)."""
    return MLPScoreNet(config) if config.arch == "mlp" else SequenceScoreNet(config)


# -- the chain --------------------------------------------------------------------------------------


class ScoreNetChain(CoefficientChain):
    """The VP chain of `rlft.schedule` driven by a network: score_k(x) = -eps_theta(x, s_k) / sqrt(1 - a(s_k)^2).

    The network is frozen (eval mode, requires_grad False) unless `trainable`; `score` stays differentiable
    in x so that learners can back-propagate through the chain. The chain owns `net`: `.to` moves and casts
    it in place, so two chains should not share one network object.
    """

    def __init__(self, net: ScoreNet, num_steps: int = 100, trainable: bool = False) -> None:
        self.schedule = net.config.schedule
        super().__init__(LevelCoefficients.from_schedule(self.schedule, num_steps))
        self.net = net
        self.event_shape = net.config.event_shape
        self._levels = self.schedule.levels(num_steps).tolist()  # s_k, (K+1,)
        self._sigma = [math.sqrt(1.0 - ab) for ab in self.coefficients.alpha_bar]  # sqrt(1 - a(s_k)^2), (K+1,)
        if not trainable:
            net.eval()
            net.requires_grad_(False)
        net.to(device=self.device, dtype=self.dtype)

    def eps(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x, s_k), same shape as x (k in 0..K)."""
        if cond is not None:
            raise ValueError("ScoreNetChain is unconditional; pass cond=None")
        self.check_state(x)
        return self.net(x, x.new_full((x.shape[0],), self._levels[k]))

    def score(self, k: int, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return -self.eps(k, x, cond) / self._sigma[k]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ScoreNetChain":
        super().to(device, dtype)
        self.net.to(device=self.device, dtype=self.dtype)
        return self


# -- training ---------------------------------------------------------------------------------------


def dsm_loss(net: ScoreNet, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching, epsilon form: (eps_theta(a x0 + sqrt(1-a^2) eps, s) - eps)^2 averaged over batch and
    event (so an all-zero network scores E[eps^2] = 1).

    Args:
        net: the epsilon network.
        x0: data, (B, *event).
        s: noise times in (0, T], (B,).
        eps: standard normal noise, (B, *event).
    """
    sched = net.config.schedule
    a = torch.exp(sched.log_a(s)).view(-1, *([1] * (x0.ndim - 1)))  # log_a is elementwise arithmetic; (B, 1, ...)
    y = a * x0 + torch.sqrt(1.0 - a * a) * eps
    return (net(y, s) - eps).pow(2).mean()


def as_training_data(data: np.ndarray | torch.Tensor, arch: str) -> torch.Tensor:
    """Checks a data array for `arch` and returns it as a float32 CPU tensor, (N, D) or (N, L, A)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS} (got {arch!r})")
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a numpy array or torch tensor (got {type(data).__name__})")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(
            f"data must hold numbers (got dtype {data.dtype}); convert it with np.asarray(data, dtype=np.float32)"
        )
    want = 2 if arch == "mlp" else 3
    if data.ndim != want:
        layout = "(N, D): one row per sample" if arch == "mlp" else "(N, L, A): N one-hot sequences of length L over A letters"
        hint = " (use arch='seq' for one-hot sequences)" if arch == "mlp" and data.ndim == 3 else ""
        hint = hint or (" (use arch='mlp' for vectors)" if arch == "seq" and data.ndim == 2 else "")
        hint = hint or (" (a 1-D array of N scalars is data.reshape(-1, 1))" if data.ndim == 1 else "")
        raise ValueError(
            f"arch={arch!r} needs data of shape {layout}; got a {data.ndim}-D array of shape {data.shape}{hint}"
        )
    if data.size == 0:
        raise ValueError(f"data is empty (shape {data.shape}); pass at least one sample with a non-empty event")
    data = data.astype(np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(data), -1).any(-1))
        raise ValueError(
            f"data has {int(bad.sum())} non-finite values (NaN/inf) in {len(rows)} samples, first at sample index "
            f"{int(rows[0])}; drop those samples (e.g. data[np.isfinite(data).all(axis=tuple(range(1, data.ndim)))])"
        )
    scale = float(np.abs(data).max())
    if scale > 20.0:
        warnings.warn(
            f"data reaches |x| = {scale:.3g}; the VP schedule assumes data of order 1 (its prior is N(0, I)). "
            "Standardise the data before training for a useful model.",
            stacklevel=3,
        )
    return torch.from_numpy(data)


def train_scorenet(
    data: np.ndarray | torch.Tensor,
    arch: Literal["mlp", "seq"] = "mlp",
    schedule: VPSchedule | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    hidden: int = 128,
    depth: int | None = None,
    time_dim: int = 64,
    heads: int = 4,
    ema_decay: float = 0.995,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> ScoreNet:
    """Trains an epsilon network on `data` by denoising score matching (module docstring), Adam + cosine decay.

    Args:
        data: samples, (N, D) for ``arch="mlp"`` or (N, L, A) for ``arch="seq"``; of order 1 in scale.
        arch: network family.
        schedule: the VP schedule (default `VPSchedule()`); noise times s ~ U(s_min T, T).
        steps: optimiser steps.
        batch_size: samples per step (drawn with replacement).
        lr: peak Adam learning rate (cosine-decayed to lr / 10).
        hidden, depth, time_dim, heads: architecture (`ScoreNetConfig`); depth defaults to 3 (mlp) / 2 (seq).
        ema_decay: decay of the exponential moving average of weights that is returned (0 returns the raw weights).
        seed: seeds initialisation, batches, noise times and noise.
        device: where to train (default: CUDA if available, else CPU).
        num_threads: torch CPU threads while training (restored afterwards); None keeps torch's setting. These
            nets are small: on a busy machine 1 thread is often many times faster than several.
        progress: show a progress bar on stderr.
    Returns:
        The trained network (float32, CPU, eval mode) with `.config` and `.summary` (`TrainingSummary`).
    """
    x_all = as_training_data(data, arch)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (got {lr})")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (got {ema_decay}); use 0 to return the raw weights")
    schedule = schedule or VPSchedule()
    config = ScoreNetConfig(arch, tuple(x_all.shape[1:]), hidden, depth or DEFAULT_DEPTH[arch], time_dim, heads, schedule)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None (got {num_threads})")
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(x_all, config, dev, steps, batch_size, lr, ema_decay, seed, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    x_all: torch.Tensor, config: ScoreNetConfig, dev: torch.device, steps: int, batch_size: int, lr: float,
    ema_decay: float, seed: int, progress: bool,
) -> ScoreNet:
    """The training loop of `train_scorenet` (arguments already checked)."""
    schedule, arch = config.schedule, config.arch

    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        net = build_network(config).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_all = x_all.to(dev)
    s_lo, s_hi = schedule.s_min * schedule.T, schedule.T

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x_all), (n,), generator=gen)
        s = s_lo + (s_hi - s_lo) * torch.rand(n, generator=gen)
        eps = torch.randn((n, *config.event_shape), generator=gen)
        return x_all[idx.to(dev)], s.to(dev), eps.to(dev)

    held = draw(min(2048, max(len(x_all), 256)))  # one fixed draw scores the net before and after training
    with torch.no_grad():
        initial_loss = float(dsm_loss(net, *held))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    window = max(1, steps // 50)
    curve: list[float] = []
    running, count = torch.zeros((), device=dev), 0  # window sum kept on the device: no sync per step
    start = time.perf_counter()
    net.train()
    for step in tqdm(range(steps), desc=f"pretrain {arch}", unit="step", disable=not progress, leave=False):
        loss = dsm_loss(net, *draw(batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with warm-up so that short runs are not dominated by the initialisation
            d = min(ema_decay, (1.0 + step) / (10.0 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - d)
            running += loss.detach()
        count += 1
        if count == window:
            curve.append(float(running) / window)
            running, count = torch.zeros((), device=dev), 0
    if count:
        curve.append(float(running) / count)
    out = ema if ema_decay > 0 else net
    out.eval().requires_grad_(False)
    with torch.no_grad():
        final_loss = float(dsm_loss(out, *held))
    out = out.cpu()
    out.summary = TrainingSummary(
        steps, batch_size, float(lr), seed, float(ema_decay), len(x_all), initial_loss, final_loss,
        round(time.perf_counter() - start, 3), curve,
    )
    return out


# -- save / load ------------------------------------------------------------------------------------


def save_scorenet(net_or_chain: ScoreNet | ScoreNetChain, directory: str | os.PathLike) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` (float32) into `directory`, atomically.

    The files are written into a temporary directory beside `directory` and moved into place with
    `os.replace`, so an interrupted save never leaves a half-written model. An existing scorenet directory
    is replaced; any other non-empty directory is refused.

    Returns:
        The directory path.
    """
    net = net_or_chain.net if isinstance(net_or_chain, ScoreNetChain) else net_or_chain
    if not isinstance(net, ScoreNet):
        raise TypeError(f"save_scorenet needs a ScoreNet or ScoreNetChain (got {type(net_or_chain).__name__})")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / CONFIG_FILE).is_file())):
        raise FileExistsError(
            f"{target} exists and is not a scorenet directory; choose another output directory or remove it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **net.config.to_dict(),
        "training": net.summary.to_dict() if net.summary is not None else None,
    }
    weights = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in net.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "model")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "model", target)  # put the previous model back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_network(directory: str | os.PathLike) -> ScoreNet:
    """Rebuilds the network (float32, CPU, eval mode, frozen) saved by `save_scorenet`."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"score network directory {str(path)!r} does not exist; create it with {PRETRAIN_HINT}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing: {str(path)!r} is not a complete scorenet directory "
                f"(needs {CONFIG_FILE} and {WEIGHTS_FILE}); re-create it with {PRETRAIN_HINT}"
            )
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"'format' is {found!r}, expected {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"'version' is {meta.get('version')!r}, this rlft reads version {FORMAT_VERSION}")
        training = meta.pop("training", None)
        summary = TrainingSummary(**training) if training else None
        config = ScoreNetConfig.from_dict({k: v for k, v in meta.items() if k not in ("format", "version")})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a valid scorenet config ({err}); re-create it with {PRETRAIN_HINT}"
        ) from err
    net = build_network(config)
    try:
        net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(
            f"{path / WEIGHTS_FILE} could not be loaded into a {config.arch!r} network of {CONFIG_FILE} ({err}); "
            f"re-create the directory with {PRETRAIN_HINT}"
        ) from err
    net.summary = summary
    return net.eval().requires_grad_(False)


def load_scorenet(directory: str | os.PathLike, num_steps: int = 100) -> ScoreNetChain:
    """The K-step chain of the network saved in `directory` by `save_scorenet` / `rlft pretrain`."""
    return ScoreNetChain(load_network(directory), num_steps=num_steps)
