"""`rlft bench smeme`: S-MEME (`learner: {type: smeme}`) on unbalanced 2-D mixtures with exact scores.

For each task (`--tasks`: "10to1", two clusters with 10:1 mass; "alt", three clusters 6:3:1 with unequal stds, the
check against defaults tuned to one mixture) it trains S-MEME with the learner's defaults (or `--set key=value`
overrides) and reports, per round j = 0 (pretrained) .. R:

  entropy            PF-ODE estimate of the round's sampler (rlft.entropy), beside
  target_entropy     the exact round target p_pre^{beta_j} (grid quadrature), and
  uniform_entropy    log(area of the support): the maximum, uniform on the support (the union of the disks of
                     radius 3 std around the component means);
  closure            (H_j - H_0) / (H*_j - H*_0), estimates on common random numbers (same x_0) over exact targets;
  small_mass         the fraction of samples nearest the smallest component (exact target's beside it);
  off_support        the fraction of samples outside the support;
  energy_distance    to exact round-target samples, with the exact-vs-exact floor;
  kl, kl_previous    path KL to the pretrained model and to the previous round's.

PNG per task: sample histograms per round beside the exact final target. `--json` prints one object:
{task: {entropy, target_entropy, pretrained: {entropy}, energy_distance, energy_distance_floor, rounds: [...]}}.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

TASKS = {
    "10to1": {"weights": [10 / 11, 1 / 11], "means": [[-1.5, 0.0], [1.5, 0.0]], "stds": [0.4, 0.4]},
    "alt": {"weights": [0.6, 0.3, 0.1], "means": [[-1.5, 0.0], [1.5, 1.0], [0.0, -2.5]], "stds": [0.5, 0.3, 0.4]},
}
SUPPORT_STDS = 3.0
EVAL_SAMPLES = 2000


def register(subparsers) -> None:
    p = subparsers.add_parser("smeme", help="S-MEME rounds on unbalanced 2-D mixtures (entropy vs exact round targets)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS), help="which mixtures (default: all)")
    p.add_argument("--num-steps", type=int, default=100, help="chain steps K (default 100)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="learner option overrides, e.g. rounds=4 drift_iterations=200 (default: none, the defaults)")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help=f"samples per figure (default {EVAL_SAMPLES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="rlft_bench_smeme", help="directory for PNGs and results.json")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    return out


def support_figures(mixture, x):
    """(off-support fraction of x, log area of the support, index of the smallest component's nearest samples)."""
    import torch

    d = torch.cdist(x.double(), mixture.means) / mixture.stds[None]  # (n, C) distances in component stds
    off = float((d.min(1).values > SUPPORT_STDS).double().mean())
    lo = (mixture.means - SUPPORT_STDS * mixture.stds[:, None]).min(0).values
    hi = (mixture.means + SUPPORT_STDS * mixture.stds[:, None]).max(0).values
    cells = 400
    axes = [lo[i] + (torch.arange(cells, dtype=torch.float64) + 0.5) * (hi[i] - lo[i]) / cells for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    inside = ((torch.cdist(grid, mixture.means) / mixture.stds[None]).min(1).values <= SUPPORT_STDS).double().mean()
    area = float(inside * (hi - lo).prod())
    small = int(torch.argmin(mixture.weights))
    nearest = torch.cdist(x.double(), mixture.means).argmin(1)
    return off, math.log(area), float((nearest == small).double().mean())


def run_task(name: str, args) -> dict[str, Any]:
    import torch

    from rlft.config import task_from_dict
    from rlft.control.smeme import ENERGY_DISTANCE, ENERGY_DISTANCE_FLOOR, ENTROPY, TARGET_ENTROPY
    from rlft.entropy import ode_entropy
    from rlft.learners import build_learner
    from rlft.models.gmm import GMMModel
    from rlft.sampling import sample

    mix = TASKS[name]
    task = task_from_dict({"model": {"type": "gmm", **mix}, "num_steps": args.num_steps, "seed": args.seed,
                           "learner": {"type": "smeme", **_overrides(args.set)}, "run": {"iterations": 1}})
    model = GMMModel.create(mix["weights"], mix["means"], mix["stds"], num_steps=args.num_steps)
    learner = build_learner(task, model, None)
    start, cpu = time.perf_counter(), time.process_time()
    learner.train_iteration()  # all rounds (run.iterations = 1)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = learner.evaluate(num_samples=args.eval_samples, seed=args.seed + 1)
    exact = model.marginal(args.num_steps)
    n, seed = args.eval_samples, args.seed + 1
    h0_est = ode_entropy(model, n, seed)
    h0 = learner.exact_target(1.0)[0]
    rows, clouds = [], []
    for j in range(learner.options.rounds + 1):
        chain = learner.round_model(j)
        x = sample(model, n, control=getattr(chain, "control", None), seed=seed, progress=False).x
        off, log_area, small = support_figures(exact, x)
        row: dict[str, Any] = {"round": j, "off_support": off, "small_mass": small, "uniform_entropy": log_area}
        if j == 0:
            row.update({ENTROPY: h0_est, TARGET_ENTROPY: h0, "beta": 1.0})
        else:
            figures = report["rounds"][str(j)]
            h = ode_entropy(chain, n, seed)  # common random numbers with h0_est
            row.update({k: figures[k] for k in figures if k != "round"}, **{ENTROPY: h})
            row["closure"] = (h - h0_est) / (figures[TARGET_ENTROPY] - h0)
            _, draw = learner.exact_target(figures["beta"])
            y = draw(n, torch.Generator().manual_seed(seed + 5))
            row["target_small_mass"] = support_figures(exact, y)[2]
        rows.append(row)
        clouds.append(x)
    final = rows[-1]
    _, draw = learner.exact_target(final["beta"])
    _plot(name, clouds, draw(n, torch.Generator().manual_seed(seed + 6)), args.out)
    return {ENTROPY: final[ENTROPY], TARGET_ENTROPY: final[TARGET_ENTROPY], "closure": final["closure"],
            "pretrained": {ENTROPY: h0_est, "exact_entropy": h0}, ENERGY_DISTANCE: final[ENERGY_DISTANCE],
            ENERGY_DISTANCE_FLOOR: final[ENERGY_DISTANCE_FLOOR], "rounds": rows, "options": learner.derived(),
            "wall_s": wall, "cpu_s": cpu}


def _plot(name: str, clouds, target, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    panels = [(f"round {j}" if j else "pretrained", x) for j, x in enumerate(clouds)] + [("exact final target", target)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=60, range=[[-4, 4], [-4.5, 3.5]], cmap="viridis")
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"smeme_{name}.png"), dpi=80)
    plt.close(fig)


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    results = {name: run_task(name, args) for name in args.tasks}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.json:
        print(json.dumps(results))
        return 0
    for name, res in results.items():
        print(f"{name}: {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU; options {res['options']}")
        print(f"{'round':>5} {'H est':>7} {'H exact':>7} {'H unif':>7} {'closure':>7} {'small':>6} {'small*':>6} "
              f"{'off':>6} {'ED/floor':>8} {'KL':>7} {'KL prev':>7}")
        for r in res["rounds"]:
            ratio = r.get("energy_distance", float("nan")) / r.get("energy_distance_floor", float("nan"))
            print(f"{r['round']:>5} {r['entropy']:7.3f} {r['target_entropy']:7.3f} {r['uniform_entropy']:7.3f} "
                  f"{r.get('closure', 0.0):7.2f} {r['small_mass']:6.3f} {r.get('target_small_mass', float('nan')):6.3f} "
                  f"{r['off_support']:6.3f} {ratio:8.2f} {r.get('kl', 0.0):7.3f} {r.get('kl_previous', 0.0):7.3f}")
    return 0
