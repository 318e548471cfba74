"""Data-parallel differentiable learners: `run: {workers_per_trial: N, gpus_per_worker: g}`.

One update of a `DifferentiableLearner` (rlft.control.rollout) maximises a batch mean,
J(theta) = 1/B sum_i j(theta; path_i), so its gradient over a batch of B = N b paths is the mean of the
gradients over N batches of b paths. With N workers each simulates b = B/N paths from its own seed
stream, the N gradients are averaged by an all-reduce (torch.distributed: gloo on CPU, NCCL on GPU) between
`backward()` and the optimiser step (`DifferentiableLearner.grad_reducer`), and every worker takes the same
Adam step from the same parameters, so the replicas stay identical without a parameter broadcast.

Design (and why not Ray Train's TorchTrainer inside the Tune trial). Rank 0 is the Tune trial's own
process and its learner is the trial's learner; ranks 1..N-1 are Ray actors the trial owns (`Replica`),
placed in the trial's placement group (`RunConfig.resource_bundles` reserves their bundles). So the trial
loop, its reports, its checkpoint manifest, resume and the exactly-once history of `rlft.run.trial` stay as
they are: rank 0 reports and checkpoints, the replicas never write. Train V2 inside Tune would move the
whole loop into a TorchTrainer with its own report/checkpoint path, a ~13 s worker-group start and a report
latency of ~1.7 s per `ray.train.report` at the default poll interval (RAY_NOTES §6), for no gain in
correctness here. N = 1 (the default) starts nothing and is today's path exactly.

What runs where:
- `setup()` (value-function and initial-law fits) runs once on rank 0, and its result reaches the replicas
  with the rest of the state (it is not data-parallel: the fits are short next to the drift updates);
- the state (networks, optimiser, counters) goes from rank 0 to every replica at start, after a restore and
  after setup, as the bytes of `save_checkpoint` (no shared file system needed);
- rank r >= 1 then draws its noise from its own stream, seeded by (task.seed, r, updates so far); rank 0
  keeps the learner's own stream, so on resume rank 0 repeats the one-worker run's draws exactly and the
  replicas start fresh streams;
- metrics are averaged over the ranks; reward queries are summed (each rank counts its own, as today).
If a replica's process dies mid-update, rank 0's all-reduce fails at once (gloo sees the closed connection; a
replica that hangs instead fails it after `COLLECTIVE_TIMEOUT_S`), the trial fails, and Tune restarts it from
its last checkpoint under `run.max_failures`; no iteration is lost or reported twice, because the rows since
that checkpoint were never reported (`rlft.run.trial`; tests/run/test_scale.py kills rank 1 to check this).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlft.config import TaskConfig
from rlft.learners import build_learner, check_learner_spec
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.run_config import RunConfig

#: the key of the world size in every reported row (and so in `--json`)
WORLD_SIZE = "world_size"
#: seconds a collective waits for a missing rank before it fails (a replica that died)
COLLECTIVE_TIMEOUT_S = 300.0


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


def _average_gradients(params: list[torch.Tensor]) -> None:
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


def _join(address: str, rank: int, world: int, device: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=address, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _state_bytes(learner) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="rlft_dp_") as tmp:
        learner.save_checkpoint(tmp)
        return {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}


def _load_bytes(learner, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="rlft_dp_") as tmp:
        for rel, data in files.items():
            Path(tmp, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        learner.load_checkpoint(tmp)


class Replica:
    """Rank r >= 1: a copy of the trial's learner that simulates its share of each update's batch."""

    def __init__(self, task: TaskConfig, rank: int, world: int, device: str) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.task, self.rank, self.world, self.device = task, rank, world, device
        torch.manual_seed(task.seed)
        model = build_model(task.model, task.num_steps).to(device=device)
        self.learner = build_learner(task, model, build_reward(task.reward, model=model).to(model.device))
        self.learner.grad_reducer = _average_gradients

    def join(self, address: str) -> None:
        _join(address, self.rank, self.world, self.device)

    def load(self, files: dict[str, bytes]) -> None:
        """Takes rank 0's state, then reseeds this rank's own noise stream."""
        _load_bytes(self.learner, files)
        # the learner's one RNG draws every update's initial states and window seeds: this rank's own stream
        self.learner._rng.manual_seed(stream_seed(self.task, self.rank, self.learner.drift_updates))

    def train_iteration(self) -> tuple[dict[str, float], int]:
        """One iteration in step with rank 0; its metrics and the reward queries it made."""
        before = self.learner.reward_queries
        metrics = self.learner.train_iteration()
        return metrics, int(self.learner.reward_queries - before)

    def parameters(self) -> list[torch.Tensor]:
        return [p.detach().cpu().clone() for p in self.learner._drift_params]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class DataParallel:
    """Rank 0's side: owns the replicas, keeps them in step, and runs the trial's learner as rank 0."""

    def __init__(self, learner, task: TaskConfig, run: RunConfig) -> None:
        import ray

        if not hasattr(learner, "grad_reducer"):
            raise TypeError(f"{type(learner).__name__} is not a DifferentiableLearner: run.workers_per_trial must be 1")
        self.learner, self.task, self.world = learner, task, run.workers_per_trial
        device = "cuda" if run.gpus_per_worker > 0 else "cpu"
        replica = ray.remote(Replica).options(num_cpus=run.cpus_per_worker, num_gpus=run.gpus_per_worker, max_restarts=0)
        self.replicas = [replica.remote(task, r, self.world, device) for r in range(1, self.world)]
        address = _free_address()
        joined = [a.join.remote(address) for a in self.replicas]
        _join(address, 0, self.world, torch.device(learner.model.device).type)
        ray.get(joined)
        learner.grad_reducer = _average_gradients
        self.sync()

    def sync(self) -> None:
        """Sends rank 0's whole state to every replica (after start, a restore and setup)."""
        import ray

        files = ray.put(_state_bytes(self.learner))
        ray.get([a.load.remote(files) for a in self.replicas])

    def train_iteration(self) -> dict[str, float]:
        """One data-parallel iteration: setup on rank 0 the first time, then every rank's updates in step."""
        import ray

        extra: dict[str, float] = {}
        if not self.learner.setup_done:
            extra = self.learner.setup()
            self.learner.setup_done = True
            self.sync()
        futures = [a.train_iteration.remote() for a in self.replicas]
        own = self.learner.train_iteration()
        others = ray.get(futures)
        metrics = {}
        for key, value in own.items():
            values = [value] + [m[key] for m, _ in others if key in m]
            metrics[key] = sum(values) / len(values)
        self.learner.reward_queries += sum(q for _, q in others)
        return {**extra, **metrics}

    def close(self) -> None:
        import ray
        import torch.distributed as dist

        ray.get([a.close.remote() for a in self.replicas])
        if dist.is_initialized():
            dist.destroy_process_group()
        for a in self.replicas:
            ray.kill(a)
        del self.learner.grad_reducer  # back to the class's no-op


def _free_address() -> str:
    """tcp://<this node's IP>:<a free port> for the process group's rendezvous."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    return f"tcp://{ip}:{port}"


def start(learner, task: TaskConfig, run: RunConfig) -> DataParallel | None:
    """The data-parallel group of a trial (None for run.workers_per_trial = 1: today's single-process path)."""
    return DataParallel(learner, task, run) if run.workers_per_trial > 1 else None
