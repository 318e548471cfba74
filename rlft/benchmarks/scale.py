"""`rlft bench scale`: data-parallel updates/s with 1 and 2 workers, the data-parallel machinery's cost at N = 1,
and reward-actor throughput against in-process evaluation (issue 20).

Updates. A differentiable learner (`--learner`, default no_kl) on a D-dimensional GMM chain (`--dim`, default 8;
K = `--num-steps`) with a global batch of B paths (`--batch-size`), one drift update per iteration, timed by the
wall clock (several processes take part), median over `--updates` updates after one warm-up iteration, each
data-parallel setting interleaved update by update with a fresh in-process learner (ratios within one pair):
    in-process     `learner.train_iteration()` in this process (what run.workers_per_trial = 1 runs: nothing else
                   is started, so the runner's N = 1 path is this one exactly);
    dp N=1         `rlft.run.parallel.DataParallel` with world size 1 (process group, gradient all-reduce and metric
                   averaging, no replica): the machinery's own overhead per update;
    dp N=2         this process and one Ray actor, B/2 paths each, gradients all-reduced over gloo.
Rewards. A reward that costs >= 10 ms per batch (`BenchReward`: a random MLP of `--reward-hidden` units, depth
`--reward-depth`, on the flattened sample) scores `--reward-batches` batches of `--reward-batch-size` rows, in
process and through pools of 1 and 2 Ray actors (`reward: {..., workers: M, batch_size: b}`); samples/s and ratios.

On a machine with fewer cores than processes (this project's CI: 2 cores shared by several jobs) the N = 2 figures
are bounded by the cores, not by the method: compare the ratios measured in one run, and say that it was shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rlft.rewards.base import Reward

ROOT = Path(__file__).resolve().parents[2]


class BenchReward(Reward):
    """r(x) = -|f(x)|^2 / d for a fixed random MLP f (seeded): a reward whose cost the benchmark sets."""

    name = "bench_mlp"

    def __init__(self, dim: int, hidden: int = 1024, depth: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        sizes = [dim] + [hidden] * depth + [dim]
        self.weights = [torch.randn(a, b, generator=gen) / math.sqrt(a) for a, b in zip(sizes, sizes[1:])]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1).float()
        for i, w in enumerate(self.weights):
            h = h @ w.to(h.device)
            h = torch.tanh(h) if i < len(self.weights) - 1 else h
        return -(h.pow(2).mean(1)).to(x.dtype)


def register(subparsers) -> None:
    p = subparsers.add_parser("scale", help="data-parallel updates/s (1 vs 2 workers) and reward-actor throughput",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--learner", default="no_kl", help="differentiable learner type (default no_kl)")
    p.add_argument("--dim", type=int, default=8, help="GMM dimension D (default 8)")
    p.add_argument("--num-steps", type=int, default=50, help="chain steps K (default 50)")
    p.add_argument("--batch-size", type=int, default=2048, help="global batch B per update (default 2048)")
    p.add_argument("--updates", type=int, default=5, help="timed updates per setting (default 5)")
    p.add_argument("--reward-batch-size", type=int, default=256, help="rows per reward chunk (default 256)")
    p.add_argument("--reward-batches", type=int, default=16, help="chunks per timed reward call (default 16)")
    p.add_argument("--reward-hidden", type=int, default=1024, help="hidden units of the bench reward (default 1024)")
    p.add_argument("--reward-depth", type=int, default=4, help="hidden layers of the bench reward (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed reward calls per setting (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU: each extra worker/actor takes 0.5 of one)")
    p.add_argument("--skip", nargs="*", default=[], choices=["updates", "rewards"], help="parts to skip")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def task_data(a: argparse.Namespace, workers: int) -> dict[str, Any]:
    """The bench task: a 2-component D-dimensional GMM, a quadratic reward, the learner with one update per iteration."""
    d = a.dim
    gpu = a.device == "cuda"
    return {
        "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0] * d, [-1.0] * d], "stds": [0.5, 0.5]},
        "reward": {"type": "quadratic", "center": [0.5] * d, "scale": 1.0}, "alpha": 1.0, "num_steps": a.num_steps,
        "seed": 0,
        "learner": {"type": a.learner, "batch_size": a.batch_size, "drift_iterations": 100,
                    "drift_iterations_per_train_iteration": 1},
        "run": {"iterations": 100, "workers_per_trial": workers, "cpus_per_worker": 1.0, "device": a.device,
                "gpus_per_trial": 0.5 if gpu else 0.0, "gpus_per_worker": 0.5 if gpu and workers > 1 else 0.0},
    }


def _median_time(step: Callable[[], Any], n: int) -> float:
    return statistics.median(_times([step], n)[0])


def _times(steps: list[Callable[[], Any]], n: int) -> list[list[float]]:
    """Wall times of n calls of each step, the steps interleaved (so a change of load hits them alike), after one
    warm-up call each (which also runs the learner's setup)."""
    for step in steps:
        step()
    out: list[list[float]] = [[] for _ in steps]
    for _ in range(n):
        for i, step in enumerate(steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out[i].append(time.perf_counter() - t)
    return out


def bench_updates(a: argparse.Namespace) -> dict[str, Any]:
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.run.parallel import DataParallel, worker_task
    from rlft.run_config import experiment_from_dict

    def learner_for(workers: int):
        task, run, _ = experiment_from_dict(task_data(a, workers))
        task = worker_task(task, run)
        torch.manual_seed(task.seed)
        model = build_model(task.model, task.num_steps).to(device=a.device)
        return build_learner(task, model, build_reward(task.reward, model=model)), task, run

    out: dict[str, Any] = {}
    for workers in (1, 2):  # each against an in-process learner, interleaved update by update
        plain = learner_for(1)[0]
        learner, task, run = learner_for(workers)
        group = DataParallel(learner, task, run)  # world size 1: the process group and the all-reduce, no replica
        try:
            base, dp = (statistics.median(t) for t in _times([plain.train_iteration, group.train_iteration], a.updates))
        finally:
            group.close()
        out[f"in_process_s_vs_dp{workers}"], out[f"dp{workers}_s"] = base, dp
    out["in_process_s"] = statistics.median([out["in_process_s_vs_dp1"], out["in_process_s_vs_dp2"]])
    out["updates_per_s"] = {"in_process": 1 / out["in_process_s"], "dp1": 1 / out["dp1_s"], "dp2": 1 / out["dp2_s"]}
    out["dp1_overhead"] = out["dp1_s"] / out["in_process_s_vs_dp1"] - 1
    out["dp2_speedup"] = out["in_process_s_vs_dp2"] / out["dp2_s"]
    return out


def bench_rewards(a: argparse.Namespace) -> dict[str, Any]:
    from rlft.rewards import build_reward

    spec = {"type": "rlft.benchmarks.scale:BenchReward", "dim": a.dim, "hidden": a.reward_hidden, "depth": a.reward_depth}
    x = torch.randn(a.reward_batch_size * a.reward_batches, a.dim, generator=torch.Generator().manual_seed(0))
    local = build_reward(spec).to(a.device)
    xs = x.to(a.device)

    def in_process():
        with torch.no_grad():
            return torch.cat([local(c) for c in xs.split(a.reward_batch_size)])

    out: dict[str, Any] = {"per_batch_ms": 1000 * _median_time(lambda: local(xs[: a.reward_batch_size]), a.repeats)}
    reference = in_process()
    out["in_process_s"] = _median_time(in_process, a.repeats)
    gpus = 0.5 if a.device == "cuda" else 0.0
    for m in (1, 2):
        pool = build_reward({**spec, "workers": m, "batch_size": a.reward_batch_size, "num_cpus": 1.0, "num_gpus": gpus})
        try:
            with torch.no_grad():
                same = torch.allclose(pool(xs), reference, rtol=1e-5, atol=1e-6)
                out[f"actors{m}_s"] = _median_time(lambda: pool(xs), a.repeats)
        finally:
            pool.close()
        out[f"actors{m}_same_values"] = bool(same)
    n = x.shape[0]
    out["samples_per_s"] = {k: n / out[f"{k}_s"] for k in ("in_process", "actors1", "actors2")}
    out["actors2_vs_in_process"] = out["in_process_s"] / out["actors2_s"]
    return out


def run(a: argparse.Namespace) -> int:
    import ray

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 num_cpus=max(3, os.cpu_count() or 1),  # this process + one worker + one actor per bench part
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    result: dict[str, Any] = {"device": a.device, "cpus": os.cpu_count(), "dim": a.dim, "num_steps": a.num_steps,
                              "batch_size": a.batch_size, "learner": a.learner}
    if "updates" not in a.skip:
        result["updates"] = bench_updates(a)
        u = result["updates"]
        print(f"updates (B={a.batch_size}, D={a.dim}, K={a.num_steps}): in-process {u['in_process_s_vs_dp1']:.3f} s/update vs "
              f"dp N=1 {u['dp1_s']:.3f} s ({100 * u['dp1_overhead']:+.1f} %); in-process {u['in_process_s_vs_dp2']:.3f} s vs "
              f"dp N=2 {u['dp2_s']:.3f} s (speed-up x{u['dp2_speedup']:.2f})", file=sys.stderr)
    if "rewards" not in a.skip:
        result["rewards"] = bench_rewards(a)
        r = result["rewards"]
        print(f"rewards ({r['per_batch_ms']:.1f} ms per batch of {a.reward_batch_size}): in-process {r['in_process_s']:.3f} s, "
              f"1 actor {r['actors1_s']:.3f} s, 2 actors {r['actors2_s']:.3f} s (x{r['actors2_vs_in_process']:.2f}); "
              f"same values: {r['actors1_same_values'] and r['actors2_same_values']}", file=sys.stderr)
    if a.json:
        print(json.dumps(result))
    return 0
