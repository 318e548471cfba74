"""`rlft bench conditional`: learners side by side on the exact CONDITIONAL bed (issue 19 item 2, MATH.md §8).

The task is `tune_configs/conditional_gmm.yaml`: the 2-D four-mode mixture and r(x, c) = -|x - c|^2 / 2 with 4 training
and 2 held-out conditions c; p_tar(.|c) and J*(c) are closed forms for every c. Each learner (`--learners`, default
all three: elegant, grpo, ppo_kl) trains with its default options for the task's run.iterations (`--iterations`
overrides), one torch thread, one after the other in this process; the RLlib learners (grpo, ppo_kl) get a local Ray
started here (and shut down at the end) when none is running. Every `--eval-every` iterations the sampler is evaluated
on the training and the held-out conditions (`--eval-samples` samples each; evaluation time is excluded from the
training time), giving the reward queries and training time at which the mean training gap closure first reaches 50 %
and 90 %, and the PNG (`--png`: gap closure against reward queries per learner, training and held-out conditions). The
final evaluation (2000 samples per condition) reports, averaged over the training conditions and over the held-out
ones: gap closure (J - J_pre)/(J* - J_pre), energy distance / its exact-vs-exact floor, path KL; and the gap closure
per condition. The gap closure's own standard error at 1000 samples per condition is 0.013-0.020 per condition (the
exact optimal control evaluates at 0.98-1.02 per condition; with the pretrained N(0, I) initial law instead of nu*, as
the RLlib learners have, at 0.97-1.01: the fixed initial law costs <= 0.03 of the gap on this bed).

Times: training wall time, the wall time of the whole learner (evaluations included) and this process's CPU time in
training (the whole of an in-process learner's cost on one thread, unaffected by other load; an RLlib learner's
EnvRunner and Learner actors are other processes, not counted there).

`--json` prints one JSON object on stdout; tables and progress go to stderr. `--quick` shrinks every budget (a smoke run,
not the numbers to report). Times are wall-clock on whatever machine runs it (on a shared machine an upper bound).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
import rlft.benchmarks.conditional_digits as conditional_digits  # the `--sections digits` section
from rlft.run.storage import log as _log  # one progress line on stderr

TASK_FILE = Path(__file__).resolve().parents[2] / "tune_configs" / "conditional_gmm.yaml"
LEARNERS = ("elegant", "grpo", "ppo_kl")
THRESHOLDS = (0.5, 0.9)
FINAL_EVAL_SAMPLES = 2000


def register(subparsers) -> None:
    p = subparsers.add_parser("conditional", help="learners on the exact conditional GMM bed (per-condition gap closure)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--learners", nargs="+", default=list(LEARNERS), help=f"learner types (default: {' '.join(LEARNERS)})")
    p.add_argument("--task", default=str(TASK_FILE), help="the conditional task YAML (default tune_configs/conditional_gmm.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="train iterations (default: the task's run.iterations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learner-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="learner option overrides (YAML values), e.g. drift_iterations=240 batch_size=256 (default: none)")
    p.add_argument("--eval-every", type=int, default=20, help="train iterations between curve evaluations (default 20)")
    p.add_argument("--eval-samples", type=int, default=500, help="samples per condition in curve evaluations (default 500)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    p.add_argument("--out", default="rlft_bench_conditional", help="directory for results.json")
    p.add_argument("--png", default=None, help="the curves' PNG (default: OUT/conditional.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--sections", nargs="+", choices=("gmm", "digits"), default=["gmm"],
                   help="gmm: the learners on the exact bed; digits: the class-conditional digits UNet with a LoRA "
                        "(rlft.benchmarks.conditional_digits) (default: gmm)")
    conditional_digits.add_arguments(p)
    p.set_defaults(func=run)



def task_data(path: str, learner: str, seed: int, iterations: int | None, quick: bool,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """The task mapping for one learner: the YAML with the learner's defaults (`learner: {type: NAME}`), or with the
    `KEY=VALUE` overrides given."""
    import yaml

    from rlft.config import load_yaml

    data = load_yaml(path)
    data["learner"] = {"type": learner}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--learner-set takes KEY=VALUE (got {item!r})")
        data["learner"][key] = _number(yaml.safe_load(value))
    data["seed"] = seed
    run = dict(data.get("run") or {})
    if iterations is not None:
        run["iterations"] = iterations
    if quick:
        run["iterations"] = 4
        data["learner"] = {"type": learner, **({"drift_iterations": 8, "batch_size": 64, "value_starts": 64,
                                                 "value_iterations": 20, "init_iterations": 5} if learner == "elegant" else {})}
    data["run"] = run
    return data


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 as a string; a string that is a float is the float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def train_one(data: dict[str, Any], eval_every: int, eval_samples: int, final_samples: int) -> dict[str, Any]:
    """Trains one learner on the task; its curve (mean training gap closure against reward queries) and final report."""
    import torch

    import rlft.evaluation as evaluation
    from rlft.conditions import conditions_of
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.run_config import run_config_of, validate_task

    torch.set_num_threads(1)
    task = validate_task(data)
    iterations = run_config_of(task).iterations
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    learner = build_learner(task, model, reward)
    conditions = conditions_of(task)
    curve, train_time, cpu_time, wall_start = [], 0.0, 0.0, time.perf_counter()
    try:
        while learner.iteration < iterations:
            start, cpu_start = time.perf_counter(), time.process_time()
            learner.train_iteration()
            train_time += time.perf_counter() - start
            cpu_time += time.process_time() - cpu_start
            it = learner.iteration
            if it % eval_every == 0 or it == iterations:
                fig = evaluation.evaluate_run(model, reward, task.alpha, learner.control(), learner.init_dist(), eval_samples,
                                              task.seed + 1, conditions=conditions)
                held = fig.get(evaluation.HELDOUT) or {}
                curve.append({"iteration": it, "reward_queries": int(learner.reward_queries), "train_time": train_time,
                              "gap_closure": fig[evaluation.GAP_CLOSURE], "kl": fig[evaluation.KL],
                              "heldout_gap_closure": held.get(evaluation.GAP_CLOSURE)})
                _log(f"  [{task.learner['type']}] iteration {it}/{iterations}: gap closure train {fig[evaluation.GAP_CLOSURE]:.3f} "
                     f"held-out {held.get(evaluation.GAP_CLOSURE, float('nan')):.3f} kl {fig[evaluation.KL]:.3f} "
                     f"queries {learner.reward_queries} train {train_time:.0f}s")
        final = learner.evaluate(num_samples=final_samples)
    finally:
        algo = getattr(learner, "algo", None)  # an RLlib learner's Algorithm holds EnvRunner/Learner actors
        if algo is not None:
            algo.stop()
    return {"curve": curve, "train_time": train_time, "train_cpu_time": cpu_time, "wall_time": time.perf_counter() - wall_start,
            "reward_queries": int(learner.reward_queries), "final": final, "to_threshold": _to_threshold(curve)}


def needs_ray(name: str) -> bool:
    """Whether learner type `name` runs on RLlib (its Algorithm needs a Ray instance)."""
    from rlft.registry import resolve
    from rlft.rllib.adapter import RLlibLearner

    cls = resolve("learner", name)
    return isinstance(cls, type) and issubclass(cls, RLlibLearner)


def _to_threshold(curve: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for t in THRESHOLDS:
        hit = next((p for p in curve if p["gap_closure"] >= t), None)
        out[f"{int(t * 100)}%"] = {"reward_queries": hit["reward_queries"], "train_time": hit["train_time"]} if hit else None
    return out


def _row(name: str, res: dict[str, Any]) -> dict[str, Any]:
    import rlft.evaluation as ev

    if "error" in res:
        return {"learner": name, "error": res["error"]}
    f, held = res["final"], res["final"].get(ev.HELDOUT, {})
    ratio = lambda d: d[ev.ENERGY_DISTANCE] / d[ev.ENERGY_DISTANCE_FLOOR] if ev.ENERGY_DISTANCE in d else None  # noqa: E731
    half = res["to_threshold"]["50%"]
    return {
        "learner": name, "train_gap_closure": f[ev.GAP_CLOSURE], "heldout_gap_closure": held.get(ev.GAP_CLOSURE),
        "train_ed_ratio": ratio(f), "heldout_ed_ratio": ratio(held) if held else None, "train_kl": f[ev.KL],
        "heldout_kl": held.get(ev.KL), "queries_to_50": half["reward_queries"] if half else None,
        "reward_queries": res["reward_queries"], "train_time": res["train_time"], "wall_time": res.get("wall_time"),
        "train_cpu_time": res.get("train_cpu_time"),
        "per_condition_gap_closure": {k: v[ev.GAP_CLOSURE] for k, v in f.get(ev.PER_CONDITION, {}).items()},
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def run(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sections = getattr(args, "sections", None) or ["gmm"]
    if "digits" in sections:
        conditional_digits.run_section(args)
    if "gmm" not in sections:
        return 0
    results: dict[str, Any] = {}
    started_ray = False
    if any(needs_ray(name) for name in args.learners):
        import ray

        from rlft.run.tune import init_ray

        started_ray = not ray.is_initialized()
        init_ray()
    try:
        _run_learners(args, results)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    rows = [_row(n, r) for n, r in results.items()]
    _log("| learner | train gap closure | held-out gap closure | ED/floor train | ED/floor held-out | KL train | "
         "queries to 50 % | queries | train time | this process's train CPU | wall time |")
    _log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            _log(f"| {r['learner']} | error: {r['error'][:80]} |")
            continue
        _log(f"| {r['learner']} | {_fmt(r['train_gap_closure'])} | {_fmt(r['heldout_gap_closure'])} | {_fmt(r['train_ed_ratio'], '.2f')} | "
             f"{_fmt(r['heldout_ed_ratio'], '.2f')} | {_fmt(r['train_kl'])} | {_fmt(r['queries_to_50'])} | {r['reward_queries']} | "
             f"{r['train_time']:.0f} s | {r['train_cpu_time']:.0f} s | {r['wall_time']:.0f} s |")
        _log("    per condition: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_condition_gap_closure"].items()))
    out = {"task": args.task, "seed": args.seed, "learner_set": args.learner_set, "rows": rows, "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from rlft.files import atomic_path

    with atomic_path(Path(args.out) / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1, default=float))
    if any("curve" in r for r in results.values()):
        png = plot_curves(results, args.png or str(Path(args.out) / "conditional.png"))
        _log(f"curves: {png}")
    if args.json:
        print(json.dumps({"task": args.task, "seed": args.seed, "learner_set": args.learner_set, "rows": rows}, default=float))
    return 0


def _run_learners(args, results: dict[str, Any]) -> None:
    for name in args.learners:
        _log(f"conditional bed: {name}")
        data = task_data(args.task, name, args.seed, args.iterations, args.quick, args.learner_set)
        try:
            results[name] = train_one(data, 1 if args.quick else args.eval_every, 100 if args.quick else args.eval_samples,
                                      200 if args.quick else FINAL_EVAL_SAMPLES)
        except Exception as err:  # a learner that does not take conditions (yet) gets an error row, the others run
            _log(f"  {name}: {type(err).__name__}: {err}")
            results[name] = {"error": f"{type(err).__name__}: {err}"}


def plot_curves(results: dict[str, Any], path: str) -> str:
    """Gap closure against reward queries per learner, training conditions (solid) and held-out ones (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlft.files import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, res) in enumerate(results.items()):
        curve = res.get("curve") or []
        if not curve:
            continue
        q = [p["reward_queries"] for p in curve]
        colour = f"C{i}"
        ax.plot(q, [p["gap_closure"] for p in curve], "-o", ms=3, color=colour, label=f"{name} (train conditions)")
        held = [p.get("heldout_gap_closure") for p in curve]
        if all(h is not None for h in held):
            ax.plot(q, held, "--", color=colour, label=f"{name} (held-out)")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("gap closure (J - J_pre) / (J* - J_pre)")
    ax.set_title("exact conditional GMM bed (4 training, 2 held-out conditions)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
