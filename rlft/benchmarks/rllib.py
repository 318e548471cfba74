"""`rlft bench rllib`: the RLlib learners' benchmark tables (issue 6).

1. ppo_kl:   PPO+KL (`learner: {type: ppo_kl}`, defaults only) on 2-D Gaussian-mixture tasks at alpha = 1: gap closure
             (J - J_pre) / (J* - J_pre) against iterations, reward queries and training time (goal: >= 0.7 in < 15 min).
2. queries:  reward queries PPO+KL and ELEGANT (`learner: {type: elegant}`, defaults) each need to close 50 % of the
             gap (first evaluation at or above 0.5; ELEGANT counts its value-function data set too).
3. fpg:      f-PG (`learner: {type: fpg}`) on the drift env with the target known only by samples (exact tilted-target
             samples as the expert set): energy distance to held-out target samples, pretrained vs fine-tuned (goal: halved).
4. restart:  a Gaussian mixture whose score is deliberately wrong (the model's mixture has perturbed weights) so that
             sample quality is the energy distance to the TRUE data; quality against NFE for the ODE sampler, the SDE
             chain, fixed-K restart schedules and f-Restart with each reward shaping (`rlft.rllib.restart`), with the
             learned policies' action statistics.

Evaluations use `rlft.evaluation.evaluate_run` (the standard figures). Training runs in this process (local EnvRunner
and Learner, `BulkEnvRunner`), with `--threads` torch threads. `--quick` shrinks every budget (a smoke run, not the
numbers to report). `--json` prints one JSON object on stdout; tables and progress go to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Any
from rlft.run.storage import log as _log  # one progress line on stderr

PARTS = ("ppo_kl", "queries", "fpg", "restart")
#: 2-D Gaussian-mixture tasks at alpha = 1: the default task (base_gmm.yaml) and a 3-mode one with a sharper reward
GMM_TASKS: dict[str, dict[str, Any]] = {
    "gmm4": {
        "model": {"type": "gmm", "weights": [0.25] * 4, "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]],
                  "stds": [0.4] * 4},
        "reward": {"type": "quadratic", "center": [1.0, 1.5], "scale": 1.0}, "alpha": 1.0, "num_steps": 100, "seed": 0,
    },
    "gmm3": {
        "model": {"type": "gmm", "weights": [0.5, 0.3, 0.2], "means": [[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]],
                  "stds": [0.4, 0.3, 0.5]},
        "reward": {"type": "quadratic", "center": [-1.0, -1.0], "scale": 2.0}, "alpha": 1.0, "num_steps": 100, "seed": 0,
    },
}
#: the restart bed: true data, and the model's (wrong) mixture
TRUE_DATA = {"type": "gmm", "weights": [0.25] * 4, "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]], "stds": [0.4] * 4}
WRONG_MODEL = {"type": "gmm", "weights": [0.55, 0.15, 0.15, 0.15], "means": TRUE_DATA["means"], "stds": [0.4] * 4}
#: f-Restart variants: name -> learner keys
RESTART_VARIANTS: dict[str, dict[str, Any]] = {
    "boost (js), uniform start": {"shaping": "none", "fpg_divergence": "js", "init_denoise_prob": 0.5},
    "boost (kl)": {"shaping": "none"},
    "boost (kl, centred)": {"shaping": "none", "center_reward": True},
    "time_weighted": {"shaping": "time_weighted", "center_reward": True},
    "terminal + nfe cost": {"shaping": "terminal", "nfe_cost": 0.02},
    "level_aware + nfe cost": {"shaping": "level_aware", "nfe_cost": 0.02, "shaping_coeff": 0.3},
}


def register(subparsers) -> None:
    p = subparsers.add_parser("rllib", help="PPO+KL, f-PG and f-Restart benchmark tables (RLlib learners)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which tables (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads ran up to 30x slower)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


# -- helpers --------------------------------------------------------------------------------------------------



def build(task_dict: dict[str, Any]):
    """(task, model, reward, learner) from a task mapping (validated as `rlft train` does)."""
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.run_config import validate_task

    task = validate_task(task_dict)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    return task, model, reward, build_learner(task, model, reward)


def train_curve(learner, iterations: int, eval_at, num_samples: int, label: str, stop=None, time_budget: float = math.inf):
    """Trains, evaluating at the iterations `eval_at(it)` says; returns rows and the training wall time (s)."""
    rows, train_time = [], 0.0
    for it in range(1, iterations + 1):
        start = time.perf_counter()
        metrics = learner.train_iteration()
        train_time += time.perf_counter() - start
        if eval_at(it) or it == iterations:
            ev = learner.evaluate(num_samples=num_samples)
            row = {"iteration": it, "reward_queries": int(learner.reward_queries), "train_time_s": train_time,
                   **{k: ev[k] for k in ("gap_closure", "objective", "optimal_objective", "reward", "kl") if k in ev},
                   **{k: ev[k] for k in ("energy_distance", "energy_distance_floor") if k in ev},
                   "pretrained_energy_distance": ev.get("pretrained", {}).get("energy_distance"),
                   "train": {k: float(v) for k, v in metrics.items()}}
            rows.append(row)
            _log(f"[{label}] it {it}: gap {row.get('gap_closure', float('nan')):.3f}  J {row.get('objective', float('nan')):.3f}"
                 f"  kl {row.get('kl', float('nan')):.3f}  queries {row['reward_queries']}  train {train_time:.0f}s")
            if stop is not None and stop(row):
                break
        if train_time > time_budget:
            break
    return rows, train_time


def _first(rows, key: str, threshold: float):
    for row in rows:
        if row.get(key, -math.inf) >= threshold:
            return row
    return None


def _stop(learner) -> None:
    algo = getattr(learner, "algo", None)
    if algo is not None:
        algo.stop()


# -- the parts --------------------------------------------------------------------------------------------------


def bench_ppo_kl(quick: bool, seed: int) -> dict[str, Any]:
    """PPO+KL with default keys on the 2-D mixture tasks: gap closure against iterations, time and queries."""
    out = {}
    for name, base in GMM_TASKS.items():
        if quick and name != "gmm4":
            continue
        task = dict(copy.deepcopy(base), seed=seed, learner={"type": "ppo_kl"})
        _, _, _, learner = build(task)
        iterations = 6 if quick else 60
        rows, train_time = train_curve(
            learner, iterations, lambda it: it <= 10 or it % 5 == 0, 500 if quick else 2000, f"ppo_kl {name}",
            time_budget=15 * 60,
        )
        _stop(learner)
        hit70, hit50 = _first(rows, "gap_closure", 0.7), _first(rows, "gap_closure", 0.5)
        out[name] = {
            "final_gap_closure": rows[-1]["gap_closure"], "best_gap_closure": max(r["gap_closure"] for r in rows),
            "final_objective": rows[-1]["objective"], "optimal_objective": rows[-1]["optimal_objective"],
            "final_kl": rows[-1]["kl"], "iterations": rows[-1]["iteration"], "train_time_s": train_time,
            "reward_queries": rows[-1]["reward_queries"],
            "time_to_70pct_s": hit70["train_time_s"] if hit70 else None,
            "queries_to_70pct": hit70["reward_queries"] if hit70 else None,
            "queries_to_50pct": hit50["reward_queries"] if hit50 else None,
            "curve": rows,
        }
    return out


def bench_queries(quick: bool, seed: int, ppo: dict[str, Any] | None) -> dict[str, Any]:
    """Reward queries to 50 % of the gap: PPO+KL (from its curve) and ELEGANT (evaluated every iteration)."""
    task = dict(copy.deepcopy(GMM_TASKS["gmm4"]), seed=seed, learner={"type": "elegant"})
    if ppo is None or "gmm4" not in ppo:
        ppo = bench_ppo_kl(quick, seed)
    _, _, _, learner = build(task)
    rows, train_time = train_curve(learner, 3 if quick else 60, lambda it: True, 500 if quick else 2000, "elegant",
                                   stop=lambda row: row["gap_closure"] >= 0.5, time_budget=20 * 60)
    hit = _first(rows, "gap_closure", 0.5)
    p = ppo["gmm4"]
    return {
        "ppo_kl": {"queries_to_50pct": p["queries_to_50pct"], "queries_to_70pct": p["queries_to_70pct"],
                   "final_gap_closure": p["final_gap_closure"]},
        "elegant": {"queries_to_50pct": hit["reward_queries"] if hit else None,
                    "iterations_to_50pct": hit["iteration"] if hit else None,
                    "gap_closure_at_stop": rows[-1]["gap_closure"], "train_time_s": train_time, "curve": rows},
    }


def bench_fpg(quick: bool, seed: int) -> dict[str, Any]:
    """f-PG on the drift env: energy distance to the target (known to the learner only by samples)."""
    task = dict(copy.deepcopy(GMM_TASKS["gmm4"]), seed=seed, learner={"type": "fpg", "expert": {"type": "target"}})
    _, _, _, learner = build(task)
    rows, train_time = train_curve(learner, 4 if quick else 30, lambda it: it % 5 == 0 or it == 1, 500 if quick else 2000, "fpg")
    _stop(learner)
    pre = rows[-1]["pretrained_energy_distance"]
    best = min(r["energy_distance"] for r in rows)
    return {"pretrained_energy_distance": pre, "final_energy_distance": rows[-1]["energy_distance"],
            "best_energy_distance": best, "energy_distance_floor": rows[-1].get("energy_distance_floor"),
            "final_ratio": rows[-1]["energy_distance"] / pre, "reward_queries": rows[-1]["reward_queries"],
            "train_time_s": train_time, "curve": rows}


def bench_restart(quick: bool, seed: int) -> dict[str, Any]:
    """Quality (energy distance to the true data) against NFE on the wrong-score mixture."""
    import torch

    import rlft.metrics as metrics
    from rlft.guidance.restart import RestartSchedule
    from rlft.models import build_model
    from rlft.models.gmm import GaussianMixture
    from rlft.rllib.restart import baseline_samplers, policy_restart_sample
    from rlft.run_config import validate_task

    K, n = 10, 1000 if quick else 4000
    task_base = {"model": WRONG_MODEL, "reward": {"type": "quadratic", "center": [0.0, 0.0], "scale": 1.0},
                 "alpha": 1.0, "num_steps": K, "seed": seed}
    true = GaussianMixture.create(TRUE_DATA["weights"], TRUE_DATA["means"], TRUE_DATA["stds"])
    data = true.sample(n, torch.Generator().manual_seed(seed + 100)).double()
    floor = metrics.energy_distance(true.sample(n, torch.Generator().manual_seed(seed + 101)).double(), data)
    model = build_model(validate_task(task_base).model, K)
    schedules = [RestartSchedule(2, 5, 1), RestartSchedule(5, 8, 2), RestartSchedule(3, 9, 3), RestartSchedule(0, 5, 2)]
    rows = []
    for r in baseline_samplers(model, n, seed + 5, schedules):
        rows.append({"sampler": r["sampler"], "nfe": float(r["nfe"]), "energy_distance": metrics.energy_distance(r["x"].double(), data)})
        _log(f"[restart] {r['sampler']}: NFE {r['nfe']}, energy distance {rows[-1]['energy_distance']:.4f}")
    learned = {}
    for name, keys in RESTART_VARIANTS.items():
        if quick and name not in ("boost (kl)", "terminal + nfe cost"):
            continue
        learner_keys = {"type": "fpg", "env": "restart", "expert": TRUE_DATA, "budget": 3 * K, "init_denoise_prob": 0.9}
        task = dict(task_base, learner={**learner_keys, **keys})
        _, _, _, learner = build(task)
        iterations = 3 if quick else 40
        start = time.perf_counter()
        for _ in range(iterations):
            learner.train_iteration()
        train_time = time.perf_counter() - start
        res = policy_restart_sample(model, learner.policy_module(), n, learner.budget, seed=seed + 5)
        ed = metrics.energy_distance(res.x.double(), data)
        figs = res.figures()
        learned[name] = {"energy_distance": ed, **figs, "noise_by_level": [None if math.isnan(v) else float(v) for v in res.noise_by_level],
                         "iterations": iterations, "train_time_s": train_time, "learner": keys}
        rows.append({"sampler": f"f-Restart: {name}", "nfe": figs["restart/nfe_mean"], "energy_distance": ed})
        _log(f"[restart] f-Restart {name}: NFE {figs['restart/nfe_mean']:.2f}, energy distance {ed:.4f}, "
             f"P(noise) {figs['restart/noise_fraction']:.3f}, budget exhausted {figs['restart/budget_exhausted_fraction']:.2f}")
        _stop(learner)
    return {"num_steps": K, "budget": 3 * K, "num_samples": n, "energy_distance_floor": floor, "table": rows, "learned": learned}


# -- the command --------------------------------------------------------------------------------------------------


def print_tables(out: dict[str, Any], stream) -> None:
    def p(s: str = "") -> None:
        print(s, file=stream)

    if "ppo_kl" in out:
        p("PPO+KL, default keys, alpha = 1 (2-D Gaussian mixtures, K = 100)")
        p(f"{'task':6s} {'final gap':>9s} {'best gap':>9s} {'J':>8s} {'J*':>8s} {'KL':>7s} {'iters':>5s} {'train s':>8s} {'s to 70%':>9s} {'queries':>8s}")
        for name, r in out["ppo_kl"].items():
            t70 = f"{r['time_to_70pct_s']:.0f}" if r["time_to_70pct_s"] is not None else "-"
            p(f"{name:6s} {r['final_gap_closure']:9.3f} {r['best_gap_closure']:9.3f} {r['final_objective']:8.3f} {r['optimal_objective']:8.3f} "
              f"{r['final_kl']:7.3f} {r['iterations']:5d} {r['train_time_s']:8.0f} {t70:>9s} {r['reward_queries']:8d}")
        p()
    if "queries" in out:
        q = out["queries"]
        p("Reward queries to close 50 % of the gap (gmm4, alpha = 1)")
        p(f"  PPO+KL : {q['ppo_kl']['queries_to_50pct']}")
        p(f"  ELEGANT: {q['elegant']['queries_to_50pct']} (iterations {q['elegant']['iterations_to_50pct']})")
        p()
    if "fpg" in out:
        f = out["fpg"]
        p("f-PG on the drift env (target known only by samples): energy distance to the target")
        p(f"  pretrained {f['pretrained_energy_distance']:.4f} -> final {f['final_energy_distance']:.4f} (ratio {f['final_ratio']:.3f}; "
          f"best {f['best_energy_distance']:.4f}; floor {f['energy_distance_floor']:.4f}); reward queries {f['reward_queries']}")
        p()
    if "restart" in out:
        r = out["restart"]
        p(f"Restart bed (wrong-score mixture, K = {r['num_steps']}, budget L = {r['budget']}): quality against NFE "
          f"(energy distance to the true data; floor {r['energy_distance_floor']:.4f})")
        p(f"  {'sampler':40s} {'NFE':>6s} {'energy dist':>12s}")
        for row in r["table"]:
            p(f"  {row['sampler']:40s} {row['nfe']:6.2f} {row['energy_distance']:12.4f}")
        p("  learned policies: P(noise) | effective noise fraction | budget exhausted | mean level | mean level of NOISE")
        for name, s in r["learned"].items():
            p(f"  {name:28s} {s['restart/noise_fraction']:.3f} | {s['restart/effective_noise_fraction']:.3f} | "
              f"{s['restart/budget_exhausted_fraction']:.2f} | {s['restart/level_mean']:.2f} | {s['restart/noise_level_mean']:.2f}")


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    torch.set_num_threads(args.threads)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"quick": args.quick, "threads": args.threads}
    start = time.perf_counter()
    if "ppo_kl" in args.parts:
        out["ppo_kl"] = bench_ppo_kl(args.quick, args.seed)
    if "queries" in args.parts:
        out["queries"] = bench_queries(args.quick, args.seed, out.get("ppo_kl"))
    if "fpg" in args.parts:
        out["fpg"] = bench_fpg(args.quick, args.seed)
    if "restart" in args.parts:
        out["restart"] = bench_restart(args.quick, args.seed)
    out["wall_time_s"] = time.perf_counter() - start
    print_tables(out, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(out, default=float))
    return 0
