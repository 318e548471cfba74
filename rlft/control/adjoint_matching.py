"""Adjoint Matching (Domingo-Enrich et al. 2024, "Adjoint Matching", Alg. 1 and the lean adjoint ODE; S-MEME App. F,
Alg. 2) as a drift solver on rlft's transition chain (MATH.md §6).

Chain and objective (maximised), with x_0 from the prior:

    x_{k+1} = m_k(x_k) + delta_k(x_k) + s_k eps_k,        J = E[r(x_K)] - alpha sum_k E |delta_k|^2 / (2 s_k^2)

One update (`AdjointMatchingLearner.objective`):
  1. sample B trajectories under the CURRENT control without gradients (`drift_rollout` under torch.no_grad,
     keep_path) and detach the states x_0 .. x_K;
  2. the lean adjoint, backwards through the PRETRAINED mean only (one vector-Jacobian product per step,
     `lean_adjoint_step`):
         a_K = grad r(x_K) / alpha,        a_k = (d m_k / d x)(x_k)^T a_{k+1};
  3. the regression, consumed as the sweep reaches each step (so no step's network activations outlive its chunk):
         L(theta) = sum_k E | delta_theta(k, x_k) - s_k^2 a_{k+1} |^2 / s_k^2        (a_{k+1}, not a_k)
     and one Adam step down L.
Why a_{k+1}: at fixed x_k, max_delta E[V_{k+1}(m_k + delta + s_k eps)] - alpha |delta|^2/(2 s_k^2) has the first-order
condition delta = s_k^2 E[grad V_{k+1}(x_{k+1}) | x_k] / alpha, and grad V_{k+1} / alpha = E[a_{k+1} | x_{k+1}] (the
envelope theorem gives the same recursion as step 2). So the regression's fixed point is the chain's exact
drift-only optimum (tests/control/test_adjoint_matching.py pins it on a linear-Gaussian chain). Signs: the AM
paper's own convention is a(1) = -grad r, u* = -sigma^T a; S-MEME's Alg. 2 as printed descends f. Here a = +grad r /
alpha and delta* = +s^2 a, pinned by that test, not copied from either.

The fixed point is the tilted target exp(r/alpha) p_pre only when the pretrained chain is memoryless (x_0 carries no
information about x_K). `chain_memory` measures it: along random directions v at x_K, the share of the linearised
variance of v.x_K that comes from x_0,

    mu = E[ sum_d Var(x_0)_d (Phi_0^T v)_d^2 ] / E[ sum_d Var(x_0)_d (Phi_0^T v)_d^2 + sum_k s_k^2 |Phi_{k+1}^T v|^2 ],

with Phi_k^T v the lean adjoint started from v (the same VJPs). For a VP chain with DDPM variance and Gaussian data
N(0, v0) it is corr(x_0, x_K)^2 ~ a(T)^2 v0 (rlft's default schedule: a(T)^2 ~ 4e-5); a DDIM chain with eta < 1
or a short horizon (beta_max = 1: a(T)^2 = 0.58) remembers x_0. The learner refuses (ConfigError) when
mu > `max_memory`.

Optional (the AM paper's public practice, off by default): `step_subset` regresses on the last quarter of the steps
plus a random quarter of the others (those weighted by 1/p, so the loss stays unbiased for L); `loss_clip_quantile`
clips each (trajectory, step) term at a running per-step quantile. The adjoint is heavy-tailed where the pretrained
chain splits between modes (2-D bench task, pretrained paths, step 50 of 100: median |a| 0.44, 99 % 24, max 348):
those rare paths carry the signal that moves mass between modes, so clipping trades that signal for variance.

Where the default falls short of the issue's goal (>= 95 % of the gap, energy distance <= 2x floor), measured on
the bench's 2-D task at alpha = 0.1 (one seed, 2000 evaluation samples; `rlft bench adjoint-matching` for the tables):
- not the discretisation: the exact optimal control of the K = 100 chain (rlft.models.gmm.OptimalControl) evaluates
  to gap 0.98-1.00 and 0.9-1.2x the floor on every bench cell (2-D and 8-D, alpha 0.1 / 0.3 / 1);
- not the network, the optimiser or the schedule: the same update with the regression target s_k^2 a_{k+1}
  replaced by the exact delta*_k(x_k) (same states, network, Adam, 200 updates, cosine schedule) reaches gap 0.990,
  2.06x the floor, path KL 3.33 (optimum 3.2); Adjoint Matching itself after 200 updates: 0.874, 21.8x, KL 7.5;
- not parameter noise: Polyak averages of the parameters (EMA 0.9 / 0.99) evaluate no better (0.872 / 22.4x);
- so (our reading) it is the fixed-point iteration itself: the target s_k^2 E_u[a_{k+1} | x_k] is taken under the CURRENT control
  u, equals delta* only at u = u*, and the first iterates overshoot (KL 9.4 at 100 updates, 3x the optimum). On a
  linear-Gaussian chain its sensitivity to the later steps' controls is ~ lambda Sigma_k / alpha (Sigma_k: the
  variance still to come), i.e. grows like 1/alpha, which is where the default does worst. Annealing alpha
  geometrically from 1 to 0.1 over the first half of the updates did not help (200 updates: 0.884, 30x, KL 6.1),
  nor did lr 1e-3 (0.801, 177x, KL 3.7: the right size, mass still in the wrong modes) or batch 512 (0.888, 33x,
  KL 5.5); at batch 1024 the lean adjoint overflowed float32 on a rare path (non-finite gradient at update 53).

With the whole default schedule (1600 updates, 426 CPU s) the same task reaches gap 0.975 but 4.56x the floor (KL 3.80;
0.939 / 11.8x at 400 updates, 0.974 / 4.1x at 800): the gap goal is met there, the energy-distance goal (<= 2x) not;
alpha = 0.3: 0.941 / 2.47x, KL 2.52, 384 s (0.945 / 2.26x at 1200 updates).

Two attempts at the fixed point, both options (off by default; 2-D task, alpha = 0.1, 200 updates, one seed):
- backward sweep (`backward_sweep`): step k's target depends on the controls of steps >= k, so a front that moves
  from the last step back to step 0, with the steps before it uncontrolled in the training rollout, fits each step
  against laws already fitted after it (the optimal feedback law does not depend on the marginal of x_k). It is not
  a one-pass solve: step k's own delta_k moves its target by -s_k^2 P / alpha times its change (P: V_{k+1}'s
  curvature; x_{k+1} contains delta_k), so even one step alone is a fixed-point iteration that diverges undamped once
  s_k^2 P / alpha > 1 (tests pin the damped sweep at the optimum). Measured over half the updates: gap 0.894,
  88x the floor, KL 4.69 (default 0.874, 21.8x, KL 7.55; optimum KL 3.2): less overshoot, mode masses worse.
- importance-weighted target (`importance_mix`, rlft.control.lean_adjoint.importance_log_weights): its minimiser is
  delta* for ANY sampling control (pinned from a wrong control on the linear chain, 3e-5 off the optimum), but at
  alpha = 0.1 the weights e^{r/alpha} prod p_pre/p_u collapse onto a few paths: beta = 1 evaluates to gap -0.33 at
  200 updates (-0.65 at 50). Neither is the default.

Options: `AdjointMatchingOptions`; machinery (windows, seeds, schedule, clipping, checkpoints): the base
`rlft.control.rollout.DifferentiableLearner`. Reward gradients count as reward queries (B per update).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from rlft.config import ConfigError
from rlft.control.networks import NetworkControl, score_coefficient
from rlft.control.options import TRAIN_OBJECTIVE, DifferentiableOptions
from rlft.control.lean_adjoint import (  # noqa: F401 (the math, re-exported: am.lean_adjoint etc.)
    FrontControl, chain_memory, importance_log_weights, lean_adjoint, lean_adjoint_step, regression_loss, regression_terms,
    reward_gradient, self_normalised)
from rlft.control.rollout import DifferentiableLearner
from rlft.models.base import DiffusionModel

FORMAT = "rlft-adjoint-matching"
FORMAT_VERSION = 1
#: defaults (see AdjointMatchingOptions for what was measured)
DEFAULT_LR, DEFAULT_DRIFT_ITERATIONS, DEFAULT_MAX_GRAD_NORM = 3e-3, 1600, 0.0
#: rows (trajectories x steps) of one regression chunk for a network control: bounds the live activations of the
#: loss independently of K (a chunk is consumed, back-propagated and freed before the sweep goes on)
LOSS_ROWS = 16384
#: the largest memory mu a chain may have without a learned initial law (AdjointMatchingOptions.max_memory)
MATCHING_MAX_MEMORY = 0.01

LOSS_WEIGHTINGS = ("path_kl", "uniform")
#: weight of each batch in the running quantile of `loss_clip_quantile`
CLIP_EMA = 0.1

REGRESSION_LOSS = "regression_loss"
TRAIN_REWARD = "train_reward"
TRAIN_KL = "train_kl"
ADJOINT_NORM = "adjoint_norm"
#: mean and smallest (over steps) effective sample size of the importance weights, as a fraction of the batch
IMPORTANCE_ESS, IMPORTANCE_ESS_MIN = "importance_ess", "importance_ess_min"


@dataclasses.dataclass(frozen=True)
class AdjointMatchingOptions(DifferentiableOptions):
    """Adjoint Matching's options (the YAML `learner:` keys besides `type`); model-independent checks run here.

    `lr` None = 3e-3, `drift_iterations` None = 1600, `max_grad_norm` None = 0 (no clipping), `batch_size` 256.
    Measured on the bench's GMM tasks at alpha = 1 (one run each, 2 shared cores): on the 2-D task lr 1e-3 stalls at
    gap closure 0.68 (400 updates, with or without clipping at the 0.99 quantile, energy distance 60-110x the floor);
    lr 3e-3: 800 updates of 256 reach 0.91 / 1.8x the floor (8-D: 0.87 / 4.4x, after 1.3x at update 400: the mode
    masses move with the rare heavy-tailed adjoints), 1600 reach 0.93 / 1.5x in 352 s (8-D: 0.91 / 3.4x, 357 s).
    loss_weighting uniform at 800: 2-D 0.90 / 2.5x, 8-D 0.81 / 10x. Batch 512 at lr 3e-3 was worse at 200 updates
    (0.34) than 256 at 100 (0.68).
    """

    batch_size: int = 256
    """Trajectories per update (each costs one reward gradient)."""

    loss_weighting: str = "path_kl"
    """Per-step weight of the regression: path_kl (L as written, |delta - s^2 a|^2 / s^2, the path KL's metric) or
    uniform (each step divided by c_k^2 / s_k^2, i.e. |g - s^2 a / c_k|^2 for delta = c_k g: every noise level counts
    alike); a positive weight per step does not move the fixed point."""
    step_subset: bool = False
    """Regress on the last quarter of the steps plus a random quarter of the others (weighted 1/p) instead of all."""
    loss_clip_quantile: float | None = None
    """Clip each (trajectory, step) regression term at a running estimate of this quantile of that step's terms
    (e.g. 0.99; clipped terms give no gradient); None = no clipping."""
    backward_sweep: float = 0.0
    """Fraction of drift_iterations over which a front sweeps from the last step back to step 0 (module docstring,
    "Backward sweep"): steps before the front run uncontrolled in the training rollout and are left out of the
    regression; 0 = off (every step from the first update)."""
    importance_mix: float = 0.0
    """Weight beta of the importance-weighted target (rlft.control.lean_adjoint.importance_log_weights): each
    (trajectory, step) term is weighted (1 - beta) + beta w_k, w_k self-normalised over the batch, so beta = 1
    regresses on delta* for any sampling control; 0 = the plain fixed-point target."""
    max_memory: float = MATCHING_MAX_MEMORY
    """Refuse chains whose memory mu (share of x_K's linearised variance due to x_0, module docstring) exceeds this;
    1 turns the check off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"learner.loss_weighting must be one of {list(LOSS_WEIGHTINGS)} (got {self.loss_weighting!r})")
        if self.loss_clip_quantile is not None and not 0.0 < self.loss_clip_quantile < 1.0:
            raise ConfigError(f"learner.loss_clip_quantile must be in (0, 1) (got {self.loss_clip_quantile}); e.g. 0.99, or null for none")
        if not 0.0 <= self.importance_mix <= 1.0:
            raise ConfigError(f"learner.importance_mix must be in [0, 1] (got {self.importance_mix}); e.g. 0.5, or 0 for off")
        if not 0.0 <= self.backward_sweep <= 1.0:
            raise ConfigError(f"learner.backward_sweep must be in [0, 1] (got {self.backward_sweep}); e.g. 0.5, or 0 for off")
        if not 0.0 <= self.max_memory <= 1.0:
            raise ConfigError(f"learner.max_memory must be in [0, 1] (got {self.max_memory}); e.g. 0.01, or 1 to skip the check")


#: the regression options a host without them (ELEGANT) runs with
MATCHING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdjointMatchingOptions)
                     if f.name in ("step_subset", "loss_weighting", "loss_clip_quantile", "backward_sweep", "importance_mix")}


# -- the drift solver (shared by this learner and ELEGANT's drift_solver: adjoint_matching) ---------------------


class AdjointMatchingDrift:
    """Steps 1-3 of the module docstring as a mixin on `DifferentiableLearner`: `matching_objective()` is one update.

    The host supplies the reward and alpha (`matching_reward`, ELEGANT's f-divergence route trains on r_f at
    alpha = 1) and x_0 (`initial_states`: ELEGANT's learned initial law, else the prior). The options
    `step_subset`, `loss_weighting` and `loss_clip_quantile` are read from the host's options where it has them
    (AdjointMatchingOptions), else take AdjointMatchingOptions' defaults."""

    def matching_reward(self) -> tuple[Any, float]:
        """(reward, alpha) of the regression: a_K = grad r / alpha."""
        return self.reward, float(self.task.alpha)

    def _matching_option(self, name: str) -> Any:
        return getattr(self.options, name, MATCHING_DEFAULTS[name])

    def build_networks(self) -> None:
        super().build_networks()
        self.clip_thresholds: dict[int, float] = {}  # step -> running quantile of its regression terms

    def chunk_steps(self) -> int:
        """Steps per regression chunk: LOSS_ROWS rows for a network control, one step otherwise (a LoRA UNet)."""
        if isinstance(self._control, NetworkControl):
            return max(1, LOSS_ROWS // self.options.batch_size)
        return 1

    def sweep_front(self) -> int:
        """The first step the next update controls and regresses (`backward_sweep`): K - 1 at update 0, moving back
        linearly to 0 at update backward_sweep * drift_iterations; 0 when the sweep is off or over."""
        K, frac = self.model.num_steps, self._matching_option("backward_sweep")
        if frac <= 0.0:
            return 0
        done = (self.drift_updates + 1) / (frac * self.options.drift_iterations)
        return max(0, min(K - 1, math.ceil(K * (1.0 - done))))

    def regression_steps(self) -> dict[int, float]:
        """{step k: weight} of this update's loss: every step with weight 1, or with `step_subset` the last quarter
        plus each other step with probability 1/3 (a quarter of all steps), weighted 3; times s_k^2 / c_k^2 with
        loss_weighting uniform."""
        K = self.model.num_steps
        if not self._matching_option("step_subset") or K < 4:
            weights = {k: 1.0 for k in range(K)}
        else:
            last = K - K // 4
            p = (K // 4) / last
            draws = torch.rand(last, generator=self._rng).tolist()
            weights = {**{k: 1.0 / p for k in range(last) if draws[k] < p}, **{k: 1.0 for k in range(last, K)}}
        front = self.sweep_front()
        weights = {k: w for k, w in weights.items() if k >= front}
        if self._matching_option("loss_weighting") == "uniform":
            weights = {k: w * self.model.std(k) ** 2 / score_coefficient(self.model, k) ** 2 for k, w in weights.items()}
        return weights

    def _clip_thresholds(self, steps: list[int], terms: torch.Tensor) -> torch.Tensor:
        """The running per-step quantiles (an exponential average, weight CLIP_EMA, of each batch's quantile) after
        this batch: steps (n,), terms (B, n) -> (1, n)."""
        q = torch.quantile(terms, self._matching_option("loss_clip_quantile"), dim=0).tolist()  # (n,)
        for k, v in zip(steps, q):
            old = self.clip_thresholds.get(k)
            self.clip_thresholds[k] = v if old is None else (1.0 - CLIP_EMA) * old + CLIP_EMA * v
        return terms.new_tensor([self.clip_thresholds[k] for k in steps]).reshape(1, -1)

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "clip_thresholds": {str(k): v for k, v in self.clip_thresholds.items()}}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.clip_thresholds = {int(k): float(v) for k, v in state.get("clip_thresholds", {}).items()}

    def _deltas(self, steps: list[int], states: torch.Tensor) -> torch.Tensor:
        """delta_theta(k, x_k) for ascending steps and their states (B, n, *event) -> (B, n, *event)."""
        control = self._control
        if isinstance(control, NetworkControl):
            runs, i = [], 0
            for j in range(1, len(steps) + 1):  # split into runs of consecutive steps: one network call each
                if j == len(steps) or steps[j] != steps[j - 1] + 1:
                    runs.append(control.all_steps(states[:, i:j], steps[i]))
                    i = j
            return torch.cat(runs, dim=1)
        return torch.stack([control(k, states[:, j]) for j, k in enumerate(steps)], dim=1)

    def matching_objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Steps 1-3 of the module docstring; the regression's gradient is accumulated chunk by chunk in the sweep.

        Returns the linear surrogate -<theta, grad L> (its gradient is -grad L, so the base's `optimizer_step`, which
        ascends the objective, takes the Adam step down L with its norm check and clipping) and the metrics."""
        o, model = self.options, self.model
        reward, alpha = self.matching_reward()
        clip = self._matching_option("loss_clip_quantile")
        B, K = o.batch_size, model.num_steps
        gen = self.device_generator()
        x0 = self.initial_states(B, gen)
        seeds = self.window_seeds(len(self.windows()))
        control, front = self._control, self.sweep_front()
        if front > 0:  # the backward sweep: steps before the front run uncontrolled
            self._control = FrontControl(control, front)
        try:
            with torch.no_grad():  # 1. trajectories under the current control, detached states
                x_final, kl, path = self.drift_rollout(x0, seeds, keep_path=True)  # path: (B, K+1, *event)
        finally:
            sampler, self._control = self._control, control
        r, grad_r = reward_gradient(reward, x_final)  # 2. a_K = grad r(x_K) / alpha
        self.reward_queries += B
        a = grad_r / alpha
        mix, extra = self._matching_option("importance_mix"), {}
        if mix > 0.0:  # per (trajectory, step): (1 - beta) + beta w_k
            w, ess = self_normalised(importance_log_weights(model, sampler, path, r, alpha))  # (B, K), (K,)
            w = (1.0 - mix) + mix * w
            extra = {IMPORTANCE_ESS: float(ess.mean()), IMPORTANCE_ESS_MIN: float(ess.min())}
        weights = self.regression_steps()
        chunk = self.chunk_steps()
        params = self._drift_params
        grads = [torch.zeros_like(p) for p in params]
        total, queue = 0.0, []

        def consume() -> None:  # 3. this chunk's loss, back-propagated now and freed
            nonlocal total
            steps = [k for k, _ in queue][::-1]  # ascending
            a_next = torch.stack([t for _, t in queue][::-1], dim=1)  # (B, n, *event)
            step_w = torch.tensor([weights[k] for k in steps], dtype=path.dtype, device=path.device)  # (n,)
            std = torch.tensor([model.std(k) for k in steps], dtype=path.dtype, device=path.device)  # (n,)
            terms = regression_terms(self._deltas(steps, path[:, steps]), a_next, std)  # (B, n)
            if clip is not None:
                terms = torch.minimum(terms, self._clip_thresholds(steps, terms.detach()))
            if mix > 0.0:
                terms = terms * w[:, steps]
            loss = (terms * step_w).sum(1).mean()
            for g, d in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    g += d
            total += float(loss.detach())
            queue.clear()

        for k in reversed(range(K)):
            if k in weights:
                queue.append((k, a))  # step k regresses on a_{k+1}
            if queue and (len(queue) >= chunk or k == 0):
                consume()
            if k > 0:
                a = lean_adjoint_step(model, k, path[:, k], a)  # a_k
        surrogate = -sum((p * g).sum() for p, g in zip(params, grads))
        metrics = {
            REGRESSION_LOSS: total, TRAIN_REWARD: float(r.mean()), TRAIN_KL: float(kl.mean()),
            TRAIN_OBJECTIVE: float(r.mean() - alpha * kl.mean()),
            ADJOINT_NORM: float(grad_r.flatten(1).norm(dim=1).mean() / alpha), **extra,
        }
        return surrogate, metrics


def check_memoryless(model: DiffusionModel, seed: int, max_memory: float, name: str, fix: str) -> float:
    """mu of `chain_memory` (seeded); ConfigError when it exceeds max_memory (`fix`: what the user can do instead)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    memory = chain_memory(model, gen)
    if memory > max_memory:
        raise ConfigError(
            f"learner {name!r}: the pretrained chain is not memoryless: x_0 explains {memory:.3g} of x_K's linearised "
            f"variance (learner.max_memory = {max_memory}), so the regression's fixed point is not exp(r/alpha) p_pre "
            f"(e.g. DDIM with eta < 1, or a schedule with a(T)^2 not near 0); {fix}")
    return memory


# -- the learner ---------------------------------------------------------------------------------------------


class AdjointMatchingLearner(AdjointMatchingDrift, DifferentiableLearner):
    """Adjoint Matching on one task (see the module docstring for the algorithm and the options)."""

    Options: ClassVar[type] = AdjointMatchingOptions
    name: ClassVar[str] = "adjoint_matching"
    checkpoint_format: ClassVar[str] = FORMAT
    checkpoint_version: ClassVar[int] = FORMAT_VERSION

    def resolve_defaults(self, o: AdjointMatchingOptions) -> AdjointMatchingOptions:
        return dataclasses.replace(
            o, lr=DEFAULT_LR if o.lr is None else o.lr,
            max_grad_norm=DEFAULT_MAX_GRAD_NORM if o.max_grad_norm is None else o.max_grad_norm,
            drift_iterations=DEFAULT_DRIFT_ITERATIONS if o.drift_iterations is None else o.drift_iterations,
        )

    def check_model(self) -> None:
        super().check_model()
        if not self.task.alpha > 0:
            raise ConfigError(f"alpha must be > 0 for learner {self.name!r} (got {self.task.alpha}): a_K = grad r / alpha")
        if not getattr(self.reward, "differentiable", True):
            raise ConfigError(
                f"reward {getattr(self.reward, 'name', '?')!r} is not differentiable; learner {self.name!r} needs grad r "
                "(the lean adjoint starts at grad r / alpha): use learner type ppo_kl instead")
        if self.options.max_memory < 1.0:
            self.memory = check_memoryless(
                self.model, int(self.task.seed) + 1, self.options.max_memory, self.name,
                "use a DDPM chain (eta = 1) with a long enough schedule, learner type elegant with drift_solver: "
                "adjoint_matching (it learns the initial law), or raise learner.max_memory to accept the bias")

    def compute_derived(self) -> dict[str, Any]:
        return {**super().compute_derived(), "loss_chunk_steps": self.chunk_steps(),
                "memory": getattr(self, "memory", None)}

    def objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.matching_objective()
