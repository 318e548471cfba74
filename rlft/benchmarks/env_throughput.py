"""`rlft bench env-throughput`: steps/s of the batched drift env against a raw batched torch loop (issue 4).

Both loops simulate B trajectories of the same pretrained chain with the pretrained policy:

    raw:  x = model.prior_sample(B);  x = model.mean(k, x) + model.std(k) * randn   for k < K
    env:  envs.DenoisingDriftEnv(model, reward, num_envs=B).step(env.pretrained_action())  (K steps + 1 autoreset
          step per episode; the action draw, the checks, the pretrained log-density, the observation arrays and
          the terminal reward are all inside the timed loop)

A "step" is one chain transition of one trajectory, so both sides count B * K per episode. The two loops are
timed in alternating order, `repeats` times. Steps/s and the ratio use the best (shortest) of the `repeats` runs
of each loop, the `timeit` convention: other processes only ever add time, so the minimum is the cleanest
estimate of each loop's own cost. The median of the paired ratios (raw time / env time of runs made back to
back) and their range are reported beside it.

Models: (a) the MLP score net (`rlft.models.scorenet`, default size, D = 2) and (b) the tiny digits UNet
(`rlft.tasks.digits_unet.tiny_unet_config` in a `DiffusersChain`, 1x8x8), both with random weights (throughput does not
depend on them). Torch threads are set explicitly (`--threads`, default 1: what a Ray EnvRunner with one CPU
gets). On a CPU device the default timer is the process CPU time (`--clock auto`), which descheduling on a busy
shared machine does not inflate (cache contention still does); `--clock wall` times wall-clock.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable

MODELS = ("mlp", "unet")
CLOCKS = ("auto", "cpu", "wall")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "env-throughput",
        help="steps/s of the batched Gymnasium env vs a raw batched torch loop (MLP score net, tiny UNet)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256], help="B values (default: 1 64 256)")
    p.add_argument("--steps", type=int, default=20, help="batched steps per timed run, rounded up to whole episodes (default 20)")
    p.add_argument("--repeats", type=int, default=9, help="alternating raw/env timing pairs per setting (default 9)")
    p.add_argument("--num-steps", type=int, default=20, help="K, chain steps per episode (default 20)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models (default: both)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--clock", choices=CLOCKS, default="auto",
        help="timer: process CPU time ('cpu': not inflated by other processes on a shared machine; equals wall time "
        "on an idle one with --threads 1), wall-clock ('wall'), or 'auto' = cpu on a CPU device, wall on a GPU",
    )
    p.add_argument("--device", default="cpu", help="torch device of the model and env (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def build_models(names: list[str], num_steps: int, device: str) -> dict:
    """name -> (model, reward) with random weights (seeded)."""
    import torch

    from rlft.rewards.builtin import QuadraticReward

    out = {}
    for name in names:
        if name == "mlp":
            from rlft.models.scorenet import ScoreNetChain, ScoreNetConfig, build_network

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = ScoreNetChain(build_network(ScoreNetConfig("mlp", (2,))), num_steps=num_steps)
        else:
            from rlft.models.diffusers_chain import DiffusersChain
            from rlft.tasks.digits_unet import digits_scheduler_config, tiny_unet_config

            model = DiffusersChain.from_config(tiny_unet_config(), digits_scheduler_config(), num_steps=num_steps, seed=0)
        if torch.device(device) != model.device:
            model.to(device=device)
        out[name] = (model, QuadraticReward([0.0] * model.event_dim))
    return out


def measure(model, reward, batch: int, steps: int, repeats: int, clock: str, progress: Callable[[], None]) -> dict:
    """Times the raw loop and the env on the same model; returns steps/s (medians) and the median paired ratio."""
    import torch

    from envs.drift import DenoisingDriftEnv

    K = model.num_steps
    episodes = max(1, math.ceil(steps / K))
    timer = time.perf_counter if clock == "wall" else time.process_time
    gen = torch.Generator(device=model.device).manual_seed(0)
    env = DenoisingDriftEnv(model, reward, num_envs=batch, seed=0)

    def raw(n: int) -> float:
        start = timer()
        with torch.inference_mode():
            for _ in range(n):
                x = model.prior_sample(batch, gen)
                for k in range(K):
                    x = model.mean(k, x) + model.std(k) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            if x.is_cuda:
                torch.cuda.synchronize()
        return timer() - start

    def stepped(n: int) -> float:
        env.reset(seed=0)
        start = timer()
        for _ in range(n):
            for _ in range(K + 1):  # K transitions + the autoreset step
                env.step(env.pretrained_action())
        return timer() - start

    raw(1), stepped(1)  # warm-up
    t_raw, t_env = [], []
    for r in range(repeats):
        if r % 2 == 0:
            t_raw.append(raw(episodes)), t_env.append(stepped(episodes))
        else:
            t_env.append(stepped(episodes)), t_raw.append(raw(episodes))
        progress()
    n_steps = batch * K * episodes
    paired = [tr / te for tr, te in zip(t_raw, t_env)]
    return {
        "batch_size": batch,
        "raw_steps_per_s": n_steps / min(t_raw),
        "env_steps_per_s": n_steps / min(t_env),
        "ratio": min(t_raw) / min(t_env),
        "median_paired_ratio": statistics.median(paired),
        "paired_ratio_min_max": [min(paired), max(paired)],
    }


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    for name in ("steps", "repeats", "num_steps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"rlft bench env-throughput: --{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f"rlft bench env-throughput: --batch-sizes must be >= 1 (got {args.batch_sizes})")
    torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if torch.device(args.device).type == "cpu" else "wall"
    models = build_models(args.models, args.num_steps, args.device)
    bar = tqdm(total=len(models) * len(args.batch_sizes) * args.repeats, desc="env throughput", unit="pair", file=sys.stderr)
    rows = []
    for name, (model, reward) in models.items():
        for batch in args.batch_sizes:
            bar.set_postfix(model=name, B=batch)
            rows.append({"model": name, **measure(model, reward, batch, args.steps, args.repeats, args.clock, lambda: bar.update())})
    bar.close()
    result = {
        "clock": args.clock, "threads": args.threads, "device": args.device, "num_steps": args.num_steps,
        "steps_per_run": args.steps, "repeats": args.repeats, "torch": torch.__version__, "results": rows,
    }
    for row in rows:
        result[f"ratio_{row['model']}_b{row['batch_size']}"] = row["ratio"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"env steps/s vs raw batched torch loop, best of {args.repeats} ({args.clock} clock, {args.threads} thread(s), {args.device}, K={args.num_steps})")
    print(f"{'model':<6} {'B':>5} {'raw steps/s':>13} {'env steps/s':>13} {'ratio':>7}  {'paired: median (min-max)'}")
    for row in rows:
        lo, hi = row["paired_ratio_min_max"]
        print(f"{row['model']:<6} {row['batch_size']:>5} {row['raw_steps_per_s']:>13,.0f} {row['env_steps_per_s']:>13,.0f} "
              f"{row['ratio']:>7.3f}  {row['median_paired_ratio']:.3f} ({lo:.2f}-{hi:.2f})")
    return 0
