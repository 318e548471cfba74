"""ELEGANT (ELEGANT Alg. 1-4, App. E) as a differentiable-control learner, with its baselines in one place.

    J(u, nu) = E[r(x_K)] - alpha ( E[sum_k |delta_k|^2 / (2 s_k^2)] + KL(nu || nu_ini) )      (eq. 5, discretised)

Alg. 1, as `ElegantLearner.train_iteration` runs it:
  1. value  a ~ v*_0 = alpha log E_pre[exp(r/alpha) | x_0]    by regression on pretrained rollouts (Alg. 4, App. E.2;
                                                              rlft.control.value)
  2. init   q = argmax E[a(x_0)] - alpha KL(path on [-T, 0])  (eq. 10; rlft.control.initial)  -> nu_hat
  3. drift  u = argmax E[r(x_K)] - alpha sum_k KL_k           (eq. 11) with x_0 ~ nu_hat, by back-propagating
                                                              through `rlft.sampling.rollout` (App. E.1: Adam,
                                                              reparameterised noise)
The fine-tuned sampler (Alg. 2) is `rlft.sampling.sample(model, n, control=learner.control(),
init=learner.init_dist())`.

`train_iteration()` semantics: the first call runs steps 1 and 2 (when the initial law is learned) and then
`drift_iterations_per_train_iteration` Adam updates of step 3; every later call runs only that many drift
updates. The drift learning rate follows a cosine from `lr` to `lr_final` over `drift_iterations` updates and
stays at `lr_final` afterwards. The defaults (1200 drift updates = 200 calls of 6 for elegant; 2000 = 200 calls
of 10 for the baselines, whose updates cost less) are what the runner's default `run.iterations: 200` performs.

Controls: for vector and sequence models a zero-initialised network g_theta with delta_k = c_k g_theta(t_k, x)
(rlft.control.networks); for diffusers chains (`add_lora`) a peft LoRA adapter (only the adapter trains).

Baselines (`learner.type`), same code path:
  elegant     the above (`learn_init: false` is the ablation without initial-distribution learning)
  no_kl       alpha = 0 in training and no initial learning (AlignProp / DRaFT); J is still reported at the
              task's alpha by `evaluate()`
  truncation  gradients flow only through the last `truncation_steps` steps (DRaFT-K)
  random_k    gradients flow through the last k ~ U{1..K} steps, k redrawn every update (AlignProp)
truncation and random_k maximise the reward alone, as in ELEGANT §8 (set `kl_penalty: true` for the KL term).
Learners without the KL term default to a smaller step (lr 1e-3) and gradient clipping at 1 (see `ElegantOptions.lr`).
`divergence` other than "kl" regularises with that f-divergence instead: the reward becomes TANG's
r_f = log (f')^{-1}((r - lambda)/alpha) (rlft.divergences) with lambda solved on pretrained samples, and the
KL machinery runs with alpha = 1 (TANG Cor. 4.4).

Reward gradient: back-propagated through the chain (pathwise); with `pathwise_weight` w < 1 (elegant's default
is 0.25) the reward part is w x pathwise + (1 - w) x likelihood-ratio, E[(r - mean r) grad_theta log p_theta(path)]
with log p_theta the Gaussian transitions' log density at the detached states (`path_log_prob`); both are
unbiased for the same gradient.

Memory: with `checkpointing: true` the chain is cut into windows of `segment_steps` steps and each window is
recomputed in the backward pass (torch.utils.checkpoint); the noise of a window is drawn from its own seed, so
the recomputation sees the same noise and the gradients equal plain back-propagation's.

Checkpoints are data: safetensors for the networks, the optimisers' tensors and the RNG state, and JSON for
the options, counters and the task that produced them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from rlft.config import ConfigError, TaskConfig
from rlft.control.initial import InitialControl
from rlft.control.networks import NETWORK_KINDS, NetworkControl, build_control_net
from rlft.control.value import ValueNet, fit_value, value_dataset
from rlft.files import atomic_path
from rlft.learners import Learner, register_learner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward, evaluate
from rlft.sampling import Control, InitialDistribution, rollout

FORMAT = "rlft-elegant"
FORMAT_VERSION = 1
STATE_FILE = "learner.json"
CONTROL_FILE = "control.safetensors"
INIT_FILE = "init.safetensors"
VALUE_FILE = "value.safetensors"
OPTIM_FILE = "optim.safetensors"
LORA_DIR = "lora"
LEARNER_TYPES = ("elegant", "no_kl", "truncation", "random_k")
#: pretrained samples used to solve TANG's lambda for an f-divergence other than KL
LAMBDA_SAMPLES = 4096

# training-metric keys (what train_iteration returns)
TRAIN_OBJECTIVE = "train_objective"
TRAIN_REWARD = "train_reward"
TRAIN_KL = "train_kl"
LR = "lr"
GRAD_NORM = "grad_norm"
GRAD_NORM_MAX = "grad_norm_max"
DRIFT_UPDATES = "drift_updates"
#: pathwise_weight of type elegant with a network control (see ElegantOptions.pathwise_weight)
DEFAULT_PATHWISE_WEIGHT = 0.25


@dataclasses.dataclass(frozen=True)
class ElegantOptions:
    """The learner's options (the YAML `learner:` keys besides `type`), validated at construction."""

    lr: float | None = None
    """Adam learning rate of the drift control at the start of the cosine schedule; None = 5e-3 with the KL term,
    1e-3 without it (no_kl, and truncation / random_k unless kl_penalty is set).

    Measured with the other defaults (`rlft bench elegant`, alpha = 1): at 1e-2 the mode weights of the 8-D
    mixture oscillate from update to update and end 3.2x the energy-distance floor; at 3e-3 the 2-D task is
    left under-trained (2.5x); 5e-3 gives 1.1x and 1.7x. Without the KL term nothing bounds the control: at 5e-3
    (no clipping) NO KL on the 2-D task ended 2000 updates at reward -1.68 with gradient norm 16, and Truncation's
    path KL reached 5e18 (states run off and back); at 1e-3 with clipping at 1 NO KL reached reward -0.11."""
    lr_final: float = 1e-4
    """Drift learning rate at the end of the schedule (and after it)."""
    batch_size: int = 512
    """Trajectories per drift update."""
    drift_iterations: int | None = None
    """Length of the learning-rate schedule, in drift updates (training may continue past it at lr_final);
    None = 1200 with pathwise_weight < 1, 2000 with 1 (an update with the likelihood-ratio pass costs 1.6-1.75x
    as much, so both fit the same time)."""
    drift_iterations_per_train_iteration: int | None = None
    """Drift updates per `train_iteration()` call; None = drift_iterations / 200, so that the runner's default
    `run.iterations: 200` runs the whole schedule (6 or 10 with the default drift_iterations)."""
    hidden: int = 64
    """Width of the control, initial-control and value networks."""
    depth: int = 3
    """Hidden layers of those networks."""
    time_frequencies: int = 8
    """Sinusoidal time features of the control network: sin/cos(pi 2^j t), j < this."""
    network: str = "auto"
    """Control network: auto | mlp | conv (auto: MLP, or convolutions for long (L, A) sequences)."""
    learn_init: bool | None = None
    """Learn the initial distribution (steps 1-2); None = yes for elegant, no for the baselines."""
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
    kl_penalty: bool | None = None
    """Keep the alpha-weighted KL in the drift loss; None = yes for elegant, no for the baselines."""
    truncation_steps: int = 10
    """truncation: gradients flow through this many last steps (>= K: through every step)."""
    checkpointing: bool = False
    """Recompute each window of steps in the backward pass (gradient checkpointing) to save memory."""
    segment_steps: int = 0
    """Steps per window (0 = ceil(sqrt(K))); the same windows are used with and without checkpointing."""
    divergence: str = "kl"
    """Regulariser: kl, or an f-divergence of rlft.divergences (forward_kl, chi2, gamma:0.5, ...)."""
    max_grad_norm: float | None = None
    """Clip the drift gradient's norm to this value (0 = no clipping); None = 0 with the KL term, 1 without it."""
    lora_rank: int = 4
    """Rank of the LoRA adapter (diffusers models only)."""
    pathwise_weight: float | None = None
    """Weight w of the pathwise (back-propagated) reward gradient; the rest, 1 - w, is the likelihood-ratio
    estimator E[(r - mean r) grad log p_theta(path)] of the same gradient (the KL term stays pathwise).
    None = 0.25 for type elegant with a network control; 1 for the baselines (pure back-propagation, as AlignProp
    and DRaFT define them) and for LoRA adapters (there the second pass is a second UNet pass per step, unmeasured).

    The pathwise gradient of the mass in each mode is carried by the few trajectories that cross between modes,
    as rare updates with 10-70x the median gradient norm, which leave the mode masses see-sawing; every
    trajectory contributes to the likelihood-ratio term. Measured (bench `train_run`, alpha = 1, one run each):
    with w = 1 and 2000 updates the 2-D task at seed 0 ends at 2.82x the energy-distance floor and the 8-D task
    at seed 5 at gap closure 0.755 and 12.8x; w = 0.5 with 1200 updates: 1.49x and 0.949 / 2.18x; w = 0.25 with
    1200 updates: 1.30x and 0.938 / 1.31x, in the same time as w = 1 with 2000 (an update costs 1.6-1.75x).
    elegant and no_kl only (gradients through every step)."""


class _Window(DiffusionModel):
    """Steps [start, stop) of a chain, seen as a chain of its own (so `rollout` can run a segment of it)."""

    def __init__(self, base: DiffusionModel, start: int, stop: int) -> None:
        super().__init__(stop - start)
        self.base, self.start = base, start
        self.event_shape, self.cond_shape = base.event_shape, base.cond_shape
        self.device, self.dtype = base.device, base.dtype

    def time(self, k: int) -> float:
        return self.base.time(self.start + k)

    def dt(self, k: int) -> float:
        return self.base.dt(self.start + k)

    def std(self, k: int) -> float:
        return self.base.std(self.start + k)

    def mean(self, k, x, cond=None):
        return self.base.mean(self.start + k, x, cond)

    def score(self, k, x, cond=None):
        return self.base.score(self.start + k, x, cond)

    def ode_step(self, k, x, cond=None):
        return self.base.ode_step(self.start + k, x, cond)

    def noise_kernel(self, k: int) -> tuple[float, float]:
        return self.base.noise_kernel(self.start + k)


class ElegantLearner(Learner):
    """ELEGANT and its baselines on one task (see the module docstring for the algorithm and the options)."""

    learner_type: ClassVar[str] = "elegant"

    def __init__(
        self,
        task: TaskConfig,
        model: DiffusionModel,
        reward: Reward,
        lr: float | None = None,
        lr_final: float = 1e-4,
        batch_size: int = 512,
        drift_iterations: int | None = None,
        drift_iterations_per_train_iteration: int | None = None,
        hidden: int = 64,
        depth: int = 3,
        time_frequencies: int = 8,
        network: Literal["auto", "mlp", "conv"] = "auto",
        learn_init: bool | None = None,
        init_steps: int = 20,
        init_iterations: int = 300,
        init_lr: float = 1e-3,
        init_batch_size: int = 256,
        value_starts: int = 512,
        value_rollouts: int = 16,
        value_iterations: int = 1000,
        value_lr: float = 1e-3,
        kl_penalty: bool | None = None,
        truncation_steps: int = 10,
        checkpointing: bool = False,
        segment_steps: int = 0,
        divergence: str = "kl",
        max_grad_norm: float | None = None,
        lora_rank: int = 4,
        pathwise_weight: float | None = None,
    ) -> None:
        super().__init__(task, model, reward)
        self.uses_lora = hasattr(model, "add_lora")  # diffusers chains: the drift is a LoRA adapter
        args = locals()
        opts = ElegantOptions(**{f.name: args[f.name] for f in dataclasses.fields(ElegantOptions)})
        self.options = self._resolve(opts)
        o = self.options
        self.train_alpha = float(task.alpha) if o.kl_penalty else 0.0
        self.train_reward: Reward = reward
        self.lambda_: float | None = None
        self.drift_updates = 0
        self.setup_done = False
        self._rng = torch.Generator().manual_seed(int(task.seed))
        with torch.random.fork_rng(devices=[]):  # network initialisations depend on task.seed only
            torch.manual_seed(int(task.seed))
            self._build_networks()

    def _build_networks(self) -> None:
        o, model, task = self.options, self.model, self.task
        # the drift control: a LoRA for diffusers chains, a zero-initialised network otherwise
        if self.uses_lora:
            if not model.has_lora:
                model.add_lora(rank=o.lora_rank, seed=int(task.seed))
            self.drift_net = None
            self._drift_params = list(model.lora_parameters())
            self._control: Control = model.lora_control()
        else:
            self.drift_net = build_control_net(model.event_shape, model.cond_shape, o.network, o.hidden, o.depth, o.time_frequencies)
            self.drift_net.to(device=model.device, dtype=model.dtype)
            self._drift_params = list(self.drift_net.parameters())
            self._control = NetworkControl(model, self.drift_net)
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=o.lr)
        # steps 1-2 (value network and initial control), only when the initial law is learned
        self.value_net: ValueNet | None = None
        self.init_control: InitialControl | None = None
        if o.learn_init:
            self.value_net = ValueNet(model.event_shape, o.hidden, o.depth).to(device=model.device, dtype=model.dtype)
            self.init_control = InitialControl(model, o.init_steps, o.hidden, o.depth).to(device=model.device, dtype=model.dtype)

    # -- options -----------------------------------------------------------------------------------
    def _resolve(self, o: ElegantOptions) -> ElegantOptions:
        """Fills the per-type defaults and checks every option (errors name the key, value, rule and fix)."""
        kind = self.learner_type
        baseline = kind != "elegant"
        if o.learn_init is None:
            o = dataclasses.replace(o, learn_init=not baseline)
        if o.kl_penalty is None:
            o = dataclasses.replace(o, kl_penalty=not baseline)
        if o.lr is None:
            o = dataclasses.replace(o, lr=5e-3 if o.kl_penalty else 1e-3)
        if o.max_grad_norm is None:
            o = dataclasses.replace(o, max_grad_norm=0.0 if o.kl_penalty else 1.0)
        if o.pathwise_weight is None:
            o = dataclasses.replace(o, pathwise_weight=1.0 if baseline or self.uses_lora else DEFAULT_PATHWISE_WEIGHT)
        if o.drift_iterations is None:
            o = dataclasses.replace(o, drift_iterations=1200 if o.pathwise_weight < 1.0 else 2000)
        if o.drift_iterations_per_train_iteration is None:
            o = dataclasses.replace(o, drift_iterations_per_train_iteration=max(1, o.drift_iterations // 200))
        if kind == "no_kl" and o.kl_penalty:
            raise ConfigError("learner.kl_penalty must be false for type no_kl (alpha = 0 in training); use type elegant for the KL term")
        if o.learn_init and not o.kl_penalty:
            raise ConfigError(
                f"learner.learn_init needs the KL term (type {kind!r} with kl_penalty false trains at alpha = 0, where the "
                "optimal initial law is degenerate); set learn_init: false or kl_penalty: true"
            )
        if o.kl_penalty and not self.task.alpha > 0:
            raise ConfigError(f"alpha must be > 0 (got {self.task.alpha}) when the learner keeps the KL term; use alpha = 0 only with type no_kl")
        positive = ("lr", "lr_final", "init_lr", "value_lr")
        for name in positive:
            v = getattr(o, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"learner.{name} must be a finite number > 0 (got {v})")
        if o.lr_final > o.lr:
            raise ConfigError(f"learner.lr_final must be <= learner.lr (got lr_final={o.lr_final}, lr={o.lr})")
        for name in ("batch_size", "drift_iterations", "drift_iterations_per_train_iteration", "hidden", "depth",
                     "time_frequencies", "init_steps", "init_batch_size", "value_starts", "value_rollouts", "truncation_steps", "lora_rank"):
            if getattr(o, name) < 1:
                raise ConfigError(f"learner.{name} must be an integer >= 1 (got {getattr(o, name)})")
        for name in ("init_iterations", "value_iterations", "segment_steps"):
            if getattr(o, name) < 0:
                raise ConfigError(f"learner.{name} must be an integer >= 0 (got {getattr(o, name)})")
        if not 0.0 <= o.pathwise_weight <= 1.0:
            raise ConfigError(f"learner.pathwise_weight must be in [0, 1] (got {o.pathwise_weight}); 1 = pure back-propagation")
        if o.pathwise_weight < 1.0 and kind in ("truncation", "random_k"):
            raise ConfigError(f"learner.pathwise_weight < 1 is for types elegant and no_kl (type {kind!r} cuts the path's gradient); leave it at 1")
        if o.max_grad_norm < 0:
            raise ConfigError(f"learner.max_grad_norm must be >= 0 (got {o.max_grad_norm}); 0 turns clipping off")
        if o.network not in NETWORK_KINDS:
            raise ConfigError(f"learner.network must be one of {list(NETWORK_KINDS)} (got {o.network!r})")
        if self.model.cond_shape is not None:
            raise ConfigError(
                f"learner {kind!r} does not support conditional models yet (cond_shape {self.model.cond_shape}): it has no "
                "distribution of conditions to train on; use an unconditional model"
            )
        from rlft.divergences import get_divergence

        try:
            div = get_divergence(o.divergence)
        except ValueError as err:
            raise ConfigError(f"learner.divergence: {err}") from None
        if div.name not in ("kl", "reverse_kl") and not o.kl_penalty:
            raise ConfigError(f"learner.divergence {o.divergence!r} needs the KL machinery (kl_penalty true, type elegant)")
        if not getattr(self.reward, "differentiable", True):
            raise ConfigError(
                f"reward {getattr(self.reward, 'name', '?')!r} is not differentiable; learner {kind!r} back-propagates "
                "through the reward: use an RLlib learner (ppo_kl, fpg) instead"
            )
        return o

    # -- the learner protocol ----------------------------------------------------------------------
    def control(self) -> Control:
        return self._control

    def init_dist(self) -> InitialDistribution | None:
        """nu_hat once the initial control has been trained; before that the prior nu_ini (None)."""
        return self.init_control if (self.init_control is not None and self.setup_done) else None

    def train_iteration(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not self.setup_done:
            metrics.update(self._setup())
        o = self.options
        sums = {TRAIN_OBJECTIVE: 0.0, TRAIN_REWARD: 0.0, TRAIN_KL: 0.0, GRAD_NORM: 0.0}
        largest = 0.0
        for _ in range(o.drift_iterations_per_train_iteration):
            for key, value in self._drift_update().items():
                sums[key] += value / o.drift_iterations_per_train_iteration
                if key == GRAD_NORM:
                    largest = max(largest, value)
        metrics.update(sums)
        # rare trajectories near the boundary between modes give gradients 10-70x the median (measured on the
        # 2-D bench task); they move mass between modes, so the mean hides what the largest one shows
        metrics[GRAD_NORM_MAX] = largest
        metrics[LR] = self._lr(self.drift_updates)
        metrics[DRIFT_UPDATES] = float(self.drift_updates)
        self.iteration += 1
        return metrics

    # -- steps 1-2: value function and initial distribution ------------------------------------------
    def _setup(self) -> dict[str, float]:
        o = self.options
        start = time.perf_counter()
        out: dict[str, float] = {}
        from rlft.divergences import FRegularisedReward, get_divergence

        if get_divergence(o.divergence).name not in ("kl", "reverse_kl"):
            if self.lambda_ is None:
                self.lambda_ = self._solve_lambda()
            self.train_reward = FRegularisedReward(self.reward, o.divergence, self.task.alpha, self.lambda_)
            self.train_alpha = FRegularisedReward.kl_alpha
            out["lambda"] = self.lambda_
        if o.learn_init:
            gen = self._device_generator()
            x0, y, queries = value_dataset(self.model, self.train_reward, self.train_alpha, o.value_starts, o.value_rollouts, gen)
            self.reward_queries += queries
            out.update(fit_value(self.value_net, x0, y, o.value_iterations, gen, lr=o.value_lr))
            out["value_target_std"] = float(y.std()) if y.numel() > 1 else 0.0
            out.update(self._fit_init(gen))
        self.setup_done = True
        out["setup_time"] = time.perf_counter() - start
        return out

    @torch.no_grad()
    def _solve_lambda(self) -> float:
        from rlft.divergences import solve_lambda
        from rlft.sampling import sample

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
            obj, parts = self.init_control.objective(self.value_net, self.train_alpha, o.init_batch_size, gen)
            opt.zero_grad(set_to_none=True)
            (-obj).backward()
            opt.step()
        return parts

    # -- step 3: the drift ---------------------------------------------------------------------------
    def _lr(self, update: int) -> float:
        o = self.options
        frac = min(update / o.drift_iterations, 1.0)
        return o.lr_final + 0.5 * (o.lr - o.lr_final) * (1.0 + math.cos(math.pi * frac))

    def _device_generator(self) -> torch.Generator:
        seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def _grad_start(self) -> int:
        """First step through which gradients flow (0 = all steps)."""
        K = self.model.num_steps
        if self.learner_type == "truncation":
            return max(K - self.options.truncation_steps, 0)
        if self.learner_type == "random_k":
            return K - int(torch.randint(1, K + 1, (1,), generator=self._rng))
        return 0

    def windows(self, grad_start: int = 0) -> list[tuple[int, int]]:
        """The windows [a, b) the chain is simulated in (cut at every segment_steps and at grad_start)."""
        K = self.model.num_steps
        seg = self.options.segment_steps or math.ceil(math.sqrt(K))
        cuts = sorted(set(range(0, K, seg)) | {grad_start})  # window starts, all < K
        return list(zip(cuts, cuts[1:] + [K]))

    def _window(self, start: int, stop: int, x: torch.Tensor, seed: int, cond: torch.Tensor | None, keep_path: bool = False):
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        control = self._control
        out = rollout(_Window(self.model, start, stop), x, lambda k, y, c: control(start + k, y, c), cond, gen, keep_path=keep_path)
        if keep_path:
            return out.x, out.step_kl.sum(1), out.path.detach()[:, :-1]  # states x_start .. x_{stop-1}
        return out.x, out.step_kl.sum(1)

    def drift_rollout(
        self, x0: torch.Tensor, seeds: list[int], grad_start: int = 0, cond: torch.Tensor | None = None, keep_path: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """The controlled chain from x0, window by window, differentiable from step `grad_start` on.

        Args:
            x0: initial states (B, *event).
            seeds: one noise seed per window of `windows(grad_start)`.
            grad_start: steps before it run without gradients (truncation, random_k).
            cond: conditioning (B, *cond_shape) or None.
            keep_path: also return the detached states x_0 .. x_K (B, K+1, *event).
        Returns:
            (x_K (B, *event), path KL sum_k KL_k (B,)) and, with keep_path, the states.
        """
        x, kl = x0, x0.new_zeros(x0.shape[0])
        states = []
        for (a, b), seed in zip(self.windows(grad_start), seeds):
            if b <= grad_start:
                with torch.no_grad():
                    out = self._window(a, b, x, seed, cond, keep_path)
            elif self.options.checkpointing and torch.is_grad_enabled():
                out = _checkpoint(self._window, a, b, x, seed, cond, keep_path, use_reentrant=False)
            else:
                out = self._window(a, b, x, seed, cond, keep_path)
            x, step = out[0], out[1]
            kl = kl + step
            if keep_path:
                states.append(out[2])
        if keep_path:
            return x, kl, torch.cat(states + [x.detach().unsqueeze(1)], dim=1)
        return x, kl

    def path_log_prob(self, path: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p_theta of given (detached) paths under the controlled chain, up to a constant, differentiable in the
        control only: sum_k -|x_{k+1} - m_k(x_k) - delta_k(x_k)|^2 / (2 s_k^2).  path: (B, K+1, *event) -> (B,).

        With `checkpointing`, window by window under torch.utils.checkpoint, so that this pass, like the rollout,
        keeps one window's activations for the backward pass rather than all K steps'."""
        if not (self.options.checkpointing and torch.is_grad_enabled()):
            return self._steps_log_prob(path, 0, cond)
        total = path.new_zeros(path.shape[0])
        for a, b in self.windows():
            total = total + _checkpoint(self._steps_log_prob, path[:, a:b + 1], a, cond, use_reentrant=False)
        return total

    def _steps_log_prob(self, path: torch.Tensor, start: int, cond: torch.Tensor | None) -> torch.Tensor:
        """The terms of `path_log_prob` for steps start .. start + n - 1 of states path (B, n+1, *event) -> (B,)."""
        n = path.shape[1] - 1
        steps = range(start, start + n)
        with torch.no_grad():
            means = torch.stack([self.model.mean(k, path[:, j], cond) for j, k in enumerate(steps)], dim=1)  # (B, n, *event)
        if isinstance(self._control, NetworkControl) and cond is None:
            # one network call for all steps: time per update at w = 0.5 vs w = 1, 2-D 2.04x -> 1.55-1.74x, 8-D 1.93x -> 1.84-1.98x
            deltas = self._control.all_steps(path[:, :n], start)
        else:
            deltas = torch.stack([self._control(k, path[:, j], cond) for j, k in enumerate(steps)], dim=1)
        var = torch.tensor([self.model.std(k) ** 2 for k in steps], dtype=path.dtype, device=path.device)  # (n,)
        residual = (path[:, 1:] - means - deltas).pow(2).flatten(2).sum(2)  # (B, n)
        return -(residual / (2.0 * var)).sum(1)

    def _initial_states(self, n: int, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            init = self.init_dist()
            return init.init_sample(n, gen)[0] if init is not None else self.model.prior_sample(n, gen)

    def drift_objective(self, n: int, grad_start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Monte-Carlo batch of eq. 11: (surrogate scalar, r (n,), path KL (n,)), differentiable.

        The surrogate's value is J_train = mean r - alpha mean KL; its gradient is J_train's, with the reward part
        mixed from the pathwise and the likelihood-ratio estimators when `pathwise_weight` < 1 (the likelihood-ratio
        term is built from log p - (log p).detach(), which is zero, so it changes the gradient and not the value)."""
        gen = self._device_generator()
        x0 = self._initial_states(n, gen)
        windows = self.windows(grad_start)
        seeds = [int(s) for s in torch.randint(0, 2**62, (len(windows),), generator=self._rng)]
        w = self.options.pathwise_weight
        if w < 1.0:
            x, kl, path = self.drift_rollout(x0, seeds, grad_start, keep_path=True)
        else:
            x, kl = self.drift_rollout(x0, seeds, grad_start)
        r = evaluate(self.train_reward, x)
        self.reward_queries += n
        reward_term = r.mean()
        if w < 1.0:
            advantage = (r - r.mean()).detach()
            logp = self.path_log_prob(path)
            score_term = (advantage * (logp - logp.detach())).mean()  # value 0, gradient E[(r - mean r) grad log p]
            reward_term = w * r.mean() + (1.0 - w) * (r.mean().detach() + score_term)
        return reward_term - self.train_alpha * kl.mean(), r, kl

    def _drift_update(self) -> dict[str, float]:
        o = self.options
        for group in self.drift_opt.param_groups:
            group["lr"] = self._lr(self.drift_updates)
        obj, r, kl = self.drift_objective(o.batch_size, self._grad_start())
        self.drift_opt.zero_grad(set_to_none=True)
        (-obj).backward()
        grads = [p.grad for p in self._drift_params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if not math.isfinite(norm):
            hint = ("; without the KL term nothing bounds the control, so set kl_penalty: true or use type elegant"
                    if not o.kl_penalty else "")
            raise FloatingPointError(
                f"the drift gradient is {norm} at update {self.drift_updates}; lower learner.lr (now {o.lr})"
                + (" or set learner.max_grad_norm" if not o.max_grad_norm > 0 else "") + hint
            )
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._drift_params, o.max_grad_norm)
        self.drift_opt.step()
        self.drift_updates += 1
        return {TRAIN_OBJECTIVE: float(obj.detach()), TRAIN_REWARD: float(r.detach().mean()), TRAIN_KL: float(kl.detach().mean()), GRAD_NORM: norm}

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """Writes learner.json (options, counters, task), the networks, optimiser state and RNG state."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.uses_lora:
            self.model.save_lora(out / LORA_DIR)
        else:
            _save(self.drift_net.state_dict(), out / CONTROL_FILE)
        if self.init_control is not None:
            _save(self.init_control.net.state_dict(), out / INIT_FILE)
            _save(self.value_net.state_dict(), out / VALUE_FILE)
        tensors, groups = _optimizer_tensors(self.drift_opt, "drift")
        tensors["rng_state"] = self._rng.get_state()
        _save(tensors, out / OPTIM_FILE)
        state = {
            "format": FORMAT, "version": FORMAT_VERSION, "type": self.learner_type,
            "options": dataclasses.asdict(self.options), "iteration": self.iteration,
            "reward_queries": int(self.reward_queries), "drift_updates": self.drift_updates,
            "setup_done": self.setup_done, "lambda": self.lambda_, "drift_param_groups": groups,
            "task": dataclasses.asdict(self.task),
        }
        with atomic_path(out / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(state, indent=2, default=str))

    def load_checkpoint(self, directory: str) -> None:
        """Restores what `save_checkpoint` wrote: the same sampler, counters, optimiser and RNG state."""
        src = Path(directory)
        path = src / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{src} holds no ELEGANT checkpoint ({STATE_FILE} is missing)")
        state = json.loads(path.read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"{path} is not an {FORMAT} checkpoint (format {state.get('format')!r})")
        if state["type"] != self.learner_type:
            raise ValueError(f"{src} holds a {state['type']!r} learner; this learner is {self.learner_type!r}")
        saved = state["options"]
        for key in ("hidden", "depth", "time_frequencies", "network", "learn_init", "init_steps", "lora_rank"):
            if saved.get(key) != getattr(self.options, key):
                raise ValueError(
                    f"checkpoint {src} was written with learner.{key} = {saved.get(key)!r}, this learner has "
                    f"{getattr(self.options, key)!r}; build the learner with the checkpoint's options"
                )
        if self.uses_lora:
            self.model.load_lora(src / LORA_DIR)
            self._drift_params = list(self.model.lora_parameters())
        else:
            self.drift_net.load_state_dict(_load(src / CONTROL_FILE, self.model.device))
        if self.init_control is not None:
            self.init_control.net.load_state_dict(_load(src / INIT_FILE, self.model.device))
            self.value_net.load_state_dict(_load(src / VALUE_FILE, self.model.device))
        tensors = load_file(str(src / OPTIM_FILE))
        self._rng.set_state(tensors.pop("rng_state"))
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=self.options.lr)
        _load_optimizer(self.drift_opt, tensors, "drift", state["drift_param_groups"], self.model.device)
        self.iteration = int(state["iteration"])
        self.reward_queries = int(state["reward_queries"])
        self.drift_updates = int(state["drift_updates"])
        self.setup_done = bool(state["setup_done"])
        self.lambda_ = state.get("lambda")
        if self.setup_done and self.lambda_ is not None:
            from rlft.divergences import FRegularisedReward

            self.train_reward = FRegularisedReward(self.reward, self.options.divergence, self.task.alpha, self.lambda_)
            self.train_alpha = FRegularisedReward.kl_alpha


@register_learner("no_kl")
class NoKLLearner(ElegantLearner):
    """NO KL (AlignProp / DRaFT): maximise E[r] alone, no initial learning."""

    learner_type = "no_kl"


@register_learner("truncation")
class TruncationLearner(ElegantLearner):
    """Truncation (DRaFT-K): gradients only through the last `truncation_steps` steps."""

    learner_type = "truncation"


@register_learner("random_k")
class RandomKLearner(ElegantLearner):
    """Random-K (AlignProp): gradients through the last k ~ U{1..K} steps, redrawn every update."""

    learner_type = "random_k"


register_learner("elegant")(ElegantLearner)


# -- safetensors helpers ----------------------------------------------------------------------------


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata={"format": FORMAT})


def _load(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return {k: v.to(device) for k, v in load_file(str(path)).items()}


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimiser's state as flat tensors ('{prefix}.{param}.{key}') and its param groups as JSON-safe dicts."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{prefix}.{idx}.{key}"] = torch.as_tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str, groups: list[dict], device) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        head, idx, key = name.split(".", 2)
        if head != prefix:
            continue
        # Adam keeps `step` as a CPU scalar tensor; moments live with the parameters
        state.setdefault(int(idx), {})[key] = value if key == "step" else value.to(device)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})
