"""`rlft bench elegant`: ELEGANT and its baselines on the exact Gaussian-mixture bed, memory against K, digits.

Sections (`--sections`, default all but digits; `--digits` adds it):

  gmm        ELEGANT with default options (`learner: {type: elegant}`) on 2-D and 8-D mixtures with a quadratic
             reward, alpha in {0.1, 0.3, 1}, plus a second 2-D mixture/centre as a check against tuning to one
             example: gap closure (J - J_pre)/(J* - J_pre), energy distance to exact target samples beside the
             exact-vs-exact floor, KL, reward, diversity, wall and CPU time. PNGs: 2-D samples, reward vs KL.
  ablation   a schedule with small beta_max, where a(T) is not tiny and nu* differs from nu_ini: ELEGANT
             with and without learning the initial distribution (same budget).
  baselines  the 2-D task at alpha = 1: ELEGANT against NO KL, Truncation, Random-K (defaults) and an
             f-divergence regulariser; J is reported at the task's alpha for all.
  memory     peak resident memory and time of one drift update for K in {50, 200, 1000}, with and without
             gradient checkpointing, each in a fresh subprocess (peak RSS above the process's RSS before
             the update; optionally under an address-space cap, `--memory-cap-mb`).
  digits     LoRA fine-tuning of the digits UNet with the digit-classifier reward at alpha = 1: reward and KL
             before/after, and a sample-grid PNG.

Times: wall-clock and the process CPU time (a shared machine inflates the first, not the second; with one
torch thread on an idle machine they agree). Every run uses `--threads` torch threads (default 1); `--jobs N` trains
N runs at a time, each in its own process (so `--jobs 2` fills a 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any
from rlft.run.storage import log as _log  # one progress line on stderr

SECTIONS = ("gmm", "ablation", "baselines", "memory", "digits")
ALPHAS = (0.1, 0.3, 1.0)
GMM_TASKS = ("2d", "8d", "2d_alt")
MEMORY_STEPS = (50, 200, 1000)
#: energy distances are computed on this many samples of the fine-tuned sampler and of the exact target
EVAL_SAMPLES = 2000


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "elegant", help="ELEGANT and baselines on the exact GMM bed, memory vs K, digits LoRA",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=None, help="which sections (default: all but digits)")
    p.add_argument("--digits", action="store_true", help="also run the digits LoRA section")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run, not the benchmark's numbers)")
    p.add_argument("--tasks", nargs="+", choices=GMM_TASKS, default=list(GMM_TASKS), help="gmm section: which mixtures (default: all)")
    p.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS), help=f"gmm section: which alphas (default: {' '.join(map(str, ALPHAS))})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="gmm section: training seeds, one run each (default: each task's own seed); the table adds a summary over them")
    p.add_argument("--iterations", type=int, default=200, help="train_iteration() calls per run (default 200, the runner's default)")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help=f"samples per evaluation (default {EVAL_SAMPLES})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time, each in its own process (default 1)")
    p.add_argument("--memory-cap-mb", type=float, default=0.0, help="memory section: address-space cap above the baseline (0 = none)")
    p.add_argument("--digits-model", default=None, help="digits: directory of a trained digits model (default: train one)")
    p.add_argument("--out", default="rlft_bench_elegant", help="directory for PNGs and results.json")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


# -- tasks ------------------------------------------------------------------------------------------


def gmm_task(name: str, alpha: float) -> dict[str, Any]:
    """The bench's tasks: "2d" (the demo task), "2d_alt" (another mixture and centre), "8d", "ablation"."""
    if name == "2d":
        from rlft.config import DEFAULT_TASK

        return {**DEFAULT_TASK, "alpha": alpha}
    if name == "2d_alt":
        model = {"type": "gmm", "weights": [0.5, 0.3, 0.2], "means": [[-1.5, 0.0], [1.5, 1.0], [0.0, -2.5]], "stds": [0.5, 0.3, 0.6]}
        return {"model": model, "reward": {"type": "quadratic", "center": [-0.5, -1.5], "scale": 2.0}, "alpha": alpha, "num_steps": 100, "seed": 1}
    if name == "8d":
        import torch

        g = torch.Generator().manual_seed(3)
        means = (1.5 * torch.randn(4, 8, generator=g, dtype=torch.float64)).round(decimals=3).tolist()
        model = {"type": "gmm", "weights": [0.25] * 4, "means": means, "stds": [0.4] * 4}
        return {"model": model, "reward": {"type": "quadratic", "center": [0.5] * 8, "scale": 1.0}, "alpha": alpha, "num_steps": 100, "seed": 2}
    if name == "ablation":
        # mean 0 and covariance I, so the prior N(0, I) still matches the forward marginal at T although
        # beta_max = 1 leaves a(T)^2 = 0.58: x_0 carries information about x_T and nu* is far from nu_ini
        model = {"type": "gmm", "weights": [0.25] * 4, "means": [[0.8, 0.8], [-0.8, 0.8], [0.8, -0.8], [-0.8, -0.8]],
                 "stds": [0.6] * 4, "beta_min": 0.1, "beta_max": 1.0}
        return {"model": model, "reward": {"type": "quadratic", "center": [1.5, 1.5], "scale": 1.0}, "alpha": alpha, "num_steps": 100, "seed": 4}
    raise ValueError(f"unknown bench task {name!r}")


# -- one training run --------------------------------------------------------------------------------


def train_run(task_data: dict, learner: dict, iterations: int, eval_samples: int, progress: bool, label: str) -> dict[str, Any]:
    """Builds the task and learner, runs `iterations` train_iteration() calls, evaluates; figures + timings."""
    import torch
    from tqdm.auto import tqdm

    from rlft.config import task_from_dict
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task = task_from_dict({**task_data, "learner": learner})
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    lrn = build_learner(task, model, reward)
    wall, cpu = time.perf_counter(), time.process_time()
    first: dict[str, float] = {}
    metrics: dict[str, float] = {}
    for i in tqdm(range(iterations), desc=label, disable=not progress, leave=False, file=sys.stderr):
        metrics = lrn.train_iteration()
        if i == 0:
            first = metrics  # steps 1-2 (value, initial law) report here
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples: dict = {}
    from rlft.evaluation import evaluate_run

    report = evaluate_run(model, reward, task.alpha, control=lrn.control(), init=lrn.init_dist(),
                          num_samples=eval_samples, seed=task.seed + 1, samples_out=samples)
    init = lrn.init_dist()
    init_kl = 0.0
    if init is not None:
        with torch.no_grad():
            init_kl = float(init.init_sample(eval_samples, torch.Generator().manual_seed(0))[1].mean())
    return {
        "label": label, "alpha": task.alpha, "learner": learner, "iterations": iterations, "wall_s": wall, "cpu_s": cpu,
        "reward_queries": int(lrn.reward_queries), "init_kl": init_kl, "setup_metrics": first, "final_metrics": metrics,
        **{k: v for k, v in report.items()}, **mode_weights(model, reward, task.alpha, samples.get("finetuned")),
        **f_target_figures(model, reward, task.alpha, learner.get("divergence", "kl"), samples.get("finetuned"), task.seed),
        "_samples": samples, "_learner": lrn,
    }


#: proposals per SIR draw of an exact f-divergence optimum (`f_target_figures`)
F_TARGET_PROPOSALS = 200_000


def f_target_figures(model, reward, alpha: float, divergence: str, x, seed: int) -> dict[str, Any]:
    """Mixture tasks with an f-divergence other than KL: the energy distance of x (n, D) to that divergence's exact
    optimum p_f = (f')^{-1}((r - lambda)/alpha) p_data (TANG Prop. 4.1), beside the floor (the mean over FLOOR_DRAWS
    other exact draws against the same reference, as `rlft.evaluation` does for the KL target).

    p_f is drawn by sampling-importance-resampling: 200k proposals from the data mixture, weights
    (f')^{-1}((r - lambda)/alpha) with lambda solved on those proposals (`rlft.divergences.solve_lambda`); each of
    the exact draws resamples its own proposals."""
    import torch

    import rlft.metrics as metrics
    from rlft.divergences import get_divergence, solve_lambda
    from rlft.evaluation import FLOOR_DRAWS, _block

    div = get_divergence(divergence)
    if x is None or div.name in ("kl", "reverse_kl") or not hasattr(model, "data"):
        return {}
    g = torch.Generator().manual_seed(seed + 7)

    def draw(n: int) -> torch.Tensor:
        proposals = model.data.sample(F_TARGET_PROPOSALS, g)  # (M, D) float64
        with torch.no_grad():
            r = reward(proposals).double()
        lam = solve_lambda(r, alpha, div)
        w = div.f_prime_inv((r - lam) / alpha).clamp_min(0.0)
        return proposals[torch.multinomial(w, n, replacement=True, generator=g)]

    n = x.shape[0]
    target = draw(n)
    floors = [metrics.energy_distance(draw(n), target, _block(n)) for _ in range(FLOOR_DRAWS)]
    return {"f_divergence": div.name, "energy_distance_f": metrics.energy_distance(x.double(), target, _block(n)),
            "energy_distance_f_floor": sum(floors) / len(floors)}


def mode_weights(model, reward, alpha: float, x) -> dict[str, Any]:
    """Mixture tasks: the fraction of samples x (n, D) in each component of the exact target (by its largest
    responsibility) beside the target's weights, and their total variation `mode_tv` (where a sampler that is
    right within modes but wrong across them shows up)."""
    import torch

    if x is None or not hasattr(model, "exact_target") or getattr(reward, "exact_form", None) is None or not alpha > 0:
        return {}
    target = model.exact_target(reward, alpha).mixture
    with torch.no_grad():
        comp = target.component_log_probs(x.double()).argmax(-1)  # (n,)
    w = torch.bincount(comp, minlength=target.weights.numel()).double() / comp.numel()
    return {"mode_weights": w.tolist(), "target_mode_weights": target.weights.tolist(),
            "mode_tv": 0.5 * float((w - target.weights).abs().sum())}


# -- sections -----------------------------------------------------------------------------------------


def _train_row(job: tuple) -> dict[str, Any]:
    """`train_run` in a worker process: sets the torch threads and drops the learner (it stays in the worker).

    A run that raises (a baseline that diverges to NaN) comes back as {"label", "alpha", "error"}, so the other
    runs' figures are still reported."""
    import torch

    task_data, learner, iterations, eval_samples, progress, label, threads = job
    torch.set_num_threads(threads)
    try:
        row = train_run(task_data, learner, iterations, eval_samples, progress, label)
    except Exception as e:  # noqa: BLE001 - reported in the results, not swallowed
        return {"label": label, "alpha": task_data.get("alpha"), "learner": learner, "error": f"{type(e).__name__}: {e}"}
    row.pop("_learner", None)
    return row


def run_jobs(jobs: list[tuple[dict, dict, str]], args) -> list[dict[str, Any]]:
    """Trains (task_data, learner, label) jobs, `args.jobs` at a time in fresh worker processes (1: in this one).

    Each worker uses `args.threads` torch threads, so --jobs 2 --threads 1 fills a 2-core machine. Rows come
    back in the order of `jobs`; their wall/CPU times are each worker's own.
    """
    specs = [(task, learner, args.iterations, args.eval_samples, not args.no_progress and args.jobs == 1, label, args.threads)
             for task, learner, label in jobs]
    if args.jobs <= 1 or len(specs) <= 1:
        rows = []
        for spec in specs:
            rows.append(_train_row(spec))
            _log(f"{spec[5]}: " + _brief(rows[-1]))
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    done: list[dict[str, Any] | None] = [None] * len(specs)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_row, spec): i for i, spec in enumerate(specs)}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=f"runs ({args.jobs} at a time)",
                        disable=args.no_progress, file=sys.stderr):
            i = futures[fut]
            done[i] = fut.result()
            _log(f"{specs[i][5]}: " + _brief(done[i]))
    return done  # type: ignore[return-value]


def gmm_cells(tasks=GMM_TASKS, alphas=ALPHAS, seeds: list[int] | None = None) -> list[tuple[str, float, int]]:
    """(task name, alpha, training seed) of every gmm run; seeds None = each task's own seed."""
    return [(name, float(alpha), seed if seed is not None else gmm_task(name, alpha)["seed"])
            for name in tasks for alpha in alphas for seed in (seeds if seeds is not None else [None])]


def gmm_jobs(budget: dict, cells: list[tuple[str, float, int]]) -> list[tuple[dict, dict, str]]:
    return [({**gmm_task(name, alpha), "seed": seed}, {"type": "elegant", **budget}, f"{name} alpha={alpha} seed={seed}")
            for name, alpha, seed in cells]


def finish_gmm(rows: list[dict[str, Any]], cells: list[tuple[str, float, int]]) -> list[dict[str, Any]]:
    for row, (name, _, seed) in zip(rows, cells):
        row["task"], row["seed"] = name, seed
    return rows


#: the gmm cell whose run is also the baselines table's ELEGANT row (the baselines' task at its own seed)
BASELINE_CELL = ("2d", 1.0, gmm_task("2d", 1.0)["seed"])


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, alpha) over its seeds: the ED/floor ratios, their mean and max, and how many are <= 2."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["alpha"]), []).append(r)
    out = []
    for (task, alpha), rs in groups.items():
        ratios = [r["energy_distance"] / r["energy_distance_floor"] for r in rs]
        gaps = [r["gap_closure"] for r in rs]
        out.append({"task": task, "alpha": alpha, "seeds": [r["seed"] for r in rs], "ratios": ratios,
                    "ratio_mean": sum(ratios) / len(ratios), "ratio_max": max(ratios), "within_2x": sum(x <= 2 for x in ratios),
                    "gap_min": min(gaps), "gap_mean": sum(gaps) / len(gaps)})
    return out


def ablation_jobs(budget: dict) -> list[tuple[dict, dict, str]]:
    return [(gmm_task("ablation", 1.0), {"type": "elegant", "learn_init": learn_init, **budget}, f"ablation learn_init={learn_init}")
            for learn_init in (True, False)]


def finish_ablation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row, learn_init in zip(rows, (True, False)):
        row["task"], row["learn_init"] = "ablation", learn_init
    return rows


BASELINES = (
    ("elegant", {"type": "elegant"}),
    ("elegant, no init", {"type": "elegant", "learn_init": False}),
    ("no_kl", {"type": "no_kl"}),
    ("truncation", {"type": "truncation"}),
    ("random_k", {"type": "random_k"}),
    ("elegant, chi2", {"type": "elegant", "divergence": "chi2"}),
)


def baseline_jobs(budget: dict, reuse: bool) -> list[tuple[dict, dict, str]]:
    """The 2-D task at alpha = 1 for every baseline (ELEGANT itself left out when the gmm section ran it)."""
    return [(gmm_task("2d", 1.0), {**learner, **budget}, label) for label, learner in BASELINES if not (reuse and label == "elegant")]


def finish_baselines(rows: list[dict[str, Any]], reuse: dict | None) -> list[dict[str, Any]]:
    rows = list(rows)
    if reuse is not None:
        rows.insert(0, dict(reuse))
    for row, (label, _) in zip(rows, BASELINES):
        row["task"], row["label"] = "2d", label
    return rows


def section_memory(args, quick: bool) -> list[dict[str, Any]]:
    """Each setting in a fresh subprocess: ru_maxrss is a per-process high-water mark.

    glibc's malloc keeps freed blocks below its mmap threshold in the heap, so a pass that allocates and frees a
    window at a time would read as its cumulative size: the probes run with MALLOC_MMAP_THRESHOLD_=65536 so the
    mark follows the live tensors (measured at K = 1000 with checkpointing: 247 MB growth under the default
    allocator, 20 MB with this setting; without checkpointing 875 MB and 862 MB)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    batch = 64 if quick else 256
    updates = 1 if quick else 3
    for K in MEMORY_STEPS:
        for ckpt in (False, True):
            code = (
                "import json; from rlft.benchmarks.elegant import memory_probe as m; "
                f"print(json.dumps(m({K}, {ckpt}, {batch}, {updates}, {args.memory_cap_mb})))"
            )
            row = probe_in_subprocess(code, env, {"num_steps": K, "checkpointing": ckpt})
            rows.append(row)
            _log(f"memory K={K} checkpointing={ckpt}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows


def probe_in_subprocess(code: str, env: dict, identity: dict[str, Any]) -> dict[str, Any]:
    """Runs `python -c code` (which prints one JSON row last) in a fresh process, so that its peak memory is its own;
    a failed probe is `identity` with ok False and the last line of its stderr."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        return {**identity, "ok": False, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_probe(num_steps: int, checkpointing: bool, batch_size: int, updates: int, cap_mb: float) -> dict[str, Any]:
    """One setting in THIS process: peak RSS growth (MB) over `updates` drift updates, and seconds per update."""
    import resource

    import torch

    from rlft.config import task_from_dict
    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    torch.set_num_threads(1)
    learner = {"type": "elegant", "learn_init": False, "checkpointing": checkpointing, "batch_size": batch_size}
    task = task_from_dict({**gmm_task("2d", 1.0), "num_steps": num_steps, "learner": learner})
    model = build_model(task.model, task.num_steps)
    lrn = build_learner(task, model, build_reward(task.reward, model=model))
    lrn.setup_done = True
    # a tiny update first so that lazily allocated buffers (Adam moments, autograd engine) exist
    full = lrn.options
    lrn.options = dataclasses.replace(full, batch_size=1)
    lrn.update()
    lrn.options = full
    base = _rss_mb()
    out: dict[str, Any] = {"num_steps": num_steps, "checkpointing": checkpointing, "batch_size": batch_size, "rss_before_mb": base}
    if cap_mb > 0:
        limit = int((_vm_mb() + cap_mb) * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(updates):
            lrn.update()
        out["wall_s_per_update"] = (time.perf_counter() - wall) / updates
        out["cpu_s_per_update"] = (time.process_time() - cpu) / updates
        out["ok"] = True
    except (MemoryError, RuntimeError) as err:
        out["ok"], out["error"] = False, f"{type(err).__name__}: {str(err)[:120]}"
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["peak_growth_mb"] = out["peak_rss_mb"] - base
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vm_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") / 2**20


DIGIT_TARGET = 3


def section_digits(args, quick: bool) -> list[dict[str, Any]]:
    """LoRA fine-tuning of the digits UNet towards one digit at alpha = 1 (`learn_init: false`: the DDPM prior's
    a(T) is ~0, so nu* = nu_ini up to a negligible tilt, and the value rollouts would cost thousands of UNet
    chains). Budget: --iterations calls of 5 updates of 32 chains (quick: 3 calls, K = 10)."""
    import torch

    from rlft.config import task_from_dict
    from rlft.tasks.digits_unet import train_digits_unet
    from rlft.rewards import build_reward
    from rlft.sampling import sample

    model_dir = args.digits_model or os.path.join(args.out, "digits_model")
    if not os.path.isdir(os.path.join(model_dir, "unet")):
        if args.digits_model:
            raise FileNotFoundError(f"--digits-model {model_dir!r} holds no trained digits model (unet/ is missing)")
        _log(f"digits: training the digits UNet into {model_dir}")
        chain = train_digits_unet(steps=200 if quick else 3000, progress=not args.no_progress)
        chain.save_pretrained(model_dir)
    iterations = 3 if quick else min(args.iterations, 40)
    num_steps = 10 if quick else 50
    learner = {"type": "elegant", "learn_init": False, "batch_size": 8 if quick else 32, "lr": 1e-3, "lr_final": 1e-4,
               "drift_iterations": 5 * iterations, "drift_iterations_per_train_iteration": 5}
    task_data = {"model": {"type": "diffusers", "path": model_dir}, "reward": {"type": "digit_classifier", "target": DIGIT_TARGET},
                 "alpha": 1.0, "num_steps": num_steps, "seed": 0}
    n_eval = 64 if quick else 256
    row = train_run(task_data, learner, iterations, n_eval, not args.no_progress, "digits LoRA")
    # how often the pretrained and the fine-tuned samples are classified as the target digit
    row["task"] = "digits"
    samples = row.get("_samples") or {}
    reward = build_reward(task_from_dict(task_data).reward)
    for name in ("pretrained", "finetuned"):
        x = samples.get(name)
        if x is not None:
            with torch.no_grad():
                pred = reward.logits(x.float()).argmax(-1)
            row[f"{name}_target_fraction"] = float((pred == DIGIT_TARGET).double().mean())
    # the grid: 32 pretrained and 32 fine-tuned samples drawn with the same seed (the same noise)
    lrn = row.pop("_learner")
    pre = sample(lrn.model, 32, seed=123, progress=False).x
    tuned = sample(lrn.model, 32, control=lrn.control(), init=lrn.init_dist(), seed=123, progress=False).x
    row["grid_png"] = _digit_grid(pre, tuned, os.path.join(args.out, "elegant_digits.png"),
                                  f"digits, same noise: pretrained (left) vs ELEGANT LoRA (right); reward log p({DIGIT_TARGET} | x), alpha = 1")
    _log("digits: " + _brief(row) + f", target fraction {row.get('pretrained_target_fraction')} -> {row.get('finetuned_target_fraction')}")
    return [row]


def _digit_grid(pre, tuned, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, imgs, name in ((axes[0], pre, "pretrained"), (axes[1], tuned, "fine-tuned")):
        imgs = imgs.detach().float().reshape(-1, 8, 8).clamp(-1, 1).cpu()
        rows = math.ceil(imgs.shape[0] / 8)
        canvas = -torch.ones(rows * 9 - 1, 8 * 9 - 1)  # white background, 1-pixel gutters
        for i, img in enumerate(imgs):
            r, c = divmod(i, 8)
            canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = img
        ax.imshow(canvas.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path



# -- reporting ----------------------------------------------------------------------------------------


def _brief(row: dict[str, Any]) -> str:
    keys = ("gap_closure", "energy_distance", "energy_distance_floor", "reward", "kl", "objective", "optimal_objective", "diversity", "wall_s", "cpu_s")
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))



def _fmt(v: Any, spec: str = ".4f") -> str:
    if not (isinstance(v, (int, float)) and math.isfinite(v)):
        return "-"
    return format(v, ".3g" if abs(v) >= 1e5 else spec)  # a diverged baseline's KL runs to 1e18


def print_tables(results: dict[str, Any], stream=None) -> None:
    w = (stream or sys.stderr).write  # looked up per call: a default bound at import outlives a replaced sys.stderr
    if results.get("gmm"):
        w("\nELEGANT (defaults) on the exact GMM bed\n")
        w(f"{'task':7} {'alpha':>5} {'seed':>4} {'gap':>6} {'ED':>8} {'floor':>8} {'ED/fl':>6} {'modeTV':>6} {'reward':>8} {'KL':>7} {'J':>8} {'J*':>8} {'div':>6} {'wall s':>7} {'cpu s':>7}\n")
        for r in results["gmm"]:
            ratio = r["energy_distance"] / r["energy_distance_floor"]
            w(f"{r['task']:7} {r['alpha']:5.1f} {r.get('seed', ''):>4} {_fmt(r['gap_closure'], '.3f'):>6} {_fmt(r['energy_distance'], '.5f'):>8} "
              f"{_fmt(r['energy_distance_floor'], '.5f'):>8} {_fmt(ratio, '.2f'):>6} {_fmt(r.get('mode_tv'), '.3f'):>6} {_fmt(r['reward']):>8} {_fmt(r['kl']):>7} "
              f"{_fmt(r['objective']):>8} {_fmt(r['optimal_objective']):>8} {_fmt(r['diversity'], '.3f'):>6} "
              f"{_fmt(r['wall_s'], '.0f'):>7} {_fmt(r['cpu_s'], '.0f'):>7}\n")
    if results.get("gmm_seeds"):
        w("\nOver training seeds: ED/floor per seed (<= 2 is the bench's goal at alpha = 1)\n")
        for r in results["gmm_seeds"]:
            per = " ".join(f"{s}:{x:.2f}" for s, x in zip(r["seeds"], r["ratios"]))
            w(f"{r['task']:7} {r['alpha']:5.1f}  mean {r['ratio_mean']:.2f}  max {r['ratio_max']:.2f}  "
              f"<= 2: {r['within_2x']}/{len(r['ratios'])}  gap min {r['gap_min']:.3f}  [{per}]\n")
    if results.get("ablation"):
        w("\nAblation: learning nu where nu* != nu_ini (beta_max = 1, alpha = 1)\n")
        w(f"{'learn_init':10} {'J':>8} {'J*':>8} {'gap':>6} {'init KL':>8} {'path KL':>8} {'reward':>8} {'ED':>8} {'floor':>8}\n")
        for r in results["ablation"]:
            w(f"{str(r['learn_init']):10} {_fmt(r['objective']):>8} {_fmt(r['optimal_objective']):>8} {_fmt(r['gap_closure'], '.3f'):>6} "
              f"{_fmt(r['init_kl']):>8} {_fmt(r['kl']):>8} {_fmt(r['reward']):>8} {_fmt(r['energy_distance'], '.5f'):>8} "
              f"{_fmt(r['energy_distance_floor'], '.5f'):>8}\n")
    if results.get("baselines"):
        w("\nBaselines on the 2-D task (J at alpha = 1 for all)\n")
        w(f"{'learner':17} {'reward':>8} {'KL':>8} {'J':>8} {'gap':>7} {'div':>6} {'ED':>8} {'ED/fl':>6} {'wall s':>7} {'cpu s':>7}\n")
        for r in results["baselines"]:
            w(f"{r['label']:17} {_fmt(r['reward']):>8} {_fmt(r['kl']):>8} {_fmt(r['objective']):>8} {_fmt(r['gap_closure'], '.3f'):>7} "
              f"{_fmt(r['diversity'], '.3f'):>6} {_fmt(r['energy_distance'], '.4f'):>8} "
              f"{_fmt(r['energy_distance'] / r['energy_distance_floor'], '.2f'):>6} {_fmt(r['wall_s'], '.0f'):>7} {_fmt(r['cpu_s'], '.0f'):>7}\n")
        for r in results["baselines"]:
            if "energy_distance_f" in r:
                w(f"  {r['label']}: energy distance to the exact {r['f_divergence']} optimum {r['energy_distance_f']:.5f} "
                  f"(floor {r['energy_distance_f_floor']:.5f}, ratio {r['energy_distance_f'] / r['energy_distance_f_floor']:.2f})\n")
        w("  (ED is to the KL target p_tar at alpha = 1: J and ED of the other rows measure how far each lands from it)\n")
    if results.get("memory"):
        w("\nOne drift update: peak memory growth and time against K (2-D task)\n")
        w(f"{'K':>5} {'checkpointing':>13} {'peak MB':>8} {'wall s':>7} {'cpu s':>7} {'ok':>4}\n")
        for r in results["memory"]:
            w(f"{r['num_steps']:5d} {str(r['checkpointing']):>13} {_fmt(r.get('peak_growth_mb'), '.1f'):>8} "
              f"{_fmt(r.get('wall_s_per_update'), '.2f'):>7} {_fmt(r.get('cpu_s_per_update'), '.2f'):>7} {str(r.get('ok')):>4}\n")
    for r in results.get("digits", []):
        w("\nDigits: LoRA fine-tuning with the digit-classifier reward (alpha = 1)\n")
        w(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1, default=str) + "\n")


def make_plots(results: dict[str, Any], out: str) -> dict[str, str]:
    import rlft.plots as plots

    paths = {}
    panels = []
    for r in results.get("gmm", []) + results.get("ablation", []) + results.get("baselines", []):
        s = r.get("_samples") or {}
        if s.get("finetuned") is not None and s["finetuned"].shape[1:] == (2,):
            name = r.get("label") or r["task"]
            if r["task"] not in name:  # baselines and ablation rows are labelled by learner
                name = f"{r['task']} α={r['alpha']:g}: {name}"
            figures = f"gap {r['gap_closure']:.2f}, KL {r['kl']:.2f}"
            if r.get("energy_distance_floor"):
                figures += f", ED/floor {r['energy_distance'] / r['energy_distance_floor']:.2f}"
            title = f"{name}\n{figures}"
            panels.append({"finetuned": s["finetuned"], "target": s.get("target"), "pretrained": s.get("pretrained"), "title": title})
    if panels:
        paths["samples"] = plots.sample_grid(os.path.join(out, "elegant_samples.png"), panels, "ELEGANT and baselines: fine-tuned vs exact target")
    for name in ("2d", "8d", "2d_alt"):
        pts = []
        for r in results.get("gmm", []):
            if r["task"] == name:
                pts.append({"kl": r["kl"], "reward": r["reward"], "label": f"α={r['alpha']:g}", "alpha": r["alpha"],
                            "group": name, "pretrained_reward": r["pretrained"]["reward"]})
        if pts:
            paths[f"pareto_{name}"] = plots.pareto_plot(os.path.join(out, f"elegant_pareto_{name}.png"), pts, f"ELEGANT {name}: reward vs KL")
    if results.get("memory"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for ckpt in (False, True):
            pts = [(r["num_steps"], r.get("peak_growth_mb")) for r in results["memory"] if r["checkpointing"] == ckpt and r.get("ok")]
            if pts:
                ax.plot(*zip(*pts), "o-", label="checkpointing" if ckpt else "plain back-prop")
        ax.set_xlabel("K (chain steps)")
        ax.set_ylabel("peak memory growth of one update (MB)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(out, "elegant_memory.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths["memory"] = path
    return paths


def run(args) -> int:
    import torch

    from rlft.config import ConfigError

    if args.iterations < 1 or args.eval_samples < 10 or args.threads < 1 or args.jobs < 1:
        raise ConfigError("--iterations must be >= 1, --eval-samples >= 10, --threads >= 1 and --jobs >= 1")
    torch.set_num_threads(args.threads)
    sections = list(args.sections or [s for s in SECTIONS if s != "digits"])
    if args.digits and "digits" not in sections:
        sections.append("digits")
    if "gmm" in sections and not (args.tasks and args.alphas and all(a > 0 for a in args.alphas)):
        raise ConfigError("--tasks and --alphas need at least one value each, and every alpha must be > 0")
    budget: dict[str, Any] = {}
    if args.quick:
        args.iterations = min(args.iterations, 6)
        args.eval_samples = min(args.eval_samples, 300)
        budget = {"value_starts": 64, "value_rollouts": 4, "value_iterations": 50, "init_iterations": 20, "batch_size": 64}
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {"quick": args.quick, "iterations": args.iterations, "eval_samples": args.eval_samples, "threads": args.threads}
    # the training sections go through one pool, so --jobs N keeps N workers busy across sections
    jobs: list[tuple[dict, dict, str]] = []
    parts: dict[str, slice] = {}
    cells = gmm_cells(args.tasks, args.alphas, args.seeds) if "gmm" in sections else []
    reuse = BASELINE_CELL in cells  # the baselines' ELEGANT row comes from the gmm section only if it runs that cell
    for name, make in (("gmm", lambda: gmm_jobs(budget, cells)), ("ablation", lambda: ablation_jobs(budget)),
                       ("baselines", lambda: baseline_jobs(budget, reuse))):
        if name in sections:
            new = make()
            parts[name] = slice(len(jobs), len(jobs) + len(new))
            jobs += new
    rows = run_jobs(jobs, args)
    if "gmm" in parts:
        results["gmm"] = finish_gmm(rows[parts["gmm"]], cells)
    if "ablation" in parts:
        results["ablation"] = finish_ablation(rows[parts["ablation"]])
    if "baselines" in parts:
        results["baselines"] = finish_baselines(rows[parts["baselines"]], results["gmm"][cells.index(BASELINE_CELL)] if reuse else None)
    failures = [r for r in rows if "error" in r]  # each run once, whichever sections show its row
    for name in parts:
        results[name] = [r for r in results[name] if "error" not in r]
    if args.seeds is not None and results.get("gmm"):
        results["gmm_seeds"] = seed_summary(results["gmm"])
    if failures:
        results["failures"] = failures
        for r in failures:
            _log(f"FAILED {r['label']}: {r['error']}")
    if "memory" in sections:
        results["memory"] = section_memory(args, args.quick)
    if "digits" in sections:
        results["digits"] = section_digits(args, args.quick)
    results["plots"] = make_plots(results, args.out)
    public = _public(results)
    from rlft.files import atomic_path

    with atomic_path(os.path.join(args.out, "results.json")) as tmp:
        tmp.write_text(json.dumps(public, indent=1, default=str))
    print_tables(results)
    if args.json:
        print(json.dumps(public, default=str))
    return 1 if failures else 0


def _public(obj: Any) -> Any:
    """Drops sample tensors (keys starting with '_') for JSON."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj
