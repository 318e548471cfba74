"""Ray and Ray Tune for `rlft train` / `rlft sweep`: connect, set up the Tuner, resources, loggers, resume.

Per-trial resources come from the config (fractional GPUs, RLlib env runners and learners: `RunConfig.
resource_bundles`, or the learner class's `trial_resources(task, run)`); retries from `FailureConfig`
(`run.max_failures`); `--resume` of an interrupted experiment is `Tuner.restore(..., resume_errored=True)`; Ctrl-C / SIGTERM
become Tune's graceful stop (`stop_on_signals`: the experiment state is saved one last time); logs are JSON always, then what `run.loggers` names (TensorBoard, CSV, MLflow, W&B).
Ray is imported inside the functions, so `rlft --help` and config validation never start it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlft.config import ConfigError
from rlft.learners import check_learner_spec
from rlft.run.keys import OBJECTIVE, TASK_KEY
from rlft.run.storage import log
from rlft.run.quiet import quiet_ray
import rlft.run.rows as rows
from rlft.run.trial import trial_main, trial_task
from rlft.rewards.remote import pool_bundles
from rlft.run_config import RunConfig, SweepGrid, run_config_of


def init_ray(address: str | None = None) -> None:
    """Connects to `address` (or RAY_ADDRESS, e.g. inside a Ray job), else starts a local Ray.

    The local instance uses this machine's CPUs and GPUs, no dashboard, and Ray's default (token)
    authentication; its workers find the project and the current directory on PYTHONPATH.
    """
    import ray

    quiet_ray()  # before init: Ray's token notice is logged while it starts
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one progress line per trial, not "[repeated 2x]"
    if not sys.stderr.isatty():  # the trials' lines reach a log file: no colour codes in their prefix
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        _init(ray, address)
    finally:
        quiet_ray()  # the handlers Ray may have (re)installed


def _init(ray, address: str | None) -> None:
    if address:  # an explicit cluster address (token auth then needs RAY_AUTH_MODE=token, see RAY_NOTES §4)
        ray.init(address=address)
        return
    if os.environ.get("RAY_ADDRESS"):  # e.g. inside a Ray job, whose runtime_env makes the project importable;
        ray.init()  # address=None lets Ray pick up RAY_ADDRESS and the token file if auth is on
        return
    root = Path(__file__).resolve().parents[2]
    paths = [str(root)] if (root / "rlft").is_dir() else []
    paths += [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}})


#: the signals `stop_on_signals` turns into Tune's graceful stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the logger of `tune.run`, whose interrupt warning ends with a `Tuner.restore(...)` hint
TUNE_LOGGER = "ray.tune.tune"


def _drop_tune_restore_hint(record: logging.LogRecord) -> bool:
    return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def stop_on_signals(received: list[int]) -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) and SIGTERM while Tune runs -> Tune's graceful stop; appends the signals to `received`.

    Enter it after `init_ray`: Ray's driver installs its own SIGTERM handler when it connects.

    Tune stops on SIGINT and SIGUSR1 alike (it saves the experiment state one last time, so `--resume` continues),
    but not on SIGTERM, and afterwards nothing tells its caller that the run was cut short. Here both signals are
    recorded and handed to Tune's SIGUSR1 handler (Tune's own SIGINT handler is disabled for the block). A second
    signal, or one before Tune has started, raises KeyboardInterrupt at once. Outside the main thread (where
    handlers cannot be set) nothing changes and the list stays empty.
    """
    def handler(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        first = not received
        received.append(signum)
        if first and callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)
        else:
            raise KeyboardInterrupt

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield received
        return
    previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
    tune_log = logging.getLogger(TUNE_LOGGER)
    tune_log.addFilter(_drop_tune_restore_hint)  # the driver prints rlft's own --resume command instead
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield received
    finally:
        tune_log.removeFilter(_drop_tune_restore_hint)
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def warn_if_unplaceable(run: RunConfig) -> None:
    """Tune waits silently for resources that do not exist: say so when the cluster is too small now."""
    import ray

    available = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for b in run.resource_bundles())
        if need > available.get(resource, 0.0):
            log(f"warning: one trial needs {need:g} {resource} but the cluster has {available.get(resource, 0.0):g}; "
                "its trials stay PENDING until an autoscaler adds nodes (check run.cpus_per_trial / gpus_per_trial)")


def run_experiment(data: dict, run: RunConfig, grid: SweepGrid, path: str, resume: bool = False):
    """Runs (or, with resume, restores and finishes) the Tune experiment; returns Tune's ResultGrid."""
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (relative paths)
    trainable = tune.with_resources(trial_main, trial_resources)
    name = os.path.basename(path.rstrip("/"))
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
                metric=OBJECTIVE, mode="max", max_concurrent_trials=run.max_concurrent_trials or None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=run.storage_path,
                callbacks=callbacks(run, name),
                # keep the best run.keep_checkpoints by J (the report names the best one) and, always, the latest
                checkpoint_config=tune.CheckpointConfig(num_to_keep=run.keep_checkpoints, checkpoint_score_attribute=OBJECTIVE,
                                                        checkpoint_score_order="max"),
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


def callbacks(run: RunConfig, name: str) -> list:
    """Tune logger callbacks: JSON always, then what run.loggers names (optional packages checked)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    out = [_keep_local_logs(JsonLoggerCallback)()]
    for logger in run.loggers:
        if logger == "csv":
            out.append(_keep_local_logs(CSVLoggerCallback)())
        elif logger == "tensorboard":
            _require("tensorboardX", "tensorboard", "pip install tensorboardX")
            out.append(TBXLoggerCallback())
        elif logger == "mlflow":
            _require("mlflow", "mlflow", "pip install 'rlft[mlflow]'")
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            s = run.mlflow
            out.append(MLflowLoggerCallback(
                tracking_uri=s.tracking_uri, experiment_name=s.experiment_name or name, tags=s.tags,
                save_artifact=s.save_artifact,
            ))
        elif logger == "wandb":
            _require("wandb", "wandb", "pip install 'rlft[wandb]' and run `wandb login` (or set WANDB_API_KEY)")
            from ray.air.integrations.wandb import WandbLoggerCallback

            s = run.wandb
            extra = {"entity": s.entity} if s.entity else {}
            out.append(WandbLoggerCallback(project=s.project or name, group=s.group or name, mode=s.mode, **extra))
    return out


_KEEP_LOCAL: dict[type, type] = {}


def _keep_local_logs(base: type) -> type:
    """Tune's JSON/CSV logger, except that a trial restarted by the same driver keeps its local log file.

    Tune replaces a restarted trial's local result.json/progress.csv with the copy in storage, which the
    driver syncs only every few checkpoints: rows logged since the last sync would vanish although the
    trial restarts from a later checkpoint. The driver's local file is complete, so it is kept; after a
    driver restart (`--resume`) there is none and the copy in storage is used, as Tune does.
    And a row for an iteration the file already holds (a trial restarted from an older checkpoint than its
    last row) replaces the rows from that iteration on (`rlft.run.rows`): every iteration exactly once.
    """
    if base not in _KEEP_LOCAL:

        class KeepLocal(base):
            def _restore_from_remote(self, file_name: str, trial) -> None:
                if trial.local_path and os.path.exists(os.path.join(trial.local_path, file_name)):
                    return
                super()._restore_from_remote(file_name, trial)

            def log_trial_result(self, iteration: int, trial, result: dict) -> None:
                # a re-run iteration (restart from an older checkpoint) replaces its first run's row: each once
                it = result.get(rows.ITERATION)
                if isinstance(it, int) and trial.local_path:
                    last = getattr(self, "_rlft_last", None)
                    if last is None:
                        last = self._rlft_last = {}
                    path = os.path.join(trial.local_path, self._SAVED_FILE_TEMPLATES[0])
                    if trial not in last:  # the file read once per trial and driver, then followed in memory
                        last[trial] = rows.last_iteration(path)
                    if last[trial] >= it:
                        self.log_trial_end(trial)  # closes the open file (reopened by the base on the next row)
                        rows.drop_rows_from(path, it)
                    last[trial] = it
                super().log_trial_result(iteration, trial, result)

        KeepLocal.__name__ = KeepLocal.__qualname__ = f"KeepLocal{base.__name__}"
        _KEEP_LOCAL[base] = KeepLocal
    return _KEEP_LOCAL[base]


def _require(module: str, logger: str, fix: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"run.loggers includes {logger!r} but the {module} package is not installed; {fix}, "
                          f"or remove {logger!r} from run.loggers")


def trial_resources(config: dict[str, Any]):
    """Placement group of one trial: the learner class's `trial_resources(task, run)` if it defines one,
    else `RunConfig.resource_bundles()` (its process, then RLlib EnvRunners and Learners)."""
    from ray.tune import PlacementGroupFactory

    task = trial_task(config)
    run = run_config_of(task)
    learner_cls, _ = check_learner_spec(task.learner)
    hook = getattr(learner_cls, "trial_resources", None)
    bundles = hook(task, run) if callable(hook) else run.resource_bundles()
    if run.workers_per_trial > 1:  # Ray Train reserves its N workers (and their reward actors run beside them)
        return PlacementGroupFactory(bundles[:1], strategy="PACK")
    return PlacementGroupFactory(bundles + pool_bundles(task.reward), strategy="PACK")


def _trial_dirname(trial) -> str:
    tag = re.sub(r"[^A-Za-z0-9._=,-]+", "_", trial.experiment_tag or "")[:80]
    return f"trial_{trial.trial_id}_{tag}".rstrip("_")
