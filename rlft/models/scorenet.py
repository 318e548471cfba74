"""Small trainable score networks and the chain they drive; their checkpoint directories.

A network eps_theta(y, s) predicts the noise in y = a(s) x0 + sqrt(1 - a(s)^2) eps (MATH.md §1); it is trained by
denoising score matching in `rlft.models.pretrain`. Its score is score_theta(y, s) = -eps_theta(y, s) / sqrt(1 - a(s)^2)
(MATH.md §1), and `ScoreNetChain` runs the same VP chain as the exact `GMMModel` with this score. Two architectures:

- ``mlp``: vectors (D,), residual SiLU MLP with a sinusoidal embedding of the noise time s added per block.
- ``seq``: one-hot sequences (L, A), a small pre-norm transformer over positions with a learned positional
  and a time embedding (the shape of ELEGANT Table 4: hidden 64, a couple of layers).

Checkpoints are data (DESIGN.md): `save_scorenet` writes ``rlft.json`` + ``model.safetensors`` through
`rlft.checkpoint` (atomic directory replace) and `load_scorenet` rebuilds the chain without unpickling anything;
directories of earlier releases (``config.json`` + ``model.safetensors``, format version 1) still load.

Notation: x0 data, y noised data, s noise time, a(s)^2 = alpha_bar(s), eps noise, K `num_steps`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

import rlft.checkpoint as checkpoint
from rlft.models.base import CoefficientChain
from rlft.schedule import LevelCoefficients, VPSchedule

ARCHS = ("mlp", "seq")
WEIGHTS_FILE = "model.safetensors"
FORMAT = "rlft-scorenet"
#: 2: the state is `rlft.checkpoint`'s rlft.json; 1: the same fields in config.json (read as legacy)
FORMAT_VERSION = 2
LEGACY_CONFIG_FILE = "config.json"
STATE_FILES = (checkpoint.STATE_FILE, LEGACY_CONFIG_FILE)
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


# -- save / load ------------------------------------------------------------------------------------


def save_scorenet(net_or_chain: ScoreNet | ScoreNetChain, directory: str | os.PathLike) -> Path:
    """Writes ``rlft.json`` (format, version, architecture, training summary) and ``model.safetensors`` (float32)
    into `directory`, replacing it atomically (`rlft.checkpoint.atomic_dir`: an interrupted save leaves the old
    model). An existing scorenet directory is replaced; any other non-empty directory is refused.

    Returns:
        The directory path.
    """
    net = net_or_chain.net if isinstance(net_or_chain, ScoreNetChain) else net_or_chain
    if not isinstance(net, ScoreNet):
        raise TypeError(f"save_scorenet needs a ScoreNet or ScoreNetChain (got {type(net_or_chain).__name__})")
    target = Path(directory)
    ours = any((target / name).is_file() for name in STATE_FILES)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not ours)):
        raise FileExistsError(
            f"{target} exists and is not a scorenet directory; choose another output directory or remove it"
        )
    state = {**net.config.to_dict(), "training": net.summary.to_dict() if net.summary is not None else None}
    weights = {k: v.to(dtype=torch.float32) for k, v in net.state_dict().items()}
    with checkpoint.atomic_dir(target) as tmp:
        checkpoint.write_state(tmp, FORMAT, FORMAT_VERSION, state)
        checkpoint.save_tensors(tmp / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    return target


def load_network(directory: str | os.PathLike) -> ScoreNet:
    """Rebuilds the network (float32, CPU, eval mode, frozen) saved by `save_scorenet` (any format version)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"score network directory {str(path)!r} does not exist; create it with {PRETRAIN_HINT}")
    state_file = next((path / n for n in STATE_FILES if (path / n).is_file()), None)
    for file in (state_file or path / checkpoint.STATE_FILE, path / WEIGHTS_FILE):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: {str(path)!r} is not a complete scorenet directory "
                f"(needs {checkpoint.STATE_FILE} and {WEIGHTS_FILE}); re-create it with {PRETRAIN_HINT}"
            )
    try:
        meta = checkpoint.read_state(path, FORMAT, FORMAT_VERSION, legacy={LEGACY_CONFIG_FILE: 1})
        training = meta.pop("training", None)
        summary = TrainingSummary(**training) if training else None
        config = ScoreNetConfig.from_dict({k: v for k, v in meta.items() if k not in ("format", "version")})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{state_file} is not a valid scorenet config ({err}); re-create it with {PRETRAIN_HINT}") from err
    net = build_network(config)
    try:
        checkpoint.load_module(path / WEIGHTS_FILE, net)
    except checkpoint.CheckpointError as err:
        raise ValueError(
            f"{path / WEIGHTS_FILE} could not be loaded into a {config.arch!r} network of {state_file.name} ({err}); "
            f"re-create the directory with {PRETRAIN_HINT}"
        ) from err
    net.summary = summary
    return net.eval().requires_grad_(False)


def load_scorenet(directory: str | os.PathLike, num_steps: int = 100) -> ScoreNetChain:
    """The K-step chain of the network saved in `directory` by `save_scorenet` / `rlft pretrain`."""
    return ScoreNetChain(load_network(directory), num_steps=num_steps)


def build_scorenet_model(cfg, num_steps: int) -> ScoreNetChain:
    """The registry's ``model: {type: scorenet, path: DIR}`` builder (cfg a `rlft.config.ScoreNetModelConfig`)."""
    if not Path(cfg.path).is_dir():
        raise FileNotFoundError(
            f"model.path {cfg.path!r} does not exist; pretrain a score network first with {PRETRAIN_HINT} "
            "and point model.path at DIR"
        )
    return load_scorenet(cfg.path, num_steps=num_steps)
