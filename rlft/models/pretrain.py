"""Denoising score matching for the small score networks of `rlft.models.scorenet`, and `rlft pretrain`.

The loss, epsilon form (Ho et al. 2020, eq. 14; Vincent 2011):

    L(theta) = E_{x0 ~ data, s ~ U(s_min T, T), eps ~ N(0, I)} |eps_theta(a(s) x0 + sqrt(1 - a(s)^2) eps, s) - eps|^2

`train_scorenet` minimises it with Adam (cosine-decayed) and returns an EMA of the weights. The command

    rlft pretrain --data X.npy --out DIR [--arch mlp|seq] [--steps N] [--batch-size B] [--lr LR]
                  [--hidden H] [--depth L] [--seed S] [--device DEV] [--threads N] [--json]

trains on a user's `.npy` array and saves DIR (`rlft.models.scorenet.save_scorenet`), which then serves as
``model: {type: scorenet, path: DIR}`` in a task. Progress goes to stderr; ``--json`` prints one JSON object on stdout.

Notation: x0 data, s noise time, a(s)^2 = alpha_bar(s), eps noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from rlft.models.scorenet import (
    ARCHS, DEFAULT_DEPTH, ScoreNet, ScoreNetConfig, TrainingSummary, build_network, save_scorenet,
)
from rlft.schedule import VPSchedule


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


# -- the command ------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="train a small score network on a .npy array (denoising score matching) and save it",
        description="Train a score network on DATA.npy ((N, D) vectors or (N, L, A) one-hot sequences) and save "
        "config.json + model.safetensors into OUT, usable as `model: {type: scorenet, path: OUT}`.",
    )
    p.add_argument("--data", required=True, help="a .npy file: (N, D) for --arch mlp, (N, L, A) for --arch seq")
    p.add_argument("--out", required=True, help="output directory (created; an older scorenet directory is replaced)")
    p.add_argument("--arch", choices=["mlp", "seq"], default=None, help="network family (default: from the data's ndim)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per step (default 256)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, cosine-decayed (default 2e-3)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--depth", type=int, default=None, help="residual blocks / transformer layers (default 3 mlp, 2 seq)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; save your samples with np.save('X.npy', array)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"--data {str(path)!r} is not a readable .npy array of numbers ({err}); write it with np.save('X.npy', array)"
        ) from err


def run(args: argparse.Namespace) -> int:
    try:
        data = _load_array(Path(args.data))
        arch = args.arch or ("seq" if data.ndim == 3 else "mlp")
        net = train_scorenet(
            data, arch=arch, steps=args.steps, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
            depth=args.depth, seed=args.seed, device=args.device, num_threads=args.threads,
            progress=True,
        )
        out = save_scorenet(net, args.out)
    except (ValueError, TypeError, FileExistsError) as err:
        print(f"rlft pretrain: {err}", file=sys.stderr)
        return 2
    s = net.summary
    report = {
        "out": str(out),
        "arch": net.config.arch,
        "event_shape": list(net.config.event_shape),
        "num_data": s.num_data,
        "steps": s.steps,
        "initial_loss": s.initial_loss,
        "final_loss": s.final_loss,
        "seconds": s.seconds,
    }
    if args.json:
        print(json.dumps(report))
    else:
        shape = "x".join(map(str, net.config.event_shape))
        print(f"trained {arch} score network on {s.num_data} samples of shape {shape}, {s.steps} steps, {s.seconds:.1f} s")
        print(f"DSM loss {s.initial_loss:.4f} -> {s.final_loss:.4f}; saved to {out}")
        print(f"use it in a task as  model: {{type: scorenet, path: {out}}}")
    return 0
