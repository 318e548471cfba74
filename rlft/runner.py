"""`rlft train` and `rlft sweep`: any learner, one trial or a grid over alpha (or any task key), on Ray Tune.

ELEGANT issue item 7 and the cluster issue's items 3-5: per-trial resources from the config (fractional
GPUs, RLlib env runners and learners), checkpoints, retries (`FailureConfig`), `--resume` of an
interrupted experiment (`Tuner.restore(..., resume_errored=True)`), TensorBoard/CSV logs (MLflow, W&B
optional). The runner drives a learner only through `rlft.learners.Learner`; it never knows which one.

The trial (`trial_main`, a Tune function trainable):
    1. builds model, reward and learner from its task (the base task with the trial's grid values);
    2. restores Tune's latest checkpoint when there is one (a retry or `--resume`), continuing from the
       saved iteration;
    3. loops `train_iteration()`; evaluates `learner.evaluate()` on the first iteration of a fresh run,
       every `run.eval_every` iterations and at the last; every row carries the latest figures;
    4. reports the rows of iterations c+1..c' together with the checkpoint at c' (every
       `run.checkpoint_every` and at the end), so what is reported is exactly the history of states
       Tune can restore: after a failure at any point each iteration is reported once, none lost.
       Each checkpoint also carries that history (history.jsonl, rows 1..c'), the record that survives
       anything: the driver syncs Tune's own logs to storage only every few checkpoints, so a killed
       driver can lose their last rows (a trial restarted by a live driver keeps them: `_keep_local_logs`).

A reported row: `iteration`, `reward_queries`, `wall_time` (s, summed over restarts), `iteration_time`,
`eval_iteration` (iteration of the figures), `train/<metric>` (the learner's own metrics), and the
figures of `rlft.evaluation` (reward, kl, objective, optimal_objective, gap_closure, diversity,
true_reward when known, energy_distance(_floor) and sliced_wasserstein when the target is exact,
pretrained/<figure>).

Checkpoint directory (data only; Tune copies it out of a temporary directory):
    learner/              what `learner.save_checkpoint` wrote (safetensors + JSON)
    history.jsonl         every reported row from iteration 1 to this checkpoint
    samples.safetensors   final checkpoint of a 2-D task: fine-tuned / pretrained / exact-target samples
    rlft_state.json       written last: iteration, wall time, latest figures, and the size and sha256 of
                          every other file, checked before a load (a torn copy is refused, never loaded)

Experiment directory `<run.storage_path>/<name>/`: Tune's files (one directory per trial with
progress.csv, result.json, TensorBoard events, checkpoint_*, and after the run rlft_history.jsonl, the
latest checkpoint's history), `rlft_experiment.json` (the validated
config; `--resume` reads it), `rlft_results.json` (the `--json` object) and `plots/*.png`.

`--json` output (one object on stdout; logs and progress go to stderr):
    rlft train:  {<figures of rlft.evaluation: reward, kl, objective, optimal_objective, gap_closure,
                  diversity, energy_distance, energy_distance_floor, ..., pretrained: {...}>,
                  iteration, reward_queries, wall_time, eval_iteration, train: {...}, config: {},
                  status, error, trial_path, checkpoint_path, history_path, optimal_reward, optimal_kl (exact
                  target only), experiment_path, plots: {samples: PATH}}
    rlft sweep:  {experiment_path, name, grid: {key: [values]}, num_trials, num_errors,
                  trials: [{config: {key: value}, <the per-trial keys above>}, ...] (grid order),
                  plots: {pareto: PATH, samples: PATH, "samples/<trial_id>": PATH, ...}}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlft.config import ConfigError, load_yaml
from rlft.run_config import (
    RunConfig,
    SweepGrid,
    apply_overrides,
    experiment_from_dict,
    parse_assignments,
    parse_run,
    validate_task,
)

# -- constants: names of files and reported keys ----------------------------------------------------
TASK_KEY = "rlft_task"  # the base task mapping inside every trial's Tune config
LEARNER_DIR = "learner"
STATE_FILE = "rlft_state.json"
SAMPLES_FILE = "samples.safetensors"
HISTORY_FILE = "history.jsonl"  # in a checkpoint: every row from iteration 1 up to it
TRIAL_HISTORY_FILE = "rlft_history.jsonl"  # in a trial directory after the run: the final checkpoint's history
EXPERIMENT_FILE = "rlft_experiment.json"
RESULTS_FILE = "rlft_results.json"
PLOTS_DIR = "plots"

ITERATION = "iteration"
EVAL_ITERATION = "eval_iteration"
REWARD_QUERIES = "reward_queries"
WALL_TIME = "wall_time"
ITERATION_TIME = "iteration_time"
TRAIN = "train"
CONFIG = "config"
STATUS = "status"
ERROR = "error"
TRIAL_PATH = "trial_path"
HISTORY_PATH = "history_path"
CHECKPOINT_PATH = "checkpoint_path"
EXPERIMENT_PATH = "experiment_path"
PLOTS = "plots"
OPTIMAL_REWARD = "optimal_reward"
OPTIMAL_KL = "optimal_kl"
#: keys Tune adds to every result (left out of the final figures)
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id",
    "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "timesteps_total", "episodes_total", "timesteps_since_restore",
}
_PLOT_SAMPLES = 2000  # samples per cloud in the 2-D plots


# -- command line -----------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Adds `rlft train` and `rlft sweep`."""
    for name, help_text in (
        ("train", "fine-tune one task as a one-trial Ray Tune experiment"),
        ("sweep", "run the config's `sweep:` grid (alpha first) as one Ray Tune experiment"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="task YAML with optional run: and sweep: sections (tune_configs/*.yaml)")
        p.add_argument("--json", action="store_true", help="print the final figures as one JSON object on stdout")
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted experiment (run.name, else the latest <config stem>_*)")
        p.add_argument("--storage-path", help="override run.storage_path (local directory or s3://, gs:// URI)")
        p.add_argument("--name", help="override run.name (the experiment directory under the storage path)")
        p.add_argument("--iterations", type=int, help="override run.iterations")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override any dotted key, e.g. --set alpha=0.3 --set learner.lr=1e-3 (repeatable)")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
        p.set_defaults(func=lambda args, _sweep=(name == "sweep"): run_command(args, sweep=_sweep))


def run_command(args: argparse.Namespace, sweep: bool) -> int:
    """`rlft train` / `rlft sweep`: validate, run (or resume) the Tune experiment, summarise, plot."""
    if os.getcwd() not in sys.path:  # a user's "module:Class" rewards/learners next to them, as on the workers
        sys.path.insert(0, os.getcwd())
    overrides = parse_assignments(args.set)
    for key, value in (("run.iterations", args.iterations), ("run.storage_path", args.storage_path),
                       ("run.name", args.name)):
        if value is not None:
            overrides[key] = value
    data = apply_overrides(load_yaml(args.config), overrides)
    task, run, grid = experiment_from_dict(data)
    command = "sweep" if sweep else "train"
    if sweep and not grid:
        raise ConfigError(f"{args.config} has no sweep: section; add e.g. `sweep: {{alpha: [0.1, 1.0]}}` or use rlft train")
    if not sweep:
        data.pop("sweep", None)
        grid = SweepGrid({})
    stem = Path(args.config).stem
    path = _experiment_path(run, stem, args.resume)
    if args.resume:
        saved = json.loads(_read_bytes(_join(path, EXPERIMENT_FILE)))
        if set(overrides) - {"run.storage_path", "run.name"}:
            _log(f"--resume continues {path} with its saved config; --set/--iterations are ignored")
        data = saved["task"]
        task, run, grid = experiment_from_dict(data)
        grid = SweepGrid(saved["grid"])
    else:
        saved = {"task": data, "grid": grid.params, "config_path": os.path.abspath(args.config), "command": command}
        _write_bytes(_join(path, EXPERIMENT_FILE), _dumps(saved))
    _log(f"rlft {command}: {grid.num_trials} trial(s) x {run.iterations} iterations -> {path}")
    init_ray(args.address)
    _warn_if_unplaceable(run)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # Tune's and the workers' printing is progress: stderr
        results = run_experiment(data, run, grid, path, resume=args.resume)
        trials = collect_trials(results, grid, path)
        plots = make_plots(trials, grid, path)
    out = _summary(trials, grid, path, plots, sweep)
    _write_bytes(_join(path, RESULTS_FILE), _dumps(out))
    print_table(trials, grid, stream=sys.stderr if args.json else stdout)
    if args.json:
        print(json.dumps(out, default=_json_default), file=stdout)
    errors = sum(t[STATUS] == "ERROR" for t in trials)
    if errors:
        _log(f"{errors} trial(s) failed; continue them from their last checkpoints with: "
             f"rlft {command} {args.config} --resume --name {os.path.basename(path)}"
             + (f" --storage-path {run.storage_path}" if args.storage_path else ""))
    return 1 if errors else 0


# -- Ray and Tune -----------------------------------------------------------------------------------


def init_ray(address: str | None = None) -> None:
    """Connects to `address` (or RAY_ADDRESS, e.g. inside a Ray job), else starts a local Ray.

    The local instance uses this machine's CPUs and GPUs, no dashboard, and Ray's default (token)
    authentication; its workers find the project and the current directory on PYTHONPATH.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one progress line per trial, not "[repeated 2x]"
    if address:  # an explicit cluster address (token auth then needs RAY_AUTH_MODE=token, see RAY_NOTES §4)
        ray.init(address=address)
        return
    if os.environ.get("RAY_ADDRESS"):  # e.g. inside a Ray job, whose runtime_env makes the project importable;
        ray.init()  # address=None lets Ray pick up RAY_ADDRESS and the token file if auth is on
        return
    root = Path(__file__).resolve().parents[1]
    paths = [str(root)] if (root / "rlft").is_dir() else []
    paths += [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}})


def _warn_if_unplaceable(run: RunConfig) -> None:
    """Tune waits silently for resources that do not exist: say so when the cluster is too small now."""
    import ray

    available = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for b in run.resource_bundles())
        if need > available.get(resource, 0.0):
            _log(f"warning: one trial needs {need:g} {resource} but the cluster has {available.get(resource, 0.0):g}; "
                 "its trials stay PENDING until an autoscaler adds nodes (check run.cpus_per_trial / gpus_per_trial)")


def run_experiment(data: dict, run: RunConfig, grid: SweepGrid, path: str, resume: bool = False):
    """Runs (or, with resume, restores and finishes) the Tune experiment; returns Tune's ResultGrid."""
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (relative paths)
    trainable = tune.with_resources(trial_main, _trial_resources)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"{path} holds no Tune experiment to resume; run without --resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        param_space = {TASK_KEY: data, **{k: tune.grid_search(v) for k, v in grid.params.items()}}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", max_concurrent_trials=run.max_concurrent_trials or None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=os.path.basename(path.rstrip("/")),
                storage_path=run.storage_path,
                callbacks=_callbacks(run, os.path.basename(path.rstrip("/"))),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=run.keep_checkpoints),
                failure_config=tune.FailureConfig(max_failures=run.max_failures),
                verbose=0,
            ),
        )
    previous = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # exactly the loggers run.loggers names
    try:
        return tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = previous


def _callbacks(run: RunConfig, name: str) -> list:
    """Tune logger callbacks: JSON always, then what run.loggers names (optional packages checked)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks = [_keep_local_logs(JsonLoggerCallback)()]
    for logger in run.loggers:
        if logger == "csv":
            callbacks.append(_keep_local_logs(CSVLoggerCallback)())
        elif logger == "tensorboard":
            _require("tensorboardX", "tensorboard", "pip install tensorboardX")
            callbacks.append(TBXLoggerCallback())
        elif logger == "mlflow":
            _require("mlflow", "mlflow", "pip install 'rlft[mlflow]'")
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            s = run.mlflow
            callbacks.append(MLflowLoggerCallback(
                tracking_uri=s.tracking_uri, experiment_name=s.experiment_name or name, tags=s.tags,
                save_artifact=s.save_artifact,
            ))
        elif logger == "wandb":
            _require("wandb", "wandb", "pip install 'rlft[wandb]' and run `wandb login` (or set WANDB_API_KEY)")
            from ray.air.integrations.wandb import WandbLoggerCallback

            s = run.wandb
            extra = {"entity": s.entity} if s.entity else {}
            callbacks.append(WandbLoggerCallback(project=s.project or name, group=s.group or name, mode=s.mode, **extra))
    return callbacks


_KEEP_LOCAL: dict[type, type] = {}


def _keep_local_logs(base: type) -> type:
    """Tune's JSON/CSV logger, except that a trial restarted by the same driver keeps its local log file.

    Tune replaces a restarted trial's local result.json/progress.csv with the copy in storage, which the
    driver syncs only every few checkpoints: rows logged since the last sync would vanish although the
    trial restarts from a later checkpoint. The driver's local file is complete, so it is kept; after a
    driver restart (`--resume`) there is none and the copy in storage is used, as Tune does.
    """
    if base not in _KEEP_LOCAL:

        class KeepLocal(base):
            def _restore_from_remote(self, file_name: str, trial) -> None:
                if trial.local_path and os.path.exists(os.path.join(trial.local_path, file_name)):
                    return
                super()._restore_from_remote(file_name, trial)

        KeepLocal.__name__ = KeepLocal.__qualname__ = f"KeepLocal{base.__name__}"
        _KEEP_LOCAL[base] = KeepLocal
    return _KEEP_LOCAL[base]


def _require(module: str, logger: str, fix: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"run.loggers includes {logger!r} but the {module} package is not installed; {fix}, "
                          f"or remove {logger!r} from run.loggers")


def _trial_task(config: dict[str, Any]):
    """The trial's validated task: the base task with the trial's grid values applied."""
    values = {k: v for k, v in config.items() if k != TASK_KEY}
    data = apply_overrides(config[TASK_KEY], values)
    data.pop("sweep", None)
    return validate_task(data)


def _trial_resources(config: dict[str, Any]):
    """Placement group of one trial: the learner class's `trial_resources(task, run)` if it defines one,
    else `RunConfig.resource_bundles()` (its process, then RLlib EnvRunners and Learners)."""
    from ray.tune import PlacementGroupFactory

    from rlft.learners import resolve_learner

    task = _trial_task(config)
    run = parse_run(task.run)
    hook = getattr(resolve_learner((task.learner or {}).get("type", "elegant")), "trial_resources", None)
    bundles = hook(task, run) if callable(hook) else run.resource_bundles()
    return PlacementGroupFactory(bundles, strategy="PACK")


def _trial_dirname(trial) -> str:
    tag = re.sub(r"[^A-Za-z0-9._=,-]+", "_", trial.experiment_tag or "")[:80]
    return f"trial_{trial.trial_id}_{tag}".rstrip("_")


# -- the trial --------------------------------------------------------------------------------------


def trial_main(config: dict[str, Any]) -> None:
    """Tune function trainable: build, restore, then train/evaluate/report/checkpoint to run.iterations."""
    import torch
    from ray import tune

    from rlft.learners import build_learner
    from rlft.models import build_model
    from rlft.rewards import build_reward

    task = _trial_task(config)
    run = parse_run(task.run)
    label = ", ".join(f"{k}={v}" for k, v in config.items() if k != TASK_KEY) or "trial"
    torch.manual_seed(task.seed)
    device = _trial_device(run)
    model = build_model(task.model, task.num_steps).to(device=device)
    reward = build_reward(task.reward, model=model).to(device)
    learner = build_learner(task, model, reward)
    state, history = _restore(learner, tune.get_checkpoint(), label)
    last_eval: dict[str, Any] = state.get("last_eval") or {}
    wall = float(state.get(WALL_TIME, 0.0))
    pending: list[dict[str, Any]] = []
    while learner.iteration < run.iterations:
        start, before = time.perf_counter(), learner.iteration
        metrics = learner.train_iteration()
        it = learner.iteration
        if it != before + 1:
            raise RuntimeError(f"{type(learner).__name__}.train_iteration() must add 1 to iteration ({before} -> {it})")
        final = it >= run.iterations
        if not last_eval or it % run.eval_every == 0 or final:
            last_eval = {**learner.evaluate(num_samples=run.eval_samples), EVAL_ITERATION: it}
            _log(f"[{label}] iteration {it}/{run.iterations}: " + _brief(last_eval))
        elapsed = time.perf_counter() - start
        wall += elapsed
        pending.append({
            ITERATION: it, REWARD_QUERIES: int(learner.reward_queries), WALL_TIME: wall, ITERATION_TIME: elapsed,
            TRAIN: _numbers(metrics), **last_eval,
        })
        history.append(pending[-1])
        if final or (run.checkpoint_every and it % run.checkpoint_every == 0):
            samples, extra = _final_samples(learner) if final else ({}, {})
            state = {ITERATION: it, REWARD_QUERIES: int(learner.reward_queries), WALL_TIME: wall,
                     "last_eval": last_eval, **extra}
            with tempfile.TemporaryDirectory(prefix="rlft_ckpt_") as tmp:
                write_checkpoint(tmp, learner, state, samples, history)
                for row in pending[:-1]:
                    tune.report(row)
                tune.report(pending[-1], checkpoint=tune.Checkpoint.from_directory(tmp))
            pending = []
        elif not run.checkpoint_every:  # no restore point between start and end: report at once
            tune.report(pending.pop())


def _trial_device(run: RunConfig) -> str:
    import ray
    import torch

    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but this trial sees no GPU; set run.gpus_per_trial > 0 or device: auto")
    if run.device == "cuda" or (run.device == "auto" and ray.get_gpu_ids() and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def write_checkpoint(
    directory: str, learner, state: dict[str, Any], samples: dict | None = None, history: list[dict] | None = None
) -> None:
    """Writes learner/, the plot samples, the rows so far and, last, rlft_state.json with a manifest of every file."""
    learner_dir = os.path.join(directory, LEARNER_DIR)
    os.makedirs(learner_dir)
    learner.save_checkpoint(learner_dir)
    if samples:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in samples.items()}, os.path.join(directory, SAMPLES_FILE))
    if history is not None:
        Path(directory, HISTORY_FILE).write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in history))
    manifest = {rel: _file_digest(os.path.join(directory, rel)) for rel in _files(directory)}
    _atomic_write(os.path.join(directory, STATE_FILE), _dumps({**state, "manifest": manifest}))


def read_checkpoint_state(directory: str) -> dict[str, Any]:
    """rlft_state.json of a checkpoint after checking every file against its manifest."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete and cannot be loaded")
    state = json.loads(Path(path).read_text())
    for rel, digest in state.get("manifest", {}).items():
        full = os.path.join(directory, rel)
        if not os.path.isfile(full) or _file_digest(full) != digest:
            raise RuntimeError(f"checkpoint {directory}: {rel} is missing or differs from what was written; "
                               "the copy is damaged, restore an older checkpoint")
    return state


def _restore(learner, checkpoint, label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Loads Tune's checkpoint (if any) into the learner; returns the runner's state and the rows so far."""
    if checkpoint is None:
        return {}, []
    with checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
        learner.load_checkpoint(os.path.join(directory, LEARNER_DIR))
        history = _read_history(directory)
    if learner.iteration != state[ITERATION]:
        raise RuntimeError(f"{type(learner).__name__}.load_checkpoint restored iteration {learner.iteration}, "
                           f"but the checkpoint was written at iteration {state[ITERATION]}")
    learner.reward_queries = max(int(learner.reward_queries), int(state[REWARD_QUERIES]))
    _log(f"[{label}] restored from the checkpoint at iteration {state[ITERATION]}")
    return state, history


def _read_history(directory: str) -> list[dict[str, Any]]:
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _final_samples(learner) -> tuple[dict, dict]:
    """2-D tasks: fine-tuned, pretrained and exact-target samples for the plots, and the exact optimum."""
    import torch

    from rlft.rewards import evaluate
    from rlft.sampling import sample

    model, reward, alpha = learner.model, learner.reward, learner.task.alpha
    if tuple(model.event_shape) != (2,):
        return {}, {}
    seed = learner.task.seed + 2
    tuned = sample(model, _PLOT_SAMPLES, control=learner.control(), init=learner.init_dist(), seed=seed, progress=False)
    samples = {"finetuned": tuned.x, "pretrained": sample(model, _PLOT_SAMPLES, seed=seed + 1, progress=False).x}
    extra: dict[str, Any] = {}
    if alpha > 0 and hasattr(model, "exact_target") and getattr(reward, "exact_form", None) is not None:
        target = model.exact_target(reward, alpha)
        x = target.mixture.sample(_PLOT_SAMPLES, torch.Generator().manual_seed(seed + 2))
        with torch.no_grad():
            r = float(evaluate(reward, x.to(device=model.device, dtype=model.dtype)).double().mean())
        samples["target"] = x
        extra = {OPTIMAL_REWARD: r, OPTIMAL_KL: (r - target.optimal_objective) / alpha}  # KL* = (E*[r] - J*)/alpha
    return samples, extra


# -- results ----------------------------------------------------------------------------------------


def collect_trials(results, grid: SweepGrid, grid_path: str = "") -> list[dict[str, Any]]:
    """One dict per trial (grid order): its grid values, status, final figures, paths, plot samples.

    `grid_path` is the experiment path; on cloud storage the trial paths are given as URIs of its scheme.
    """
    order = {_key(c): i for i, c in enumerate(grid.combinations())}
    trials = []
    for result in results:
        config = {k: result.config.get(k) for k in grid.params}
        metrics = result.metrics or {}
        trial: dict[str, Any] = {CONFIG: config, STATUS: "ERROR" if result.error else "TERMINATED",
                                 ERROR: _error_text(result.error)}
        trial.update({k: v for k, v in metrics.items() if k not in _TUNE_KEYS})
        trial[TRIAL_PATH] = _uri(result.path, grid_path)
        trial[CHECKPOINT_PATH] = _uri(result.checkpoint.path, grid_path) if result.checkpoint else None
        trial["_trial_id"] = metrics.get("trial_id") or os.path.basename(result.path)
        trial["_alpha"] = result.config.get("alpha", (result.config.get(TASK_KEY) or {}).get("alpha", 1.0))
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                state = read_checkpoint_state(directory)
                if not result.error:
                    trial.update({k: state[k] for k in (OPTIMAL_REWARD, OPTIMAL_KL) if k in state})
                if os.path.isfile(os.path.join(directory, HISTORY_FILE)):
                    trial[HISTORY_PATH] = _join(trial[TRIAL_PATH], TRIAL_HISTORY_FILE)
                    _write_bytes(trial[HISTORY_PATH], Path(directory, HISTORY_FILE).read_bytes())
                if not result.error and os.path.isfile(os.path.join(directory, SAMPLES_FILE)):
                    from safetensors.torch import load_file

                    trial["_samples"] = load_file(os.path.join(directory, SAMPLES_FILE))
        trials.append(trial)
    return sorted(trials, key=lambda t: order.get(_key(t[CONFIG]), len(order)))


def make_plots(trials: list[dict[str, Any]], grid: SweepGrid, path: str) -> dict[str, str]:
    """Writes the sample scatter(s), the per-trial sample grid and the reward-vs-KL (Pareto) picture."""
    from rlft import plots

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rlft_plots_") as tmp:
        local = {}
        with_samples = [t for t in trials if "_samples" in t]
        for t in with_samples:
            s = t["_samples"]
            name = "samples.png" if not grid else f"samples_{t['_trial_id']}.png"
            title = _label(t[CONFIG] if "alpha" in t[CONFIG] else {"alpha": t["_alpha"], **t[CONFIG]})
            title += f"  (reward {t.get('reward', float('nan')):.3f}, KL {t.get('kl', float('nan')):.3f})"
            local["samples" if not grid else f"samples/{t['_trial_id']}"] = plots.scatter_samples(
                os.path.join(tmp, name), s["finetuned"], s.get("target"), s.get("pretrained"), title)
        if grid and with_samples:
            panels = [{"finetuned": t["_samples"]["finetuned"], "target": t["_samples"].get("target"),
                       "pretrained": t["_samples"].get("pretrained"), "title": _label(t[CONFIG])} for t in with_samples]
            local["samples"] = plots.sample_grid(os.path.join(tmp, "samples_grid.png"), panels)
        points = [_pareto_point(t, grid) for t in trials if isinstance(t.get("reward"), float)]
        if grid and points:
            local["pareto"] = plots.pareto_plot(os.path.join(tmp, "pareto.png"), points)
        for key, file in local.items():
            target = _join(path, PLOTS_DIR, os.path.basename(file))
            _write_bytes(target, Path(file).read_bytes())
            out[key] = target
    return out


def _pareto_point(trial: dict[str, Any], grid: SweepGrid) -> dict[str, Any]:
    config = trial[CONFIG]
    others = {k: v for k, v in config.items() if k != "alpha"}
    return {
        "kl": trial.get("kl"), "reward": trial.get("reward"), "alpha": config.get("alpha", trial.get("_alpha", 0.0)),
        "label": f"α={config['alpha']:g}" if "alpha" in config else _label(config),
        "group": _label(others) if others and "alpha" in config else "",  # one line per setting of the rest
        OPTIMAL_KL: trial.get(OPTIMAL_KL), OPTIMAL_REWARD: trial.get(OPTIMAL_REWARD),
        "pretrained_reward": (trial.get("pretrained") or {}).get("reward"),
    }


def _summary(trials, grid: SweepGrid, path: str, plots: dict[str, str], sweep: bool) -> dict[str, Any]:
    public = [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials]
    if not public:
        raise RuntimeError(f"Tune returned no trial results for {path}; see the log above")
    if not sweep:
        return {**public[0], EXPERIMENT_PATH: path, PLOTS: plots}
    return {EXPERIMENT_PATH: path, "name": os.path.basename(path.rstrip("/")), "grid": grid.params,
            "num_trials": len(public), "num_errors": sum(t[STATUS] == "ERROR" for t in public),
            "trials": public, PLOTS: plots}


def print_table(trials: list[dict[str, Any]], grid: SweepGrid, stream=None) -> None:
    """A fixed-width table of the final figures, one row per trial."""
    stream = stream or sys.stdout
    columns = [(k, k) for k in grid.params] + [
        (STATUS, "status"), (ITERATION, "iter"), ("reward", "reward"), ("kl", "KL"), ("objective", "J"),
        ("optimal_objective", "J*"), ("gap_closure", "gap"), ("energy_distance", "E-dist"),
        ("energy_distance_floor", "floor"), ("diversity", "div"),
    ]
    rows = [[_cell(t[CONFIG].get(k) if k in grid.params else t.get(k)) for k, _ in columns] for t in trials]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)), file=stream)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=stream)


# -- storage (local directories and cloud URIs alike) ------------------------------------------------


def _experiment_path(run: RunConfig, stem: str, resume: bool) -> str:
    root = run.storage_path
    if resume:
        if run.name:
            return _join(root, run.name)
        from ray import tune

        candidates = sorted((n for n in _list_dirs(root) if n.startswith(f"{stem}_")), reverse=True)
        for name in candidates:
            if tune.Tuner.can_restore(_join(root, name)):
                return _join(root, name)
        raise ConfigError(f"--resume found no experiment {stem}_* under {root}; give --name NAME (or run.name)")
    if run.name:
        path = _join(root, run.name)
        if _exists(path):
            raise ConfigError(f"experiment {path} already exists; pass --resume to continue it or choose another run.name")
        return path
    base = f"{stem}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while _exists(_join(root, name)):
        n += 1
        name = f"{base}-{n}"
    return _join(root, name)


def _uri(path: str, like: str) -> str:
    """Tune's filesystem path as a URI with the scheme of `like` (unchanged for local storage)."""
    if "://" not in like or "://" in path:
        return path
    return f"{like.split('://', 1)[0]}://{path}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(target: str):
    import pyarrow.fs

    if "://" in target:
        return pyarrow.fs.FileSystem.from_uri(target)
    return pyarrow.fs.LocalFileSystem(), target


def _exists(target: str) -> bool:
    if "://" not in target:
        return os.path.exists(target)
    import pyarrow.fs

    fs, path = _filesystem(target)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _list_dirs(root: str) -> list[str]:
    if "://" not in root:
        return [p.name for p in Path(root).iterdir() if p.is_dir()] if os.path.isdir(root) else []
    import pyarrow.fs

    fs, path = _filesystem(root)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [os.path.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory]


def _write_bytes(target: str, data: bytes) -> None:
    """Writes a file atomically: rename of a temporary file locally, a single object PUT on cloud storage."""
    if "://" not in target:
        _atomic_write(target, data)
        return
    fs, path = _filesystem(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # needed by file://, harmless on object stores
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read_bytes(target: str) -> bytes:
    if "://" not in target:
        if not os.path.isfile(target):
            raise ConfigError(f"{target} does not exist; is this an experiment directory written by rlft?")
        return Path(target).read_bytes()
    fs, path = _filesystem(target)
    with fs.open_input_stream(path) as f:
        return f.read()


def _atomic_write(path: str, data: bytes) -> None:
    from rlft.files import atomic_path

    with atomic_path(path, prefix=".tmp_", suffix="") as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


def _file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


# -- small helpers ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, default=_json_default).encode()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _numbers(metrics: Any) -> dict[str, float]:
    """The learner's training metrics as plain floats (tensors and numpy scalars converted)."""
    out = {}
    for k, v in (metrics or {}).items():
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _brief(figures: dict[str, Any]) -> str:
    keys = ("reward", "kl", "objective", "optimal_objective", "gap_closure", "energy_distance")
    return " ".join(f"{k}={figures[k]:.4g}" for k in keys if isinstance(figures.get(k), (int, float)))


def _label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()) or "run"


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _error_text(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
