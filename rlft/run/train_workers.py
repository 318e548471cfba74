"""`run.workers_per_trial: N > 1` on Ray Train: a TorchTrainer of N workers inside the Tune trial (Train V2).

The Tune trial's process (`fit`) builds a `TorchTrainer` whose `train_loop_per_worker` is the trial loop of
`rlft.run.trial` (`worker_main`) on N Train workers, each with `run.cpus_per_worker` CPUs and
`run.gpus_per_worker` GPUs (gloo on CPU, NCCL on GPU; Train starts the process group), and the ranks keep in
step through `rlft.run.parallel.Rank`. When rank 0 has rows to report (at a checkpoint, or every iteration with
run.checkpoint_every = 0) every rank calls `ray.train.report` (Train's report is a barrier over the ranks; `report`
broadcasts rank 0's decision); only rank 0's carries rows (`ROWS`) and the trial checkpoint it wrote in rlft's format. On Train's controller a callback (`_Forward`) hands each batch of rows and its checkpoint
to the Tune trial's process, which reports them to Tune exactly as the one-worker loop does (the rows, the last
with the checkpoint, which Tune copies into the trial's storage) and only then lets Train go on.

Failures. A worker that dies fails the collective of the others at once; Train's controller sees it at its next
poll and restarts the worker group from its latest checkpoint (`FailureConfig(max_failures=run.max_failures)`),
which is the latest checkpoint Tune holds: rows since it were never forwarded, so each iteration is recorded
once. When Train's retries are spent `fit` raises, the trial fails, and Tune retries it (again under
run.max_failures) from Tune's checkpoint, handed to the new TorchTrainer's workers in their config (`RESUME`;
`rlft train --resume` takes the same path). Train's own copies of the checkpoints (at most two) live under the
experiment's `.train/<trial id>`; they are removed when the trial ends well and before a retry starts (so a
checkpoint Train registered but Tune never got is not resumed from: its rows were never reported).

Resources. Tune reserves the trial's own bundle (`run.cpus_per_trial`; it only drives the Train run); Train
reserves the N worker bundles in its own placement group when it starts. `RunConfig.resource_bundles` lists
all N + 1, and `rlft check` / `rlft.run.tune.warn_if_unplaceable` check that they fit.

Latency. Train's controller polls its workers every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (Ray's default 2 s);
a report waits for the previous one to be polled, so this sets it to `HEALTH_CHECK_S` unless the user did.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Any, Callable

from rlft.run_config import RunConfig

#: the key of rank 0's rows in its `ray.train.report` metrics
ROWS = "rlft_rows"
#: the keys of each worker's config: the Tune trial's config, and Tune's checkpoint to resume from (Train V2 has no
#: `resume_from_checkpoint`: a first run's `ray.train.get_checkpoint()` is None)
TRIAL, RESUME = "trial", "resume"
#: Train's controller poll interval (env var) and the value set when the user has not
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_S = "0.2"
#: Ray Train re-logs every print() of a worker through logging unless this is "0"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
#: seconds a collective waits for a missing rank before it fails (a worker that hangs rather than dies)
COLLECTIVE_TIMEOUT_S = 300


def world() -> tuple[int, int]:
    """(rank, world size) of this Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


@functools.cache
def device() -> str:
    """The torch device Train gave this worker ("cuda:i" or "cpu"; asked once per process: `report` needs it
    every iteration)."""
    import ray.train.torch

    return str(ray.train.torch.get_device())


def trial_config(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The Tune trial's config, from what `fit` hands each worker."""
    return loop_config[TRIAL]


def get_checkpoint(loop_config: dict[str, Any]):
    """The checkpoint this worker resumes from, as a Tune checkpoint: Train's latest (after a worker failure),
    else the Tune trial's (a Tune retry or `--resume`), else None."""
    import ray.train
    from ray import tune

    ckpt = ray.train.get_checkpoint()
    ckpt = loop_config[RESUME] if ckpt is None else ckpt
    return None if ckpt is None else tune.Checkpoint(ckpt.path, filesystem=ckpt.filesystem)


def report(rows: list[dict[str, Any]], directory: str | None) -> None:
    """Called by every rank once per iteration: when rank 0 has rows to report (with its checkpoint, if any), every
    rank calls `ray.train.report` (a barrier over the ranks; ranks >= 1 report nothing), else none does. Rank 0's
    decision reaches the others by a one-number broadcast over the process group, so between checkpoints an
    iteration pays no Train report at all."""
    import ray.train
    import torch
    import torch.distributed as dist

    due = torch.tensor([1 if rows else 0], device=device())
    dist.broadcast(due, src=0)
    if not int(due.item()):
        return
    ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
    ray.train.report({ROWS: rows} if rows else {}, checkpoint=ckpt)


def _forward_callback(rows_q, acks):
    from ray.train.v2.api.callback import UserCallback

    class _Forward(UserCallback):
        """On Train's controller: rank 0's rows and checkpoint to the Tune trial, then wait until Tune has them."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            rows = metrics[0].get(ROWS) if metrics else None
            if rows:
                rows_q.put((rows, None if checkpoint is None else (checkpoint.path, checkpoint.filesystem)))
                acks.get()  # Tune has copied the checkpoint: Train may now replace it

    return _Forward()


def fit(config: dict[str, Any], run: RunConfig, worker_main: Callable[[dict[str, Any]], None], label: str) -> None:
    """In the Tune trial: runs `worker_main(config)` on run.workers_per_trial Train workers and reports rank 0's
    rows and checkpoints to Tune as they come; raises when the Train run fails for good."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)  # propagated to Train's controller
    os.environ.setdefault(PRINT_PATCH_ENV, "0")  # the workers' progress lines once, not again through logging
    ctx = tune.get_context()
    name = f"{ctx.get_experiment_name()}/.train/{ctx.get_trial_id()}"
    rows_q, acks = Queue(maxsize=1, actor_options={"num_cpus": 0}), Queue(maxsize=1, actor_options={"num_cpus": 0})
    gpus = run.gpus_per_worker
    _remove_train_copies(run, name)  # a failed attempt's: Tune's checkpoint, not one Tune never got, is the restart point
    trainer = TorchTrainer(
        worker_main, train_loop_config={TRIAL: config, RESUME: tune.get_checkpoint()},
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.workers_per_trial, use_gpu=gpus > 0,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run.storage_path, callbacks=[_forward_callback(rows_q, acks)],
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            errors.append(err)

    thread = threading.Thread(target=target, name=f"rlft-train-{label}", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not rows_q.empty():
            try:
                rows, where = rows_q.get(timeout=0.5)
            except (Empty, queue.Empty):
                continue
            for row in rows[:-1]:
                tune.report(row)
            ckpt = None if where is None else tune.Checkpoint(where[0], filesystem=where[1])
            tune.report(rows[-1], checkpoint=ckpt)
            acks.put(True)
        thread.join()
    finally:
        for q in (rows_q, acks):
            q.shutdown(force=True)
    if errors:
        raise errors[0]
    _remove_train_copies(run, name)


def _remove_train_copies(run: RunConfig, name: str) -> None:
    """Deletes Train's run directory `name` (copies of checkpoints Tune holds), and `.train` once it is empty."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(run.storage_path) if run.is_cloud_storage else (pyarrow.fs.LocalFileSystem(), run.storage_path)
    run_dir = f"{root.rstrip('/')}/{name}"
    parent = run_dir.rsplit("/", 1)[0]
    try:
        fs.delete_dir(run_dir)
        if not fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True)):
            fs.delete_dir(parent)
    except OSError:  # another trial's run is still there, or the storage refused: the copies stay
        pass
