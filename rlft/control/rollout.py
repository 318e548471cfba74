"""DifferentiableLearner: the machinery every learner that trains a drift control on the chain needs.

A differentiable learner trains delta_k(x) = control(k, x) by stochastic gradient steps on one scalar per
update (`objective()`, maximised). This base owns everything around that scalar, so a new family (ELEGANT,
its baselines, Adjoint Matching, S-MEME, discriminator-guidance training) is one file with its objective:

- the windows [a, b) the chain is simulated in (`windows`): cut every `segment_steps` steps and at the first
  step gradients flow through (`grad_start()`), with one noise seed per window;
- the controlled rollout window by window (`drift_rollout`): windows before `grad_start` run without
  gradients, the others either plainly or under torch.utils.checkpoint (`checkpointing: true`), where the
  backward pass recomputes a window from its own seed, so it sees the same noise and the gradients equal
  plain back-propagation's; called under torch.no_grad() it is the sampler a regression learner needs;
- the path log-probability log p_theta(path) of detached states (`path_log_prob`), for likelihood-ratio terms;
- per-update generators and window seeds from one RNG seeded by the task (`device_generator`, `window_seeds`);
- a cosine learning rate from `lr` to `lr_final` over `drift_iterations` updates (`lr_at`);
- the optimiser step with the gradient norm, a non-finite check and clipping (`optimizer_step`);
- checkpoints through `rlft.checkpoint` (control or LoRA adapter, optimiser state, RNG state, JSON state).
Options: `rlft.control.options.DifferentiableOptions` (subclassed per learner as its `Options`).

The control is a zero-initialised network g_theta with delta_k = c_k g_theta(t_k, x) (rlft.control.networks),
or, on a diffusers chain (a model with `add_lora`), a peft LoRA adapter whose parameters alone train.

Conditional tasks (`rlft.conditions`): the networks take the condition (`cond_shape`); learners that draw it per
trajectory (training conditions only) say `supports_conditions = True`, the others refuse a conditional task.

Hooks a subclass overrides: `objective()` (required), `setup()` (work before the first update), `grad_start()`,
`resolve_defaults()` / `check_model()` (options), `build_networks()`, `checkpoint_state()` / `restore_state()`
and `save_networks()` / `load_networks()` (extra networks and counters).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

import rlft.checkpoint as checkpoint
from rlft.conditions import Conditions, check_task_conditions, conditions_of
from rlft.config import TaskConfig, from_dict
from rlft.control.networks import NetworkControl, build_control_net
from rlft.control.options import DRIFT_UPDATES, GRAD_NORM, GRAD_NORM_MAX, LR, DifferentiableOptions
from rlft.learners import Learner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.run_config import run_config_of
from rlft.sampling import Control, rollout

log = logging.getLogger(__name__)

STATE_FILE = checkpoint.STATE_FILE
CONTROL_FILE = "control.safetensors"
OPTIM_FILE = "optim.safetensors"
LORA_DIR = "lora"
#: the drift optimiser's prefix in OPTIM_FILE, and the RNG state's key there
DRIFT_PREFIX, RNG_KEY = "drift", "rng_state"

class Window(DiffusionModel):
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


class DifferentiableLearner(Learner):
    """A drift control trained by gradient steps on `objective()`; see the module docstring for the hooks."""

    Options: ClassVar[type] = DifferentiableOptions
    #: the `learner.type` this class is registered under (written into and checked against checkpoints)
    name: ClassVar[str] = "differentiable"
    #: checkpoint format name and the newest version this class writes and reads
    checkpoint_format: ClassVar[str] = "rlft-differentiable"
    checkpoint_version: ClassVar[int] = 1
    #: {older state-file name: version} of earlier releases' checkpoints that still load
    checkpoint_legacy: ClassVar[dict[str, int]] = {}
    #: options whose value shapes the networks: a checkpoint written with other values is refused
    architecture_options: ClassVar[tuple[str, ...]] = ("hidden", "depth", "time_frequencies", "network", "lora_rank")
    grad_reducer: Callable[[list[torch.Tensor]], None] = staticmethod(lambda params: None)  # data parallel: rlft.run.parallel
    #: whether `objective()` draws a conditional task's training conditions (`ElegantLearner.train_conditions`)
    supports_conditions: ClassVar[bool] = False

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: Any = None, **overrides: Any) -> None:
        """`options` is the parsed `Options`; keyword overrides (Python API) replace fields of it, or of the defaults."""
        if overrides:
            base = dataclasses.asdict(options) if options is not None else {}
            options = from_dict(self.Options, {**base, **overrides}, "learner")
        super().__init__(task, model, reward, options)
        self.uses_lora = hasattr(model, "add_lora")  # diffusers chains: the drift is a LoRA adapter
        self.conditions: Conditions | None = conditions_of(task)
        self.cond_shape = self.conditions.shape if self.conditions is not None else model.cond_shape
        self.options = self.resolve(self.options)
        self.check_model()
        self.drift_updates = 0
        self.setup_done = False
        self._rng = torch.Generator().manual_seed(int(task.seed))
        with torch.random.fork_rng(devices=[]):  # network initialisations depend on task.seed only
            torch.manual_seed(int(task.seed))
            self.build_networks()
        self._derived = self.compute_derived()
        log.info("%s: %s", self.name, " ".join(f"{k}={v}" for k, v in self._derived.items()))

    # -- options ------------------------------------------------------------------------------------
    def resolve_defaults(self, o: Any) -> Any:
        """Fills the options a subclass derives (None -> a value); the base needs lr, max_grad_norm, drift_iterations."""
        return o

    def resolve(self, o: Any) -> Any:
        """The options with every None filled: the subclass's defaults, then the updates per `train_iteration`
        tied to the runner's `run.iterations`. The result is validated again (the same checks as parsing)."""
        o = self.resolve_defaults(o)
        missing = [k for k in ("lr", "max_grad_norm", "drift_iterations") if getattr(o, k) is None]
        if missing:
            raise TypeError(f"{type(self).__name__}.resolve_defaults left {missing} unset")
        if o.drift_iterations_per_train_iteration is None:
            o = dataclasses.replace(o, drift_iterations_per_train_iteration=math.ceil(o.drift_iterations / self.run_iterations()))
        return dataclasses.replace(o)  # runs __post_init__ on the resolved values

    def run_iterations(self) -> int:
        """The runner's `run.iterations` for this task (the default when the task has no `run:` section)."""
        return int(run_config_of(self.task).iterations)

    def check_model(self) -> None:
        """Checks that need the model or the reward (the rest ran when the options were parsed)."""
        check_task_conditions(self.conditions, self.model.cond_shape, self.reward, self.name, self.supports_conditions)

    def compute_derived(self) -> dict[str, Any]:
        """The sizes and values derived from the options, the task and the model (computed once, logged at start)."""
        o = self.options
        return {
            "lr": o.lr, "max_grad_norm": o.max_grad_norm, "drift_iterations": o.drift_iterations,
            "run_iterations": self.run_iterations(),
            "drift_iterations_per_train_iteration": o.drift_iterations_per_train_iteration,
            "segment_steps": self.segment_steps(), "windows": len(self.windows()), "uses_lora": self.uses_lora,
        }

    def derived(self) -> dict[str, Any]:
        """A copy of the derived sizes (see `compute_derived`)."""
        return dict(self._derived)

    # -- networks -----------------------------------------------------------------------------------
    def build_networks(self) -> None:
        """The drift control (a LoRA adapter for diffusers chains, a zero-initialised network otherwise) and its
        Adam optimiser. Runs under a torch RNG seeded with task.seed; subclasses add their networks after this."""
        o, model = self.options, self.model
        if self.uses_lora:
            if not model.has_lora:
                model.add_lora(rank=o.lora_rank, seed=int(self.task.seed))
            self.drift_net = None
            self._drift_params = list(model.lora_parameters())
            self._control: Control = model.lora_control()
        else:
            self.drift_net = build_control_net(model.event_shape, self.cond_shape, o.network, o.hidden, o.depth, o.time_frequencies)
            self.drift_net.to(device=model.device, dtype=model.dtype)
            self._drift_params = list(self.drift_net.parameters())
            self._control = NetworkControl(model, self.drift_net)
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=o.lr)

    def control(self) -> Control:
        return self._control

    # -- seeds and schedule --------------------------------------------------------------------------
    def device_generator(self) -> torch.Generator:
        """A generator on the model's device, seeded from the learner's RNG (one per update)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def window_seeds(self, n: int) -> list[int]:
        """n noise seeds from the learner's RNG (one per window of an update)."""
        return [int(s) for s in torch.randint(0, 2**62, (n,), generator=self._rng)]

    def lr_at(self, update: int) -> float:
        """Cosine from lr to lr_final over drift_iterations updates, lr_final afterwards."""
        o = self.options
        frac = min(update / o.drift_iterations, 1.0)
        return o.lr_final + 0.5 * (o.lr - o.lr_final) * (1.0 + math.cos(math.pi * frac))

    # -- the rollout ---------------------------------------------------------------------------------
    def grad_start(self) -> int:
        """First step through which gradients flow in the next update (0 = all steps)."""
        return 0

    def segment_steps(self) -> int:
        return self.options.segment_steps or math.ceil(math.sqrt(self.model.num_steps))

    def windows(self, grad_start: int = 0) -> list[tuple[int, int]]:
        """The windows [a, b) the chain is simulated in (cut at every segment_steps and at grad_start)."""
        K = self.model.num_steps
        cuts = sorted(set(range(0, K, self.segment_steps())) | {grad_start})  # window starts, all < K
        return list(zip(cuts, cuts[1:] + [K]))

    def _window(self, start: int, stop: int, x: torch.Tensor, seed: int, cond: torch.Tensor | None, keep_path: bool = False):
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        control = self._control
        out = rollout(Window(self.model, start, stop), x, lambda k, y, c: control(start + k, y, c), cond, gen, keep_path=keep_path)
        if keep_path:
            return out.x, out.step_kl.sum(1), out.path.detach()[:, :-1]  # states x_start .. x_{stop-1}
        return out.x, out.step_kl.sum(1)

    def drift_rollout(
        self, x0: torch.Tensor, seeds: list[int], grad_start: int = 0, cond: torch.Tensor | None = None, keep_path: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """The controlled chain from x0, window by window, differentiable from step `grad_start` on.

        Args:
            x0: initial states (B, *event).
            seeds: one noise seed per window of `windows(grad_start)` (extra seeds are unused).
            grad_start: steps before it run without gradients (truncation, random_k).
            cond: conditioning (B, *cond_shape) or None.
            keep_path: also return the detached states x_0 .. x_K (B, K+1, *event).
        Returns:
            (x_K (B, *event), path KL sum_k KL_k (B,)) and, with keep_path, the states.
        """
        windows = self.windows(grad_start)
        if len(seeds) < len(windows):
            raise ValueError(f"drift_rollout needs one seed per window: {len(windows)} windows {windows}, {len(seeds)} seeds")
        x, kl = x0, x0.new_zeros(x0.shape[0])
        states = []
        for (a, b), seed in zip(windows, seeds):
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
            return x, kl, torch.cat(states + [x.detach().unsqueeze(1)], dim=1)  # (B, K+1, *event)
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
        if isinstance(self._control, NetworkControl):
            # one network call for all steps: time per update at w = 0.5 vs w = 1, 2-D 2.04x -> 1.55-1.74x, 8-D 1.93x -> 1.84-1.98x
            deltas = self._control.all_steps(path[:, :n], start, cond)
        else:
            deltas = torch.stack([self._control(k, path[:, j], cond) for j, k in enumerate(steps)], dim=1)
        var = torch.tensor([self.model.std(k) ** 2 for k in steps], dtype=path.dtype, device=path.device)  # (n,)
        residual = (path[:, 1:] - means - deltas).pow(2).flatten(2).sum(2)  # (B, n)
        return -(residual / (2.0 * var)).sum(1)

    def initial_states(self, n: int, gen: torch.Generator, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 (n, *event) from the learned initial law (at conditions cond (n, d)) if there is one, else the prior."""
        with torch.no_grad():
            init, args = self.init_dist(), (() if cond is None else (cond,))
            return init.init_sample(n, gen, *args)[0] if init is not None else self.model.prior_sample(n, gen)

    # -- training ------------------------------------------------------------------------------------
    def setup(self) -> dict[str, float]:
        """Work before the first update (value networks, initial laws, ...); returns metrics. Runs once."""
        return {}

    def objective(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One update's scalar to maximise (differentiable in the drift parameters) and its metrics."""
        raise NotImplementedError(f"{type(self).__name__} must define objective()")

    def nonfinite_hint(self) -> str:
        """Extra advice appended to the error raised when the gradient is not finite."""
        return ""

    def optimizer_step(self, objective: torch.Tensor) -> float:
        """One Adam step up `objective`: back-propagates, checks and (optionally) clips the gradient; its norm."""
        o = self.options
        self.drift_opt.zero_grad(set_to_none=True)
        (-objective).backward()
        self.grad_reducer(self._drift_params)  # the mean over data-parallel workers (a no-op in one process)
        grads = [p.grad for p in self._drift_params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"the drift gradient is {norm} at update {self.drift_updates}; lower learner.lr (now {o.lr})"
                + (" or set learner.max_grad_norm" if not o.max_grad_norm > 0 else "") + self.nonfinite_hint()
            )
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._drift_params, o.max_grad_norm)
        self.drift_opt.step()
        return norm

    def update(self) -> dict[str, float]:
        """One drift update: the scheduled learning rate, `objective()`, one optimiser step."""
        for group in self.drift_opt.param_groups:
            group["lr"] = self.lr_at(self.drift_updates)
        objective, metrics = self.objective()
        metrics[GRAD_NORM] = self.optimizer_step(objective)
        self.drift_updates += 1
        return metrics

    def train_iteration(self) -> dict[str, float]:
        """`setup()` on the first call, then drift_iterations_per_train_iteration updates; their mean metrics,
        the largest gradient norm, the learning rate of the next update and the update count."""
        metrics: dict[str, float] = {}
        if not self.setup_done:
            metrics.update(self.setup())
            self.setup_done = True
        n = self.options.drift_iterations_per_train_iteration
        sums: dict[str, float] = {}
        largest = 0.0
        for _ in range(n):
            for key, value in self.update().items():
                sums[key] = sums.get(key, 0.0) + value / n
                if key == GRAD_NORM:
                    largest = max(largest, value)
        metrics.update(sums)
        # rare trajectories near the boundary between modes give gradients 10-70x the median (measured on the
        # 2-D bench task); they move mass between modes, so the mean hides what the largest one shows
        metrics[GRAD_NORM_MAX] = largest
        metrics[LR] = self.lr_at(self.drift_updates)
        metrics[DRIFT_UPDATES] = float(self.drift_updates)
        self.iteration += 1
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """The JSON-safe state a checkpoint keeps (subclasses add their counters)."""
        return {
            "type": self.name, "options": dataclasses.asdict(self.options), "iteration": self.iteration,
            "reward_queries": int(self.reward_queries), "drift_updates": self.drift_updates,
            "setup_done": self.setup_done, "task": dataclasses.asdict(self.task),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restores what `checkpoint_state` returned (after the networks are loaded)."""
        self.iteration = int(state["iteration"])
        self.reward_queries = int(state["reward_queries"])
        self.drift_updates = int(state["drift_updates"])
        self.setup_done = bool(state["setup_done"])

    def save_networks(self, out: Path) -> None:
        """Writes the drift control; subclasses add their networks."""
        if self.uses_lora:
            self.model.save_lora(out / LORA_DIR)
        else:
            checkpoint.save_module(out / CONTROL_FILE, self.drift_net)

    def load_networks(self, src: Path) -> None:
        if self.uses_lora:
            self.model.load_lora(src / LORA_DIR)
            self._drift_params = list(self.model.lora_parameters())
        else:
            checkpoint.load_module(src / CONTROL_FILE, self.drift_net, self.model.device)

    def save_checkpoint(self, directory: str) -> None:
        """Writes the networks, the optimiser and RNG state (safetensors) and the JSON state (options, counters, task)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.save_networks(out)
        tensors, groups = checkpoint.optimizer_tensors(self.drift_opt, DRIFT_PREFIX)
        tensors[RNG_KEY] = self._rng.get_state()
        checkpoint.save_tensors(out / OPTIM_FILE, tensors, {"format": self.checkpoint_format})
        state = {**self.checkpoint_state(), "drift_param_groups": groups}
        checkpoint.write_state(out, self.checkpoint_format, self.checkpoint_version, state)

    def load_checkpoint(self, directory: str) -> None:
        """Restores what `save_checkpoint` wrote (or an earlier version listed in `checkpoint_legacy`)."""
        src = Path(directory)
        state = checkpoint.read_state(src, self.checkpoint_format, self.checkpoint_version, legacy=self.checkpoint_legacy)
        if state.get("type") != self.name:
            raise checkpoint.CheckpointError(f"{src} holds a {state.get('type')!r} learner; this learner is {self.name!r}: "
                                             f"load it with learner.type {state.get('type')!r}")
        saved = state.get("options", {})
        for key in self.architecture_options:
            if saved.get(key) != getattr(self.options, key):
                raise checkpoint.CheckpointError(
                    f"checkpoint {src} was written with learner.{key} = {saved.get(key)!r}, this learner has "
                    f"{getattr(self.options, key)!r}; build the learner with the checkpoint's options"
                )
        self.load_networks(src)
        tensors = checkpoint.load_tensors(src / OPTIM_FILE)
        self._rng.set_state(tensors.pop(RNG_KEY))
        self.drift_opt = torch.optim.Adam(self._drift_params, lr=self.options.lr)
        checkpoint.load_optimizer(self.drift_opt, tensors, DRIFT_PREFIX, state["drift_param_groups"], self.model.device)
        self.restore_state(state)
