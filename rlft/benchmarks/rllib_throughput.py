"""`rlft bench rllib-throughput`: RLlib sampling steps/s divided by a raw batched torch loop's, before and after
`rlft.rllib.env_runner.BulkEnvRunner` (issue 6, item 6; RAY_NOTES.md §2).

All three loops simulate B trajectories of the same pretrained chain (random weights: throughput does not depend on
them) for K steps:

    raw:      x = model.mean(k, x) + model.std(k) * randn                      (as `rlft bench env-throughput`)
    default:  RLlib's SingleAgentEnvRunner, gym_env_vectorize_mode="vector_entry_point" over the batched drift env
              (`envs.DenoisingDriftEnv`), `runner.sample(num_timesteps=B K episodes)`
    fast:     `BulkEnvRunner` on the same env and module

Both runners run the same policy, `rlft.rllib.modules.DriftPolicyModule` (MLP 64x2 mean net; its forward and the
action draw are part of sampling), explore=True, one local EnvRunner in this process. A step is one transition of
one trajectory. Timings alternate raw/default/fast, `repeats` times; ratios are medians of the paired ratios.
Models: (a) the MLP score net (`rlft.models.scorenet`), (b) the tiny digits UNet (`rlft.tasks.digits_unet`).

`--json` prints {"ratio_<model>_default": .., "ratio_<model>_fast": .., "models": {<model>: {...steps/s...}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

MODELS = ("mlp", "unet")
BENCH_ENV = "rlft_bench_drift"
_MODELS: dict = {}  # name -> (model, reward), built once per process (the env creator reads it)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rllib-throughput",
        help="RLlib sampling steps/s / raw torch loop steps/s, default EnvRunner vs BulkEnvRunner",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--batch-size", type=int, default=256, help="B, trajectories per EnvRunner (default 256)")
    p.add_argument("--num-steps", type=int, default=20, help="K, chain steps per episode (default 20)")
    p.add_argument("--episodes", type=int, default=2, help="rounds of B episodes per timed run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timing triples per model (default 3)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models (default: both)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock or this process's CPU time (cpu: robust on a shared machine; default wall)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _make_env(env_config):
    from envs.drift import DenoisingDriftEnv

    model, reward = _MODELS[env_config["model"]]
    return DenoisingDriftEnv(model, reward, num_envs=int(env_config["num_envs"]), seed=0)


def build_runner(name: str, batch: int, fast: bool):
    """A local EnvRunner (RLlib's or `BulkEnvRunner`) over the benchmark env of model `name`."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.tune.registry import register_env

    from rlft.rllib.env_runner import VECTORIZE_MODE, BulkEnvRunner
    from rlft.rllib.modules import DriftPolicyModule, drift_model_config

    register_env(BENCH_ENV, _make_env)
    model, _ = _MODELS[name]
    cls = BulkEnvRunner if fast else SingleAgentEnvRunner
    config = (
        PPOConfig()
        .environment(BENCH_ENV, env_config={"model": name}, normalize_actions=False, clip_actions=False)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=batch, gym_env_vectorize_mode=VECTORIZE_MODE, env_runner_cls=cls)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=DriftPolicyModule,
                                               model_config=drift_model_config([model.std(k) for k in range(model.num_steps)])))
        .debugging(seed=0, log_level="ERROR")
    )
    return cls(config=config)


def measure(name: str, batch: int, episodes: int, repeats: int, progress, clock: str = "wall") -> dict:
    """steps/s of the raw loop and both runners on one model, and the median paired ratios."""
    import torch

    model, _ = _MODELS[name]
    K = model.num_steps
    timer = time.perf_counter if clock == "wall" else time.process_time
    gen = torch.Generator().manual_seed(0)
    runners = {"default": build_runner(name, batch, fast=False), "fast": build_runner(name, batch, fast=True)}
    n_steps = batch * K * episodes

    def raw() -> float:
        start = timer()
        with torch.inference_mode():
            for _ in range(episodes):
                x = model.prior_sample(batch, gen)
                for k in range(K):
                    x = model.mean(k, x) + model.std(k) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return timer() - start

    def sampled(which: str) -> float:
        start = timer()
        eps = runners[which].sample(num_timesteps=n_steps)
        elapsed = timer() - start
        done = sum(len(e) for e in eps)
        return elapsed * n_steps / max(done, 1)  # normalised to exactly n_steps

    raw(), sampled("default"), sampled("fast")  # warm-up (module build, first reset, lazy imports)
    times: dict[str, list[float]] = {"raw": [], "default": [], "fast": []}
    for r in range(repeats):
        order = ["raw", "default", "fast"] if r % 2 == 0 else ["fast", "default", "raw"]
        for which in order:
            times[which].append(raw() if which == "raw" else sampled(which))
        progress()
    out = {"batch_size": batch, "num_steps": K, "steps_per_run": n_steps}
    for which, ts in times.items():
        out[f"{which}_steps_per_s"] = n_steps / statistics.median(ts)
    for which in ("default", "fast"):
        pairs = [tr / tw for tr, tw in zip(times["raw"], times[which])]
        out[f"ratio_{which}"] = statistics.median(pairs)
        out[f"ratio_{which}_min_max"] = [min(pairs), max(pairs)]
    out["speedup_fast_over_default"] = out["fast_steps_per_s"] / out["default_steps_per_s"]
    return out


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import torch
    from tqdm.auto import tqdm

    from rlft.benchmarks.env_throughput import build_models

    torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.num_steps < 1 or args.episodes < 1 or args.repeats < 1:
        print("rlft bench rllib-throughput: --batch-size, --num-steps, --episodes and --repeats must be >= 1", file=sys.stderr)
        return 2
    _MODELS.update(build_models(args.models, args.num_steps, "cpu"))
    bar = tqdm(total=len(args.models) * args.repeats, desc="rllib-throughput", unit="triple", file=sys.stderr)
    results = {}
    for name in args.models:
        results[name] = measure(name, args.batch_size, args.episodes, args.repeats, lambda: bar.update(1), args.clock)
    bar.close()
    out = {f"ratio_{name}_{which}": results[name][f"ratio_{which}"] for name in args.models for which in ("default", "fast")}
    out.update({"models": results, "threads": args.threads, "clock": args.clock, "torch_version": torch.__version__})
    if args.json:
        print(json.dumps(out))
    else:
        print(f"RLlib sampling vs raw torch loop, B = {args.batch_size}, K = {args.num_steps}, {args.threads} thread(s), {args.clock} clock")
        print(f"{'model':6s} {'raw steps/s':>12s} {'default':>10s} {'fast':>10s} {'ratio default':>14s} {'ratio fast':>11s}")
        for name, r in results.items():
            print(f"{name:6s} {r['raw_steps_per_s']:12.0f} {r['default_steps_per_s']:10.0f} {r['fast_steps_per_s']:10.0f} "
                  f"{r['ratio_default']:14.3f} {r['ratio_fast']:11.3f}")
    return 0 if all(math.isfinite(v) for v in out.values() if isinstance(v, float)) else 1
