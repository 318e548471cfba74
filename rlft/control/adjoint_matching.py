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

Options: `AdjointMatchingOptions`; machinery (windows, seeds, schedule, clipping, checkpoints): the base
`rlft.control.rollout.DifferentiableLearner`. Reward gradients count as reward queries (B per update).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from rlft.config import ConfigError
from rlft.control.networks import NetworkControl, score_coefficient
from rlft.control.options import TRAIN_OBJECTIVE, DifferentiableOptions
from rlft.control.rollout import DifferentiableLearner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import evaluate
from rlft.sampling import rollout

FORMAT = "rlft-adjoint-matching"
FORMAT_VERSION = 1
#: defaults (see AdjointMatchingOptions for what was measured)
DEFAULT_LR, DEFAULT_DRIFT_ITERATIONS, DEFAULT_MAX_GRAD_NORM = 3e-3, 1600, 0.0
#: rows (trajectories x steps) of one regression chunk for a network control: bounds the live activations of the
#: loss independently of K (a chunk is consumed, back-propagated and freed before the sweep goes on)
LOSS_ROWS = 16384
#: the largest memory mu a chain may have without a learned initial law (AdjointMatchingOptions.max_memory)
MATCHING_MAX_MEMORY = 0.01
#: trajectories and prior samples of the memorylessness check
MEMORY_PROBES, MEMORY_PRIOR_SAMPLES = 16, 4096

LOSS_WEIGHTINGS = ("path_kl", "uniform")
#: weight of each batch in the running quantile of `loss_clip_quantile`
CLIP_EMA = 0.1

REGRESSION_LOSS = "regression_loss"
TRAIN_REWARD = "train_reward"
TRAIN_KL = "train_kl"
ADJOINT_NORM = "adjoint_norm"


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
    max_memory: float = MATCHING_MAX_MEMORY
    """Refuse chains whose memory mu (share of x_K's linearised variance due to x_0, module docstring) exceeds this;
    1 turns the check off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"learner.loss_weighting must be one of {list(LOSS_WEIGHTINGS)} (got {self.loss_weighting!r})")
        if self.loss_clip_quantile is not None and not 0.0 < self.loss_clip_quantile < 1.0:
            raise ConfigError(f"learner.loss_clip_quantile must be in (0, 1) (got {self.loss_clip_quantile}); e.g. 0.99, or null for none")
        if not 0.0 <= self.max_memory <= 1.0:
            raise ConfigError(f"learner.max_memory must be in [0, 1] (got {self.max_memory}); e.g. 0.01, or 1 to skip the check")


#: the regression options a host without them (ELEGANT) runs with
MATCHING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdjointMatchingOptions)
                     if f.name in ("step_subset", "loss_weighting", "loss_clip_quantile")}


# -- the math (pure torch) -------------------------------------------------------------------------------------


def reward_gradient(reward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x) (B,), grad_x r(x) (B, *event)), both detached."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        r = evaluate(reward, x)
        (grad,) = torch.autograd.grad(r.sum(), x)
    return r.detach(), grad.detach()


def lean_adjoint_step(model: DiffusionModel, k: int, x: torch.Tensor, a_next: torch.Tensor,
                      cond: torch.Tensor | None = None) -> torch.Tensor:
    """a_k = (d m_k / d x)(x_k)^T a_{k+1}: one vector-Jacobian product through the PRETRAINED mean of step k.

    x: x_k (B, *event), detached; a_next: a_{k+1} (B, *event) -> a_k (B, *event), detached."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (a,) = torch.autograd.grad(model.mean(k, x, cond), x, a_next)
    return a.detach()


def lean_adjoint(model: DiffusionModel, path: torch.Tensor, a_final: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
    """All of a_0 .. a_K from a_K (the sweep of step 2, kept whole: for tests and small chains).

    path: x_0 .. x_K (B, K+1, *event); a_final: a_K (B, *event) -> (B, K+1, *event)."""
    a = [a_final]
    for k in reversed(range(path.shape[1] - 1)):
        a.append(lean_adjoint_step(model, k, path[:, k], a[-1], cond))
    return torch.stack(a[::-1], dim=1)  # (B, K+1, *event)


def regression_terms(delta: torch.Tensor, a_next: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|delta_k - s_k^2 a_{k+1}|^2 / s_k^2 per trajectory and step: delta, a_next (B, n, *event), std (n,) -> (B, n)."""
    var = std.to(delta.dtype).pow(2).reshape(1, -1, *([1] * (delta.dim() - 2)))  # (1, n, 1, ...)
    return ((delta - var * a_next).pow(2) / var).flatten(2).sum(2)


def regression_loss(delta: torch.Tensor, a_next: torch.Tensor, std: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-trajectory sum_k w_k |delta_k - s_k^2 a_{k+1}|^2 / s_k^2 over the given steps (w = 1 by default).

    delta, a_next: (B, n, *event) for n steps; std, weight: (n,) -> (B,)."""
    per_step = regression_terms(delta, a_next, std)  # (B, n)
    if weight is not None:
        per_step = per_step * weight.to(per_step.dtype)
    return per_step.sum(1)


@torch.no_grad()
def chain_memory(model: DiffusionModel, generator: torch.Generator, n: int = MEMORY_PROBES) -> float:
    """mu: the share of the pretrained chain's linearised variance of v.x_K that comes from x_0 (module docstring).

    n pretrained trajectories, one random direction v ~ N(0, I) each, the lean adjoint from a_K = v."""
    var0 = model.prior_sample(MEMORY_PRIOR_SAMPLES, generator).flatten(1).var(0)  # (D,)
    path = rollout(model, model.prior_sample(n, generator), generator=generator, keep_path=True).path  # (n, K+1, *event)
    a = torch.randn(path[:, -1].shape, generator=generator, device=path.device, dtype=path.dtype)
    noise = path.new_zeros(n)
    for k in reversed(range(model.num_steps)):
        noise += model.std(k) ** 2 * a.flatten(1).pow(2).sum(1)  # s_k^2 |Phi_{k+1}^T v|^2
        a = lean_adjoint_step(model, k, path[:, k], a)
    prior = (var0 * a.flatten(1).pow(2)).sum(1)
    return float(prior.sum() / (prior.sum() + noise.sum()))


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
        with torch.no_grad():  # 1. trajectories under the current control, detached states
            x_final, kl, path = self.drift_rollout(x0, seeds, keep_path=True)  # path: (B, K+1, *event)
        r, grad_r = reward_gradient(reward, x_final)  # 2. a_K = grad r(x_K) / alpha
        self.reward_queries += B
        a = grad_r / alpha
        weights = self.regression_steps()
        chunk = self.chunk_steps()
        params = self._drift_params
        grads = [torch.zeros_like(p) for p in params]
        total, queue = 0.0, []

        def consume() -> None:  # 3. this chunk's loss, back-propagated now and freed
            nonlocal total
            steps = [k for k, _ in queue][::-1]  # ascending
            a_next = torch.stack([t for _, t in queue][::-1], dim=1)  # (B, n, *event)
            w = torch.tensor([weights[k] for k in steps], dtype=path.dtype, device=path.device)  # (n,)
            std = torch.tensor([model.std(k) for k in steps], dtype=path.dtype, device=path.device)  # (n,)
            terms = regression_terms(self._deltas(steps, path[:, steps]), a_next, std)  # (B, n)
            if clip is not None:
                terms = torch.minimum(terms, self._clip_thresholds(steps, terms.detach()))
            loss = (terms * w).sum(1).mean()
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
            ADJOINT_NORM: float(grad_r.flatten(1).norm(dim=1).mean() / alpha),
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
