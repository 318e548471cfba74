"""`rlft check CONFIG`: every configuration error before Ray starts, and the same check for train/sweep/submit.

The typed configs catch what a mapping alone can show (`rlft.config`, `rlft.run_config`, the learners' `Options`:
unknown keys, types, ranges, weights summing to 1, ...). This module orchestrates them and adds what needs built
objects or the machine:

1. the config file (not a directory) and the typed experiment (`experiment_from_dict`);
2. the pretrained model, built as a trial builds it (a missing or damaged model directory fails here);
3. the reward, built with the model and evaluated on a small pretrained batch: a floating tensor of shape (N,),
   finite (an integer reward is cast by `rlft.rewards.base.check_reward_values`, and said so here);
4. resources: the CPUs/GPUs of one trial against this machine's (a local Ray is started on it), or, with
   `--address` / RAY_ADDRESS, left to `rlft.run.tune.warn_if_unplaceable` against the cluster;
5. the storage path: not under a file, writable (the name's length and characters: `RunConfig`);
6. with `--resume`: the saved experiment exists and its newest good checkpoint fits the task (model, dimension,
   learner type).

Every failure is one `ConfigError` (what, where as a key path, the rule, the fix), which `rlft.cli.main` prints as
one message with exit status 2. Nothing is written and Ray is not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft.config import ConfigError, TaskConfig, load_yaml, model_config_to_dict
from rlft.rewards.remote import pool_bundles
from rlft.run.keys import EXPERIMENT_FILE, LEARNER_DIR
from rlft.run.storage import exists, join, log
from rlft.run_config import RunConfig, SweepGrid, apply_overrides, experiment_from_dict, parse_assignments

#: pretrained samples the reward is evaluated on
CHECK_BATCH = 256


@dataclass
class CheckReport:
    """What `check_experiment` found: the validated experiment and the lines of its one-screen summary."""

    data: dict[str, Any]
    task: TaskConfig
    run: RunConfig
    grid: SweepGrid
    path: str
    lines: list[str] = field(default_factory=list)


def register(subparsers) -> None:
    """Adds `rlft check`."""
    help_text = "check a config (model, reward, learner, resources, storage, --resume) without starting Ray"
    p = subparsers.add_parser("check", help=help_text, description=help_text)
    p.add_argument("config", help="experiment YAML (tune_configs/*.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a dotted key (repeatable)")
    p.add_argument("--resume", action="store_true", help="check that the experiment can be resumed")
    p.add_argument("--name", help="override run.name")
    p.add_argument("--storage-path", help="override run.storage_path")
    p.add_argument("--iterations", type=int, help="override run.iterations")
    p.add_argument("--sweep", action="store_true", help="check it as `rlft sweep` would (the sweep: grid is required)")
    p.add_argument("--address", help="Ray cluster address the run will use (resources are then the cluster's)")
    p.set_defaults(func=check_command)


def check_command(args: argparse.Namespace) -> int:
    """`rlft check`: runs every check and prints the summary (exit 0) or raises ConfigError (exit 2)."""
    report = check_args(args, sweep=args.sweep)
    print("\n".join(report.lines))
    print("ok: no problem found; nothing was written")
    return 0


def check_args(args: argparse.Namespace, sweep: bool, where: str = "local") -> CheckReport:
    """`check_experiment` from the train/sweep/check/submit command-line arguments."""
    overrides = parse_assignments(getattr(args, "set", []))
    for key, value in (("run.iterations", getattr(args, "iterations", None)),
                       ("run.storage_path", getattr(args, "storage_path", None)), ("run.name", getattr(args, "name", None))):
        if value is not None:
            overrides[key] = value
    address = getattr(args, "address", None)
    if where == "local" and (address or os.environ.get("RAY_ADDRESS")):
        where = "cluster"
    return check_experiment(args.config, overrides, sweep=sweep, resume=bool(getattr(args, "resume", False)),
                            where=where)


def check_experiment(config: str, overrides: dict[str, Any], sweep: bool = False, resume: bool = False,
                     where: str = "local") -> CheckReport:
    """Every check of a `rlft train|sweep|submit` of `config` (module docstring); writes nothing.

    Args:
        config: the YAML file.
        overrides: {dotted.key: value} as `--set` gives them (run.name, run.storage_path included).
        sweep: checked as `rlft sweep` (a `sweep:` grid is required).
        resume: the experiment must exist and fit the task.
        where: "local" (a local Ray on this machine: resources and storage checked here), "cluster" (a running
            cluster: its resources are checked when Ray connects) or "submit" (a job: storage is the cluster's).
    Raises:
        ConfigError: the first problem, as one message.
    """
    if os.getcwd() not in sys.path:  # a user's "module:Class" next to them, as on the workers
        sys.path.insert(0, os.getcwd())
    if Path(config).is_dir():
        raise ConfigError(f"config {config!r} is a directory; give a YAML file, e.g. tune_configs/gmm_elegant.yaml")
    data = apply_overrides(load_yaml(config), overrides)
    task, run, grid = experiment_from_dict(data)
    if sweep and not grid:
        raise ConfigError(f"{config} has no sweep: section; add e.g. `sweep: {{alpha: [0.1, 1.0]}}` or use rlft train")
    if not sweep:
        grid = SweepGrid({})
    if where != "submit":
        check_storage(run.storage_path)
    if where == "local":
        check_resources(run, task)
    path = join(run.storage_path, run.name or f"{Path(config).stem}_<date-time>")
    report = CheckReport(data, task, run, grid, path)
    model, reward_line = check_model_and_reward(task)
    if resume and run.name and where != "submit":  # a submitted job resumes from the cluster's storage
        check_resume(path, task, model)
    learner = (task.learner or {}).get("type", "elegant")
    options = {k: v for k, v in (task.learner or {}).items() if k != "type"}
    report.lines += [
        f"config    {config}" + (f" (--set {', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""),
        f"model     {task.model.type}: event shape {tuple(model.event_shape)}, K = {model.num_steps} steps",
        f"reward    {(task.reward or {}).get('type')}: {reward_line}",
        f"alpha     {task.alpha:g}",
        f"learner   {learner}" + (f" {options}" if options else " (its defaults)"),
        f"trials    {grid.num_trials} x {run.iterations} iterations" + (f" over {grid.params}" if grid else ""),
        f"resources per trial {_bundles_text(run)}; " + _available_text(where),
        f"results   {path}" + (" (resumed)" if resume else ""),
    ]
    return report


# -- the checks that need the built objects or the machine -------------------------------------------------


def check_model_and_reward(task: TaskConfig) -> tuple[Any, str]:
    """Builds the model and the reward as a trial does and evaluates the reward on pretrained samples.

    Returns:
        (the model, "mean ± s.e. on N pretrained samples" of the reward).
    """
    import torch

    from rlft.models import build_model
    from rlft.rewards import build_reward
    from rlft.rewards.base import RewardError, check_reward_values
    from rlft.sampling import sample

    torch.manual_seed(task.seed)
    where = getattr(task.model, "path", None)
    if isinstance(where, str) and where.startswith(("/", "~", ".")) and not Path(where).expanduser().is_dir():
        raise ConfigError(f"model.path {where!r} is not a directory (working directory {os.getcwd()}); give the "
                          "directory written by `rlft pretrain` (scorenet) or a diffusers model (unet/, scheduler/)")
    try:
        model = build_model(task.model, task.num_steps)
    except ConfigError:
        raise
    except Exception as err:  # a missing or damaged directory, a file of another format, ...
        fix = (f"check model.path ({where!r}, relative to {os.getcwd()}): it must be a directory written by `rlft "
               "pretrain` (scorenet) or a diffusers model" if where is not None else "check the model section")
        raise ConfigError(f"model ({task.model.type}) cannot be built: {_first_line(err)}; {fix}") from None
    spec = task.reward
    if spec is None:
        return model, "none (the learner needs no reward)"
    if "workers" in spec:  # served by Ray actors in the run: the served reward itself is checked here
        from rlft.rewards.base import pool_spec

        spec = pool_spec(spec)["reward"]
    try:
        reward = build_reward(spec, model=model)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"reward ({spec['type']}) cannot be built with {_args(spec)}: "
                          f"{_first_line(err)}; fix the reward's arguments") from None
    if getattr(reward, "conditional", False):
        return model, "conditional (called per condition in the run; not evaluated here)"
    n = CHECK_BATCH
    with torch.no_grad():
        x = sample(model, n, seed=task.seed, progress=False).x.to(device=model.device, dtype=model.dtype)
        try:
            raw = reward(x)
            dtype = getattr(raw, "dtype", None)
            values = check_reward_values(raw, n, spec["type"])
        except RewardError as err:
            raise ConfigError(f"reward ({spec['type']}) on {n} pretrained samples: {err}") from None
        except Exception as err:
            shape = tuple(model.event_shape)
            raise ConfigError(f"reward ({spec['type']}) fails on pretrained samples of shape {shape}: "
                              f"{_first_line(err)}; fix the reward's arguments ({_args(spec)}) to match the "
                              "model") from None
    v = values.double()
    note = "" if dtype is None or dtype.is_floating_point else f" (it returns {dtype}; rlft casts it to float)"
    return model, f"{v.mean().item():.4g} ± {v.std().item() / math.sqrt(n):.2g} (mean ± s.e., {n} pretrained samples){note}"


def check_storage(storage: str) -> None:
    """A local storage path must not lie under a file and its nearest existing directory must be writable."""
    if "://" in storage:
        return
    p = Path(storage)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"run.storage_path {storage!r} lies under {str(probe)!r}, which is a file, not a directory; "
                          "give a directory (e.g. --storage-path ~/rlft_results)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run.storage_path {storage!r} is not writable ({str(probe)!r} refuses writes); give a "
                          "directory you can write to (e.g. --storage-path ~/rlft_results)")
    if len(os.path.basename(storage.rstrip("/"))) > 255:
        raise ConfigError(f"run.storage_path {storage[:60]!r}... has a name longer than 255 characters; shorten it")


def check_resources(run: RunConfig, task: TaskConfig) -> None:
    """One trial's CPUs/GPUs against this machine's (the local Ray gets exactly these)."""
    import torch

    from rlft.learners import check_learner_spec

    cpus, gpus = local_cpus(), torch.cuda.device_count() if torch.cuda.is_available() else 0
    learner_cls, _ = check_learner_spec(task.learner)
    hook = getattr(learner_cls, "trial_resources", None)
    bundles = hook(task, run) if callable(hook) else run.resource_bundles()
    bundles = bundles + pool_bundles(task.reward) * run.workers_per_trial  # reward actors: each worker's own pool
    need_cpu = sum(b.get("CPU", 0.0) for b in bundles)
    need_gpu = sum(b.get("GPU", 0.0) for b in bundles)
    workers = f" + {run.workers_per_trial} x run.cpus_per_worker (Ray Train workers)" if run.workers_per_trial > 1 else ""
    if need_cpu > cpus:
        key = "run.cpus_per_trial" if len(bundles) == 1 else f"run.cpus_per_trial + RLlib env runners/learners/reward actors{workers}"
        fix = (f"lower run.cpus_per_worker or run.cpus_per_trial (the trial's process only drives the Train workers: "
               f"0.25 is enough)" if workers else f"set run.cpus_per_trial <= {cpus}")
        raise ConfigError(f"{key}: one trial needs {need_cpu:g} CPUs but this machine has {cpus}; a local Ray would "
                          f"wait for them forever: {fix} (fractions like 0.5 are allowed), or run on a cluster with --address")
    if need_gpu > gpus:
        raise ConfigError(f"run.gpus_per_trial{workers.replace('cpus', 'gpus')}: one trial needs {need_gpu:g} GPUs but this machine has {gpus}; set "
                          "run.gpus_per_trial: 0 (and run.device: auto), or run on a GPU cluster with --address")
    if run.device == "cuda" and gpus == 0:
        raise ConfigError("run.device is 'cuda' but this machine has no GPU (torch.cuda.is_available() is False); "
                          "use run.device: auto (or cpu), or run on a GPU cluster with --address")


def local_cpus() -> int:
    """CPUs a local Ray sees (the process's affinity where the system reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_resume(path: str, task: TaskConfig, model: Any) -> None:
    """The experiment at `path` exists and its newest good checkpoint was written for this task."""
    saved_file = join(path, EXPERIMENT_FILE)
    if not exists(saved_file):
        raise ConfigError(f"--resume: {path} holds no rlft experiment ({EXPERIMENT_FILE} is missing); check --name and "
                          "--storage-path, or run without --resume to start a new one")
    if "://" in path:
        return
    try:
        saved = json.loads(Path(saved_file).read_text())["task"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume: {saved_file} cannot be read ({err}); the experiment is damaged: start a new one "
                          "(another --name)") from None
    compare_tasks(saved, task, f"the experiment {path}")
    from rlft.api import newest_good_checkpoints

    for ckpt in newest_good_checkpoints(Path(path)):
        state_file = ckpt / LEARNER_DIR / "rlft.json"
        try:
            ckpt_task = json.loads(state_file.read_text()).get("task")
        except (OSError, ValueError):
            continue
        if isinstance(ckpt_task, dict):  # a trial's values (a sweep's grid) and a wrapped learner may differ here
            compare_tasks(ckpt_task, task, f"checkpoint {ckpt}", shape_only=True)


def compare_tasks(saved: dict[str, Any], task: TaskConfig, what: str, shape_only: bool = False) -> None:
    """Refuses a saved task whose model, dimension or learner type differs from `task` (naming the mismatch);
    with `shape_only`, only the model type and the dimension are compared."""
    from rlft.config import model_config_from_dict

    try:
        saved_model = model_config_to_dict(model_config_from_dict(saved.get("model")))
    except ConfigError:
        saved_model = saved.get("model")
    mine = model_config_to_dict(task.model)
    saved_learner = (saved.get("learner") or {}).get("type", "elegant")
    learner = (task.learner or {}).get("type", "elegant")
    mismatch = None
    if isinstance(saved_model, dict) and saved_model.get("type") != mine["type"]:
        mismatch = f"model type {saved_model.get('type')!r} there, {mine['type']!r} here"
    elif isinstance(saved_model, dict) and _dim(saved_model) != _dim(mine):
        mismatch = f"dimension {_dim(saved_model)} there, {_dim(mine)} here"
    elif shape_only:
        pass
    elif saved_learner != learner:
        mismatch = f"learner type {saved_learner!r} there, {learner!r} here"
    elif saved_model != mine:
        mismatch = "another pretrained model (model section differs)"
    elif saved.get("num_steps", 100) != task.num_steps:
        mismatch = f"num_steps {saved.get('num_steps', 100)} there, {task.num_steps} here"
    if mismatch:
        raise ConfigError(f"--resume: {what} was written for another task ({mismatch}); resume it with the config that "
                          "made it, or start a new experiment (another --name)")


def _dim(model: dict[str, Any]) -> Any:
    means = model.get("means")
    return len(means[0]) if isinstance(means, list) and means and isinstance(means[0], list) else model.get("path")


def _bundles_text(run: RunConfig) -> str:
    head = run.resource_bundles()
    cpu, gpu = sum(b.get("CPU", 0.0) for b in head), sum(b.get("GPU", 0.0) for b in head)
    return f"{cpu:g} CPU, {gpu:g} GPU (device {run.device})"


def _available_text(where: str) -> str:
    if where != "local":
        return "checked against the cluster when Ray connects"
    import torch

    return f"this machine: {local_cpus()} CPUs, {torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs"


def _args(spec: dict[str, Any]) -> str:
    return ", ".join(f"reward.{k}={v!r}" for k, v in spec.items() if k != "type") or "no arguments"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def log_summary(report: CheckReport) -> None:
    """The summary on stderr (train/sweep print it before Ray starts)."""
    for line in report.lines:
        log(line)
