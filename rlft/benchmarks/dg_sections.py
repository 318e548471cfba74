"""`rlft bench dg --sections scorenet digits`: discriminator guidance beyond the exact bed (issue 18 item 4).

scorenet  A 2-D data set made with numpy (`SCORENET_MODES`: five modes, unequal weights and stds), a score net
          pretrained on it by `rlft pretrain`'s trainer (`train_scorenet` + `save_scorenet`) for too few steps
          (`--scorenet-steps`), then refined by ``learner: {type: discriminator_guidance, data: {path: X.npy}}`` (the
          array's last fifth is held out). Reported: energy distance of the pretrained and the refined chain to the
          held-out rows, and the floor (training rows against held-out rows).
digits    The digits UNet (`rlft.tasks.digits_unet`) trained deliberately short (`--digits-steps`), refined on the
          8x8 digits by a conv discriminator (LoRA-free: a separate small net of (x, n_k); the correction is
          c_k w grad l, c_k the diffusers chain's `score_coefficients`). Reported before/after: the Fréchet distance
          in the digit classifier's feature space (its penultimate layer, `digit_features`) to held-out digits and
          its floor (training digits against held-out ones), the total variation between the predicted-label
          histogram and the data's label histogram, the "not a digit" fraction, and a sample grid PNG.

Measured (defaults, one thread, shared machine): scorenet, energy distance to 4000 fresh draws (floor 0.011)
0.091 -> 0.035 after 100 pretraining steps, 0.032 -> 0.031 after 300; digits, Fréchet 80.1 -> 53.2 (floor 21.1),
label TV 0.216 -> 0.133, not a digit 0.028 -> 0.036 (400 CE updates instead of 1500 changed nothing: 80.1 -> 80.1).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np

#: the scorenet section's data law: five modes on a ring of radius 2, unequal weights and stds
SCORENET_MODES = {"weights": [0.4, 0.25, 0.15, 0.12, 0.08], "stds": [0.25, 0.35, 0.2, 0.3, 0.25], "radius": 2.0}
#: rows of the scorenet section's data set (the last fifth held out by the learner)
SCORENET_ROWS = 6000


def register_arguments(p) -> None:
    p.add_argument("--scorenet-steps", type=int, nargs="+", default=[100, 300],
                   help="pretraining steps of the score net, one row each (default 100 300)")
    p.add_argument("--scorenet-updates", type=int, default=1500, help="discriminator updates, scorenet (default 1500)")
    p.add_argument("--digits-steps", type=int, default=150, help="training steps of the digits UNet (default 150)")
    p.add_argument("--digits-updates", type=int, default=1500, help="discriminator updates, digits (default 1500)")
    p.add_argument("--digits-objective", choices=["ce", "mse", "mse_ce"], default="ce",
                   help="the digits discriminator's objective (default ce: J_MSE needs a UNet call per level and step)")
    p.add_argument("--digits-num-steps", type=int, default=25, help="chain steps K of the digits UNet (default 25)")
    p.add_argument("--digits-samples", type=int, default=500, help="samples judged per digits figure (default 500)")
    p.add_argument("--digits-model-samples", type=int, default=1000,
                   help="UNet samples the discriminator learns as label 0, drawn once (default 1000)")


def log(msg: str) -> None:
    print(f"[dg] {msg}", file=sys.stderr, flush=True)


# -- the scorenet section ---------------------------------------------------------------------------------------


def scorenet_data(rows: int, seed: int) -> np.ndarray:
    """`rows` i.i.d. samples (rows, 2) of `SCORENET_MODES` (float32), drawn with numpy."""
    rng = np.random.default_rng(seed)
    m = SCORENET_MODES
    angles = 2 * np.pi * np.arange(len(m["weights"])) / len(m["weights"]) + np.pi / 2
    means = m["radius"] * np.stack([np.cos(angles), np.sin(angles)], 1)  # (C, 2)
    comp = rng.choice(len(m["weights"]), size=rows, p=m["weights"])
    x = means[comp] + np.asarray(m["stds"])[comp, None] * rng.standard_normal((rows, 2))
    return x.astype(np.float32)


def refine(model, learner: dict[str, Any], updates: int, seed: int, num_samples: int):
    """Builds a discriminator-guidance learner on `model`, trains it `updates` steps; (figures, learner, train CPU s)
    (CPU seconds of this process: wall time on a shared machine says little)."""
    from rlft.config import task_from_dict
    from rlft.learners import build_learner

    task = task_from_dict({"model": {"type": "gmm", "weights": [1.0], "means": [[0.0, 0.0]], "stds": [1.0]},
                           "num_steps": model.num_steps, "seed": seed, "run": {"iterations": 1},
                           "learner": {"type": "discriminator_guidance", "drift_iterations": updates, **learner}})
    lrn = build_learner(task, model, None)  # the model is given: the task's model entry is a placeholder
    start = time.process_time()
    while lrn.drift_updates < lrn.options.drift_iterations:
        lrn.final_metrics = lrn.train_iteration()  # the last iteration's losses (ce_loss ln 2 = 0.693: chance)
    train_s = time.process_time() - start
    return lrn.evaluate(num_samples=num_samples, seed=seed + 1), lrn, train_s


def scorenet_section(args) -> dict[str, Any]:
    """One row per `--scorenet-steps` value: {"rows": [...]}."""
    os.makedirs(args.out, exist_ok=True)
    data = scorenet_data(SCORENET_ROWS, args.seed)
    path = os.path.join(args.out, "scorenet_data.npy")
    np.save(path, data)
    return {"rows": [scorenet_row(steps, path, args) for steps in args.scorenet_steps]}


def scorenet_row(steps: int, path: str, args) -> dict[str, Any]:
    from rlft.models.pretrain import train_scorenet
    from rlft.models.scorenet import load_scorenet, save_scorenet

    n_train = SCORENET_ROWS - int(round(0.2 * SCORENET_ROWS))  # the learner's default holdout: the last fifth
    start = time.process_time()
    net = train_scorenet(np.load(path)[:n_train], steps=steps, hidden=64, seed=args.seed, num_threads=args.threads,
                         progress=False, device="cpu")
    pretrain_s = time.process_time() - start
    directory = save_scorenet(net, os.path.join(args.out, f"scorenet_{steps}"))
    model = load_scorenet(directory, num_steps=args.num_steps)
    log(f"scorenet: pretrained {steps} steps in {pretrain_s:.0f} CPU s (DSM loss {net.summary.final_loss:.3f})")
    figures, lrn, train_s = refine(model, {"data": {"path": path}}, args.scorenet_updates, args.seed, n_train)
    out = {"pretrain_steps": steps, "pretrain_s": pretrain_s, "updates": args.scorenet_updates,
           "train_s": train_s, "energy_distance": figures["energy_distance"],
           "energy_distance_floor": figures["energy_distance_floor"], "num_samples": figures["num_samples"],
           "pretrained_energy_distance": figures["pretrained"]["energy_distance"],
           "fresh": fresh_energy_distances(model, lrn.control(), args.eval_samples, args.seed)}
    f = out["fresh"]
    log(f"scorenet: ED to the {out['num_samples']} held-out rows {out['pretrained_energy_distance']:.4f} -> "
        f"{out['energy_distance']:.4f} (floor {out['energy_distance_floor']:.4f}); to {f['num_samples']} fresh draws "
        f"{f['pretrained']:.4f} -> {f['refined']:.4f} (floor {f['floor']:.4f}); {train_s:.0f} CPU s")
    return out


def fresh_energy_distances(model, control, n: int, seed: int) -> dict[str, float]:
    """Energy distance of n refined and n pretrained samples to n fresh draws of the data law (a larger held-out set
    than the array's last fifth), and the floor: the mean over 4 other fresh draws (blocks as `rlft.evaluation`)."""
    import torch

    from rlft.evaluation import ENERGY_BLOCKS
    from rlft.metrics import energy_distance
    from rlft.sampling import sample

    block = max(64, n // ENERGY_BLOCKS)
    draws = [torch.as_tensor(scorenet_data(n, seed + 100 + i), dtype=torch.float64) for i in range(5)]
    ref = draws[0]
    refined = sample(model, n, control=control, seed=seed + 7, progress=False).x.double()
    plain = sample(model, n, seed=seed + 8, progress=False).x.double()
    return {"num_samples": n, "refined": energy_distance(refined, ref, block), "pretrained": energy_distance(plain, ref, block),
            "floor": sum(energy_distance(d, ref, block) for d in draws[1:]) / 4}


# -- the digits section -----------------------------------------------------------------------------------------


def digit_features(net, x):
    """The digit classifier's penultimate layer (B, 64) (`rlft.tasks.digits.DigitCNN`: its fc2 maps these to logits)."""
    import torch.nn.functional as F

    h = F.silu(net.conv1(x))
    h = F.avg_pool2d(F.silu(net.conv2(h)), 2)  # (B, 32, 4, 4)
    return F.silu(net.fc1(h.flatten(1)))


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    |mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2})  (Dowson & Landau 1982; FID's formula)."""
    from scipy import linalg

    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)  # round-off can leave a tiny imaginary part
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))


def feature_frechet(a, b) -> float:
    """`frechet_distance` of the Gaussians fitted to two feature sets (n, d) and (m, d)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def label_figures(net, x, data_labels) -> dict[str, Any]:
    """Predicted-label histogram of images x against the data's label histogram: total variation among the samples
    called digits, and the "not a digit" fraction."""
    import torch

    from rlft.tasks.digits import NOT_A_DIGIT, NUM_DIGITS

    with torch.no_grad():
        pred = net(x.float()).argmax(-1)
    counts = torch.bincount(pred, minlength=NUM_DIGITS + 1).double()
    digits = counts[:NUM_DIGITS] / counts[:NUM_DIGITS].sum().clamp_min(1.0)
    data = torch.bincount(data_labels, minlength=NUM_DIGITS).double()
    data = data / data.sum()
    return {"label_tv": float(0.5 * (digits - data).abs().sum()),
            "not_a_digit": float(counts[NOT_A_DIGIT] / counts.sum()), "class_counts": counts.long().tolist()}


def digits_figures(net, x, ref_features, data_labels) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        f = digit_features(net, x.float())
    return {"frechet": feature_frechet(f.numpy(), ref_features), **label_figures(net, x, data_labels)}


def digits_section(args) -> dict[str, Any]:
    import torch

    from rlft.sampling import sample
    from rlft.tasks.digits import DigitClassifierReward, load_digits_data
    from rlft.tasks.digits_unet import train_digits_unet

    os.makedirs(args.out, exist_ok=True)
    images, labels = load_digits_data()  # (1797, 1, 8, 8), (1797,)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    images, labels = images[perm], labels[perm]  # shuffled: the learner holds out the last fifth
    path = os.path.join(args.out, "digits_data.npy")
    np.save(path, images.numpy())
    n_hold = int(round(0.2 * images.shape[0]))
    train_x, hold_x = images[:-n_hold], images[-n_hold:]
    start = time.process_time()
    chain = train_digits_unet(steps=args.digits_steps, num_steps=args.digits_num_steps, seed=args.seed,
                              progress=False, threads=args.threads)
    unet_s = time.process_time() - start
    log(f"digits: UNet trained {args.digits_steps} steps in {unet_s:.0f} CPU s")
    classifier = DigitClassifierReward(0).net
    with torch.no_grad():
        ref = digit_features(classifier, hold_x).numpy()
        floor = feature_frechet(digit_features(classifier, train_x[: n_hold]).numpy(), ref)
    learner = {"objective": args.digits_objective, "hidden": 32, "depth": 2, "batch_size": 128,
               "model_samples": args.digits_model_samples, "data": {"path": path}}
    _, lrn, train_s = refine(chain, learner, args.digits_updates, args.seed, 16)
    n = args.digits_samples
    refined = sample(chain, n, control=lrn.control(), seed=args.seed + 5, progress=False).x.float()
    plain = sample(chain, n, seed=args.seed + 5, progress=False).x.float()  # the same noise: a paired comparison
    out = {"unet_steps": args.digits_steps, "unet_s": unet_s, "updates": args.digits_updates, "train_s": train_s,
           "objective": args.digits_objective, "num_samples": n, "frechet_floor": floor,
           "final_metrics": lrn.final_metrics,
           "data_not_a_digit": label_figures(classifier, hold_x, labels)["not_a_digit"],
           "pretrained": digits_figures(classifier, plain, ref, labels),
           "refined": digits_figures(classifier, refined, ref, labels)}
    out["png"] = digits_grid(plain, refined, hold_x, args.out)
    p, r = out["pretrained"], out["refined"]
    log(f"digits: discriminator's last losses {lrn.final_metrics}")
    log(f"digits: Fréchet {p['frechet']:.2f} -> {r['frechet']:.2f} (floor {floor:.2f}), label TV {p['label_tv']:.3f} -> "
        f"{r['label_tv']:.3f}, not a digit {p['not_a_digit']:.3f} -> {r['not_a_digit']:.3f} ({train_s:.0f} CPU s)")
    return out


def digits_grid(plain, refined, real, out: str, n: int = 64) -> str:
    """A PNG of n real digits, n pretrained samples and n refined samples (8 x 8 grids, same noise for the two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(x):
        side = math.isqrt(min(n, x.shape[0]))
        x = x[: side * side, 0].clamp(-1, 1).numpy()  # (side^2, 8, 8)
        x = np.pad(x, ((0, 0), (0, 1), (0, 1)), constant_values=-1.0)  # a blank line between digits, (side^2, 9, 9)
        return x.reshape(side, side, 9, 9).transpose(0, 2, 1, 3).reshape(side * 9, side * 9)

    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    for ax, (title, x) in zip(axes, [("held-out digits", real), ("pretrained (short)", plain), ("refined (DG)", refined)]):
        ax.imshow(grid(x), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = os.path.join(out, "dg_digits.png")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def table(sections: dict[str, Any]) -> str:
    lines = []
    for s in sections.get("scorenet", {}).get("rows", []):
        f = s["fresh"]
        lines.append(f"scorenet ({s['pretrain_steps']} pretraining steps, {s['updates']} updates): energy distance "
                     f"{s['pretrained_energy_distance']:.4f} -> {s['energy_distance']:.4f}, floor {s['energy_distance_floor']:.4f} "
                     f"({s['num_samples']} held-out rows); {f['pretrained']:.4f} -> {f['refined']:.4f}, floor {f['floor']:.4f} "
                     f"({f['num_samples']} fresh draws)")
    if "digits" in sections:
        d = sections["digits"]
        lines.append(f"digits ({d['unet_steps']} UNet steps, {d['updates']} {d['objective']} updates): {'':>8}"
                     f"{'Fréchet':>8} {'label TV':>8} {'not digit':>9}")
        for name in ("pretrained", "refined"):
            f = d[name]
            lines.append(f"{name:>56} {f['frechet']:8.2f} {f['label_tv']:8.3f} {f['not_a_digit']:9.3f}")
        lines.append(f"{'held-out floor':>56} {d['frechet_floor']:8.2f} {'':>8} {d['data_not_a_digit']:9.3f}")
    return "\n".join(lines)


SECTIONS = {"scorenet": scorenet_section, "digits": digits_section}
