"""One trial of `rlft train` / `rlft sweep`: build, restore, train, evaluate, report, checkpoint.

`trial_main` is the Tune function trainable. It
    1. builds the trial's task (the base task with the trial's grid values; its `run:` section is the one the
       loop runs, so a learner reading `rlft.run_config.run_config_of(task).iterations` sees the same number),
       the model, the reward (an f-regularised reward's lambda solved once here, `_prepared_task`) and the
       learner through `rlft.learners.build_learner`;
    2. restores Tune's latest checkpoint when there is one (a retry or `--resume`), continuing from the
       saved iteration;
    3. loops `train_iteration()`; evaluates `learner.evaluate()` on the first iteration of a fresh run,
       every `run.eval_every` iterations and at the last; every row carries the latest figures;
    4. reports the rows of iterations c+1..c' together with the checkpoint at c' (every
       `run.checkpoint_every` and at the end), so what is reported is exactly the history of states
       Tune can restore: after a failure at any point each iteration is reported once, none lost.
       Each checkpoint also carries that history (history.jsonl, rows 1..c'), the record that survives
       anything: the driver syncs Tune's own logs to storage only every few checkpoints, so a killed
       driver can lose their last rows (a trial restarted by a live driver keeps them: `rlft.run.tune`).
With run.workers_per_trial = N > 1 the loop (`train_loop`) runs on N Ray Train workers (`worker_main`, started
by `rlft.run.train_workers.fit`): rank 0 does all of the above, ranks >= 1 only update in step with it.

Checkpoint directory (data only; Tune copies it out of a temporary directory):
    learner/              what `learner.save_checkpoint` wrote (safetensors + JSON)
    history.jsonl         every reported row from iteration 1 to this checkpoint
    samples.safetensors   final checkpoint of a 2-D task: fine-tuned / pretrained / exact-target samples
    rlft_state.json       written last: {"format": "rlft_trial", "version": 1, iteration, wall time, latest
                          figures, and the size and sha256 of every other file}, checked before a load (a
                          torn copy is refused, never loaded). Version 0 (rlft before the format name) has
                          the same files and no "format"/"version" keys; it is read as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import rlft.checkpoint as checkpoint
from rlft.checkpoint import CheckpointError
from rlft.conditions import conditions_of
from rlft.config import TaskConfig
from rlft.evaluation import control_at, init_at
from rlft.learners import Learner, build_learner
from rlft.models import DiffusionModel, build_model
from rlft.rewards import build_reward, evaluate, prepare_reward_spec
from rlft.rewards.base import at_condition
from rlft.run.keys import (
    EVAL_ITERATION, HISTORY_FILE, ITERATION, ITERATION_TIME, LAST_EVAL, LEARNER_DIR, MANIFEST, OBJECTIVE, OPTIMAL_KL,
    OPTIMAL_REWARD, REWARD_QUERIES, SAMPLES_FILE, SAMPLES_FINETUNED, SAMPLES_PRETRAINED, SAMPLES_TARGET, STATE_FILE,
    TASK_KEY, TRAIN, WALL_TIME,
)
from rlft.run.storage import json_default, log
import rlft.run.parallel as parallel
import rlft.run.train_workers as train_workers
from rlft.run.progress import Progress
from rlft.run.quiet import quiet_ray
from rlft.run_config import RunConfig, apply_overrides, run_config_of, validate_task
from rlft.sampling import sample

TRIAL_FORMAT = "rlft_trial"
"""The format name in rlft_state.json."""
TRIAL_VERSION = 1
"""The newest checkpoint layout this code writes and reads (0: no format name, same files)."""
PLOT_SAMPLES = 2000
"""Samples per cloud in the 2-D plots."""
BEST_SCORE = OBJECTIVE
"""The figure the best evaluated iteration maximises: J (gap closure orders iterations alike where J* is exact)."""


def trial_task(config: dict[str, Any]) -> TaskConfig:
    """The trial's validated task: the base task (with its `run:` section) and the trial's grid values."""
    values = {k: v for k, v in config.items() if k != TASK_KEY}
    data = apply_overrides(config[TASK_KEY], values)
    data.pop("sweep", None)
    return validate_task(data)


def trial_main(config: dict[str, Any]) -> None:
    """Tune function trainable: build, restore, then train/evaluate/report/checkpoint to run.iterations.

    With run.workers_per_trial = N > 1 the same loop runs on N Ray Train workers (`worker_main`, started and
    forwarded to Tune by `rlft.run.train_workers.fit`); N = 1 runs it here, in the trial's process."""
    from ray import tune

    quiet_ray()  # RLlib's and Tune's notices about their own internals (rlft.run.quiet)
    task = trial_task(config)
    run = run_config_of(task)  # the hook learners read: the loop and their schedules see one number
    label = ", ".join(f"{k}={v}" for k, v in config.items() if k != TASK_KEY) or "trial"
    if run.workers_per_trial > 1:
        train_workers.fit(config, run, worker_main, label)
        return

    def report(rows: list[dict[str, Any]], directory: str | None) -> None:
        for row in rows[:-1]:
            tune.report(row)
        if rows:
            tune.report(rows[-1], checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    train_loop(task, run, label, tune.get_checkpoint(), report, _trial_device(run))


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker` of a data-parallel trial: this rank's share of `train_loop`."""
    quiet_ray()
    config = train_workers.trial_config(loop_config)
    task = trial_task(config)
    run = run_config_of(task)
    label = ", ".join(f"{k}={v}" for k, v in config.items() if k != TASK_KEY) or "trial"
    rank, world = train_workers.world()
    device = "cpu" if run.device == "cpu" else train_workers.device()  # Train's: cuda:<local rank> with gpus_per_worker
    train_loop(task, run, label, train_workers.get_checkpoint(loop_config) if rank == 0 else None, train_workers.report, device,
               rank=rank, world=world)


Report = Callable[[list[dict[str, Any]], "str | None"], None]
"""report(rows, checkpoint directory or None): called once per iteration, with the rows due (often none)."""


def train_loop(task: TaskConfig, run: RunConfig, label: str, ckpt, report: Report, device: str,
               rank: int = 0, world: int = 1) -> None:
    """The trial loop of one rank: rank 0 restores, evaluates, writes checkpoints and reports its rows; ranks >= 1
    (data parallel, `rlft.run.parallel.Rank`) only update in step with it and report nothing."""
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps).to(device=device)
    task = _prepared_task(task, model)
    reward = build_reward(task.reward, model=model).to(model.device) if task.reward is not None else None  # smeme, DG
    task = parallel.worker_task(task, run)  # learner.batch_size / run.workers_per_trial paths per worker
    learner = build_learner(task, model, reward)
    quiet_ray()  # again: RLlib installs its own log handler when the learner imports it
    state, history = _restore(learner, ckpt, label)
    group = parallel.Rank(learner, task) if world > 1 else None
    if group:
        group.sync()  # rank 0's (restored) state on every rank
    best = best_evaluated(history)  # a new best evaluation is checkpointed (`rlft.run.results` names it)
    last_eval: dict[str, Any] = state.get(LAST_EVAL) or {}
    wall = float(state.get(WALL_TIME, 0.0))
    pending: list[dict[str, Any]] = []
    progress = Progress(label, run.iterations, start=learner.iteration)
    while learner.iteration < run.iterations:
        start, before = time.perf_counter(), learner.iteration
        metrics = group.train_iteration() if group else learner.train_iteration()
        it = learner.iteration
        if it != before + 1:
            raise RuntimeError(f"{type(learner).__name__}.train_iteration() must add 1 to iteration ({before} -> {it})")
        if rank > 0:
            report([], None)  # in step with rank 0's (rlft.run.train_workers.report: Train's report is a barrier)
            continue
        final = it >= run.iterations
        if not last_eval or it % run.eval_every == 0 or final:
            last_eval = {**learner.evaluate(num_samples=run.eval_samples), EVAL_ITERATION: it}
            if best is None or last_eval.get(BEST_SCORE, -math.inf) > best.get(BEST_SCORE, -math.inf):
                best = {ITERATION: it, **last_eval}
        elapsed = time.perf_counter() - start
        wall += elapsed
        log(progress.line(it, metrics, last_eval, last_eval.get(EVAL_ITERATION)))
        pending.append({
            ITERATION: it, REWARD_QUERIES: int(learner.reward_queries), WALL_TIME: wall, ITERATION_TIME: elapsed,
            TRAIN: _numbers(metrics), parallel.WORLD_SIZE: world, **last_eval,
        })
        history.append(pending[-1])
        at_best = best is not None and best[ITERATION] == it > 1  # not the first row: it only records the start
        if final or at_best or (run.checkpoint_every and it % run.checkpoint_every == 0):
            samples, extra = _final_samples(learner) if final else ({}, {})
            state = {ITERATION: it, REWARD_QUERIES: int(learner.reward_queries), WALL_TIME: wall,
                     LAST_EVAL: last_eval, **extra}
            with tempfile.TemporaryDirectory(prefix="rlft_ckpt_") as tmp:
                write_checkpoint(tmp, learner, state, samples, history)
                report(pending, tmp)
            pending = []
        elif not run.checkpoint_every:  # no restore point between start and end: report at once
            report([pending.pop()], None)
        else:
            report([], None)
    if group:
        group.close()


def best_evaluated(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluated row (its figures from its own iteration) with the highest J, or None (no evaluation yet)."""
    evaluated = [r for r in rows
                 if r.get(EVAL_ITERATION) == r.get(ITERATION) and isinstance(r.get(BEST_SCORE), (int, float))]
    return max(evaluated, key=lambda r: r[BEST_SCORE], default=None)


def _prepared_task(task: TaskConfig, model: DiffusionModel) -> TaskConfig:
    """The task with an f-regularised reward's lambda solved once, here, and written into its reward spec
    (`prepare_reward_spec`), so the reward, the learner and every process it starts (RLlib env runners) reuse
    it instead of re-solving it from `num_samples` pretrained rollouts each."""
    if task.reward is None:  # a learner that needs no reward (checked before Ray starts)
        return task
    return dataclasses.replace(task, reward=prepare_reward_spec(task.reward, model, task.alpha))


def _trial_device(run: RunConfig) -> str:
    import ray

    if run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but this trial sees no GPU; set run.gpus_per_trial > 0 or device: auto")
    if run.device == "cuda" or (run.device == "auto" and ray.get_gpu_ids() and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


# -- the checkpoint manifest ------------------------------------------------------------------------------


def write_checkpoint(
    directory: str, learner: Learner, state: dict[str, Any], samples: dict | None = None,
    history: list[dict] | None = None,
) -> None:
    """Writes learner/, the plot samples, the rows so far and, last, rlft_state.json with a manifest of every file."""
    learner_dir = os.path.join(directory, LEARNER_DIR)
    os.makedirs(learner_dir)
    learner.save_checkpoint(learner_dir)
    if samples:
        checkpoint.save_tensors(os.path.join(directory, SAMPLES_FILE), {k: v.float() for k, v in samples.items()})
    if history is not None:
        Path(directory, HISTORY_FILE).write_text("".join(json.dumps(r, default=json_default) + "\n" for r in history))
    manifest = {rel: _file_digest(os.path.join(directory, rel)) for rel in _files(directory)}
    checkpoint.write_state(directory, TRIAL_FORMAT, TRIAL_VERSION, {**state, MANIFEST: manifest}, name=STATE_FILE)


def read_checkpoint_state(directory: str) -> dict[str, Any]:
    """rlft_state.json of a trial checkpoint (version 0 or 1) after checking every file against its manifest.

    Raises:
        CheckpointError: the state file is missing (a copy cut short), damaged, of a newer version, or a file
            differs from what was written.
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete and cannot be loaded")
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint state {path} cannot be read ({err}); the copy is damaged, restore an older checkpoint") from None
    if not isinstance(state, dict) or "format" in state or "version" in state:  # version >= 1: checked
        state = checkpoint.read_state(directory, TRIAL_FORMAT, TRIAL_VERSION, name=STATE_FILE)
    for rel, digest in state.get(MANIFEST, {}).items():
        full = os.path.join(directory, rel)
        if not os.path.isfile(full) or _file_digest(full) != digest:
            raise CheckpointError(f"checkpoint {directory}: {rel} is missing or differs from what was written; "
                                  "the copy is damaged, restore an older checkpoint")
    return state


def read_samples(directory: str) -> dict[str, torch.Tensor] | None:
    """The plot samples of a final checkpoint (None when it has none)."""
    path = os.path.join(directory, SAMPLES_FILE)
    return checkpoint.load_tensors(path) if os.path.isfile(path) else None


def read_history(directory: str) -> list[dict[str, Any]]:
    """The rows of iterations 1..c of the checkpoint at c (none for a checkpoint without history.jsonl)."""
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _restore(learner: Learner, ckpt, label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Loads Tune's checkpoint (if any) into the learner; returns the runner's state and the rows so far.

    A checkpoint that fails its manifest (a torn copy, a truncated file) is skipped with a warning naming it, and
    the newest older checkpoint of the trial that passes is used instead (`_older_checkpoints`)."""
    if ckpt is None:
        return {}, []
    error: CheckpointError | None = None  # the newest checkpoint's
    skipped: tuple[Any, CheckpointError] | None = None  # the last one that failed
    for tried, candidate in enumerate(_candidates(ckpt)):
        if skipped is not None:  # say so now that an older checkpoint exists to use instead
            log(f"[{label}] warning: skipping the damaged checkpoint {skipped[0]}: {skipped[1]}; trying {candidate.path}")
        with candidate.as_directory() as directory:
            try:
                state = read_checkpoint_state(directory)
            except CheckpointError as err:
                error, skipped = error or err, (getattr(candidate, "path", candidate), err)
                continue
            learner.load_checkpoint(os.path.join(directory, LEARNER_DIR))
            history = read_history(directory)
            break
    else:
        if tried == 0:
            raise error
        raise CheckpointError(f"{error} (and no older checkpoint of this trial passes its manifest check: start the "
                              "experiment again without --resume)") from None
    if learner.iteration != state[ITERATION]:
        raise RuntimeError(f"{type(learner).__name__}.load_checkpoint restored iteration {learner.iteration}, "
                           f"but the checkpoint was written at iteration {state[ITERATION]}")
    learner.reward_queries = max(int(learner.reward_queries), int(state[REWARD_QUERIES]))
    log(f"[{label}] restored from the checkpoint at iteration {state[ITERATION]}")
    return state, history


def _candidates(ckpt) -> Iterator:
    """Tune's checkpoint, then (listed only when asked for) the trial's older checkpoint_<n> directories, newest first."""
    yield ckpt
    yield from _older_checkpoints(ckpt)


def _older_checkpoints(ckpt) -> list:
    """The trial's checkpoint_<n> directories older than Tune's `ckpt`, newest first (local or cloud storage)."""
    import pyarrow.fs
    from ray import tune

    parent, name = os.path.split(str(getattr(ckpt, "path", "")).rstrip("/"))
    number = checkpoint_number(name)
    if number is None or getattr(ckpt, "filesystem", None) is None:
        return []
    infos = ckpt.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    older = [(n, i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory
             and (n := checkpoint_number(os.path.basename(i.path))) is not None and n < number]
    return [tune.Checkpoint(path, filesystem=ckpt.filesystem) for _, path in sorted(older, reverse=True)]


def checkpoint_number(name: str) -> int | None:
    """n of a Tune checkpoint directory named checkpoint_<n> (None for any other name)."""
    head, _, digits = name.partition("_")
    return int(digits) if head == "checkpoint" and digits.isdigit() else None


def _final_samples(learner: Learner) -> tuple[dict, dict]:
    """2-D tasks: fine-tuned, pretrained and exact-target samples for the plots, and the exact optimum (a conditional
    task's at its first training condition)."""
    model, reward, alpha = learner.model, learner.reward, learner.task.alpha
    if tuple(model.event_shape) != (2,):
        return {}, {}
    control, init, conditions = learner.control(), learner.init_dist(), conditions_of(learner.task)
    if conditions is not None:
        c = conditions.train[0].to(device=model.device, dtype=model.dtype)
        reward, control, init = at_condition(reward, c), control_at(control, c), init_at(init, c)
    seed = learner.task.seed + 2
    tuned = sample(model, PLOT_SAMPLES, control=control, init=init, seed=seed, progress=False)
    samples = {SAMPLES_FINETUNED: tuned.x, SAMPLES_PRETRAINED: sample(model, PLOT_SAMPLES, seed=seed + 1, progress=False).x}
    extra: dict[str, Any] = {}
    if alpha > 0 and hasattr(model, "exact_target") and getattr(reward, "exact_form", None) is not None:
        target = model.exact_target(reward, alpha)
        x = target.mixture.sample(PLOT_SAMPLES, torch.Generator().manual_seed(seed + 2))
        with torch.no_grad():
            r = float(evaluate(reward, x.to(device=model.device, dtype=model.dtype)).double().mean())
        samples[SAMPLES_TARGET] = x
        extra = {OPTIMAL_REWARD: r, OPTIMAL_KL: (r - target.optimal_objective) / alpha}  # KL* = (E*[r] - J*)/alpha
    return samples, extra


def _numbers(metrics: Any) -> dict[str, float]:
    """The learner's training metrics as plain floats (tensors and numpy scalars converted)."""
    out = {}
    for k, v in (metrics or {}).items():
        v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


def _file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}
