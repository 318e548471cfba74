"""The `run:` and `sweep:` sections of a task YAML: how `rlft train` and `rlft sweep` run it on Ray Tune.

    run:                            # every key optional (defaults in `RunConfig`)
      iterations: 200               # learner iterations per trial
      eval_every: 10                # standard figures every 10 iterations (carried forward between)
      checkpoint_every: 10          # a Tune checkpoint every 10 iterations (and always at the end)
      storage_path: ~/rlft_results  # or s3://bucket/prefix, gs://..., a shared NFS path
      cpus_per_trial: 1
      gpus_per_trial: 0.5           # fractional GPUs: two trials share one GPU
      max_concurrent_trials: 2
      max_failures: 1               # a failed trial restarts from its last checkpoint once
    sweep:                          # the grid of `rlft sweep`: every combination is one trial
      alpha: [0.1, 0.3, 1.0]        # any dotted task key: alpha, seed, learner.lr, reward.scale, ...
      learner.lr: [1.0e-3, 3.0e-3]

`load_experiment` reads a YAML (following `base:`), applies overrides, validates the task, the `run:`
and `sweep:` sections, the reward's keyword arguments (against its signature) and the learner's typed
options (`rlft.learners.check_learner_spec`), without building a model, a reward or a learner and
without importing Ray, so `rlft train` fails before Ray starts and `rlft submit` rejects a malformed
config before it sends anything. Every error names the dotted key, the value, the rule and the fix.

The run's length and a learner's schedule are one number: a trial's task carries the `run:` section the
trial loop runs (overrides such as `--iterations` included), and a learner whose schedule depends on the
number of iterations reads it with `run_config_of(task).iterations`.

Hook for learners that start Ray actors of their own (RLlib): `run_config_of(task)` returns the parsed
`RunConfig`, whose `num_env_runners`, `num_envs_per_env_runner`, `cpus_per_env_runner`, `num_learners`
and `gpus_per_learner` the learner passes to its AlgorithmConfig; the runner reserves the matching
placement-group bundles for the trial (`RunConfig.resource_bundles`), or asks the learner class's
optional `trial_resources(task, run) -> list[dict]` classmethod when it defines one.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

import rlft.registry as registry
from rlft.config import ConfigError, TaskConfig, check_kwargs, from_dict, load_yaml, task_from_dict
from rlft.conditions import conditions_of
from rlft.learners import check_learner_spec, check_reward_needed
from rlft.rewards.base import POOL_KEYS, pool_spec
from rlft.rewards.f_regularised import check_task_alpha
from rlft.rewards.remote import RewardPool, check_pool_options

#: the logger callbacks `run.loggers` may name (JSON is always written: Tune's results are read from it)
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
#: task keys a sweep may not vary (they configure the experiment itself, not a trial)
UNSWEEPABLE = ("run", "sweep")


@dataclass(frozen=True)
class MLflowSettings:
    """MLflow tracking for `loggers: [..., mlflow]` (needs the `mlflow` package: `pip install rlft[mlflow]`)."""

    tracking_uri: str | None = None
    """Tracking server or local directory; None uses MLFLOW_TRACKING_URI (else ./mlruns)."""
    experiment_name: str | None = None
    """MLflow experiment; None uses the Tune experiment name."""
    tags: dict[str, str] | None = None
    """Tags added to every MLflow run (one run per trial)."""
    save_artifact: bool = False
    """Also upload each trial's directory (checkpoints included) as MLflow artifacts."""


@dataclass(frozen=True)
class WandbSettings:
    """Weights & Biases logging for `loggers: [..., wandb]` (needs `wandb` and WANDB_API_KEY or `wandb login`)."""

    project: str | None = None
    """W&B project; None uses the Tune experiment name."""
    group: str | None = None
    """W&B group of the runs (one run per trial); None uses the experiment name."""
    entity: str | None = None
    """W&B entity (user or team); None uses the logged-in default."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """W&B mode; `offline` writes locally for a later `wandb sync`."""


@dataclass(frozen=True)
class RunConfig:
    """How one task runs under Ray Tune: budget, evaluation, checkpoints, resources, storage, loggers."""

    iterations: int = 200
    """Learner iterations (`train_iteration()` calls) per trial."""
    eval_every: int = 10
    """Iterations between evaluations of the standard figures (per trial); between two evaluations each
    reported iteration carries the latest figures and their `eval_iteration`. The last iteration is
    always evaluated."""
    eval_samples: int = 1000
    """Samples of the fine-tuned (and, cached, the pretrained) sampler per evaluation."""
    checkpoint_every: int = 10
    """Iterations between Tune checkpoints (per trial); 0 = only at the end. Iteration rows are reported
    with the next checkpoint, so a trial restored from it never reports an iteration twice."""
    keep_checkpoints: int = 2
    """Checkpoints kept per trial: the best by J (`rlft.run.results` names the best) and, always, the latest."""
    storage_path: str = "~/rlft_results"
    """Where experiments are written: a local directory (made absolute) or a cloud URI (s3://, gs://);
    on a multi-node cluster use a cloud URI or a shared file system."""
    name: str | None = None
    """Experiment directory name under storage_path; None = `<config file stem>_<date-time>`."""
    cpus_per_trial: float = 1.0
    """CPUs reserved for each trial's own process (fractional allowed, > 0)."""
    gpus_per_trial: float = 0.0
    """GPUs reserved for each trial's own process (fractional allowed: 0.5 = two trials per GPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a trial puts the model and reward: auto = cuda when the trial was given a GPU."""
    max_concurrent_trials: int = 0
    """Most trials running at once in a sweep (global); 0 = as many as the cluster's resources fit."""
    max_failures: int = 0
    """Times a failed trial is restarted from its last checkpoint (Tune FailureConfig); -1 = forever."""
    num_env_runners: int = 0
    """RLlib trials: remote EnvRunner actors per trial (0 = sample in the trial's process)."""
    num_envs_per_env_runner: int = 1
    """RLlib trials: vectorised sub-environments per EnvRunner."""
    cpus_per_env_runner: float = 1.0
    """RLlib trials: CPUs reserved per remote EnvRunner."""
    num_learners: int = 0
    """RLlib trials: remote Learner actors per trial (0 = learn in the trial's process)."""
    gpus_per_learner: float = 0.0
    """RLlib trials: GPUs per remote Learner (fractional allowed); used only with num_learners >= 1."""
    workers_per_trial: int = 1
    """Differentiable learners: data-parallel workers per trial, each with batch_size / N paths (rlft.run.parallel)."""
    cpus_per_worker: float = 1.0
    """CPUs per data-parallel Ray Train worker (workers_per_trial > 1: N workers; the trial's process only drives them)."""
    gpus_per_worker: float = 0.0
    """GPUs per data-parallel Ray Train worker (NCCL when > 0, gloo when 0; gpus_per_trial must then be 0)."""
    loggers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = field(
        default_factory=lambda: ["tensorboard", "csv"]
    )
    """Tune logger callbacks (JSON results are always written)."""
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    """MLflow settings (used when `loggers` has mlflow)."""
    wandb: WandbSettings = field(default_factory=WandbSettings)
    """W&B settings (used when `loggers` has wandb)."""

    def __post_init__(self) -> None:
        positive_ints = ("iterations", "eval_every", "eval_samples", "keep_checkpoints", "num_envs_per_env_runner")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("checkpoint_every", "max_concurrent_trials", "num_env_runners", "num_learners"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0 (got {getattr(self, name)}); use 0 for the default")
        if self.max_failures < -1:
            raise ConfigError(f"run.max_failures must be >= -1 (got {self.max_failures}); -1 retries forever")
        if not self.cpus_per_trial > 0:
            raise ConfigError(f"run.cpus_per_trial must be > 0 (got {self.cpus_per_trial}); fractions like 0.5 are allowed")
        if self.workers_per_trial < 1 or not self.cpus_per_worker > 0 or (self.workers_per_trial > 1 and self.gpus_per_trial > 0):
            raise ConfigError(f"run.workers_per_trial must be >= 1 and run.cpus_per_worker > 0, and with workers_per_trial > 1 run.gpus_per_trial "
                              f"must be 0 (the Train workers take run.gpus_per_worker each; the trial only drives them) (got {self.workers_per_trial}, "
                              f"{self.cpus_per_worker}, {self.gpus_per_worker}, {self.gpus_per_trial})")
        for name in ("gpus_per_trial", "gpus_per_learner", "cpus_per_env_runner", "gpus_per_worker"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise ConfigError(f"run.{name} must be a finite number >= 0 (got {value})")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ConfigError(f"run.gpus_per_trial must be <= 1 or a whole number (got {self.gpus_per_trial})")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"run.name must be a plain directory name without '/' (got {self.name!r})")
        if self.name is not None and (len(self.name) > 200 or any(not (c.isalnum() or c in "._-=,+") for c in self.name)):
            raise ConfigError(f"run.name {self.name[:40]!r}{'...' if len(self.name) > 40 else ''} ({len(self.name)} characters) "
                              "must be at most 200 letters, digits or . _ - = , +: choose another --name / run.name")
        if self.device == "cuda" and self.gpus_per_trial == 0 and not (self.workers_per_trial > 1 and self.gpus_per_worker > 0):
            raise ConfigError("run.device is 'cuda' but run.gpus_per_trial is 0, so Ray gives the trial no GPU; set "
                              "run.gpus_per_trial (e.g. 1 or 0.5) or run.device: auto")
        if not self.storage_path:
            raise ConfigError("run.storage_path must not be empty; give a local directory or a cloud URI")
        if "://" not in self.storage_path:  # local: absolute, so Tune and every worker agree on it
            object.__setattr__(self, "storage_path", os.path.abspath(os.path.expanduser(self.storage_path)))
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"run.loggers lists a logger twice (got {self.loggers})")

    @property
    def is_cloud_storage(self) -> bool:
        """True when storage_path is a URI (s3://, gs://, ...) rather than a local directory."""
        return "://" in self.storage_path

    def resource_bundles(self) -> list[dict[str, float]]:
        """Bundles of one trial: its process, EnvRunners, Learners, then N > 1 Train workers (Train reserves those).

        Mirrors RLlib's `Algorithm.default_resource_request` so an RLlib algorithm built inside the trial
        finds its actors' resources in the trial's placement group.
        """
        head = {"CPU": self.cpus_per_trial}
        if self.gpus_per_trial > 0:
            head["GPU"] = self.gpus_per_trial
        bundles = [head]
        if self.cpus_per_env_runner > 0:
            bundles += [{"CPU": self.cpus_per_env_runner} for _ in range(self.num_env_runners)]
        for _ in range(self.num_learners):
            learner = {"CPU": 1.0} if self.gpus_per_learner == 0 else {"GPU": self.gpus_per_learner}
            bundles.append(learner)
        worker = {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker > 0 else {})}
        return bundles + [dict(worker) for _ in range(self.workers_per_trial if self.workers_per_trial > 1 else 0)]  # Train's own group


@dataclass(frozen=True)
class SweepGrid:
    """The grid of `rlft sweep`: dotted task keys and their values (alpha first); one trial per combination."""

    params: dict[str, list[Any]] = field(default_factory=dict)
    """{dotted.key: [values, ...]} in trial order, alpha first."""

    def __bool__(self) -> bool:
        return bool(self.params)

    @property
    def num_trials(self) -> int:
        """Number of combinations (1 for an empty grid: the base task)."""
        return math.prod(len(v) for v in self.params.values())

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination as {dotted.key: value}, the last key varying fastest."""
        keys = list(self.params)
        return [dict(zip(keys, values)) for values in itertools.product(*self.params.values())]


# -- overrides --------------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Returns a deep copy of a task mapping with `{dotted.key: value}` overrides set (mappings created).

    Raises:
        ConfigError: a key walks through a value that is not a mapping.
    """
    out = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted key like 'alpha' or 'learner.lr'")
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"cannot set {key}: {where} is {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = copy.deepcopy(value)
    return out


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """Parses `--set key=value` arguments; values are YAML (numbers like 1e-3 are read as numbers)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must look like key=value, e.g. --set learner.lr=1e-3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        out[key.strip()] = value
    return out


# -- validation -------------------------------------------------------------------------------------


def check_components(task: TaskConfig) -> None:
    """Checks the reward's keyword arguments and parses the learner's typed options (builds nothing).

    The learner section goes through `rlft.learners.check_learner_spec`: `learner.type` is resolved through
    the registry and the other keys are parsed into the learner's frozen `Options` dataclass, so an unknown
    key or a bad value fails here, before Ray starts, with its path (`learner.<key>`) in the message.
    """
    cls, options = check_learner_spec(task.learner)
    check_zero_alpha(task, options)
    check_reward_needed(cls, task.reward)  # a task without `reward:` only for a learner that needs none
    if task.reward is not None:
        check_reward_spec(task.reward)
        check_task_alpha(task.reward, task.alpha)
    conditions_of(task)  # a malformed `conditions:` section fails here, before Ray starts
    check_data_parallel(task)


def check_data_parallel(task: TaskConfig) -> None:
    """run.workers_per_trial > 1 needs a differentiable learner whose batch_size the workers divide evenly."""
    n = parse_run(task.run).workers_per_trial
    cls, options = check_learner_spec(task.learner) if n > 1 else (None, None)
    if n > 1 and (not hasattr(cls, "grad_reducer") or options.batch_size % n):
        raise ConfigError(f"run.workers_per_trial = {n} needs a differentiable learner (elegant, no_kl, adjoint_matching, ...) with "
                          f"learner.batch_size a multiple of {n} (got {cls.__name__}, batch_size {getattr(options, 'batch_size', None)}); "
                          "each worker simulates batch_size / workers_per_trial paths. RLlib learners scale with run.num_learners")


def check_zero_alpha(task: TaskConfig, options: Any) -> None:
    """alpha = 0 only for a learner that trains without the KL term (`kl_penalty: false`) and has no tilted target."""
    if task.alpha == 0 and (getattr(options, "kl_penalty", True) or hasattr(options, "expert")):
        kind = (task.learner or {}).get("type", "elegant")
        what = ("its target p* ∝ exp(r/alpha) p_pre is undefined at alpha = 0" if hasattr(options, "expert") else
                "it keeps the KL term, which alpha = 0 removes: the objective is the reward alone, the control unbounded")
        raise ConfigError(f"alpha = 0 with learner {kind!r}: {what}; use alpha > 0, or learner type no_kl to "
                          "train on the reward alone")


def check_reward_spec(spec: dict[str, Any]) -> None:
    """Checks a `reward:` mapping's keys against its factory's signature (`model` is filled by rlft); a mapping
    with `workers:` (served by Ray actors) has its pool keys checked, then the served reward's own."""
    if "workers" in spec:
        pooled = pool_spec(spec)
        check_kwargs(RewardPool, {k: v for k, v in pooled.items() if k != "type"}, "reward", {"model": None})
        check_pool_options(*(pooled.get(k, d) for k, d in zip(POOL_KEYS, (1, 0, 1.0, 0.0, 2))))
        spec = pooled["reward"]
    params = {k: v for k, v in spec.items() if k != "type"}
    try:
        factory = registry.resolve("reward", spec["type"])
    except registry.RegistryError as err:
        raise ConfigError(f"reward.type: {err}") from None
    if isinstance(factory, type) or params or not _takes_only_x(factory):
        check_kwargs(factory, params, "reward", {"model": None})


def _takes_only_x(fn: Any) -> bool:
    """A plain reward function r(x) (wrapped as it is, without keyword arguments)."""
    try:
        required = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    except (TypeError, ValueError):
        return False
    return len(required) == 1


def validate_task(data: dict) -> TaskConfig:
    """Validates a task mapping completely: the task's keys and its reward's and learner's arguments."""
    task = task_from_dict(data)
    check_components(task)
    return task


def parse_run(section: dict | None) -> RunConfig:
    """Validates the `run:` section (None = all defaults)."""
    return from_dict(RunConfig, section or {}, "run")


def run_config_of(task: TaskConfig) -> RunConfig:
    """The hook learners use to read the run's length (`iterations`: what the trial loop runs) and resources
    (env runners, learners, GPUs) from their task; the defaults when the task has no `run:` section."""
    return parse_run(task.run)


def parse_sweep(section: dict | None, data: dict) -> SweepGrid:
    """Validates `sweep:` against the task mapping `data`: each value is applied to the task and re-validated."""
    if not section:
        return SweepGrid({})
    if not isinstance(section, dict):
        raise ConfigError(f"sweep must be a mapping {{dotted.key: [values, ...]}} (got {section!r})")
    task_keys = {f.name for f in dataclasses.fields(TaskConfig)}
    params: dict[str, list[Any]] = {}
    for key in sorted(section, key=lambda k: (k != "alpha", list(section).index(k))):  # alpha first
        values = section[key]
        top = str(key).split(".")[0]
        if top not in task_keys or top in UNSWEEPABLE:
            valid = sorted(task_keys - set(UNSWEEPABLE))
            raise ConfigError(
                f"sweep.{key} is not a task key a trial can vary; use a dotted key under one of {valid} "
                "(e.g. alpha, seed, learner.lr, reward.scale)"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key} must be a non-empty list of values (got {values!r})")
        for i, value in enumerate(values):
            try:
                validate_task(apply_overrides(_without_sections(data), {key: value}))
            except ConfigError as err:
                raise ConfigError(f"sweep.{key}[{i}] = {value!r} gives an invalid task: {err}") from None
        params[key] = list(values)
    grid = SweepGrid(params)
    if 1 < grid.num_trials <= 256 and len(params) > 1:  # combinations can clash (e.g. alpha=0 and a learner)
        for combo in grid.combinations():
            try:
                validate_task(apply_overrides(_without_sections(data), combo))
            except ConfigError as err:
                raise ConfigError(f"sweep combination {combo} gives an invalid task: {err}") from None
    return grid


def _without_sections(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "sweep"}


def experiment_from_dict(data: dict) -> tuple[TaskConfig, RunConfig, SweepGrid]:
    """Validates a whole experiment mapping (task + `run:` + `sweep:`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment config must be a mapping (got {data!r})")
    task = validate_task(data)
    run = parse_run(task.run)
    grid = parse_sweep(task.sweep, data)
    return task, run, grid


def load_experiment(
    path: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> tuple[TaskConfig, RunConfig, SweepGrid]:
    """Reads and validates an experiment YAML (task, `run:`, `sweep:`); builds nothing heavy.

    Args:
        path: the YAML file (it may name a `base:` file relative to itself).
        overrides: {dotted.key: value} set after loading, e.g. {"run.iterations": 5, "alpha": 0.3}.
    Returns:
        (task, run, grid): the validated task (its `run`/`sweep` sections kept as mappings), the parsed
        `RunConfig` and the `SweepGrid` (empty when the file has no `sweep:`).
    Raises:
        ConfigError: naming the dotted key, the value and the rule.
    """
    return experiment_from_dict(apply_overrides(load_yaml(path), overrides))
