"""`rlft bench adjoint-matching`: Adjoint Matching beside back-propagation (memory in K) and beside ELEGANT and PPO+KL
(quality and reward queries) on the exact Gaussian-mixture bed (issue 17).

Sections (`--sections`, default both):

  memory   per K in {50, 200, 1000} (2-D task, alpha = 1, batch 256): peak memory growth `peak_mb` and seconds per
           update of Adjoint Matching (`learner: {type: adjoint_matching}`) beside ELEGANT's back-propagation through
           the chain, plain and with gradient checkpointing (`rlft bench elegant`'s probe, reused). Each setting runs
           in a fresh subprocess; `peak_mb` = ru_maxrss (the process's resident high-water mark, from
           resource.getrusage) minus the resident size before the measured updates, after one warm-up update of
           batch 1, under MALLOC_MMAP_THRESHOLD_=65536 (so freed blocks go back to the system and the mark follows the
           live tensors; see `rlft.benchmarks.elegant.section_memory`).
  quality  on the exact GMM bed (`rlft.benchmarks.elegant.gmm_task`: 2-D and 8-D, alpha in {0.1, 0.3, 1}), each
           learner with default keys: gap closure (J - J_pre)/(J* - J_pre), energy distance / its exact-vs-exact
           floor, path KL, wall time, and the reward queries and training time at which the evaluated gap closure
           first reaches 50 %, 90 % and 95 %. Learners: adjoint_matching, elegant (backprop drift solver),
           elegant_am (drift_solver adjoint_matching), ppo_kl (RLlib; `rlft.benchmarks.rllib.train_curve` counts its
           queries, as for `rlft bench rllib`). Evaluations every `--eval-every` train iterations on `--eval-samples`
           samples (evaluation time excluded from the training time); the final one on 2000. PNG: gap closure
           against reward queries and against training time, one panel per (task, alpha).

`--json` prints one JSON object on stdout; tables and progress go to stderr. `--quick` shrinks every budget (a smoke
run, not the numbers to report). Times are wall-clock on whatever machine runs it (on a shared machine an upper bound).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from typing import Any

from rlft.files import atomic_path
from rlft.run.storage import log as _log  # one progress line on stderr

SECTIONS = ("memory", "quality")
MEMORY_STEPS = (50, 200, 1000)
MEMORY_METHODS = ("adjoint_matching", "backprop", "backprop_checkpointing")
LEARNERS: dict[str, dict[str, Any]] = {
    "adjoint_matching": {"type": "adjoint_matching"},
    "elegant": {"type": "elegant"},
    "elegant_am": {"type": "elegant", "drift_solver": "adjoint_matching"},
    "ppo_kl": {"type": "ppo_kl"},
}
TASKS = ("2d", "8d")
ALPHAS = (0.1, 0.3, 1.0)
THRESHOLDS = (0.5, 0.9, 0.95)
FINAL_EVAL_SAMPLES = 2000


def register(subparsers) -> None:
    p = subparsers.add_parser("adjoint-matching", help="Adjoint Matching: memory against K, quality and reward queries",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    p.add_argument("--learners", nargs="+", choices=list(LEARNERS), default=list(LEARNERS))
    p.add_argument("--time-budget", type=float, default=600.0, help="training seconds per run (default 600)")
    p.add_argument("--eval-every", type=int, default=10, help="train iterations between evaluations (default 10)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples per curve evaluation (default 1000)")
    p.add_argument("--memory-batch", type=int, default=256, help="trajectories per update in the memory section")
    p.add_argument("--memory-updates", type=int, default=3, help="measured updates per memory setting")
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    p.add_argument("--out", default="rlft_bench_adjoint_matching", help="directory for the PNG and results.json")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)



# -- memory ---------------------------------------------------------------------------------------------------


def memory_probe(num_steps: int, method: str, batch_size: int, updates: int) -> dict[str, Any]:
    """One setting in THIS process: peak resident growth (MB) over `updates` updates, and seconds per update."""
    import dataclasses
    import resource
    import time

    import torch

    from rlft.benchmarks.elegant import _rss_mb, gmm_task, memory_probe as backprop_probe
    from rlft.config import task_from_dict
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    torch.set_num_threads(1)
    if method != "adjoint_matching":
        row = backprop_probe(num_steps, method == "backprop_checkpointing", batch_size, updates, 0.0)
        return {"num_steps": num_steps, "method": method, "batch_size": batch_size, "ok": row.get("ok", False),
                "peak_mb": row.get("peak_growth_mb"), "s_per_update": row.get("wall_s_per_update"),
                "cpu_s_per_update": row.get("cpu_s_per_update"), **({"error": row["error"]} if "error" in row else {})}
    task = task_from_dict({**gmm_task("2d", 1.0), "num_steps": num_steps,
                           "learner": {"type": "adjoint_matching", "batch_size": batch_size}})
    model = build_model(task.model, task.num_steps)
    lrn = build_learner(task, model, build_reward(task.reward, model=model))
    full = lrn.options
    lrn.options = dataclasses.replace(full, batch_size=1)  # warm-up: Adam moments, autograd engine
    lrn.update()
    lrn.options = full
    base = _rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(updates):
        lrn.update()
    return {"num_steps": num_steps, "method": method, "batch_size": batch_size, "ok": True,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base,
            "s_per_update": (time.perf_counter() - wall) / updates, "cpu_s_per_update": (time.process_time() - cpu) / updates}


def section_memory(args) -> dict[str, Any]:
    from rlft.benchmarks.elegant import probe_in_subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    batch, updates = (32, 1) if args.quick else (args.memory_batch, args.memory_updates)
    rows = []
    for K in MEMORY_STEPS:
        for method in MEMORY_METHODS:
            code = ("import json; from rlft.benchmarks.adjoint_matching import memory_probe as m; "
                    f"print(json.dumps(m({K}, {method!r}, {batch}, {updates})))")
            row = probe_in_subprocess(code, env, {"num_steps": K, "method": method})
            rows.append(row)
            _log(f"memory K={K} {method}: peak_mb {row.get('peak_mb')}, s/update {row.get('s_per_update')}")
    per_k = {str(K): {r["method"]: {"peak_mb": r.get("peak_mb"), "s_per_update": r.get("s_per_update")}
                      for r in rows if r["num_steps"] == K} for K in MEMORY_STEPS}
    ratios = {}
    for method in MEMORY_METHODS:
        lo, hi = per_k[str(MEMORY_STEPS[0])][method]["peak_mb"], per_k[str(MEMORY_STEPS[-1])][method]["peak_mb"]
        ratios[method] = hi / lo if lo and hi is not None else None
    return {"per_K": per_k, "peak_ratio_K1000_over_K50": ratios, "batch_size": batch, "updates": updates, "rows": rows,
            "peak_mb_by": "ru_maxrss growth over the measured updates (resource.getrusage), MALLOC_MMAP_THRESHOLD_=65536"}


# -- quality --------------------------------------------------------------------------------------------------


def quality_run(task_name: str, alpha: float, learner_name: str, args) -> dict[str, Any]:
    """One learner with default keys on one (task, alpha): the evaluated curve and the final figures."""
    import time

    import rlft.benchmarks.rllib as rllib_bench
    from rlft.benchmarks.elegant import gmm_task

    task = {**copy.deepcopy(gmm_task(task_name, alpha)), "learner": copy.deepcopy(LEARNERS[learner_name])}
    wall = time.perf_counter()
    _, _, _, learner = rllib_bench.build(task)
    every = 1 if learner_name == "ppo_kl" else args.eval_every  # PPO+KL: one iteration = 4000 queries
    iterations = 3 if args.quick else 10_000
    budget = 20.0 if args.quick else args.time_budget
    label = f"{learner_name} {task_name} a={alpha:g}"
    try:
        rows, train_time = rllib_bench.train_curve(
            learner, iterations, lambda it: it % every == 0, 200 if args.quick else args.eval_samples, label,
            stop=lambda row: _done(learner), time_budget=budget)
        final = learner.evaluate(num_samples=200 if args.quick else FINAL_EVAL_SAMPLES)
    finally:
        rllib_bench._stop(learner)
    out = {"task": task_name, "alpha": alpha, "learner": learner_name, "train_time_s": train_time,
           "wall_s": time.perf_counter() - wall, "reward_queries": int(learner.reward_queries),
           "iterations": rows[-1]["iteration"] if rows else 0,
           **{k: final.get(k) for k in ("gap_closure", "objective", "optimal_objective", "reward", "kl",
                                         "energy_distance", "energy_distance_floor")}}
    out["ed_over_floor"] = (out["energy_distance"] / out["energy_distance_floor"]
                            if out.get("energy_distance_floor") else None)
    for t in THRESHOLDS:
        hit = rllib_first(rows, t)
        out[f"queries_to_{round(100 * t)}pct"] = hit["reward_queries"] if hit else None
        out[f"time_to_{round(100 * t)}pct_s"] = hit["train_time_s"] if hit else None
    out["curve"] = [{k: r.get(k) for k in ("iteration", "reward_queries", "train_time_s", "gap_closure", "kl",
                                            "energy_distance", "energy_distance_floor")} for r in rows]
    return out


def rllib_first(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first evaluated row whose gap closure is at or above `threshold` (rlft bench rllib's rule), or None."""
    import rlft.benchmarks.rllib as rllib_bench

    return rllib_bench._first(rows, "gap_closure", threshold)


def _done(learner) -> bool:
    """A differentiable learner is done when its learning-rate schedule is (PPO+KL runs to the time budget)."""
    o = getattr(learner, "options", None)
    return o is not None and hasattr(o, "drift_iterations") and learner.drift_updates >= o.drift_iterations


def section_quality(args) -> list[dict[str, Any]]:
    rows = []
    for task_name in args.tasks:
        for alpha in args.alphas:
            for name in args.learners:
                try:
                    row = quality_run(task_name, alpha, name, args)
                except Exception as err:  # one failed run is a row, not a lost table
                    row = {"task": task_name, "alpha": alpha, "learner": name, "error": f"{type(err).__name__}: {err}"}
                rows.append(row)
                _log(f"[{name} {task_name} a={alpha:g}] " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "curve"))
    return rows


# -- output ---------------------------------------------------------------------------------------------------


def _f(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def print_tables(results: dict[str, Any], stream=None) -> None:
    w = (stream or sys.stderr).write
    mem = results.get("memory")
    if mem:
        w(f"\nOne update against K (2-D task, batch {mem['batch_size']}): peak memory growth (MB) / seconds per update\n")
        w(f"{'K':>5} " + " ".join(f"{m:>26}" for m in MEMORY_METHODS) + "\n")
        for K, per in mem["per_K"].items():
            w(f"{K:>5} " + " ".join(f"{_f(per[m]['peak_mb'], '.1f'):>16} / {_f(per[m]['s_per_update'], '.2f'):>6}s"
                                    for m in MEMORY_METHODS) + "\n")
        w("peak at K=1000 / K=50: " + ", ".join(f"{m} {_f(r, '.2f')}x" for m, r in mem["peak_ratio_K1000_over_K50"].items()) + "\n")
    if results.get("quality"):
        w("\nQuality on the exact GMM bed (default keys): final figures; reward queries / training s to 50, 90, 95 % of the gap\n")
        w(f"{'task':4} {'alpha':>5} {'learner':17} {'gap':>6} {'ED/fl':>6} {'KL':>7} {'train s':>7} "
          f"{'q50':>8} {'q90':>8} {'q95':>8} {'s50':>5} {'s90':>5} {'s95':>5}\n")
        for r in results["quality"]:
            if "error" in r:
                w(f"{r['task']:4} {r['alpha']:5.2g} {r['learner']:17} error: {r['error'][:80]}\n")
                continue
            w(f"{r['task']:4} {r['alpha']:5.2g} {r['learner']:17} {_f(r['gap_closure'], '.3f'):>6} {_f(r['ed_over_floor'], '.2f'):>6} "
              f"{_f(r['kl'], '.3f'):>7} {_f(r['train_time_s'], '.0f'):>7} "
              + " ".join(f"{_f(r[f'queries_to_{p}pct'], 'd'):>8}" for p in (50, 90, 95)) + " "
              + " ".join(f"{_f(r[f'time_to_{p}pct_s'], '.0f'):>5}" for p in (50, 90, 95)) + "\n")


def make_plot(rows: list[dict[str, Any]], out: str) -> str | None:
    rows = [r for r in rows if r.get("curve")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["task"], r["alpha"]) for r in rows})
    fig, axes = plt.subplots(2, len(cells), figsize=(4 * len(cells), 6.5), squeeze=False)
    for j, (task, alpha) in enumerate(cells):
        for r in rows:
            if (r["task"], r["alpha"]) != (task, alpha):
                continue
            curve = [c for c in r["curve"] if c.get("gap_closure") is not None]
            for i, key in enumerate(("reward_queries", "train_time_s")):
                axes[i][j].plot([c[key] for c in curve], [c["gap_closure"] for c in curve], ".-", label=r["learner"])
        for i, xlabel in enumerate(("reward queries", "training time (s)")):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.axhline(0.95, color="grey", lw=0.8, ls="--")
            ax.set_ylim(-0.2, 1.05)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("gap closure")
            ax.set_title(f"{task}, alpha = {alpha:g}")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    path = os.path.join(out, "adjoint_matching_quality.png")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    import torch

    from rlft.config import ConfigError

    if args.eval_every < 1 or args.eval_samples < 10 or not args.time_budget > 0:
        raise ConfigError("--eval-every must be >= 1, --eval-samples >= 10 and --time-budget > 0")
    if any(not a > 0 for a in args.alphas):
        raise ConfigError(f"--alphas must be > 0 (got {args.alphas})")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    if "memory" in args.sections:
        results["memory"] = section_memory(args)
    if "quality" in args.sections:
        results["quality"] = section_quality(args)
        png = make_plot(results["quality"], args.out)
        if png:
            results["png"] = png
    print_tables(results)
    with atomic_path(os.path.join(args.out, "results.json")) as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
    if args.json:
        print(json.dumps(results, default=str))
    return 0
