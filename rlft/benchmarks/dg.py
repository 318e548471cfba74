"""`rlft bench dg`: discriminator guidance (`learner: {type: discriminator_guidance}`) on the exact 2-D wrong-mixture bed.

P is a 4-component Gaussian mixture; the "pretrained" model is the exact chain of a deliberately wrong mixture P~
(wrong weights, a shifted mode, a missing mode), so the exact correction score_P(k) - score_P~(k) is known at every
level. For each objective (ce, mse, mse_ce = J_MSE + gamma J_CE), discriminator width and data size N it trains l_phi
for `--updates` Adam steps and reports (BOOST Thm 4, Thm 6):

  E_phi            sum_k lambda_k E_{x_k ~ q_P,k} |w grad l_phi - (score_P - s_theta)|^2 (the learner's `score_errors`)
  E_theta - E_phi  the refinement value (E_theta: the same with no correction; > 0 means the discriminator helps)
  ED, floor        energy distance of refined samples to exact samples of P, and the exact-vs-exact floor
  ED pre           the uncorrected model's energy distance

`--optimum` adds a row per N for the fully over-fitted discriminator l* = log q^_N,k - log q~_k (the N data points
diffused to level k): the minimiser of every objective on the finite data set (Thm 6's limit). It costs O(N) per
evaluation of l*: about a minute at N = 3000 on one core, far more at N = 30000.

Sections (`--sections`, default exact scorenet digits): `exact` is the grid above; `gamma` trains mse_ce at each of
`--gammas` over `--widths` x `--sizes` (does the thesis's regulariser gamma J_CE of eq. 3.10 matter?); `scorenet` and
`digits` refine a short-trained score net on 2-D numpy data and the digits UNet (`rlft.benchmarks.dg_sections`).

PNGs (in --out): `dg_gradient_norm.png`, |grad l_phi| against |exact correction| along the line y = 2 (through the
shifted mode) at a low- and a mid-noise level, for the extreme cells (smallest and largest N, widest net), as the
thesis's Fig. 3.1; `dg_samples.png`, refined samples of those cells beside P~ and P, as Fig. 3.3. `--json` prints
{"cells": [...], "gamma_cells": [...], "sections": {...}, "pretrained": {...}} on stdout; the tables go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import rlft.benchmarks.dg_sections as dg_sections

#: P (the data law) and the wrong "pretrained" mixture P~: weights off, the (-2, 2) mode shifted to (-1.2, 2),
#: the (-2, -2) mode missing (the same pair as the learner's slow test)
P = {"weights": [0.4, 0.3, 0.2, 0.1], "means": [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]], "stds": [0.4] * 4}
P_WRONG = {"weights": [0.2, 0.5, 0.3], "means": [[2.0, 2.0], [-1.2, 2.0], [2.0, -2.0]], "stds": [0.4] * 3}
OBJECTIVES = ("ce", "mse", "mse_ce")
SECTION_NAMES = ("exact", "gamma", "scorenet", "digits")
DEFAULT_SECTIONS = ("exact", "scorenet", "digits")
LINE_Y, LINE_POINTS = 2.0, 161


def register(subparsers) -> None:
    p = subparsers.add_parser("dg", help="discriminator guidance on an exact 2-D wrong-mixture bed (CE vs MSE vs MSE+CE)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--widths", nargs="+", type=int, default=[32, 128], help="discriminator widths (default 32 128)")
    p.add_argument("--sizes", nargs="+", type=int, default=[300, 3000, 30000], help="data sizes N (default 300 3000 30000)")
    p.add_argument("--updates", type=int, default=1500, help="Adam steps per cell (default 1500)")
    p.add_argument("--batch-size", type=int, default=256, help="data and model samples per step (default 256)")
    p.add_argument("--gamma", type=float, default=1.0, help="gamma of mse_ce (default 1)")
    p.add_argument("--num-steps", type=int, default=50, help="chain steps K (default 50)")
    p.add_argument("--eval-samples", type=int, default=4000, help="samples for the energy distance (default 4000)")
    p.add_argument("--optimum", action="store_true",
                   help="add a row per N for the fully over-fitted discriminator log q^_N,k - log q~_k (Thm 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="rlft_bench_dg", help="directory for PNGs and results.json")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--sections", nargs="+", choices=SECTION_NAMES, default=list(DEFAULT_SECTIONS),
                   help="exact: the grid above; gamma: mse_ce over --gammas on the exact bed (--widths x --sizes); "
                        "scorenet, digits: beyond the toy (rlft.benchmarks.dg_sections) (default: exact scorenet digits)")
    p.add_argument("--gammas", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0],
                   help="gamma values of the gamma section (default 0.01 0.1 1 10)")
    dg_sections.register_arguments(p)
    p.set_defaults(func=run)


def build(objective: str, width: int, n_data: int, args):
    """A fresh discriminator-guidance learner on the bed (float64 chain of P~)."""
    import torch

    from rlft.config import task_from_dict
    from rlft.learners import build_learner
    from rlft.models.gmm import GMMModel

    learner = {"type": "discriminator_guidance", "objective": objective, "gamma": args.gamma, "hidden": width,
               "drift_iterations": args.updates, "batch_size": args.batch_size,
               "data": {"type": "gmm", **P, "num_samples": n_data}}
    task = task_from_dict({"model": {"type": "gmm", **P_WRONG}, "num_steps": args.num_steps, "seed": args.seed,
                           "learner": learner, "run": {"iterations": 1}})
    model = GMMModel.create(P_WRONG["weights"], P_WRONG["means"], P_WRONG["stds"], num_steps=args.num_steps)
    return build_learner(task, model.to(dtype=torch.float64), None)


def profile_levels(learner) -> list[int]:
    """A low-noise and a mid-noise level: the steps whose noise std n_k is nearest 0.1 and 0.5."""
    n = learner.levels.noise_std
    return [int((n - t).abs().argmin()) for t in (0.1, 0.5)]


def gradient_profile(learner) -> dict[str, Any]:
    """|w grad l_phi| and |score_P - s_theta| (the exact correction) along y = LINE_Y at `profile_levels`."""
    import torch

    mixture, model, lv = learner._mixture(), learner.model, learner.levels
    xs = torch.linspace(-4.0, 4.0, LINE_POINTS, dtype=torch.float64)
    pts = torch.stack([xs, torch.full_like(xs, LINE_Y)], 1).to(dtype=model.dtype, device=model.device)
    out: dict[str, Any] = {"x": xs.tolist(), "levels": {}}
    control = learner.control()
    for k in profile_levels(learner):
        diffused = mixture.diffuse(float(lv.signal[k]) ** 2)
        with torch.no_grad():
            exact = diffused.score(pts.double()) - model.score(k, pts).double()
        g = control(k, pts).double() / float(lv.c[k])
        out["levels"][str(k)] = {"noise_std": float(lv.noise_std[k]), "grad_norm": g.norm(dim=1).tolist(),
                                 "exact_norm": exact.norm(dim=1).tolist()}
    return out


def empirical_optimum(learner):
    """l*(x, n_k) = log q^_N,k(x) - log q~_k(x), q^_N,k the N data points diffused to level k: the logit every objective
    (CE, J_MSE, both) is minimised by on the finite data set when trained to convergence with no inductive bias, i.e.
    the fully over-fitted discriminator of Thm 6."""
    import torch

    from rlft.models.gmm import GaussianMixture

    class EmpiricalLogRatio(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            data = learner.samples()[0].double()
            lv, weights = learner.levels, torch.full((data.shape[0],), 1.0 / data.shape[0], dtype=torch.float64)
            self.noise_std = lv.noise_std.double()
            self.p = [GaussianMixture(weights, float(a) * data, torch.full_like(weights, float(n)))
                      for a, n in zip(lv.signal.double(), self.noise_std)]
            q = learner.model.data  # the pretrained chain's mixture P~
            self.q = [q.diffuse(float(a) ** 2) for a in lv.signal.double()]

        def forward(self, x: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
            k = int(torch.argmin((self.noise_std - float(noise_std[0])).abs()))
            return self.p[k].log_prob(x.double()) - self.q[k].log_prob(x.double())

    return EmpiricalLogRatio()


def cell(objective: str, width: int, n_data: int, args, logit=None) -> dict[str, Any]:
    """Train (or, with `logit`, plug in a given logit network instead) and evaluate one cell."""
    from rlft.guidance.discriminator_guidance import SCORE_ERROR
    from rlft.sampling import sample

    learner = build(objective, width, n_data, args)
    start = time.perf_counter()
    if logit == "optimum":
        learner.control().discriminator = empirical_optimum(learner)
    elif logit is None:
        while learner.drift_updates < learner.options.drift_iterations:
            learner.train_iteration()
    else:
        learner.control().discriminator = logit
    wall = time.perf_counter() - start
    figures = learner.evaluate(num_samples=args.eval_samples, seed=args.seed + 1)
    e_phi, e_theta = figures[SCORE_ERROR], figures["pretrained"][SCORE_ERROR]
    refined = sample(learner.model, 1000, control=learner.control(), seed=args.seed + 3, progress=False).x
    return {"objective": objective, "width": width, "n": n_data, "gamma": args.gamma, "e_phi": e_phi, "e_theta": e_theta,
            "refinement": e_theta - e_phi, "energy_distance": figures["energy_distance"],
            "energy_distance_floor": figures["energy_distance_floor"],
            "pretrained_energy_distance": figures["pretrained"]["energy_distance"], "train_s": wall,
            "profile": gradient_profile(learner), "samples": refined.double().cpu().tolist()}


def table(cells: list[dict[str, Any]]) -> str:
    if not cells:
        return ""
    lines = [f"{'objective':>9} {'gamma':>5} {'width':>5} {'N':>6} {'E_phi':>8} {'E_th-E_phi':>10} {'ED':>8} {'ED/floor':>8} "
             f"{'ED pre':>7} {'train s':>7}"]
    for c in cells:
        gamma = f"{c['gamma']:g}" if c["objective"] == "mse_ce" else "-"
        lines.append(f"{c['objective']:>9} {gamma:>5} {c['width']:>5} {c['n']:>6} {c['e_phi']:8.3f} {c['refinement']:10.3f} "
                     f"{c['energy_distance']:8.4f} {c['energy_distance'] / c['energy_distance_floor']:8.1f} "
                     f"{c['pretrained_energy_distance']:7.4f} {c['train_s']:7.0f}")
    lines.append(f"E_theta (uncorrected) {cells[0]['e_theta']:.3f}; floor {cells[0]['energy_distance_floor']:.5f}")
    return "\n".join(lines)


def extreme_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per objective, the widest net's cells at the smallest and the largest N."""
    if not cells:
        return []
    width = max(c["width"] for c in cells)
    lo, hi = min(c["n"] for c in cells), max(c["n"] for c in cells)
    return [c for c in cells if c["width"] == width and c["n"] in (lo, hi)]


def plot(cells: list[dict[str, Any]], args) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from rlft.models.gmm import GaussianMixture

    picks = extreme_cells(cells)
    if not picks:
        return []
    os.makedirs(args.out, exist_ok=True)
    levels = list(picks[0]["profile"]["levels"])
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 3.5), squeeze=False)
    for ax, k in zip(axes[0], levels):
        xs = picks[0]["profile"]["x"]
        ref = picks[0]["profile"]["levels"][k]
        ax.plot(xs, ref["exact_norm"], "k-", lw=2, label="|exact correction|")
        for c in picks:
            ax.plot(xs, c["profile"]["levels"][k]["grad_norm"], lw=1, label=f"{c['objective']} N={c['n']}")
        ax.set_title(f"|grad l_phi| along y={LINE_Y}, level {k} (noise std {ref['noise_std']:.2f})")
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths = [os.path.join(args.out, "dg_gradient_norm.png")]
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)

    gen = torch.Generator().manual_seed(args.seed + 9)
    p_x = GaussianMixture.create(P["weights"], P["means"], P["stds"]).sample(1000, gen)
    q_x = GaussianMixture.create(P_WRONG["weights"], P_WRONG["means"], P_WRONG["stds"]).sample(1000, gen)
    panels = [("pretrained P~", q_x)] + [(f"{c['objective']} w={c['width']} N={c['n']}", torch.tensor(c["samples"]))
                                          for c in picks] + [("data law P", p_x)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1, alpha=0.4)
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    paths.append(os.path.join(args.out, "dg_samples.png"))
    fig.savefig(paths[1], dpi=80)
    plt.close(fig)
    return paths


def grid(objectives_gammas: list[tuple[str, float]], args) -> list[dict[str, Any]]:
    """`cell` for each (objective, gamma) x width x N."""
    cells = []
    for objective, gamma in objectives_gammas:
        for width in args.widths:
            for n_data in args.sizes:
                c = cell(objective, width, n_data, argparse.Namespace(**{**vars(args), "gamma": gamma}))
                cells.append(c)
                print(f"[dg] {objective} gamma {gamma:g} width {width} N {n_data}: E_phi {c['e_phi']:.3f} "
                      f"ED {c['energy_distance']:.4f} ({c['train_s']:.0f} s)", file=sys.stderr, flush=True)
    return cells


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    cells = grid([(o, args.gamma) for o in args.objectives], args) if "exact" in args.sections else []
    gamma_cells = grid([("mse_ce", g) for g in args.gammas], args) if "gamma" in args.sections else []
    for n_data in args.sizes if args.optimum else ():
        cells.append(cell("ce", 8, n_data, args, logit="optimum"))  # the width is unused: the logit is given
        cells[-1].update(objective="optimum", width=0)
        print(f"[dg] over-fitted optimum N {n_data}: E_phi {cells[-1]['e_phi']:.3f} "
              f"ED {cells[-1]['energy_distance']:.4f}", file=sys.stderr, flush=True)
    sections = {name: dg_sections.SECTIONS[name](args) for name in args.sections if name in dg_sections.SECTIONS}
    paths = plot([c for c in cells if c["objective"] != "optimum"], args)
    paths += [sections["digits"]["png"]] if "digits" in sections else []

    def slim(cs):
        return [{k: v for k, v in c.items() if k not in ("profile", "samples")} for c in cs]

    first = (cells + gamma_cells)[:1]
    result = {"cells": slim(cells), "gamma_cells": slim(gamma_cells), "sections": sections,
              "pretrained": {"e_theta": first[0]["e_theta"] if first else None,
                             "energy_distance": first[0]["pretrained_energy_distance"] if first else None},
              "pngs": paths, "options": {k: v for k, v in vars(args).items() if k != "func"}}
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:  # written whole, then renamed: never half a file
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    print("\n".join(t for t in (table(cells), table(gamma_cells), dg_sections.table(sections)) if t), file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0
