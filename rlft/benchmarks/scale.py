"""`rlft bench scale`: data-parallel updates/s with 1 and 2 Ray Train workers, what Ray Train adds per update at
N = 1, and reward-actor throughput against in-process evaluation (issue 20).

Updates. A differentiable learner (`--learner`, default no_kl) on `--model`: `digits` (default) is the tiny digits
UNet (`rlft.tasks.digits_unet.tiny_unet_config`, random weights: the cost of an update does not depend on them)
fine-tuned through a LoRA adapter (`--lora-rank`), `gmm` a D-dimensional GMM chain (`--dim`); K = `--num-steps`,
a global batch of B paths (`--batch-size`), one drift update per iteration, wall-clock times after one warm-up:
    in-process     `learner.train_iteration()` in this process (what run.workers_per_trial = 1 runs: nothing
                   else is started, so the runner's N = 1 path is this one exactly), before and after the Train runs;
    train N=1      a TorchTrainer of one worker (forced here; the runner never does this) running what each rank
                   of `rlft train` runs per iteration: `rlft.run.parallel.Rank.train_iteration` (gradient
                   all-reduce, metric gather) and `rlft.run.train_workers.report` (a one-number broadcast, and a
                   `ray.train.report` every `--report-every` iterations: rows are reported at checkpoints, every
                   iteration only with run.checkpoint_every = 0); interleaved update by update, in the same
                   worker, with a plain `train_iteration()` of a second learner: the ratio is Train's overhead;
    train N=2      two Train workers (gloo), B/2 paths each, against the in-process time.
The worker group's start (`fit` wall time minus the timed loop) is reported on its own.
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
    p.add_argument("--model", default="digits", choices=["digits", "gmm"], help="digits UNet + LoRA, or a GMM (default digits)")
    p.add_argument("--dim", type=int, default=8, help="GMM dimension D (default 8)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank of the digits UNet (default 4)")
    p.add_argument("--num-steps", type=int, default=10, help="chain steps K (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch B per update (default 32)")
    p.add_argument("--updates", type=int, default=3, help="timed updates per setting (default 3)")
    p.add_argument("--report-every", type=int, default=1,
                   help="iterations per Train report (1: every one, as with run.checkpoint_every 0; default 1)")
    p.add_argument("--reward-batch-size", type=int, default=256, help="rows per reward chunk (default 256)")
    p.add_argument("--reward-batches", type=int, default=16, help="chunks per timed reward call (default 16)")
    p.add_argument("--reward-hidden", type=int, default=1024, help="hidden units of the bench reward (default 1024)")
    p.add_argument("--reward-depth", type=int, default=4, help="hidden layers of the bench reward (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed reward calls per setting (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU: each extra worker/actor takes 0.5 of one)")
    p.add_argument("--skip", nargs="*", default=[], choices=["updates", "rewards"], help="parts to skip")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def task_data(a: argparse.Namespace, workers: int, model_dir: str = "") -> dict[str, Any]:
    """The bench task: the digits UNet (saved in model_dir) with a linear reward, or a 2-component D-dimensional GMM
    with a quadratic one; the learner with one update per iteration."""
    gpu = a.device == "cuda"
    if a.model == "digits":
        model, reward = {"type": "diffusers", "path": model_dir}, {"type": "linear", "direction": [0.01] * 64}
        extra = {"lora_rank": a.lora_rank}
    else:
        d = a.dim
        model = {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0] * d, [-1.0] * d], "stds": [0.5, 0.5]}
        reward, extra = {"type": "quadratic", "center": [0.5] * d, "scale": 1.0}, {}
    return {
        "model": model, "reward": reward, "alpha": 1.0, "num_steps": a.num_steps, "seed": 0,
        "learner": {"type": a.learner, "batch_size": a.batch_size, "drift_iterations": 100,
                    "drift_iterations_per_train_iteration": 1, **extra},
        "run": {"iterations": 100, "workers_per_trial": workers, "cpus_per_worker": 1.0, "device": a.device,
                "gpus_per_worker": 0.5 if gpu and workers > 1 else 0.0, "gpus_per_trial": 0.5 if gpu and workers == 1 else 0.0},
    }


def _learner(data: dict[str, Any], device: str):
    """A learner of rank `data`'s share (batch_size / workers_per_trial), built as the trial builds it."""
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.run.parallel import worker_task
    from rlft.run_config import experiment_from_dict

    task, run, _ = experiment_from_dict(data)
    task = worker_task(task, run)
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps).to(device=device)
    return build_learner(task, model, build_reward(task.reward, model=model).to(model.device)), task


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: what `rlft.run.trial.train_loop` does per iteration on each rank (timed),
    interleaved (N = 1) with a plain in-process learner's `train_iteration()` in the same worker."""
    import tempfile

    import ray.train

    import rlft.run.train_workers as train_workers
    from rlft.run.parallel import Rank

    torch.set_num_threads(1)
    device = config["device"] if config["device"] == "cpu" else train_workers.device()
    learner, task = _learner(config["task"], device)
    group = Rank(learner, task)
    start = time.perf_counter()
    group.sync()

    done = [0]

    def step() -> None:  # rank 0 has a row to report every `report_every` iterations (a checkpoint's rows, no files)
        group.train_iteration()
        done[0] += 1
        due = group.rank == 0 and done[0] % config["report_every"] == 0
        train_workers.report([{"iteration": done[0]}] if due else [], None)

    steps = [step]
    if group.world == 1:
        steps.append(_learner({**config["task"], "run": {**config["task"]["run"], "workers_per_trial": 1}}, device)[0].train_iteration)
    times = _times(steps, config["updates"])
    with tempfile.TemporaryDirectory() as tmp:  # Train keeps a run's metrics only with a checkpoint
        Path(tmp, "times.json").write_text(json.dumps({"times": times, "loop_s": time.perf_counter() - start}))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if group.rank == 0 else None)


def _train_run(a: argparse.Namespace, workers: int, model_dir: str) -> dict[str, Any]:
    """One TorchTrainer run of `_train_worker` on `workers` workers; its times and its start cost."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    import rlft.run.train_workers as train_workers

    os.environ.setdefault(train_workers.HEALTH_CHECK_ENV, train_workers.HEALTH_CHECK_S)
    os.environ.setdefault(train_workers.PRINT_PATCH_ENV, "0")
    gpu = a.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="rlft_bench_scale_") as storage:
        trainer = TorchTrainer(
            _train_worker, train_loop_config={"task": task_data(a, workers, model_dir), "updates": a.updates, "device": a.device,
                                              "report_every": a.report_every},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                                   resources_per_worker={"CPU": 1.0, **({"GPU": 0.5} if gpu else {})}),
            run_config=ray.train.RunConfig(name=f"scale{workers}", storage_path=storage))
        t = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t
        with result.checkpoint.as_directory() as directory:
            measured = json.loads(Path(directory, "times.json").read_text())
    return {"times": measured["times"], "fit_s": wall, "start_s": wall - measured["loop_s"]}


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
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rlft_bench_unet_") as model_dir:
        if a.model == "digits":
            from rlft.models.diffusers_chain import DiffusersChain
            from rlft.tasks.digits_unet import digits_scheduler_config, tiny_unet_config

            DiffusersChain.from_config(tiny_unet_config(), digits_scheduler_config(), num_steps=a.num_steps, seed=0).save_pretrained(model_dir)
        plain = _learner(task_data(a, 1, model_dir), a.device)[0]
        before = statistics.median(_times([plain.train_iteration], a.updates)[0])
        one, two = _train_run(a, 1, model_dir), _train_run(a, 2, model_dir)
        after = statistics.median(_times([plain.train_iteration], a.updates)[0])
    out: dict[str, Any] = {"in_process_s": statistics.median([before, after]), "in_process_before_s": before,
                           "in_process_after_s": after}
    out["train1_s"], out["train1_plain_s"] = (statistics.median(t) for t in one["times"])
    out["train2_s"] = statistics.median(two["times"][0])
    out["train1_start_s"], out["train2_start_s"] = one["start_s"], two["start_s"]
    out["updates_per_s"] = {"in_process": 1 / out["in_process_s"], "train1": 1 / out["train1_s"], "train2": 1 / out["train2_s"]}
    out["train1_overhead"] = out["train1_s"] / out["train1_plain_s"] - 1
    out["train2_speedup"] = out["in_process_s"] / out["train2_s"]
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
    result: dict[str, Any] = {"device": a.device, "cpus": os.cpu_count(), "model": a.model, "dim": a.dim,
                              "num_steps": a.num_steps, "batch_size": a.batch_size, "learner": a.learner}
    if "updates" not in a.skip:
        result["updates"] = bench_updates(a)
        u = result["updates"]
        print(f"updates ({a.model}, B={a.batch_size}, K={a.num_steps}): in-process {u['in_process_s']:.3f} s/update "
              f"(before {u['in_process_before_s']:.3f}, after {u['in_process_after_s']:.3f}); Ray Train N=1 {u['train1_s']:.3f} s vs "
              f"plain in the same worker {u['train1_plain_s']:.3f} s ({100 * u['train1_overhead']:+.1f} %); Ray Train N=2 "
              f"{u['train2_s']:.3f} s (x{u['train2_speedup']:.2f} vs in-process); worker-group start {u['train1_start_s']:.1f} s "
              f"(N=1), {u['train2_start_s']:.1f} s (N=2)", file=sys.stderr)
    if "rewards" not in a.skip:
        result["rewards"] = bench_rewards(a)
        r = result["rewards"]
        print(f"rewards ({r['per_batch_ms']:.1f} ms per batch of {a.reward_batch_size}): in-process {r['in_process_s']:.3f} s, "
              f"1 actor {r['actors1_s']:.3f} s, 2 actors {r['actors2_s']:.3f} s (x{r['actors2_vs_in_process']:.2f}); "
              f"same values: {r['actors1_same_values'] and r['actors2_same_values']}", file=sys.stderr)
    if a.json:
        print(json.dumps(result))
    return 0
