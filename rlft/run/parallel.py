"""Data-parallel differentiable learners: one rank's side of `run: {workers_per_trial: N, gpus_per_worker: g}`.

One update of a `DifferentiableLearner` (rlft.control.rollout) maximises a batch mean,
J(theta) = 1/B sum_i j(theta; path_i), so its gradient over a batch of B = N b paths is the mean of the
gradients over N batches of b paths. With N workers each simulates b = B/N paths from its own seed
stream, the N gradients are averaged by an all-reduce (torch.distributed: gloo on CPU, NCCL on GPU) between
`backward()` and the optimiser step (`DifferentiableLearner.grad_reducer`), and every rank takes the same
Adam step from the same parameters, so the replicas stay identical without a parameter broadcast.

This module is what each rank runs inside an initialised process group; who starts the ranks and the group is
`rlft.run.train_workers` (Ray Train's TorchTrainer inside the Tune trial). Per rank (`Rank`):
- the state (networks, optimiser, counters) goes from rank 0 to every rank at start (after rank 0's restore)
  and after setup, as the bytes of `save_checkpoint` broadcast over the group (no shared file system needed);
- `setup()` (the value-function and initial-law fits) runs once on rank 0 and reaches the others with that
  broadcast: it is not data-parallel (the fits run their own optimisers, outside `grad_reducer`; they are a
  one-off cost next to the drift updates);
- rank r >= 1 then draws its noise from its own stream, seeded by (task.seed, r, updates so far); rank 0
  keeps the learner's own stream, so on resume rank 0 repeats the one-worker run's draws exactly and the
  other ranks start fresh streams;
- metrics are averaged over the ranks; reward queries are summed into rank 0's counter (each rank counts its
  own, as one process does), so the count is the same as one worker's on the concatenated batch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from rlft.config import TaskConfig
from rlft.learners import check_learner_spec
from rlft.run_config import RunConfig

#: the key of the world size in every reported row (and so in `--json`)
WORLD_SIZE = "world_size"


def worker_task(task: TaskConfig, run: RunConfig) -> TaskConfig:
    """The task each rank builds its learner from: `learner.batch_size` divided by the number of workers."""
    n = run.workers_per_trial
    if n == 1:
        return task
    learner = dict(task.learner or {})
    _, options = check_learner_spec(task.learner)
    learner["batch_size"] = int(options.batch_size) // n
    return dataclasses.replace(task, learner=learner)


def stream_seed(task: TaskConfig, rank: int, updates: int) -> int:
    """The seed of rank r's noise stream from update `updates` on (rank 0 keeps the learner's own stream)."""
    return (int(task.seed) * 1_000_003 + rank * 7_919 + updates * 104_729) % 2**62


def average_gradients(params: list[torch.Tensor]) -> None:
    """All-reduces the gradients of `params` to their mean over the ranks (one flat buffer)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def state_bytes(learner) -> dict[str, bytes]:
    """The files `learner.save_checkpoint` writes, as {relative path: bytes}."""
    with tempfile.TemporaryDirectory(prefix="rlft_dp_") as tmp:
        learner.save_checkpoint(tmp)
        return {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}


def load_bytes(learner, files: dict[str, bytes]) -> None:
    """Loads what `state_bytes` returned into `learner`."""
    with tempfile.TemporaryDirectory(prefix="rlft_dp_") as tmp:
        for rel, data in files.items():
            Path(tmp, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        learner.load_checkpoint(tmp)


class Rank:
    """One rank of a data-parallel learner in an initialised process group (`torch.distributed`)."""

    def __init__(self, learner, task: TaskConfig) -> None:
        import torch.distributed as dist

        if not hasattr(learner, "grad_reducer"):
            raise TypeError(f"{type(learner).__name__} is not a DifferentiableLearner: run.workers_per_trial must be 1")
        self.learner, self.task = learner, task
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        learner.grad_reducer = average_gradients

    def sync(self) -> None:
        """Rank 0's whole state to every rank (at start and after setup); ranks >= 1 then reseed their stream."""
        import torch.distributed as dist

        box = [state_bytes(self.learner) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if self.rank > 0:
            load_bytes(self.learner, box[0])
            # the learner's one RNG draws every update's initial states and window seeds: this rank's own stream
            self.learner._rng.manual_seed(stream_seed(self.task, self.rank, self.learner.drift_updates))

    def train_iteration(self) -> dict[str, float]:
        """One iteration in step with the other ranks: setup on rank 0 the first time, then every rank's updates;
        the metrics averaged over the ranks, and (on rank 0) the reward queries of all ranks counted."""
        import torch.distributed as dist

        extra: dict[str, float] = {}
        if not self.learner.setup_done:
            if self.rank == 0:
                extra = self.learner.setup()
                self.learner.setup_done = True
            self.sync()
        before = self.learner.reward_queries
        own = self.learner.train_iteration()
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (own, int(self.learner.reward_queries - before)))
        metrics = {}
        for key, value in own.items():
            values = [m[key] for m, _ in gathered if key in m]
            metrics[key] = sum(values) / len(values)
        if self.rank == 0:
            self.learner.reward_queries += sum(q for _, q in gathered[1:])
        return {**extra, **metrics}

    def close(self) -> None:
        del self.learner.grad_reducer  # back to the class's no-op
