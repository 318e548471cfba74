"""ELEGANT (Alg. 1-4, App. E) on the differentiable-control base (rlft.control.rollout).

    J(u, nu) = E[r(x_K)] - alpha ( E[sum_k |delta_k|^2 / (2 s_k^2)] + KL(nu || nu_ini) )      (eq. 5, discretised)

Alg. 1, as `ElegantLearner.train_iteration` runs it:
  1. value  a ~ v*_0 = alpha log E_pre[exp(r/alpha) | x_0]    by regression on pretrained rollouts (Alg. 4, App. E.2;
                                                              rlft.control.value)
  2. init   q = argmax E[a(x_0)] - alpha KL(path on [-T, 0])  (eq. 10; rlft.control.initial)  -> nu_hat
  3. drift  u = argmax E[r(x_K)] - alpha sum_k KL_k           (eq. 11) with x_0 ~ nu_hat, by back-propagating
                                                              through the windowed rollout (App. E.1: Adam,
                                                              reparameterised noise)
The fine-tuned sampler (Alg. 2) is `rlft.sampling.sample(model, n, control=learner.control(),
init=learner.init_dist())`.

`train_iteration()`: the first call runs steps 1 and 2 (`setup()`, when the initial law is learned) and then
`drift_iterations_per_train_iteration` Adam updates of step 3; every later call runs only the updates. The
learning rate follows a cosine from `lr` to `lr_final` over `drift_iterations` updates (1200 with the default
pathwise_weight 0.25, 2000 with 1), and `drift_iterations_per_train_iteration` defaults to
ceil(drift_iterations / run.iterations): the runner's default 200 iterations run the schedule (6 or 10 a call).

Regulariser (`divergence`): "kl" is eq. 5. Any other f-divergence D_f(p || p_pre) of rlft.divergences follows
TANG Cor. 4.4: the reward becomes r_f = log (f')^{-1}((r - lambda)/alpha) (rlft.rewards.f_regularised), lambda
solved once on pretrained samples, and the KL machinery runs with alpha = 1.

Reward gradient (eq. 11): with `pathwise_weight` w the reward part of the gradient is w x pathwise (back-propagated)
+ (1 - w) x likelihood ratio,

    g_LR = (1/n) sum_i (r_i - b_i) grad_theta log p_theta(path_i),   b_i = (sum_j r_j - r_i) / (n - 1)

with log p_theta the Gaussian transitions' log density at the detached states (`path_log_prob`). The
leave-one-out baseline b_i does not depend on path_i, so g_LR is unbiased for grad E[r]; the batch mean
(b_i = mean_j r_j) would scale it by (1 - 1/n). The KL term is always back-propagated.

Drift solver (`drift_solver`): "backprop" is step 3 above; "adjoint_matching" solves eq. 11 by Adjoint Matching's
regression onto the lean adjoint instead (rlft.control.adjoint_matching: gradient-free rollouts, memory flat in K,
no reward-gradient mixing). Its fixed point is the drift-only optimum given x_0 for ANY initial law, so with the
learned nu_hat the pair (nu_hat, u) targets exp(r/alpha) p_pre even for a chain that remembers x_0, where plain
Adjoint Matching from the prior is biased.

Conditional tasks (`task.conditions`, MATH.md §8): the drift u(t, x, c), the value a(x_0, c) and the initial law
nu_hat(.|c) take the condition; each trajectory of steps 1-3 draws one training condition c (never a held-out one)
and is rewarded with r(x_K, c), so one control maximises the mean over training conditions of J(c).

Baselines (NO KL, Truncation, Random-K) are subclasses in rlft.control.baselines.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

import rlft.checkpoint as checkpoint
import rlft.control.adjoint_matching as am
from rlft.config import ConfigError
from rlft.control.initial import InitialControl
from rlft.control.options import TRAIN_OBJECTIVE, DifferentiableOptions
from rlft.control.rollout import DifferentiableLearner
from rlft.control.value import ValueNet, fit_value, value_dataset
from rlft.divergences import get_divergence, solve_lambda
from rlft.rewards.base import Reward, evaluate
from rlft.rewards.f_regularised import FRegularisedReward
from rlft.sampling import InitialDistribution, sample

FORMAT = "rlft-elegant"
#: 2: the state file is rlft.json (rlft.checkpoint); 1 wrote learner.json (same tensors, same keys)
FORMAT_VERSION = 2
LEGACY_STATE_FILES = {"learner.json": 1}
INIT_FILE = "init.safetensors"
VALUE_FILE = "value.safetensors"
#: pretrained samples used to solve TANG's lambda for an f-divergence other than KL
LAMBDA_SAMPLES = 4096
#: pathwise_weight of ELEGANT with a network control (see ElegantOptions.pathwise_weight)
DEFAULT_PATHWISE_WEIGHT = 0.25
#: learning rate with and without the KL term (see ElegantOptions.lr)
LR_WITH_KL, LR_WITHOUT_KL = 5e-3, 1e-3
#: drift solvers of step 3 (see the module docstring)
DRIFT_SOLVERS = ("backprop", "adjoint_matching")
#: the regression solver's name (an option value, not a learner type)
MATCHING_SOLVER = DRIFT_SOLVERS[1]
#: drift updates of the adjoint_matching solver (see ElegantOptions.drift_solver)
AM_DRIFT_ITERATIONS = 800

TRAIN_REWARD = "train_reward"
TRAIN_KL = "train_kl"
LAMBDA = "lambda"


@dataclasses.dataclass(frozen=True)
class ElegantOptions(DifferentiableOptions):
    """ELEGANT's options (the YAML `learner:` keys besides `type`); model-independent checks run at parsing.

    `lr` None = 5e-3 with the KL term, 1e-3 without it. Measured with the other defaults (`rlft bench elegant`,
    alpha = 1): at 1e-2 the mode weights of the 8-D mixture oscillate from update to update and end 3.2x the
    energy-distance floor; at 3e-3 the 2-D task is left under-trained (2.5x); 5e-3 gives 1.1x and 1.7x. Without
    the KL term nothing bounds the control: at 5e-3 (no clipping) NO KL on the 2-D task ended 2000 updates at
    reward -1.68 with gradient norm 16, and Truncation's path KL reached 5e18; at 1e-3 with clipping at 1 NO KL
    reached reward -0.11. `max_grad_norm` None = 0 with the KL term, 1 without it. `drift_iterations` None =
    1200 with pathwise_weight < 1, 2000 with 1 (an update with the likelihood-ratio pass costs 1.6-1.75x as
    much, so both fit the same time).

    `pathwise_weight` None = 0.25 with a network control, 1 on LoRA adapters (there the second pass is a second
    UNet pass per step, unmeasured). The pathwise gradient of the mass in each mode is carried by the few
    trajectories that cross between modes, as rare updates with 10-70x the median gradient norm, which leave
    the mode masses see-sawing; every trajectory contributes to the likelihood-ratio term. Measured (bench
    `train_run`, alpha = 1, one run each, in-sample baseline): with w = 1 and 2000 updates the 2-D task at seed 0
    ends at 2.82x the energy-distance floor and the 8-D task at seed 5 at gap closure 0.755 and 12.8x; w = 0.5
    with 1200 updates: 1.49x and 0.949 / 2.18x; w = 0.25 with 1200 updates: 1.30x and 0.938 / 1.31x, in the same
    time as w = 1 with 2000.
    """

    learn_init: bool = True
    """Learn the initial distribution (steps 1-2); needs the KL term."""
    init_steps: int = 20
    """Steps J of the initial-distribution SDE on [-T, 0]."""
    init_iterations: int = 300
    """Adam updates of the initial control (eq. 10)."""
    init_lr: float = 1e-3
    """Learning rate of the initial control."""
    init_batch_size: int = 256
    """Samples per initial-control update."""
    value_starts: int = 512
    """Starting points x_0 of the value data set (Alg. 4)."""
    value_rollouts: int = 16
    """Pretrained rollouts per starting point in the log-mean-exp target (App. E.2; 1 = Alg. 4)."""
    value_iterations: int = 1000
    """Adam updates of the value regression."""
    value_lr: float = 1e-3
    """Learning rate of the value regression."""
    kl_penalty: bool = True
    """Keep the alpha-weighted KL (the task's alpha) in the drift loss; false trains at alpha = 0."""
    divergence: str = "kl"
    """The regulariser D_f(p || p_pre): kl, or an f-divergence of rlft.divergences (forward_kl, chi2, gamma:0.5, ...)."""
    pathwise_weight: float | None = None
    """Weight w in [0, 1] of the back-propagated reward gradient, the rest being the likelihood-ratio estimator
    (see the class docstring); None = 0.25 with a network control, 1 on a LoRA adapter."""
    drift_solver: str = "backprop"
    """Step 3's solver: backprop (eq. 11 by back-propagating through the rollout) or adjoint_matching (regression
    onto the lean adjoint; lr None = 3e-3 and max_grad_norm None = 0 as type adjoint_matching, drift_iterations
    None = 800: with ELEGANT's batch of 512 as many trajectories as type adjoint_matching's 1600 x 256)."""

    POSITIVE: ClassVar[tuple[str, ...]] = DifferentiableOptions.POSITIVE + ("init_lr", "value_lr")
    AT_LEAST_ONE: ClassVar[tuple[str, ...]] = DifferentiableOptions.AT_LEAST_ONE + (
        "init_steps", "init_batch_size", "value_starts", "value_rollouts")
    AT_LEAST_ZERO: ClassVar[tuple[str, ...]] = DifferentiableOptions.AT_LEAST_ZERO + ("init_iterations", "value_iterations")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.learn_init and not self.kl_penalty:
            raise ConfigError(
                "learner.learn_init needs the KL term (kl_penalty false trains at alpha = 0, where the optimal initial law "
                "is degenerate); set learn_init: false or kl_penalty: true"
            )
        if self.pathwise_weight is not None and not 0.0 <= self.pathwise_weight <= 1.0:
            raise ConfigError(f"learner.pathwise_weight must be in [0, 1] (got {self.pathwise_weight}); 1 = pure back-propagation")
        try:
            div = get_divergence(self.divergence)
        except ValueError as err:
            raise ConfigError(f"learner.divergence: {err}") from None
        if not self.kl_route(div) and not self.kl_penalty:
            raise ConfigError(f"learner.divergence {self.divergence!r} needs the KL machinery (kl_penalty: true, type elegant)")
        if self.drift_solver not in DRIFT_SOLVERS:
            raise ConfigError(f"learner.drift_solver must be one of {list(DRIFT_SOLVERS)} (got {self.drift_solver!r})")
        if self.matching_drift and not self.kl_penalty:
            raise ConfigError("learner.drift_solver adjoint_matching needs the KL term (its adjoint starts at grad r / alpha); "
                              "set kl_penalty: true or drift_solver: backprop")
        if self.lr is None and self.lr_final > self.default_lr():
            raise ConfigError(f"learner.lr_final must be <= learner.lr (got lr_final={self.lr_final}, default lr={self.default_lr()})")

    @staticmethod
    def kl_route(div) -> bool:
        """Whether a divergence is eq. 5's KL itself (no TANG reward transform)."""
        return div.name in ("kl", "reverse_kl")

    @property
    def matching_drift(self) -> bool:
        """Whether step 3 is solved by Adjoint Matching's regression (drift_solver adjoint_matching)."""
        return self.drift_solver == MATCHING_SOLVER

    def default_lr(self) -> float:
        if self.matching_drift:
            return am.DEFAULT_LR
        return LR_WITH_KL if self.kl_penalty else LR_WITHOUT_KL


class ElegantLearner(am.AdjointMatchingDrift, DifferentiableLearner):
    """ELEGANT on one task (see the module docstring for the algorithm and the options)."""

    Options: ClassVar[type] = ElegantOptions
    name: ClassVar[str] = "elegant"
    checkpoint_format: ClassVar[str] = FORMAT
    checkpoint_version: ClassVar[int] = FORMAT_VERSION
    checkpoint_legacy: ClassVar[dict[str, int]] = LEGACY_STATE_FILES
    supports_conditions: ClassVar[bool] = True
    architecture_options: ClassVar[tuple[str, ...]] = DifferentiableLearner.architecture_options + ("learn_init", "init_steps")

    # -- options --------------------------------------------------------------------------------------
    def default_pathwise_weight(self) -> float:
        return 1.0 if self.uses_lora else DEFAULT_PATHWISE_WEIGHT

    def resolve_defaults(self, o: ElegantOptions) -> ElegantOptions:
        if o.matching_drift:
            o = dataclasses.replace(
                o, max_grad_norm=am.DEFAULT_MAX_GRAD_NORM if o.max_grad_norm is None else o.max_grad_norm,
                drift_iterations=AM_DRIFT_ITERATIONS if o.drift_iterations is None else o.drift_iterations)
        if o.lr is None:
            o = dataclasses.replace(o, lr=o.default_lr())
        if o.max_grad_norm is None:
            o = dataclasses.replace(o, max_grad_norm=0.0 if o.kl_penalty else 1.0)
        if o.pathwise_weight is None:
            o = dataclasses.replace(o, pathwise_weight=self.default_pathwise_weight())
        if o.drift_iterations is None:
            o = dataclasses.replace(o, drift_iterations=1200 if o.pathwise_weight < 1.0 else 2000)
        return o

    def check_model(self) -> None:
        super().check_model()
        if self.options.kl_penalty and not self.task.alpha > 0:
            raise ConfigError(
                f"alpha must be > 0 (got {self.task.alpha}) when the learner keeps the KL term; use alpha = 0 only with type no_kl")
        if self.conditions is not None and not ElegantOptions.kl_route(get_divergence(self.options.divergence)):
            raise ConfigError(f"learner.divergence {self.options.divergence!r} with conditions: TANG's lambda would be needed "
                              "per condition, which is not implemented; use divergence: kl in a conditional task")
        if not getattr(self.reward, "differentiable", True):
            raise ConfigError(
                f"reward {getattr(self.reward, 'name', '?')!r} is not differentiable; learner {self.name!r} back-propagates "
                "through the reward: use an RLlib learner (ppo_kl, fpg) instead"
            )
        if self.options.matching_drift and not self.options.learn_init:
            am.check_memoryless(self.model, int(self.task.seed) + 1, am.MATCHING_MAX_MEMORY, self.name,
                                "set learner.learn_init: true (the learned initial law removes the bias)")

    def compute_derived(self) -> dict[str, Any]:
        return {**super().compute_derived(), "pathwise_weight": self.options.pathwise_weight, "train_alpha": self.train_alpha}

    def train_conditions(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """One TRAINING condition per trajectory (n, d) in the model's dtype, or None (unconditional: no random draw,
        so an unconditional run's numbers are unchanged)."""
        return None if self.conditions is None else self.conditions.sample(n, gen, self.model.dtype).to(self.model.device)

    # -- networks -------------------------------------------------------------------------------------
    def build_networks(self) -> None:
        super().build_networks()
        o, model = self.options, self.model
        self.train_alpha = float(self.task.alpha) if o.kl_penalty else 0.0
        self.train_reward: Reward = self.reward
        self.lambda_: float | None = None
        # steps 1-2 (value network and initial control), only when the initial law is learned
        self.value_net: ValueNet | None = None
        self.init_control: InitialControl | None = None
        if o.learn_init:
            self.value_net = ValueNet(model.event_shape, o.hidden, o.depth, self.cond_shape).to(device=model.device, dtype=model.dtype)
            self.init_control = InitialControl(model, o.init_steps, o.hidden, o.depth, self.cond_shape).to(device=model.device, dtype=model.dtype)

    def init_dist(self) -> InitialDistribution | None:
        """nu_hat once the initial control has been trained; before that the prior nu_ini (None)."""
        return self.init_control if (self.init_control is not None and self.setup_done) else None

    # -- steps 1-2: value function and initial distribution ---------------------------------------------
    def setup(self) -> dict[str, float]:
        o = self.options
        start = time.perf_counter()
        out: dict[str, float] = {}
        if not ElegantOptions.kl_route(get_divergence(o.divergence)):
            if self.lambda_ is None:
                self.lambda_ = self._solve_lambda()
            self._use_f_reward()
            out[LAMBDA] = self.lambda_
        if o.learn_init:
            gen = self.device_generator()
            cond = self.train_conditions(o.value_starts, gen)  # (N, d) or None
            x0, y, queries = value_dataset(self.model, self.train_reward, self.train_alpha, o.value_starts, o.value_rollouts, gen,
                                           cond=cond)
            self.reward_queries += queries
            out.update(fit_value(self.value_net, x0, y, o.value_iterations, gen, lr=o.value_lr, cond=cond))
            out["value_target_std"] = float(y.std()) if y.numel() > 1 else 0.0
            out.update(self._fit_init(gen))
        out["setup_time"] = time.perf_counter() - start
        return out

    def _use_f_reward(self) -> None:
        """TANG Cor. 4.4: train on r_f with the KL machinery at alpha = 1."""
        self.train_reward = FRegularisedReward(self.reward, self.options.divergence, self.task.alpha, self.lambda_)
        self.train_alpha = FRegularisedReward.kl_alpha

    @torch.no_grad()
    def _solve_lambda(self) -> float:
        seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        x = sample(self.model, LAMBDA_SAMPLES, seed=seed, progress=False, desc="pretrained (lambda)").x
        r = evaluate(self.reward, x.to(self.model.device))
        self.reward_queries += LAMBDA_SAMPLES
        return solve_lambda(r, self.task.alpha, self.options.divergence)

    def _fit_init(self, gen: torch.Generator) -> dict[str, float]:
        """Eq. 10: max_q E[a(x_0)] - alpha KL with the value network frozen."""
        o = self.options
        self.value_net.requires_grad_(False)
        opt = torch.optim.Adam(self.init_control.net.parameters(), lr=o.init_lr)
        parts: dict[str, float] = {}
        for i in range(o.init_iterations):
            lr = o.init_lr * 0.5 * (1.0 + math.cos(math.pi * i / o.init_iterations))
            for group in opt.param_groups:
                group["lr"] = lr
            cond = self.train_conditions(o.init_batch_size, gen)
            obj, parts = self.init_control.objective(self.value_net, self.train_alpha, o.init_batch_size, gen, cond)
            opt.zero_grad(set_to_none=True)
            (-obj).backward()
            opt.step()
        return parts

    # -- step 3: the drift (eq. 11) -----------------------------------------------------------------------
    def drift_objective(self, n: int, grad_start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Monte-Carlo batch of eq. 11: (surrogate scalar, r (n,), path KL (n,)), differentiable.

        The surrogate's value is J_train = mean r - alpha mean KL; its gradient is J_train's, with the reward part
        mixed from the pathwise and the likelihood-ratio estimators when `pathwise_weight` < 1 (the likelihood-ratio
        term is built from log p - (log p).detach(), which is zero, so it changes the gradient and not the value).

        Steps: 1. x_0 from nu_hat (or the prior) and one seed per window; 2. the windowed rollout (and the detached
        path for the likelihood-ratio term); 3. r(x_K); 4. the leave-one-out advantage r_i - b_i times
        grad log p_theta(path_i) (module docstring)."""
        gen = self.device_generator()
        cond = self.train_conditions(n, gen)  # (n, d): one training condition per trajectory, or None
        x0 = self.initial_states(n, gen, cond)
        seeds = self.window_seeds(len(self.windows(grad_start)))
        w = self.options.pathwise_weight
        if w < 1.0:
            x, kl, path = self.drift_rollout(x0, seeds, grad_start, cond=cond, keep_path=True)
        else:
            x, kl = self.drift_rollout(x0, seeds, grad_start, cond=cond)
        r = evaluate(self.train_reward, x, cond=cond)
        self.reward_queries += n
        reward_term = r.mean()
        if w < 1.0:
            advantage = leave_one_out_advantage(r).detach()
            logp = self.path_log_prob(path, cond)
            score_term = (advantage * (logp - logp.detach())).mean()  # value 0, gradient g_LR
            reward_term = w * r.mean() + (1.0 - w) * (r.mean().detach() + score_term)
        return reward_term - self.train_alpha * kl.mean(), r, kl

    def matching_reward(self) -> tuple[Reward, float]:
        return self.train_reward, self.train_alpha

    def objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        if self.options.matching_drift:
            return self.matching_objective()
        grad_start = self.grad_start()
        obj, r, kl = self.drift_objective(self.options.batch_size, grad_start)
        return obj, {TRAIN_OBJECTIVE: float(obj.detach()), TRAIN_REWARD: float(r.detach().mean()), TRAIN_KL: float(kl.detach().mean())}

    def nonfinite_hint(self) -> str:
        if self.options.kl_penalty:
            return ""
        return "; without the KL term nothing bounds the control, so set kl_penalty: true or use type elegant"

    # -- checkpoints ------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "lambda": self.lambda_}

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        self.lambda_ = state.get("lambda")
        if self.setup_done and self.lambda_ is not None:
            self._use_f_reward()

    def save_networks(self, out: Path) -> None:
        super().save_networks(out)
        if self.init_control is not None:
            checkpoint.save_module(out / INIT_FILE, self.init_control.net)
            checkpoint.save_module(out / VALUE_FILE, self.value_net)

    def load_networks(self, src: Path) -> None:
        super().load_networks(src)
        if self.init_control is not None:
            checkpoint.load_module(src / INIT_FILE, self.init_control.net, self.model.device)
            checkpoint.load_module(src / VALUE_FILE, self.value_net, self.model.device)


def leave_one_out_advantage(r: torch.Tensor) -> torch.Tensor:
    """r_i - (sum_j r_j - r_i) / (n - 1): the advantage with a baseline independent of sample i, (n,) -> (n,).

    = n/(n-1) (r_i - mean r); with n = 1 there is no other sample and the advantage is 0."""
    n = r.shape[0]
    if n < 2:
        return torch.zeros_like(r)
    return r - (r.sum() - r) / (n - 1)
