"""The `rlft.learners.Learner` protocol over an RLlib Algorithm: the base PPO+KL and f-PG share.

Three pieces, used by every RLlib learner (`rlft.rllib.ppo_kl`, `rlft.rllib.fpg`):

- `PPOOptions`: the typed, frozen PPO settings every RLlib learner takes (one docstring per field), with the
  model-independent checks in `__post_init__` so that they run before Ray starts (`rlft.learners.check_learner_spec`);
- `EnvSpec`: what an EnvRunner needs to build its env, and nothing else: the Gymnasium env id, the typed model
  config (crossing the process boundary as `rlft.config.model_config_to_dict`), the reward spec with anything
  expensive already solved on the driver (`prepare_reward_spec`: lambda of an f-regularised reward), alpha, K, seed;
- `RLlibLearner`: train_iteration = one `algo.train()`; data-only checkpoints through `rlft.checkpoint`.

Checkpoints: `save_checkpoint` writes (1) ``weights.safetensors`` + ``rlft.json`` (format "rlft-rllib", version 2):
every learner tensor (the RLModules and the Adam moments) and the counters, data only; (2) ``rllib/``: RLlib's own
`Algorithm.save_to_path`, which PICKLES (class_and_ctor_args.pkl, *state.pkl: cloudpickle). `load_checkpoint` reads
only (1) and never unpickles (version 1 directories, with ``state.json``, still load); ``trust_pickles: true``
restores (2) with `Algorithm.restore_from_path` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

import rlft.checkpoint as checkpoint
from rlft.config import ConfigError, ModelConfig, TaskConfig, model_config_to_dict
from rlft.learners import Learner
from rlft.models.base import DiffusionModel
from rlft.rewards.base import Reward
from rlft.rllib.env_runner import ENV_ID, RLLIB_ENV, VECTORIZE_MODE, BulkEnvRunner, env_class
from rlft.rllib.keys import EPISODE_RETURN_MEAN, EPISODES, METRICS_LOGGER

log = logging.getLogger(__name__)

FORMAT, VERSION = "rlft-rllib", 2
WEIGHTS_FILE, RLLIB_DIR = "weights.safetensors", "rllib"
#: state files of earlier releases: version 1 wrote state.json
LEGACY_STATE = {"state.json": 1}


def _fail(name: str, value: Any, rule: str, fix: str) -> None:
    raise ConfigError(f"learner.{name} {rule} (got {value!r}); {fix}")


def lr_schedule(lr: float, lr_final: float | None, iterations: int, steps_per_iteration: int) -> float | list[list[float]]:
    """RLlib's lr setting: `lr`, or a linear schedule reaching `lr_final` at the update of the last of `iterations`.

    RLlib sets the lr of an update from the env steps sampled BEFORE it (the Learner's `after_gradient_based_update`
    reads NUM_ENV_STEPS_SAMPLED_LIFETIME after each update, for the next), so iteration i (1-based) trains at
    schedule((i - 1) S), S = env steps per iteration: the schedule ends at (iterations - 1) S, the same final value
    whatever `run.iterations` is.
    """
    if lr_final is None:
        return lr
    return [[0, lr], [max(1, iterations - 1) * max(1, steps_per_iteration), lr_final]]


@dataclass(frozen=True)
class PPOOptions:
    """PPO settings shared by the RLlib learners (the YAML `learner:` keys besides `type`)."""

    env: str = "drift"
    """Gymnasium env id the EnvRunners step: "drift" / "restart" (the built-ins), a registered id, or "module:Id"."""
    episodes_per_iteration: int = 256
    """Trajectories per iteration, all EnvRunners together (rounded up to whole rounds of every EnvRunner)."""
    num_envs: int = 256
    """Trajectories each EnvRunner simulates at once (when run.num_envs_per_env_runner is not set)."""
    lr: float = 3e-4
    """Adam learning rate of the policy and value networks."""
    lr_final: float | None = None
    """Learning rate of the last iteration, reached linearly from lr over run.iterations (`--iterations` rescales
    the schedule); None: lr throughout."""
    num_epochs: int = 4
    """Passes of PPO over each iteration's batch."""
    minibatch_size: int = 4096
    """Env steps per PPO minibatch (capped at the batch size)."""
    clip_param: float = 0.2
    """PPO's clip epsilon of the probability ratio (eq. 22)."""
    gamma: float = 1.0
    """Discount; 1 keeps the return equal to the episode's reward (and KL) sum, as J is defined."""
    lambda_: float = 0.95
    """GAE lambda of the advantages."""
    entropy_coeff: float = 0.0
    """Weight of the policy-entropy bonus (0: the drift policy's std is fixed, so its entropy is constant)."""
    grad_clip: float | None = None
    """Global gradient-norm clip of the PPO update (None: no clipping)."""
    hidden: int = 64
    """Width of the policy and value MLPs."""
    num_layers: int = 2
    """Hidden layers of the policy and value MLPs."""
    fast_env_runner: bool = True
    """Sample with `BulkEnvRunner` (rounds of whole batches) instead of RLlib's SingleAgentEnvRunner."""
    trust_pickles: bool = False
    """Load checkpoints through RLlib's pickled `rllib/` directory instead of the data-only weights."""
    save_rllib_checkpoint: bool = True
    """Also write RLlib's own (pickled) checkpoint beside the data-only one."""

    def __post_init__(self) -> None:
        for name in ("episodes_per_iteration", "num_envs", "num_epochs", "minibatch_size", "hidden", "num_layers"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1", f"set a positive {name}")
        for name in ("lr", "clip_param"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0", f"use e.g. {name}: {getattr(type(self), name)}")
        if self.lr_final is not None and not self.lr_final > 0:
            _fail("lr_final", self.lr_final, "must be > 0 or null", "use e.g. lr_final: lr / 10, or null for a constant lr")
        if not 0.0 < self.gamma <= 1.0:
            _fail("gamma", self.gamma, "must be in (0, 1]", "use gamma: 1.0 (J sums rewards undiscounted)")
        if not 0.0 <= self.lambda_ <= 1.0:
            _fail("lambda_", self.lambda_, "must be in [0, 1]", "use e.g. lambda_: 0.95")
        if self.entropy_coeff < 0:
            _fail("entropy_coeff", self.entropy_coeff, "must be >= 0", "use entropy_coeff: 0.0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            _fail("grad_clip", self.grad_clip, "must be > 0 or null", "use grad_clip: null for no clipping")
        try:
            env_class(self.env)  # imports a "module:Id" env's module here, on the driver
        except ValueError as err:
            raise ConfigError(f"learner.env: {err}") from None


@dataclass(frozen=True)
class EnvSpec:
    """What an EnvRunner needs to build its env: the env id and the task's model, reward and alpha (typed)."""

    env: str
    """Gymnasium env id (alias, registered id, or "module:Id")."""
    model: ModelConfig
    """The pretrained model's typed config (`rlft.config.ModelConfig`)."""
    reward: dict[str, Any]
    """The reward spec, prepared on the driver (`prepare_reward_spec`: nothing is re-solved on the workers)."""
    alpha: float
    """The task's KL weight."""
    num_steps: int
    """K, chain steps per trajectory."""
    seed: int
    """The task's seed."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the env (e.g. the restart env's budget)."""

    @classmethod
    def of(cls, env: str, task: TaskConfig, model: DiffusionModel, **env_kwargs: Any) -> "EnvSpec":
        """The spec of `task` on `env`; an f-regularised reward's lambda is solved here, once."""
        from rlft.rewards.f_regularised import prepare_reward_spec

        reward = prepare_reward_spec(dict(task.reward), model, task.alpha)
        return cls(env, task.model, reward, task.alpha, task.num_steps, task.seed, dict(env_kwargs))

    def env_config(self, device: str = "cpu") -> dict[str, Any]:
        """The RLlib env_config of `rlft.rllib.env_runner.make_env` (plain data: it crosses to every EnvRunner)."""
        task = {"model": model_config_to_dict(self.model), "reward": dict(self.reward), "alpha": self.alpha,
                "num_steps": self.num_steps, "seed": self.seed}
        return {ENV_ID: self.env, "task": task, "device": device, **self.env_kwargs}


class RLlibLearner(Learner):
    """Base adapter: an RLlib Algorithm behind `rlft.learners.Learner` (train_iteration = one `algo.train()`).

    Subclasses set `Options` (a `PPOOptions` subclass) and implement `build_config()`. Resources come from the task's
    `run:` section (`rlft.run_config.RunConfig`: num_env_runners, num_envs_per_env_runner, cpus_per_env_runner,
    num_learners, gpus_per_learner).
    """

    Options = PPOOptions
    WEIGHTS_FILE = WEIGHTS_FILE

    def __init__(self, task: TaskConfig, model: DiffusionModel, reward: Reward, options: PPOOptions | None = None) -> None:
        super().__init__(task, model, reward, options)
        from rlft.run_config import run_config_of

        o = self.options
        self.run = run_config_of(task)
        explicit = "num_envs_per_env_runner" in (task.run or {})
        self.num_envs = self.run.num_envs_per_env_runner if explicit else int(o.num_envs)
        runners = max(1, self.run.num_env_runners)
        rounds = max(1, math.ceil(o.episodes_per_iteration / (self.num_envs * runners)))
        self.episodes_per_iteration = rounds * self.num_envs * runners  # whole rounds of every EnvRunner
        self.env_class = env_class(o.env)
        self.algo = None
        self.last_result: dict[str, Any] = {}

    # -- to implement -------------------------------------------------------------------------------------
    def build_config(self) -> PPOConfig:
        raise NotImplementedError

    # -- shared config pieces -----------------------------------------------------------------------------
    def base_config(self, config: PPOConfig, env: EnvSpec, steps_per_episode: int) -> PPOConfig:
        """Environment, EnvRunners, learners, seed and PPO's settings; batch = whole rounds of episodes."""
        run, o = self.run, self.options
        config = (
            config.environment(RLLIB_ENV, env_config=env.env_config("cpu"), normalize_actions=False, clip_actions=False)
            .env_runners(
                num_env_runners=run.num_env_runners, num_envs_per_env_runner=self.num_envs,
                num_cpus_per_env_runner=run.cpus_per_env_runner, gym_env_vectorize_mode=VECTORIZE_MODE,
                env_runner_cls=BulkEnvRunner if o.fast_env_runner else None,
                # truncate_episodes: RLlib's own runner re-seeds its env at every sample() call in complete_episodes
                # mode (same x_0 every iteration); the batch is whole rounds, so no episode is cut here either
                rollout_fragment_length="auto", batch_mode="truncate_episodes",
            )
            .learners(num_learners=run.num_learners, num_gpus_per_learner=run.gpus_per_learner if run.num_learners else 0)
            .debugging(seed=self.task.seed, log_level="ERROR")
            .reporting(metrics_num_episodes_for_smoothing=self.episodes_per_iteration)
        )
        config.train_batch_size_per_learner = max(1, self.episodes_per_iteration * steps_per_episode // max(1, run.num_learners))
        config.training(
            gamma=o.gamma, lambda_=o.lambda_, num_epochs=o.num_epochs,
            lr=lr_schedule(o.lr, o.lr_final, run.iterations, self.episodes_per_iteration * steps_per_episode),
            minibatch_size=min(o.minibatch_size, config.train_batch_size_per_learner), clip_param=o.clip_param,
            entropy_coeff=o.entropy_coeff, use_kl_loss=False, vf_clip_param=1e8, grad_clip=o.grad_clip,
        )
        return config

    def derived(self) -> dict[str, int]:
        """The sizes derived from the options and the run section (computed once, logged at start)."""
        return {"episodes_per_iteration": self.episodes_per_iteration, "num_envs_per_env_runner": self.num_envs,
                "train_batch_size_per_learner": int(self.config.train_batch_size_per_learner),
                "minibatch_size": int(self.config.minibatch_size)}

    def build(self) -> None:
        self.config = self.build_config()
        log.info("%s on %s: %s", type(self).__name__, self.options.env, self.derived())
        self.algo = _build_algo_outside_home(self.config)

    # -- Learner protocol ---------------------------------------------------------------------------------
    def train_iteration(self) -> dict[str, float]:
        result = self.algo.train()
        self.last_result = result
        self.iteration += 1
        runners = result.get("env_runners", {})
        episodes = int(runners.get("num_episodes", self.episodes_per_iteration))
        self.reward_queries += episodes  # one terminal reward per episode
        out = {EPISODE_RETURN_MEAN: float(runners.get("episode_return_mean", float("nan"))), EPISODES: float(episodes)}
        for key, value in (result.get("learners", {}).get(DEFAULT_MODULE_ID, {}) or {}).items():
            if isinstance(value, (int, float, np.floating, np.integer)):
                out[key] = float(value)
        return out

    def module_state(self, module_id: str = DEFAULT_MODULE_ID) -> dict[str, np.ndarray]:
        """The current weights of one RLModule, from the (local or first remote) Learner."""
        path = f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{module_id}"
        return self.algo.learner_group.get_state(components=path)[COMPONENT_LEARNER][COMPONENT_RL_MODULE][module_id]

    # -- checkpoints: data, not pickles -------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        state = self.algo.learner_group.get_state(components=COMPONENT_LEARNER)[COMPONENT_LEARNER]
        state.pop(METRICS_LOGGER, None)  # running metric windows: not needed to resume
        arrays, meta = checkpoint.flatten_state(state)
        checkpoint.save_tensors(os.path.join(directory, WEIGHTS_FILE), {k: torch.from_numpy(v) for k, v in arrays.items()})
        checkpoint.write_state(directory, FORMAT, VERSION, {
            "learner": type(self).__name__, "iteration": self.iteration, "reward_queries": self.reward_queries,
            "learner_state": meta, "sampled_lifetime": self._sampled_lifetime(),
            # what `rlft.load` needs to rebuild the policy's control in plain torch, without Ray
            "task": dataclasses.asdict(self.task), "module_config": getattr(self, "model_config", None),
        })
        if self.options.save_rllib_checkpoint:
            self.algo.save_to_path(os.path.join(directory, RLLIB_DIR))

    def load_checkpoint(self, directory: str) -> None:
        info = checkpoint.read_state(directory, FORMAT, VERSION, legacy=LEGACY_STATE)
        if info.get("learner") != type(self).__name__:
            raise checkpoint.CheckpointError(
                f"checkpoint {directory} was written by {info.get('learner')}, not {type(self).__name__}: "
                f"load it with learner.type naming {info.get('learner')}")
        if self.options.trust_pickles:
            self.algo.restore_from_path(os.path.join(directory, RLLIB_DIR))
        else:
            tensors = checkpoint.load_tensors(os.path.join(directory, WEIGHTS_FILE))
            state = checkpoint.unflatten_state({k: v.numpy() for k, v in tensors.items()}, info["learner_state"])
            # RLlib only accepts weights newer than its own (weights_seq_no): mark the loaded ones newest, so
            # that the Learner takes them and the sync below reaches every EnvRunner
            current = self.algo.learner_group.get_state(components=COMPONENT_LEARNER)[COMPONENT_LEARNER]
            state[WEIGHTS_SEQ_NO] = max(int(state.get(WEIGHTS_SEQ_NO, 0)), int(current.get(WEIGHTS_SEQ_NO, 0))) + 1
            self.algo.learner_group.set_state({COMPONENT_LEARNER: state})
            self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group, inference_only=True)
        self.iteration = int(info["iteration"])
        self.reward_queries = int(info["reward_queries"])

    def _sampled_lifetime(self) -> int:
        try:
            return int(self.algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime"), default=0))
        except Exception:  # metrics layout differs across RLlib versions: the counter is informative only
            return 0


def _build_algo_outside_home(config):
    """`config.build_algo()`, except that the Algorithm's (unused, empty) log directory goes under the temp
    directory instead of a new `~/ray_results/<date>...` folder per run: an Algorithm built outside a Tune
    Trainable makes one there (`Trainable._setup_logdir`), and rlft writes its results elsewhere."""
    import tempfile

    import ray.tune.trainable.trainable as trainable

    saved = trainable.DEFAULT_STORAGE_PATH
    trainable.DEFAULT_STORAGE_PATH = os.path.join(tempfile.gettempdir(), "rlft_rllib_logdirs")
    try:
        return config.build_algo()
    finally:
        trainable.DEFAULT_STORAGE_PATH = saved
