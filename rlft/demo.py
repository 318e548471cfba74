"""`rlft demo`: the main job. Fine-tunes a learner on the embedded 2-D task (or any Gaussian-mixture task YAML) and
shows it beside the pretrained model and the exact optimum.

The learner (`DEMO_LEARNER`, the fastest of rlft's learners to close >= 90 % of the gap on this task, measured:
see `DEMO_LEARNER`) trains in this process, without Ray, one progress line per iteration on stderr. Then the
pretrained chain and the fine-tuned one are sampled and scored by what every learner in rlft is measured by:
reward, path KL, J = E[r] - alpha KL, gap closure (J - J_pre) / (J* - J_pre) against the exact J*, the energy
distance to exact target samples beside the exact-vs-exact floor, diversity. The exact optimum's column is the
tilted target itself (reward E*[r], KL* = (E*[r] - J*) / alpha). A PNG shows the three clouds.

`rlft demo --oracle` samples the exact optimal control instead of training (bridge preservation with the optimal
initial law): the closed form every learner is chasing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rlft.config import DEFAULT_TASK, ConfigError, load_task, task_from_dict
from rlft.files import atomic_path

DEMO_LEARNER: dict[str, Any] = {"type": "elegant", "drift_iterations": 200, "learn_init": False}
"""The demo's learner when the task names none: ELEGANT's drift, 200 updates of 512 trajectories (its lr schedule
over them). Measured on the embedded task (`rlft demo`, 8192 samples): gap closure 0.928, energy distance 4.7x the
floor, in 489 s of training on a shared 2-core machine at 2.4 s per update (alone an update takes 0.28-0.37 s, so
~60-75 s). On the same machine, with 300-update schedules: ELEGANT's drift 0.80 / 0.88 of the gap after 50 / 100
updates, Adjoint Matching 0.62 / 0.66 / 0.47 after 50 / 100 / 150; PPO+KL needs a local Ray, which did not start on
the loaded machine (it trains in-process too: `--learner ppo_kl` starts one)."""
DEMO_ITERATIONS = 20
"""Iterations of the demo's training (the schedule's updates spread over them: 10 each); `--iterations` changes
how often progress is printed, not the number of updates of a differentiable learner."""

ROWS = [
    ("reward", "reward", "{:.4f}"),
    ("path KL", "kl", "{:.4f}"),
    ("J", "objective", "{:.4f}"),
    ("J*", "optimal_objective", "{:.4f}"),
    ("gap closure", "gap_closure", "{:.3f}"),
    ("energy dist.", "energy_distance", "{:.5f}"),
    ("  floor (exact, mean of 8)", "energy_distance_floor", "{:.5f}"),
    ("sliced W1", "sliced_wasserstein", "{:.4f}"),
    ("diversity", "diversity", "{:.4f}"),
]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fine-tune a learner on a Gaussian-mixture task (default: embedded 2-D task) beside the exact optimum",
        description=__doc__,
    )
    p.add_argument("--config", help="task YAML with a gmm model and a linear/quadratic reward (default: embedded); "
                                    "its learner: section, if any, is the learner trained")
    p.add_argument("--oracle", action="store_true", help="sample the exact optimal control instead of training a learner")
    p.add_argument("--learner", help=f"learner type to train (default: the task's, else {DEMO_LEARNER['type']} "
                                     "with the demo's budget)")
    p.add_argument("--iterations", type=int, help=f"training iterations (default: the task's run.iterations, else "
                                                   f"{DEMO_ITERATIONS})")
    p.add_argument("--samples", type=int, default=8192, help="samples per model (default 8192)")
    p.add_argument("--out", default="rlft_demo.png", help="scatter PNG path (default rlft_demo.png; '' for none)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress lines and bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from rlft.evaluation import evaluate_run
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task = _demo_task(args)
    if args.samples < 100:
        raise ConfigError(f"--samples must be >= 100 (got {args.samples})")
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    if getattr(reward, "exact_form", None) is None:
        raise ConfigError(f"reward.type must be 'linear' or 'quadratic' for `rlft demo` (got {task.reward['type']!r})")
    progress = not args.no_progress
    if args.oracle:
        oracle = model.optimal_control(reward, task.alpha)
        control, init, name, trained = oracle, oracle, "optimal control", {}
    else:
        learner, trained = _train(task, model, reward, progress)
        control, init, name = learner.control(), learner.init_dist(), learner_label(task.learner)
    samples: dict = {}
    report = evaluate_run(model, reward, task.alpha, control=control, init=init, num_samples=args.samples,
                          seed=task.seed, progress=progress, samples_out=samples)
    report["task"] = {"alpha": task.alpha, "num_steps": task.num_steps, "dim": model.event_dim, "seed": task.seed}
    report["column"] = name
    if not args.oracle:
        report["learner"] = {**dict(task.learner), **trained}
        report["exact"] = exact_figures(model, reward, task.alpha, samples["target"], report)
    if args.out:
        report["plot"] = str(_scatter(samples, args.out, task, name))
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        _print_table(report, task)
    return 0


def _demo_task(args):
    """The task to run: embedded or --config, with the demo's learner (unless it names one) and run length."""
    import dataclasses

    from rlft.learners import check_learner_spec
    from rlft.run_config import run_config_of

    task = load_task(args.config) if args.config else task_from_dict(DEFAULT_TASK)
    if task.model.type != "gmm":
        raise ConfigError(f"model.type must be 'gmm' for `rlft demo` (got {task.model.type!r}): the demo needs the exact target")
    if args.oracle:
        return task
    learner = {"type": args.learner} if args.learner else dict(task.learner) if task.learner else dict(DEMO_LEARNER)
    run = dict(task.run or {})
    if args.iterations is not None:
        if args.iterations < 1:
            raise ConfigError(f"--iterations must be >= 1 (got {args.iterations})")
        run["iterations"] = args.iterations
    run.setdefault("iterations", DEMO_ITERATIONS)
    check_learner_spec(learner)  # option errors name learner.<key>, before any training
    task = dataclasses.replace(task, learner=learner, run=run)
    run_config_of(task)  # run errors name run.<key>
    return task


def learner_label(spec: dict[str, Any] | None) -> str:
    """The column title of a learner spec: its type."""
    return str((spec or {}).get("type", "learner"))


def _train(task, model, reward, progress: bool):
    """Builds and trains `task.learner` for run.iterations in this process (Ray started only for RLlib learners)."""
    from rlft.learners import build_learner
    from rlft.run.progress import Progress
    from rlft.run_config import run_config_of

    iterations = run_config_of(task).iterations
    ray_started = _start_ray_if_needed(task.learner)
    start = time.perf_counter()
    learner = build_learner(task, model, reward)
    bar = Progress(f"demo: {learner_label(task.learner)}", iterations)
    try:
        while learner.iteration < iterations:
            metrics = learner.train_iteration()
            if progress:
                print(bar.line(learner.iteration, metrics or {}, {}), file=sys.stderr, flush=True)
    finally:
        algo = getattr(learner, "algo", None)
        if ray_started and algo is not None:
            algo.stop()
    return learner, {"iterations": iterations, "train_seconds": time.perf_counter() - start}


def _start_ray_if_needed(spec: dict[str, Any]) -> bool:
    """A local Ray for an RLlib learner (their EnvRunners and Learners are Ray actors); the others need none."""
    from rlft.learners import resolve_learner

    if not resolve_learner(learner_label(spec)).__module__.startswith("rlft.rllib"):
        return False
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def exact_figures(model, reward, alpha: float, target_x, report: dict[str, Any]) -> dict[str, Any]:
    """The exact optimum's column: E*[r] over exact target samples, KL* = (E*[r] - J*) / alpha, J*, diversity."""
    import torch

    from rlft.evaluation import sample_figures

    j_star = model.exact_target(reward, alpha).optimal_objective
    with torch.no_grad():
        r_star = float(reward(target_x.to(device=model.device, dtype=model.dtype)).double().mean())
    kl_star = (r_star - j_star) / alpha
    out = sample_figures(model, reward, alpha, target_x, torch.full((target_x.shape[0],), kl_star, dtype=torch.float64))
    out.update(objective=j_star, optimal_objective=j_star, gap_closure=1.0,
               energy_distance=report.get("energy_distance_floor"))
    return out


def _print_table(report: dict, task) -> None:
    pre, out = report["pretrained"], sys.stdout
    exact = report.get("exact")
    learner = report.get("learner")
    head = f"rlft demo: d={report['task']['dim']}, alpha={task.alpha}, K={task.num_steps}, {report['num_samples']} samples per model"
    if learner:
        head += f"; {report['column']} trained {learner['iterations']} iterations in {learner['train_seconds']:.0f} s"
    print(head, file=out)
    columns = [("pretrained", pre), (report["column"], report)] + ([("exact optimum", exact)] if exact else [])
    print(f"{'':26s}" + "".join(f"{title:>18s}" for title, _ in columns), file=out)
    for label, key, fmt in ROWS:
        cells = []
        for title, figures in columns:
            value = figures.get(key)
            if key == "energy_distance_floor" and figures is not report:
                cells.append("")
            elif figures is exact and key == "energy_distance":
                cells.append("= floor")
            else:
                cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-")
        print(f"{label:26s}" + "".join(f"{c:>18s}" for c in cells), file=out)
    ratio = report["energy_distance"] / report["energy_distance_floor"]
    print(f"energy distance / floor: {ratio:.2f}  (<= 2 means indistinguishable from exact target samples at this size)", file=out)
    if "plot" in report:
        print(f"scatter: {report['plot']}", file=out)


def _scatter(samples: dict, path: str, task, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = [("pretrained", samples["pretrained"]), (name, samples["finetuned"]), ("exact target", samples["target"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    center = task.reward.get("center")
    for ax, (title, x) in zip(axes, panels):
        x = x.reshape(x.shape[0], -1)[:4000, :2].float().numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.3)
        if center is not None and len(center) >= 2:
            ax.plot(center[0], center[1], "r*", ms=12, label="reward center")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.suptitle(f"rlft demo: alpha={task.alpha}, K={task.num_steps}")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:  # never leave a half-written PNG behind
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
