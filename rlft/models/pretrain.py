"""`rlft pretrain`: train a small score network on a user's `.npy` array and save it as a model directory.

    rlft pretrain --data X.npy --out DIR [--arch mlp|seq] [--steps N] [--batch-size B] [--lr LR]
                  [--hidden H] [--depth L] [--seed S] [--device DEV] [--threads N] [--json]

The loss is denoising score matching (`rlft.models.scorenet`, module docstring). DIR then serves as
``model: {type: scorenet, path: DIR}`` in a task. Progress goes to stderr; ``--json`` prints one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def _load_array(path: Path):
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; save your samples with np.save('X.npy', array)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"--data {str(path)!r} is not a readable .npy array of numbers ({err}); write it with np.save('X.npy', array)"
        ) from err


def run(args: argparse.Namespace) -> int:
    from rlft.models.scorenet import save_scorenet, train_scorenet

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
