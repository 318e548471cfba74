"""`rlft bench smeme`: S-MEME (`learner: {type: smeme}`) on unbalanced 2-D mixtures with exact scores.

For each task (`--tasks`: "10to1", two clusters with 10:1 mass; "alt", three clusters 6:3:1 with unequal stds;
"skew", three clusters 15:4:1 with stds 0.6 / 0.25 / 0.35: checks against defaults tuned to one mixture) it trains S-MEME with the learner's defaults (or `--set key=value`
overrides) and reports, per round j = 0 (pretrained) .. R:

  entropy            PF-ODE estimate of the round's sampler (rlft.entropy), beside
  target_entropy     the exact round target p_pre^{beta_j} (grid quadrature), and
  uniform_entropy    log(area of the support): the maximum, uniform on the support (the union of the disks of
                     radius 3 std around the component means);
  closure            (H_j - H_0) / (H*_j - H*_0), estimates on common random numbers (same x_0) over exact targets;
  sample_entropy     the Kozachenko-Leonenko (nearest-neighbour) entropy of the stochastic sampler's samples, beside
                     that of exact target samples, and its closure: the PF-ODE law equals the sampler's only where
                     the control is exact, so the two disagree for a control short of its round's optimum;
  small_mass         the fraction of samples nearest the smallest component (exact target's beside it);
  off_support        the fraction of samples outside the support;
  energy_distance    to exact round-target samples, with the exact-vs-exact floor;
  kl, kl_previous    path KL to the pretrained model and to the previous round's.

`--pretrain`: the issue's unbalanced toy. A 2-D data set of two clusters with 10:1 mass is drawn with numpy, a score
net is pretrained on it by denoising score matching (the function behind `rlft pretrain`; or `--scorenet DIR` made
by that command), and S-MEME runs R = 1 .. 4 rounds (--round-counts) at a fixed total of updates (--total-updates,
split evenly); per round: both entropies against the exact round target p_data^{beta_j} of the exact mixture and
the uniform-on-support maximum, the small cluster's mass, the off-support fraction; one PNG row per R.

PNG per task: sample histograms per round beside the exact final target. `--json` prints one object:
{task: {entropy, target_entropy, pretrained: {entropy}, energy_distance, energy_distance_floor, rounds: [...]}}.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from rlft.run.storage import log

TASKS = {
    "10to1": {"weights": [10 / 11, 1 / 11], "means": [[-1.5, 0.0], [1.5, 0.0]], "stds": [0.4, 0.4]},
    "alt": {"weights": [0.6, 0.3, 0.1], "means": [[-1.5, 0.0], [1.5, 1.0], [0.0, -2.5]], "stds": [0.5, 0.3, 0.4]},
    "skew": {"weights": [0.75, 0.2, 0.05], "means": [[-1.8, -0.5], [1.2, 1.5], [1.5, -1.8]], "stds": [0.6, 0.25, 0.35]},
}
#: `--pretrain`: the numpy data set (two clusters, 10:1 mass) a score net is pretrained on by denoising score matching
PRETRAIN_MIXTURE = TASKS["10to1"]
PRETRAIN_DATA, PRETRAIN_STEPS = 20000, 3000
SUPPORT_STDS = 3.0
#: the exact target's quadrature box, in component stds around the means (widened by 1 for the tempered targets)
GRID_BOX = 6.0
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
    p.add_argument("--pretrain", action="store_true",
                   help="instead: the unbalanced toy with a score net pretrained on a numpy 10:1 data set, 1..R rounds "
                        "at a fixed total of updates (--round-counts, --total-updates)")
    p.add_argument("--scorenet", default=None, metavar="DIR",
                   help="with --pretrain: a score net made by `rlft pretrain --data X.npy --out DIR` (default: pretrain one "
                        f"here, {PRETRAIN_STEPS} steps on {PRETRAIN_DATA} samples, the same function)")
    p.add_argument("--round-counts", nargs="+", type=int, default=[1, 2, 3, 4], help="with --pretrain (default 1 2 3 4)")
    p.add_argument("--total-updates", type=int, default=300, help="with --pretrain: updates over all rounds (default 300)")
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
    from rlft.entropy import knn_entropy, ode_entropy
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
        row: dict[str, Any] = {"round": j, "off_support": off, "small_mass": small, "uniform_entropy": log_area,
                               "sample_entropy": knn_entropy(x)}
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
            row["target_sample_entropy"] = knn_entropy(y)
            row["sample_closure"] = (row["sample_entropy"] - rows[0]["sample_entropy"]) / (figures[TARGET_ENTROPY] - h0)
        rows.append(row)
        clouds.append(x)
    final = rows[-1]
    _, draw = learner.exact_target(final["beta"])
    _plot(name, clouds, draw(n, torch.Generator().manual_seed(seed + 6)), args.out)
    return {ENTROPY: final[ENTROPY], TARGET_ENTROPY: final[TARGET_ENTROPY], "closure": final["closure"],
            "sample_entropy": final["sample_entropy"], "sample_closure": final["sample_closure"],
            "pretrained": {ENTROPY: h0_est, "exact_entropy": h0}, ENERGY_DISTANCE: final[ENERGY_DISTANCE],
            ENERGY_DISTANCE_FLOOR: final[ENERGY_DISTANCE_FLOOR], "rounds": rows, "options": learner.derived(),
            "wall_s": wall, "cpu_s": cpu}


def pretrained_scorenet(args, num_steps: int):
    """(chain, exact data mixture): the score net of --scorenet, or one pretrained here on numpy draws of the 10:1 mixture
    (the function behind `rlft pretrain`), saved under --out/scorenet."""
    import numpy as np

    from rlft.models.gmm import GaussianMixture
    from rlft.models.pretrain import train_scorenet
    from rlft.models.scorenet import load_scorenet, save_scorenet

    mix = PRETRAIN_MIXTURE
    exact = GaussianMixture.create(mix["weights"], mix["means"], mix["stds"])
    path = args.scorenet
    if path is None:
        rng = np.random.default_rng(args.seed)
        comp = rng.choice(len(mix["weights"]), size=PRETRAIN_DATA, p=np.asarray(mix["weights"]) / sum(mix["weights"]))
        data = np.asarray(mix["means"])[comp] + np.asarray(mix["stds"])[comp, None] * rng.standard_normal((PRETRAIN_DATA, 2))
        os.makedirs(args.out, exist_ok=True)
        np.save(os.path.join(args.out, "data_10to1.npy"), data.astype(np.float32))
        net = train_scorenet(data.astype(np.float32), "mlp", steps=PRETRAIN_STEPS, seed=args.seed, num_threads=args.threads,
                             progress=False)
        path = str(save_scorenet(net, os.path.join(args.out, "scorenet")))
    return load_scorenet(path, num_steps=num_steps), exact


def run_pretrained(args) -> dict[str, Any]:
    """The unbalanced toy on a pretrained score net: for each R in --round-counts, R rounds of total/R updates; per
    round the PF-ODE and nearest-neighbour entropies against the exact round target p_data^{beta_j} of the exact
    mixture (grid quadrature) and the uniform-on-support maximum, the small cluster's mass, the off-support share."""
    import torch

    from rlft.config import task_from_dict
    from rlft.control.smeme import round_exponents
    from rlft.entropy import TemperedGrid, knn_entropy, ode_entropy
    from rlft.learners import build_learner
    from rlft.sampling import sample

    start = time.perf_counter()
    model, exact = pretrained_scorenet(args, args.num_steps)
    pretrain_s = time.perf_counter() - start
    n, seed = args.eval_samples, args.seed + 1
    lo = (exact.means - GRID_BOX * exact.stds[:, None]).min(0).values
    hi = (exact.means + GRID_BOX * exact.stds[:, None]).max(0).values
    x0 = sample(model, n, seed=seed, progress=False).x
    off0, log_area, small0 = support_figures(exact, x0)
    pre = {"entropy": ode_entropy(model, n, seed), "sample_entropy": knn_entropy(x0), "off_support": off0,
           "small_mass": small0, "target_entropy": TemperedGrid(exact.log_prob, lo, hi, 1.0).entropy(),
           "uniform_entropy": log_area}
    results: dict[str, Any] = {"pretrained": pre, "pretrain_s": pretrain_s, "runs": {}}
    clouds: dict[int, list] = {}
    for R in args.round_counts:
        opts = {**_overrides(args.set), "rounds": R, "drift_iterations": max(1, args.total_updates // R)}
        task = task_from_dict({"model": {"type": "gmm", **PRETRAIN_MIXTURE}, "num_steps": args.num_steps,
                               "seed": args.seed, "learner": {"type": "smeme", **opts}, "run": {"iterations": 1}})
        learner = build_learner(task, model, None)
        t0, c0 = time.perf_counter(), time.process_time()
        learner.train_iteration()
        rows, clouds[R] = [], [("pretrained", x0)]
        betas = round_exponents(learner.alphas())
        for j in range(1, R + 1):
            chain = learner.round_model(j)
            x = sample(model, n, control=chain.control, seed=seed, progress=False).x
            off, _, small = support_figures(exact, x)
            grid = TemperedGrid(exact.log_prob, lo - 1.0, hi + 1.0, betas[j - 1])
            target = grid.sample(n, torch.Generator().manual_seed(seed + j))
            h, h_knn = ode_entropy(chain, n, seed), knn_entropy(x)
            rows.append({"round": j, "beta": betas[j - 1], "entropy": h, "sample_entropy": h_knn,
                         "target_entropy": grid.entropy(), "target_sample_entropy": knn_entropy(target),
                         "closure": (h - pre["entropy"]) / (grid.entropy() - pre["target_entropy"]),
                         "sample_closure": (h_knn - pre["sample_entropy"]) / (grid.entropy() - pre["target_entropy"]),
                         "small_mass": small, "target_small_mass": support_figures(exact, target)[2],
                         "off_support": off, "uniform_entropy": log_area})
            clouds[R].append((f"R={R}: round {j}", x))
        clouds[R].append((f"exact p^{betas[-1]:.2f}", target))
        results["runs"][str(R)] = {"rounds": rows, "updates_per_round": opts["drift_iterations"],
                                   "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        log(f"smeme --pretrain: {R} round(s) done in {time.perf_counter() - t0:.0f} s")
    _plot_rounds(clouds, os.path.join(args.out, "smeme_pretrained.png"))
    return results


def _plot_rounds(clouds: dict[int, list], path: str) -> None:
    """One row per round count R: the pretrained samples, round 1 .. R, the exact final round target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(c) for c in clouds.values())
    fig, axes = plt.subplots(len(clouds), cols, figsize=(2.2 * cols, 2.2 * len(clouds)), squeeze=False)
    for row, (R, xs) in zip(axes, clouds.items()):
        for j, ax in enumerate(row):
            ax.set_xticks([]), ax.set_yticks([])
            if j >= len(xs):
                ax.axis("off")
                continue
            title, x = xs[j]
            ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=50, range=[[-3.5, 3.5], [-2.5, 2.5]], cmap="viridis")
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


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
    if args.pretrain:
        res = run_pretrained(args)
        with open(os.path.join(args.out, "results_pretrained.json"), "w") as f:
            json.dump(res, f, indent=1)
        if args.json:
            print(json.dumps(res))
            return 0
        p = res["pretrained"]
        print(f"pretrained score net (pretraining {res['pretrain_s']:.0f} s): H ode {p['entropy']:.3f}, H knn "
              f"{p['sample_entropy']:.3f}, exact {p['target_entropy']:.3f}, uniform {p['uniform_entropy']:.3f}, small "
              f"{p['small_mass']:.3f}, off {p['off_support']:.3f}")
        print(f"{'R':>2} {'round':>5} {'H ode':>6} {'H knn':>6} {'H*':>6} {'H unif':>6} {'clos':>5} {'clos knn':>8} "
              f"{'small':>6} {'small*':>6} {'off':>6}")
        for R, run_ in res["runs"].items():
            for r in run_["rounds"]:
                print(f"{R:>2} {r['round']:>5} {r['entropy']:6.3f} {r['sample_entropy']:6.3f} {r['target_entropy']:6.3f} "
                      f"{r['uniform_entropy']:6.3f} {r['closure']:5.2f} {r['sample_closure']:8.2f} {r['small_mass']:6.3f} "
                      f"{r['target_small_mass']:6.3f} {r['off_support']:6.3f}")
        return 0
    results = {name: run_task(name, args) for name in args.tasks}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.json:
        print(json.dumps(results))
        return 0
    for name, res in results.items():
        print(f"{name}: {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU; options {res['options']}")
        print(f"{'round':>5} {'H est':>7} {'H exact':>7} {'H unif':>7} {'closure':>7} {'H knn':>6} {'H* knn':>6} "
              f"{'cl knn':>6} {'small':>6} {'small*':>6} "
              f"{'off':>6} {'ED/floor':>8} {'KL':>7} {'KL prev':>7}")
        for r in res["rounds"]:
            ratio = r.get("energy_distance", float("nan")) / r.get("energy_distance_floor", float("nan"))
            print(f"{r['round']:>5} {r['entropy']:7.3f} {r['target_entropy']:7.3f} {r['uniform_entropy']:7.3f} "
                  f"{r.get('closure', 0.0):7.2f} {r['sample_entropy']:6.3f} {r.get('target_sample_entropy', float('nan')):6.3f} "
                  f"{r.get('sample_closure', 0.0):6.2f} {r['small_mass']:6.3f} {r.get('target_small_mass', float('nan')):6.3f} "
                  f"{r['off_support']:6.3f} {ratio:8.2f} {r.get('kl', 0.0):7.3f} {r.get('kl_previous', 0.0):7.3f}")
    return 0
