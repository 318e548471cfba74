"""`rlft demo`: the main job on the embedded default task (or any Gaussian-mixture task YAML).

It samples the pretrained chain and the chain under the exact optimal control (bridge preservation, with
the optimal initial law), and reports what every learner is measured by: reward, path KL, J, J*, gap
closure, and the energy distance to exact target samples beside the exact-vs-exact floor. It writes a
scatter PNG of both beside the exact target (2-D tasks; the first two coordinates otherwise).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlft.config import DEFAULT_TASK, ConfigError, load_task, task_from_dict
from rlft.files import atomic_path

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
        help="exact optimal control on a Gaussian-mixture task (default: embedded 2-D task)",
        description=__doc__,
    )
    p.add_argument("--config", help="task YAML with a gmm model and a linear/quadratic reward (default: embedded)")
    p.add_argument("--samples", type=int, default=8192, help="samples per model (default 8192)")
    p.add_argument("--out", default="rlft_demo.png", help="scatter PNG path (default rlft_demo.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from rlft.evaluation import evaluate_run
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task = load_task(args.config) if args.config else task_from_dict(DEFAULT_TASK)
    if task.model.type != "gmm":
        raise ConfigError(f"model.type must be 'gmm' for `rlft demo` (got {task.model.type!r}): the demo needs the exact target")
    if args.samples < 100:
        raise ConfigError(f"--samples must be >= 100 (got {args.samples})")
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    if getattr(reward, "exact_form", None) is None:
        raise ConfigError(f"reward.type must be 'linear' or 'quadratic' for `rlft demo` (got {task.reward['type']!r})")
    oracle = model.optimal_control(reward, task.alpha)
    samples: dict = {}
    report = evaluate_run(
        model, reward, task.alpha, control=oracle, init=oracle, num_samples=args.samples,
        seed=task.seed, progress=not args.no_progress, samples_out=samples,
    )
    report["task"] = {"alpha": task.alpha, "num_steps": task.num_steps, "dim": model.event_dim, "seed": task.seed}
    if args.out:
        report["plot"] = str(_scatter(samples, args.out, task))
    if args.json:
        print(json.dumps(report, indent=None))
    else:
        _print_table(report, task)
    return 0


def _print_table(report: dict, task) -> None:
    pre = report["pretrained"]
    out = sys.stdout
    print(f"rlft demo: d={report['task']['dim']}, alpha={task.alpha}, K={task.num_steps}, "
          f"{report['num_samples']} samples per model", file=out)
    print(f"{'':26s}{'pretrained':>14s}{'optimal control':>18s}", file=out)
    for label, key, fmt in ROWS:
        a = fmt.format(pre[key]) if key in pre else "-"
        b = fmt.format(report[key]) if key in report else "-"
        if key == "energy_distance_floor":
            a = ""
        print(f"{label:26s}{a:>14s}{b:>18s}", file=out)
    ratio = report["energy_distance"] / report["energy_distance_floor"]
    print(f"energy distance / floor: {ratio:.2f}  (<= 2 means indistinguishable from exact target samples at this size)", file=out)
    if "plot" in report:
        print(f"scatter: {report['plot']}", file=out)


def _scatter(samples: dict, path: str, task) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = [("pretrained", samples["pretrained"]), ("optimal control", samples["finetuned"]),
              ("exact target", samples["target"])]
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
