"""`rlft bench conditional --sections digits`: the class-conditional digits UNet fine-tuned with a LoRA (issue 19 item 3).

The task is `tune_configs/digits_conditional.yaml`: a diffusers UNet2DModel with a class-label embedding, trained on
scikit-learn's 8x8 digits with their labels (`python -m rlft.tasks.digits_unet --num-classes 10`; the bench trains one
into `--out` unless `--digits-model` names one), fine-tuned by ELEGANT through a peft LoRA on training classes 0-7 with
r(x, c) = log p(c | x) + thickness * mean ink; classes 8 and 9 are held out. Before and after, for every class c (training
and held-out), `--digits-samples` samples are drawn with the same noise (seed per class), and the bench reports per class:
the digit classifier's accuracy (argmax over its 11 classes == c), mean log p(c | x), mean ink, the reward r(x, c), and the
fine-tuned chain's path KL to the pretrained one (exact per-step Gaussian KL summed over the K steps, averaged over the
samples). The picture (one PNG): one row per class, pretrained samples on the left, fine-tuned on the right.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rlft.run.storage import log as _log

TASK_FILE = Path(__file__).resolve().parents[2] / "tune_configs" / "digits_conditional.yaml"
SAMPLE_SEED = 1000  # class j is drawn with SAMPLE_SEED + j, before and after fine-tuning (the same noise)
IMAGES_PER_ROW = 8


def add_arguments(p) -> None:
    """The digits section's options of `rlft bench conditional`."""
    p.add_argument("--digits-task", default=str(TASK_FILE), help="digits section: the task YAML")
    p.add_argument("--digits-model", default=None, help="digits section: a trained class-conditional digits model "
                   "directory (default: train one into OUT/digits_conditional_model, or reuse it)")
    p.add_argument("--digits-train-steps", type=int, default=150, help="digits section: UNet training steps (default 150: a "
                   "short-trained model whose class conditioning is weak, about 0.77 accuracy at K = 10)")
    p.add_argument("--digits-iterations", type=int, default=None, help="digits section: train iterations (default: the task's)")
    p.add_argument("--digits-samples", type=int, default=64, help="digits section: samples per class, before and after")
    p.add_argument("--digits-png", default=None, help="digits section: the picture (default OUT/conditional_digits.png)")


def run_section(args) -> dict[str, Any]:
    """The digits section: measures, writes OUT/digits_results.json (atomically), prints it with --json."""
    from rlft.files import atomic_path

    out = section_digits(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(args.out) / "digits_results.json") as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1, default=float))
    if args.json:
        print(json.dumps({"digits": out}, default=float))
    return out


def section_digits(args) -> dict[str, Any]:
    """Pretrains (or loads) the class-conditional UNet, fine-tunes it on the task, and measures every class before/after."""
    import torch

    from rlft.config import load_yaml
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.run_config import run_config_of, validate_task
    from rlft.conditions import conditions_of
    from rlft.tasks.digits_unet import train_digits_unet

    torch.set_num_threads(1)
    quick = bool(getattr(args, "quick", False))
    model_dir = args.digits_model or os.path.join(args.out, "digits_conditional_model")
    pretrain_s = 0.0
    if not os.path.isdir(os.path.join(model_dir, "unet")):
        if args.digits_model:
            raise FileNotFoundError(f"--digits-model {model_dir!r} holds no trained digits model (unet/ is missing)")
        steps = 20 if quick else args.digits_train_steps
        _log(f"digits: training the class-conditional digits UNet ({steps} steps) into {model_dir}")
        start = time.perf_counter()
        train_digits_unet(steps=steps, num_classes=10, progress=False).save_pretrained(model_dir)
        pretrain_s = time.perf_counter() - start
    data = load_yaml(args.digits_task)
    data["model"] = {**data["model"], "path": str(model_dir)}
    data["seed"] = args.seed
    run = dict(data.get("run") or {})
    if args.digits_iterations is not None:
        run["iterations"] = args.digits_iterations
    if quick:
        run["iterations"] = 2
        data["num_steps"] = 4
        data["learner"] = {**data["learner"], "batch_size": 4, "drift_iterations": 2}
    data["run"] = run
    task = validate_task(data)
    iterations = run_config_of(task).iterations
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    learner = build_learner(task, model, reward)
    conds = conditions_of(task)
    labels = [int(c.argmax()) for c in conds.train] + [int(c.argmax()) for c in conds.eval]
    split = ["train"] * conds.train.shape[0] + ["held-out"] * conds.eval.shape[0]
    n = 4 if quick else args.digits_samples
    before = _measure(model, reward, labels, n, None)
    metrics, start = [], time.perf_counter()
    while learner.iteration < iterations:
        metrics.append(learner.train_iteration())
        _log(f"  [digits] iteration {learner.iteration}/{iterations}: train reward {metrics[-1].get('train_reward', float('nan')):.3f} "
             f"kl {metrics[-1].get('train_kl', float('nan')):.3f} ({time.perf_counter() - start:.0f} s)")
    train_s = time.perf_counter() - start
    after = _measure(model, reward, labels, n, learner.control())
    rows = [{"class": c, "split": s, **{f"{k}_before": before[k][j] for k in before if k != "x"},
             **{f"{k}_after": after[k][j] for k in after if k != "x"}} for j, (c, s) in enumerate(zip(labels, split))]
    png = args.digits_png or os.path.join(args.out, "conditional_digits.png")
    _grid(before["x"], after["x"], labels, split, png,
          f"class-conditional digits, same noise per row: pretrained (left) vs ELEGANT LoRA (right); "
          f"r = log p(c | x) + {reward.thickness:g} x ink, alpha = {task.alpha:g}, K = {task.num_steps}")
    out = {"task": args.digits_task, "model": str(model_dir), "pretrain_s": pretrain_s, "train_s": train_s,
           "iterations": iterations, "drift_updates": metrics[-1].get("drift_updates") if metrics else 0,
           "reward_queries": int(learner.reward_queries), "num_steps": task.num_steps, "samples_per_class": n,
           "learner": task.learner, "rows": rows, "png": png,
           **{f"{s}_{k}": _mean([r[k] for r in rows if r["split"] == s]) for s in ("train", "held-out")
              for k in ("accuracy_before", "accuracy_after", "kl_after", "log_p_before", "log_p_after")}}
    _table(out)
    return out


def _measure(model, reward, labels: list[int], n: int, control) -> dict[str, list]:
    """Per class: samples (n, 1, 8, 8) drawn with seed SAMPLE_SEED + j, classifier accuracy, mean log p(c | x), ink,
    reward and path KL (0 for the pretrained chain)."""
    import torch
    from torch.nn import functional as F

    from rlft.sampling import sample

    out: dict[str, list] = {k: [] for k in ("x", "accuracy", "log_p", "ink", "reward", "kl")}
    eye = torch.eye(model.cond_shape[0], dtype=model.dtype)
    with torch.no_grad():
        for j, c in enumerate(labels):
            cond = eye[c].expand(n, -1)
            s = sample(model, n, control=control, cond=cond, seed=SAMPLE_SEED + j, progress=False)
            x = s.x.float()
            logp = F.log_softmax(reward.logits(x).double(), -1)  # (n, 11)
            out["x"].append(x)
            out["accuracy"].append(float((logp.argmax(-1) == c).double().mean()))
            out["log_p"].append(float(logp[:, c].mean()))
            out["ink"].append(float(((x + 1) / 2).flatten(1).mean()))
            out["reward"].append(float(reward(x, cond.float()).double().mean()))
            out["kl"].append(float(s.kl.double().mean()))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _table(out: dict[str, Any]) -> None:
    _log(f"digits: {out['iterations']} iterations ({out['drift_updates']} LoRA updates, {out['reward_queries']} reward "
         f"queries, K = {out['num_steps']}) in {out['train_s']:.0f} s; {out['samples_per_class']} samples per class")
    _log("| class | split | accuracy before | accuracy after | log p(c|x) before | after | ink before | after | path KL |")
    _log("|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        _log(f"| {r['class']} | {r['split']} | {r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} | {r['log_p_before']:.2f} | "
             f"{r['log_p_after']:.2f} | {r['ink_before']:.3f} | {r['ink_after']:.3f} | {r['kl_after']:.2f} |")
    for s in ("train", "held-out"):
        if out[f"{s}_accuracy_before"] is not None:
            _log(f"  {s} mean: accuracy {out[f'{s}_accuracy_before']:.3f} -> {out[f'{s}_accuracy_after']:.3f}, log p(c|x) "
                 f"{out[f'{s}_log_p_before']:.2f} -> {out[f'{s}_log_p_after']:.2f}, path KL {out[f'{s}_kl_after']:.2f}")


def _grid(before, after, labels, split, path: str, title: str) -> str:
    """One PNG: a row per class (IMAGES_PER_ROW samples), pretrained panel left, fine-tuned panel right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    rows, cols = len(labels), IMAGES_PER_ROW
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * rows + 0.8), layout="constrained")
    for ax, imgs, name in ((axes[0], before, "pretrained"), (axes[1], after, "fine-tuned (LoRA)")):
        canvas = -torch.ones(rows * 9 - 1, cols * 9 - 1)  # white background, 1-pixel gutters
        for r, x in enumerate(imgs):
            for c, img in enumerate(x[:cols].reshape(-1, 8, 8).clamp(-1, 1)):
                canvas[r * 9: r * 9 + 8, c * 9: c * 9 + 8] = img
        ax.imshow(canvas.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_yticks([r * 9 + 3.5 for r in range(rows)])
        ax.set_yticklabels([f"{c}{' (held out)' if s != 'train' else ''}" for c, s in zip(labels, split)], fontsize=8)
        ax.set_xticks([])
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
