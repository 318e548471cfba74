"""`rlft bench tfbind8`: reward over-optimisation on TFBind8, every learner side by side (ELEGANT Tables 2-3, Fig. 2).

    rlft bench tfbind8 [--budget small|full] [--alpha 0.01] [--seeds N] [--lr LR] [--scores FILE] [--learners a,b,...]
                       [--out DIR] [--json]
    rlft bench tfbind8 --sweep-results EXP/rlft_results.json [--out DIR] [--json]      # r* against alpha

The task (`rlft.tasks.tfbind8`): a VP diffusion on 8x4 one-hot DNA pretrained on all 8-mers, a learned reward r
(an MLP oracle on half of the sequences) and the exact binding score r* of the argmax-decoded sequence. Every
learner fine-tunes against r at the same alpha; the differentiable ones and PPO+KL get the same number of reward
queries for their drift (batch x updates = episodes); ELEGANT's value data are counted on top and reported.

Learners (names are the JSON keys):
    pretrained            the pretrained sampler
    no_kl                 max E[r] (AlignProp/DRaFT), no KL              rlft.control.elegant
    truncation            no KL, gradients through the last 20 % of steps (DRaFT-K, K = 0.8 T as in Table 3)
    random_k              no KL, gradients through the last k ~ U{1..K} steps (AlignProp)
    guidance              classifier guidance, P_t(top 10 % | x_t), level gamma (App. E.3)   rlft.guidance.classifier
    guidance_tweedie      TANG eq. 3.28: sigma^2/alpha grad r(Tweedie x0_hat)
    ppo_kl                PPO with the KL penalty (App. E.3, eq. 22-23)  rlft.rllib.ppo_kl
    elegant               ELEGANT Alg. 1 (value function, initial distribution, drift)
    elegant_drift         ELEGANT without initial-distribution learning (learn_init: false)
    elegant_f             elegant_drift with an f-divergence regulariser (TANG §4, --divergence, default chi2)
    adjoint_matching      Adjoint Matching's regression onto the lean adjoint of grad r (r is the oracle MLP on the
                          continuous x_K, so it has a gradient; r* is a lookup and is only scored)
elegant and elegant_drift are separate rows because x_0 of the VP chain (beta_max = 20) carries almost no
information about x_K: the value targets are mostly noise, and before `rlft.control.value` clamped a(x) to the
range of its targets the initial control chased the value network's extrapolation (measured: init KL 70-1000
nats, decoded r* 0.45-0.55 at alpha = 0.01); with the clamp both rows agree within their standard errors.
Learning rates: 3e-3 (cosine to 3e-4) with gradient-norm clipping at 1 for every differentiable learner, except
1e-3 for NO KL, Truncation and Random-K, whose states otherwise overflow float32 (see `Budget.lr_no_kl`).

Figures per learner (1000 samples per seed, mean over seeds, `_se` = standard error over seeds):
    reward (r of the continuous x_K, what the learners optimise), reward_decoded (r of the one-hot argmax),
    true_reward (r*), kl (path KL to the pretrained chain, incl. the initial law's), objective (r - alpha KL),
    diversity (mean pairwise Levenshtein distance of decoded sequences, ELEGANT §8), hamming_diversity,
    distinct_fraction, tv_to_target (total variation between the decoded samples and the exact tilted target;
    for elegant_f the exact f-divergence optimum `target_f`),
    reward_queries, seconds.
The exact optimum (`target`): p_tar(s) ∝ p_data(s) exp(r(s)/alpha) over the 65,536 sequences (r of the one-hot
s), with its E[r], E[r*], KL to p_data, J*, diversity and the TV an n-sample perfect sampler would show
(`tv_floor`); `target_true` tilts by r* instead (the best any sampler at this alpha can do with a perfect
oracle); `target_pretrained` tilts the pretrained model's empirical law of decoded sequences; `target_f`
is the exact f-divergence optimum p = (f')^{-1}((r - lambda)/alpha) p_data.
Plots: `histograms.png` (r and r* per learner, ELEGANT Fig. 2), and with --sweep-results `alpha_sweep.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ALL_LEARNERS = (
    "pretrained", "no_kl", "truncation", "random_k", "guidance", "guidance_tweedie", "ppo_kl", "elegant",
    "elegant_drift", "elegant_f", "adjoint_matching",
)
#: learners driven through `rlft.learners.build_learner`, with their `learner.type`
_LEARNER_TYPES = {"no_kl": "no_kl", "truncation": "truncation", "random_k": "random_k", "ppo_kl": "ppo_kl",
                  "elegant": "elegant", "elegant_drift": "elegant", "elegant_f": "elegant", "adjoint_matching": "adjoint_matching"}
# figure keys (the JSON contract beside rlft.evaluation's)
REWARD, REWARD_DECODED, TRUE_REWARD, KL, OBJECTIVE = "reward", "reward_decoded", "true_reward", "kl", "objective"
DIVERSITY, HAMMING, DISTINCT, TV = "diversity", "hamming_diversity", "distinct_fraction", "tv_to_target"
QUERIES, SECONDS = "reward_queries", "seconds"
_AVERAGED = (REWARD, REWARD_DECODED, TRUE_REWARD, KL, OBJECTIVE, DIVERSITY, HAMMING, DISTINCT, TV, QUERIES, SECONDS)


@dataclass(frozen=True)
class Budget:
    """Sizes of one benchmark run (the two presets are `BUDGETS`)."""

    num_steps: int
    """K, chain steps."""
    batch_size: int
    """Trajectories per drift update (and PPO episodes per iteration)."""
    updates: int
    """Drift updates (and PPO iterations): every learner gets batch_size x updates reward queries for its drift."""
    seeds: int
    """Seeds per learner (the +- is the standard error over them)."""
    samples: int
    """Evaluation samples per learner and seed (ELEGANT Fig. 2: 1000)."""
    value_starts: int
    """ELEGANT value data: starting points x_0."""
    value_rollouts: int
    """ELEGANT value data: pretrained rollouts per x_0 (App. E.2's log-mean-exp target)."""
    value_iterations: int
    """ELEGANT value regression steps."""
    init_iterations: int
    """ELEGANT initial-control updates."""
    init_steps: int
    """Steps of ELEGANT's initial-distribution SDE."""
    classifier_steps: int
    """Training steps of the guidance classifier."""
    lr: float = 3e-3
    """Drift learning rate of the KL-regularised differentiable learners (cosine to lr/10)."""
    lr_no_kl: float = 1e-3
    """Drift learning rate of NO KL, Truncation and Random-K: with nothing holding them back their states run off
    to |x| ~ 1e9 once r saturates at 1 (measured), and at 3e-3 overflow to NaN in float32 within 100 updates."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping of the differentiable learners (without it NO KL / Truncation can diverge to NaN)."""


BUDGETS = {
    "small": Budget(num_steps=25, batch_size=64, updates=100, seeds=2, samples=1000, value_starts=256, value_rollouts=4,
                    value_iterations=200, init_iterations=100, init_steps=10, classifier_steps=1000),
    "full": Budget(num_steps=50, batch_size=128, updates=300, seeds=3, samples=1000, value_starts=1024, value_rollouts=8,
                   value_iterations=1000, init_iterations=300, init_steps=20, classifier_steps=3000),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tfbind8", help="TFBind8: every learner against a learned reward, with the exact r* (ELEGANT Tables 2-3)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="small (< 15 min on 2 cores) or full")
    p.add_argument("--alpha", type=float, default=0.01, help="KL weight alpha of every learner (default 0.01, Table 3)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per learner (default: the budget's)")
    p.add_argument("--updates", type=int, default=None, help="drift updates / PPO iterations (default: the budget's)")
    p.add_argument("--lr", type=float, default=None,
                   help="drift learning rate of the KL-regularised differentiable learners (default: the budget's, 3e-3)")
    p.add_argument("--scores", default=None, help="raw PBM 8-mer file of another transcription factor (default: SIX6)")
    p.add_argument("--learners", default=",".join(ALL_LEARNERS), help=f"comma-separated subset of {','.join(ALL_LEARNERS)}")
    p.add_argument("--gamma", type=float, default=30.0, help="classifier-guidance level (ELEGANT Table 6: 30)")
    p.add_argument("--divergence", default="chi2", help="f-divergence of elegant_f (rlft.divergences names)")
    p.add_argument("--cache-dir", default=None, help="where the model and oracle are built (default $RLFT_CACHE or ~/.cache/rlft)")
    p.add_argument("--out", default="runs/tfbind8", help="directory of the plots and results.json (default runs/tfbind8)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for these small nets)")
    p.add_argument("--sweep-results", default=None, help="an `rlft sweep` rlft_results.json: draw r* against alpha instead")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


# -- figures ----------------------------------------------------------------------------------------


def sample_figures(x, kl, reward, alpha: float, target, queries: int, seconds: float) -> dict[str, float]:
    """The figures of one sampler's samples x (n, 8, 4) with path KLs kl (n,) (keys: module docstring)."""
    import torch

    import rlft.metrics as metrics
    from rlft.tasks import tfbind8 as tb

    with torch.no_grad():
        r = reward(x).double()
        tokens = tb.decode(x)
        out = {
            REWARD: float(r.mean()), REWARD_DECODED: float(reward.decoded(x).double().mean()),
            TRUE_REWARD: float(reward.true_reward(x).double().mean()), KL: float(kl.double().mean()),
        }
    out[OBJECTIVE] = out[REWARD] - alpha * out[KL]
    out[DIVERSITY] = metrics.levenshtein_diversity(tokens)
    out[HAMMING] = metrics.hamming_diversity(tokens)
    out[DISTINCT] = metrics.distinct_fraction(tokens)
    out[TV] = tb.total_variation(tb.empirical_distribution(x), target)
    out[QUERIES] = float(queries)
    out[SECONDS] = float(seconds)
    return out


def exact_targets(reward, alpha: float, n: int, pretrained_x=None, divergence: str | None = None) -> dict[str, Any]:
    """The exact optima over sequences at alpha (see the module docstring).

    "_p" holds the r-tilted law (65536,), and "_p_f" the f-divergence optimum when `divergence` is given.
    """
    import numpy as np
    import torch

    import rlft.metrics as metrics
    from rlft.tasks import tfbind8 as tb

    with torch.no_grad():
        r = reward(tb.all_sequences()).double().numpy()  # r of every one-hot sequence, (65536,)
    r_true = reward.lookup.table.double().cpu().numpy()
    base = tb.data_distribution()

    def summary(p: np.ndarray, base_law: np.ndarray, seed: int) -> dict[str, float]:
        idx = np.random.default_rng(seed).choice(len(p), size=n, p=p)
        tokens = torch.from_numpy(tb.decode_index(idx))
        return {
            REWARD: float(p @ r), TRUE_REWARD: float(p @ r_true), KL: tb.kl_divergence(p, base_law),
            DIVERSITY: metrics.levenshtein_diversity(tokens), HAMMING: metrics.hamming_diversity(tokens),
            DISTINCT: metrics.distinct_fraction(tokens), "tv_floor": tb.tv_floor(p, n, seed=seed),
            "effective_support": float(1.0 / (p * p).sum()),
        }

    p = tb.tilted_distribution(base, r, alpha)
    out: dict[str, Any] = {"alpha": alpha, **summary(p, base, 0), "optimal_objective": tb.optimal_objective(base, r, alpha), "_p": p}
    out["data"] = {REWARD: float(base @ r), TRUE_REWARD: float(base @ r_true)}
    out["target_true"] = summary(tb.tilted_distribution(base, r_true, alpha), base, 1)
    if pretrained_x is not None:
        emp = tb.empirical_distribution(pretrained_x)
        out["target_pretrained"] = {**summary(tb.tilted_distribution(emp, r, alpha), emp, 2),
                                    "num_pretrained": int(pretrained_x.shape[0])}
    if divergence is not None:
        from rlft.divergences import get_divergence, solve_lambda

        div = get_divergence(divergence)
        weights = np.round(base / base.min()).astype(int)  # design-bench rows: palindromes twice
        lam = solve_lambda(torch.from_numpy(np.repeat(r, weights)), alpha, div)
        w = div.f_prime_inv((torch.from_numpy(r) - lam) / alpha).double().numpy()
        pf = base * np.maximum(w, 0.0)
        out["_p_f"] = pf / pf.sum()
        out["target_f"] = {"divergence": divergence, "lambda": lam, **summary(out["_p_f"], base, 3)}
    return out


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Means over seeds of every figure, with standard errors `<key>_se`, and the per-seed rows."""
    out: dict[str, Any] = {}
    n = len(per_seed)
    for key in _AVERAGED:
        vals = [row[key] for row in per_seed if key in row]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        out[key] = mean
        if key in (REWARD, TRUE_REWARD, KL, DIVERSITY, REWARD_DECODED, TV):
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else float("nan")
            out[f"{key}_se"] = math.sqrt(var / len(vals)) if len(vals) > 1 else float("nan")
    out["num_seeds"] = n
    out["seeds"] = per_seed
    return out


# -- one learner ------------------------------------------------------------------------------------


def learner_spec(name: str, budget: Budget, divergence: str) -> dict[str, Any]:
    """The `learner:` mapping of a learner name at this budget (the same drift queries for every learner)."""
    if name == "ppo_kl":
        return {"type": "ppo_kl", "episodes_per_iteration": budget.batch_size, "num_envs": budget.batch_size}
    spec: dict[str, Any] = {
        "type": _LEARNER_TYPES[name], "batch_size": budget.batch_size, "drift_iterations": budget.updates,
        "drift_iterations_per_train_iteration": 1,
        "max_grad_norm": budget.max_grad_norm,
        "pathwise_weight": 1.0,  # every figure of this bench was measured with the back-propagated gradient alone
    }
    lr = budget.lr_no_kl if name in ("no_kl", "truncation", "random_k") else budget.lr
    spec.update(lr=lr, lr_final=lr / 10)
    if name == "adjoint_matching":
        del spec["pathwise_weight"]  # a regression, not a back-propagated objective
    if name == "truncation":
        spec["truncation_steps"] = max(1, round(0.2 * budget.num_steps))  # update on [0.8 T, T] (Table 3)
    if name == "elegant":
        spec.update(value_starts=budget.value_starts, value_rollouts=budget.value_rollouts,
                    value_iterations=budget.value_iterations, init_iterations=budget.init_iterations,
                    init_steps=budget.init_steps)
    if name in ("elegant_drift", "elegant_f"):
        spec["learn_init"] = False  # see the module docstring: the learned initial law is its own row
    if name == "elegant_f":
        spec["divergence"] = divergence
    return spec


def run_learner(name: str, task_data: dict[str, Any], model, reward, budget: Budget, seed: int):
    """Trains one learner for `budget.updates` iterations; returns (control, init, reward queries)."""
    from rlft.config import task_from_dict
    from rlft.learners import build_learner

    task = task_from_dict({**task_data, "seed": seed})
    learner = build_learner(task, model, reward)
    try:
        for _ in _progress(range(budget.updates), f"{name} seed {seed}"):
            learner.train_iteration()
        return learner.control(), learner.init_dist(), learner.reward_queries
    finally:
        algo = getattr(learner, "algo", None)
        if algo is not None:
            algo.stop()


def guidance_control(name: str, model, reward, alpha: float, budget: Budget, gamma: float, seed: int, table):
    """(control, labelled examples or reward queries) of a guidance baseline."""
    import numpy as np
    import torch

    from rlft.guidance.classifier import ClassifierGuidance, ExpectedRewardGuidance, train_noisy_classifier
    from rlft.tasks import tfbind8 as tb

    if name == "guidance_tweedie":
        return ExpectedRewardGuidance(model, reward, alpha), budget.samples * budget.num_steps
    train_idx, _ = tb.oracle_split(table, reward.settings)  # the labelled half the oracle saw
    y = table[train_idx]
    labels = torch.from_numpy((y >= np.percentile(y, 90)).astype(np.float32))  # "top 10 %" (App. E.3)
    clf, _ = train_noisy_classifier(tb.all_sequences()[train_idx], labels, model.schedule,
                                    steps=budget.classifier_steps, seed=seed, progress=True)
    return ClassifierGuidance(model, clf, gamma), len(train_idx)


# -- the command ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.out)
    if args.sweep_results:
        from rlft.tasks.tfbind8 import TFBind8LearnedReward

        reward = TFBind8LearnedReward(scores=args.scores, cache_dir=args.cache_dir)
        try:
            report = sweep_report(args.sweep_results, out_dir, reward)
        except ValueError as err:
            print(f"rlft bench tfbind8: {err}", file=sys.stderr)
            return 2
        _emit(report, args.json, _print_sweep)
        return 0
    names = [n.strip() for n in args.learners.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_LEARNERS]
    if bad:
        print(f"rlft bench tfbind8: unknown learner(s) {bad}; choose from {list(ALL_LEARNERS)}", file=sys.stderr)
        return 2
    if not args.alpha > 0:
        print(f"rlft bench tfbind8: --alpha must be > 0 (got {args.alpha})", file=sys.stderr)
        return 2
    budget = BUDGETS[args.budget]
    overrides = {k: v for k, v in (("seeds", args.seeds), ("updates", args.updates)) if v is not None}
    if any(v < 1 for v in overrides.values()):
        print(f"rlft bench tfbind8: --seeds and --updates must be >= 1 (got {overrides})", file=sys.stderr)
        return 2
    if args.lr is not None:
        if not (args.lr > 0 and math.isfinite(args.lr)):
            print(f"rlft bench tfbind8: --lr must be a finite number > 0 (got {args.lr})", file=sys.stderr)
            return 2
        overrides["lr"] = args.lr
    from dataclasses import replace

    budget = replace(budget, **overrides)
    report = benchmark(names, budget, args.alpha, args.scores, args.cache_dir, args.gamma, args.divergence, out_dir)
    report["budget_name"] = args.budget
    _emit(report, args.json, _print_table)
    return 0


def benchmark(names: list[str], budget: Budget, alpha: float, scores: str | None, cache_dir: str | None, gamma: float,
              divergence: str, out_dir: Path, model_options: dict[str, Any] | None = None,
              reward_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs the learners and writes results.json and histograms.png into out_dir; returns the report.

    `model_options` / `reward_options` are extra keys of the task's `model:` / `reward:` (e.g. a tiny
    `pretrain_steps` or oracle `epochs` in tests).
    """
    import torch

    from rlft.models import build_model
    from rlft.rewards.base import build_reward
    from rlft.sampling import sample
    from rlft.tasks.tfbind8_data import load_table

    start = time.perf_counter()
    table = load_table(scores)
    model_spec: dict[str, Any] = {"type": "tfbind8", **({"cache_dir": cache_dir} if cache_dir else {}), **(model_options or {})}
    reward_spec: dict[str, Any] = {"type": "tfbind8_learned", **({"scores": str(Path(scores).resolve())} if scores else {}),
                                   **({"cache_dir": cache_dir} if cache_dir else {}), **(reward_options or {})}
    task_data = {"model": model_spec, "reward": reward_spec, "alpha": alpha, "num_steps": budget.num_steps}
    from rlft.config import task_from_dict

    task = task_from_dict({**task_data, "learner": {"type": "elegant"}})
    model = build_model(task.model, budget.num_steps)
    reward = build_reward(task.reward, model=model)
    pre = sample(model, 4 * budget.samples, seed=10_000, desc="pretrained (target)")
    target = exact_targets(reward, alpha, budget.samples, pre.x, divergence if "elegant_f" in names else None)
    p_target = target.pop("_p")
    p_target_f = target.pop("_p_f", None)  # elegant_f's TV is to the f-divergence optimum it targets

    learners: dict[str, Any] = {}
    samples: dict[str, torch.Tensor] = {}
    missing: dict[str, str] = {}
    failures: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = []
        for seed in range(budget.seeds):
            t0 = time.perf_counter()
            try:
                control, init, queries = _train(name, task_data, model, reward, alpha, budget, gamma, divergence, seed, table)
            except ImportError as err:  # a learner whose module is not there yet
                missing[name] = str(err)
                break
            except (ArithmeticError, ValueError) as err:  # a run that diverged (RewardError is a ValueError)
                failures.setdefault(name, []).append({"seed": seed, "error": f"{type(err).__name__}: {err}"})
                continue
            out = sample(model, budget.samples, control=control, init=init, seed=1000 + seed, desc=f"{name} samples")
            p = p_target_f if name == "elegant_f" and p_target_f is not None else p_target
            rows.append(sample_figures(out.x, out.kl, reward, alpha, p, queries, time.perf_counter() - t0))
            if seed == 0:
                samples[name] = out.x
        if rows:
            learners[name] = aggregate(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "task": {"alpha": alpha, "num_steps": budget.num_steps, "scores": scores or "SIX6 (shipped)",
                 "oracle": reward.metrics, "budget": asdict(budget), "gamma": gamma, "divergence": divergence},
        "target": target, "learners": learners, "missing": missing, "failures": failures,
        "plots": {"histograms": histogram_plot(out_dir / "histograms.png", samples, reward, alpha)},
        "seconds": time.perf_counter() - start,
    }
    from rlft.files import atomic_path

    with atomic_path(out_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=float))
    return report


def _train(name, task_data, model, reward, alpha, budget, gamma, divergence, seed, table):
    """(control, init, queries) of one learner and seed."""
    if name == "pretrained":
        return None, None, 0
    if name.startswith("guidance"):
        control, queries = guidance_control(name, model, reward, alpha, budget, gamma, seed, table)
        return control, None, queries
    data = {**task_data, "learner": learner_spec(name, budget, divergence)}
    return run_learner(name, data, model, reward, budget, seed)


# -- plots ------------------------------------------------------------------------------------------


def histogram_plot(path: Path, samples: dict[str, Any], reward, alpha: float) -> str | None:
    """ELEGANT Fig. 2: per learner, histograms of r (blue) and r* (red) of its samples (seed 0)."""
    if not samples:
        return None
    import numpy as np
    import torch

    from rlft.plots import _figure, _save

    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    bins = np.linspace(0.0, 1.0, 41)
    for i, (name, x) in enumerate(samples.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        with torch.no_grad():
            r = reward(x).double().clamp(0, 1).numpy()
            rs = reward.true_reward(x).double().numpy()
        ax.hist(r, bins=bins, color="tab:blue", alpha=0.6, label="r (learned)")
        ax.hist(rs, bins=bins, color="tab:red", alpha=0.6, label="r* (exact)")
        ax.set_title(f"{name}\nr {r.mean():.2f}  r* {rs.mean():.2f}", fontsize=9)
        ax.set_xlim(0, 1)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"TFBind8, alpha = {alpha:g}: r and r* of {len(next(iter(samples.values())))} samples per learner", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def sweep_report(results_file: str | os.PathLike, out_dir: Path, reward) -> dict[str, Any]:
    """r, r* and KL of each trial of an `rlft sweep` over alpha, with the exact target's curve; draws alpha_sweep.png.

    Args:
        results_file: the sweep's rlft_results.json (trials with config.alpha, reward, true_reward, kl).
        out_dir: where alpha_sweep.png goes.
        reward: the sweep's `TFBind8LearnedReward` (the target curve tilts by its r).
    """
    import numpy as np
    import torch

    from rlft.plots import _figure, _save
    from rlft.tasks import tfbind8 as tb

    data = json.loads(Path(results_file).read_text())
    points = []
    for trial in data.get("trials", []):
        alpha = (trial.get("config") or {}).get("alpha")
        if alpha is None or not isinstance(trial.get(TRUE_REWARD), float):
            continue
        points.append({"alpha": float(alpha), REWARD: trial.get(REWARD), TRUE_REWARD: trial[TRUE_REWARD], KL: trial.get(KL),
                       "learner": ((trial.get("config") or {}).get("learner.type") or "")})
    if not points:
        raise ValueError(f"{results_file} holds no trials with an alpha and a true_reward; "
                         "run `rlft sweep tune_configs/tfbind8_alpha_sweep.yaml` first")
    points.sort(key=lambda p: p["alpha"])
    with torch.no_grad():
        r = reward(tb.all_sequences()).double().numpy()
    r_true, base = reward.lookup.table.double().numpy(), tb.data_distribution()
    grid = np.geomspace(min(p["alpha"] for p in points) / 2, max(p["alpha"] for p in points) * 2, 40)
    curve = [{"alpha": float(a), TRUE_REWARD: float(tb.tilted_distribution(base, r, a) @ r_true),
              REWARD: float(tb.tilted_distribution(base, r, a) @ r)} for a in grid]
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(grid, [c[TRUE_REWARD] for c in curve], color="tab:red", lw=1, label="exact target: E[r*]")
    ax.plot(grid, [c[REWARD] for c in curve], color="tab:blue", lw=1, ls="--", label="exact target: E[r]")
    ax.plot([p["alpha"] for p in points], [p[TRUE_REWARD] for p in points], "o-", color="tab:red", label="fine-tuned: r*")
    ax.plot([p["alpha"] for p in points], [p[REWARD] for p in points], "s--", color="tab:blue", label="fine-tuned: r")
    ax.axhline(float(base @ r_true), color="0.6", lw=0.8, label="pretrained (data): r*")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    ax.set_title("TFBind8: r* against alpha")
    path = _save(fig, out_dir / "alpha_sweep.png")
    return {"points": points, "target_curve": curve, "plots": {"alpha_sweep": path}}


# -- output -----------------------------------------------------------------------------------------


def _progress(it, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, file=sys.stderr)


def _emit(report: dict[str, Any], as_json: bool, printer) -> None:
    if as_json:
        print(json.dumps(report, default=float))
    else:
        printer(report)


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    v, se = row.get(key), row.get(f"{key}_se")
    if v is None:
        return "-"
    fmt = f".{digits}f" if abs(v) < 10 ** 5 else ".2g"  # NO KL's path KL runs to 1e18
    return f"{v:{fmt}}" + (f" ± {se:{fmt}}" if se is not None and math.isfinite(se) else "")


def _print_table(report: dict[str, Any]) -> None:
    t = report["task"]
    o = t["oracle"]
    print(f"TFBind8 ({t['scores']}), alpha = {t['alpha']:g}, K = {t['num_steps']}, budget {report.get('budget_name')}: "
          f"oracle r held-out corr {o.get('heldout_corr', float('nan')):.3f} "
          f"(top 10 %: {o.get('heldout_top10_corr', float('nan')):.3f})")
    head = (f"{'learner':17s} {'r':>15s} {'r (decoded)':>15s} {'r*':>15s} {'KL':>15s} {'div (Lev)':>9s} {'Hamming':>7s} "
            f"{'distinct':>8s} {'TV':>6s} {'queries':>8s} {'s':>6s}")
    print(head)
    rows = dict(report["learners"])
    tg = report["target"]
    rows["exact target"] = {**tg, TV: tg["tv_floor"]}
    rows["target (r*-tilt)"] = {**tg["target_true"], TV: tg["target_true"]["tv_floor"]}
    if "target_f" in tg:
        rows[f"target ({tg['target_f']['divergence']})"] = {**tg["target_f"], TV: tg["target_f"]["tv_floor"]}
    for name, row in rows.items():
        print(f"{name:17s} {_pm(row, REWARD):>15s} {_pm(row, REWARD_DECODED):>15s} {_pm(row, TRUE_REWARD):>15s} "
              f"{_pm(row, KL, 1):>15s} {row.get(DIVERSITY, float('nan')):9.2f} {row.get(HAMMING, float('nan')):7.2f} "
              f"{row.get(DISTINCT, float('nan')):8.3f} {row.get(TV, float('nan')):6.3f} {row.get(QUERIES, 0):8.0f} {row.get(SECONDS, 0):6.0f}")
    print(f"(exact target TV = the floor of a perfect {t['budget']['samples']}-sample sampler; KL of targets is over sequences)")
    if report.get("failures"):
        print(f"failed runs (left out of the means): {report['failures']}")
    if report.get("missing"):
        print(f"missing learners: {report['missing']}")
    print(f"histograms: {report['plots']['histograms']}  ({report['seconds']:.0f} s)")


def _print_sweep(report: dict[str, Any]) -> None:
    print(f"{'alpha':>8s} {'r':>7s} {'r*':>7s} {'KL':>8s}")
    for p in report["points"]:
        print(f"{p['alpha']:8.4g} {p[REWARD]:7.3f} {p[TRUE_REWARD]:7.3f} {p[KL] if p[KL] is not None else float('nan'):8.2f}")
    print(f"plot: {report['plots']['alpha_sweep']}")
