"""`rlft sample RUN_OR_CHECKPOINT -n N --out samples.npy [--seed S] [--png]`: samples of a fine-tuned model.

RUN_OR_CHECKPOINT is anything `rlft.load` takes: an experiment folder (`<run.storage_path>/<name>`, its newest good
checkpoint), a trial directory, a trial checkpoint or a learner checkpoint. The samples are written as one
(N, *event_shape) float32 .npy file, atomically; `--png` adds a scatter beside it (with the pretrained model's
samples) for 2-D tasks. Ray is not started.

Exit status: 0 when written; 2 when the path is not a checkpoint or an argument is wrong (nothing is written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlft.run.storage import log


def register(subparsers) -> None:
    """Adds `rlft sample`."""
    help_text = "draw samples of a fine-tuned model (experiment folder or checkpoint) into a .npy file"
    p = subparsers.add_parser("sample", help=help_text, description=help_text)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="experiment folder <storage_path>/<name>, trial directory, or checkpoint directory")
    p.add_argument("-n", "--num-samples", type=int, required=True, help="number of samples N")
    p.add_argument("--out", required=True, help="output .npy file: an (N, *event_shape) float32 array")
    p.add_argument("--seed", type=int, help="sampling seed (default: the task's seed)")
    p.add_argument("--png", action="store_true", help="also write a scatter plot beside --out (2-D tasks)")
    p.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    import numpy as np

    from rlft.api import load
    from rlft.checkpoint import CheckpointError
    from rlft.files import atomic_path

    if os.getcwd() not in sys.path:  # a user's "module:Class" rewards/learners next to them, as `rlft train` does
        sys.path.insert(0, os.getcwd())
    out = Path(args.out)
    if args.num_samples < 1:
        print(f"rlft sample: -n must be >= 1 (got {args.num_samples})", file=sys.stderr)
        return 2
    if out.suffix != ".npy":
        print(f"rlft sample: --out must name a .npy file (got {args.out!r}); e.g. --out samples.npy", file=sys.stderr)
        return 2
    try:
        sampler = load(args.path)
    except CheckpointError as err:
        print(f"rlft sample: {err}", file=sys.stderr)
        return 2
    x = sampler.sample(args.num_samples, seed=args.seed, progress=sys.stderr.isatty()).float().numpy()
    with atomic_path(out, suffix=".tmp.npy") as tmp:  # np.save appends .npy to other names
        np.save(tmp, x)
    log(f"rlft sample: {x.shape[0]} samples of shape {tuple(x.shape[1:])} from {sampler.checkpoint} -> {out}")
    if args.png:
        if tuple(x.shape[1:]) != (2,):
            log(f"rlft sample: --png draws 2-D tasks only (event shape {tuple(x.shape[1:])}); no picture written")
        else:
            from rlft.plots import scatter_samples

            from rlft.sampling import sample

            seed = sampler.task.seed if args.seed is None else args.seed
            pre = sample(sampler.base, args.num_samples, seed=seed + 1, progress=False).x.float().numpy()
            png = scatter_samples(out.with_suffix(".png"), x, pretrained=pre,
                                  title=f"{x.shape[0]} samples of {Path(args.path).resolve().name}, beside the pretrained model")
            log(f"rlft sample: scatter -> {png}")
    return 0
