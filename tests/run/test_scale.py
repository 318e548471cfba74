"""Data-parallel differentiable learners (`run.workers_per_trial`: rlft.run.parallel, rlft.run.train_workers).

The pinned fact: an update on N workers of B/N paths each takes the step of one learner whose gradient is the
mean of the N half-batch gradients, i.e. the gradient of the batch-mean objective on the concatenated batch of
B paths drawn from the same N seed streams. The reference is computed in this process with plain autograd; the
data-parallel update is `rlft.run.parallel.Rank` (what each Ray Train worker runs) on a gloo group of this
process (rank 0) and one Ray actor (rank 1). Full Ray Train runs (`rlft train` with 2 workers) are `slow`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
from pathlib import Path

import pytest
import torch

from rlft.config import ConfigError, task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.run.parallel import Rank, load_bytes, state_bytes, stream_seed, worker_task
from rlft.run_config import RunConfig, experiment_from_dict, run_config_of

MIX = {"type": "gmm", "weights": [0.6, 0.4], "means": [[1.0, 0.0], [-1.0, 0.5]], "stds": [0.4, 0.5]}


def _task(workers: int = 2, **learner):
    return {
        "model": MIX, "reward": {"type": "quadratic", "center": [1.0, 0.5], "scale": 1.0}, "alpha": 1.0,
        "num_steps": 8, "seed": 3,
        "learner": {"type": "no_kl", "batch_size": 64, "hidden": 16, "depth": 2, "max_grad_norm": 0.0,
                    "drift_iterations": 10, "drift_iterations_per_train_iteration": 1, "lr": 1e-2, **learner},
        "run": {"iterations": 10, "workers_per_trial": workers, "cpus_per_worker": 0.5, "cpus_per_trial": 0.5},
    }


def _learner(task):
    torch.manual_seed(task.seed)  # as the trial does before it builds the model
    model = build_model(task.model, task.num_steps)
    return build_learner(task, model, build_reward(task.reward, model=model))


def _join(address: str, rank: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))


class RankOne:
    """Rank 1 of a 2-rank gloo group in a Ray actor: one data-parallel iteration of its own learner."""

    def __init__(self, task) -> None:
        torch.set_num_threads(1)
        self.task, self.learner = task, _learner(task)

    def iteration(self, address: str):
        import torch.distributed as dist

        _join(address, 1)
        try:
            group = Rank(self.learner, self.task)
            group.sync()
            metrics = group.train_iteration()
            return metrics, [p.detach().clone() for p in self.learner._drift_params]
        finally:
            dist.destroy_process_group()


# -- options, before Ray --------------------------------------------------------------------------------


def test_options_are_checked_before_ray():
    with pytest.raises(ConfigError, match=r"run.workers_per_trial = 3 needs .* learner.batch_size a multiple of 3 \(got NoKLLearner, batch_size 64\)"):
        experiment_from_dict(_task(workers=3))
    with pytest.raises(ConfigError, match="run.workers_per_trial = 2 needs a differentiable learner"):
        experiment_from_dict({**_task(), "learner": {"type": "tests.run.test_runner:LinearLearner"}})
    with pytest.raises(ConfigError, match="with workers_per_trial > 1 run.gpus_per_trial must be 0"):
        RunConfig(workers_per_trial=2, gpus_per_trial=0.5, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="workers_per_trial must be >= 1"):
        RunConfig(workers_per_trial=0)
    # the trial's own bundle, then the N Train workers' (Train reserves those in its own placement group)
    bundles = RunConfig(workers_per_trial=3, cpus_per_worker=0.5, gpus_per_worker=0.5, cpus_per_trial=0.25).resource_bundles()
    assert bundles == [{"CPU": 0.25}, {"CPU": 0.5, "GPU": 0.5}, {"CPU": 0.5, "GPU": 0.5}, {"CPU": 0.5, "GPU": 0.5}]
    assert RunConfig(workers_per_trial=2, device="cuda", gpus_per_worker=1).device == "cuda"  # the workers' GPUs


def test_rlft_check_counts_the_train_workers(monkeypatch):
    import rlft.run.check as check

    task, run, _ = experiment_from_dict({**_task(workers=2), "run": {**_task()["run"], "cpus_per_worker": 1.0}})
    monkeypatch.setattr(check, "local_cpus", lambda: 2)  # 0.5 (trial) + 2 x 1 (workers) = 2.5 > 2
    with pytest.raises(ConfigError, match=r"2 x run.cpus_per_worker \(Ray Train workers\): one trial needs 2.5 CPUs but this machine has 2; "
                                          r".*lower run.cpus_per_worker or run.cpus_per_trial"):
        check.check_resources(run, task)
    monkeypatch.setattr(check, "local_cpus", lambda: 3)
    check.check_resources(run, task)


def test_trial_placement_group_holds_only_the_trials_own_bundle():
    from rlft.run.keys import TASK_KEY
    from rlft.run.tune import trial_resources

    pgf = trial_resources({TASK_KEY: _task(workers=2)})
    assert pgf.bundles == [{"CPU": 0.5}]  # Train reserves the 2 workers' bundles itself
    assert trial_resources({TASK_KEY: _task(workers=1)}).bundles == [{"CPU": 0.5}]


def test_each_worker_simulates_its_share_of_the_batch():
    task, _, _ = experiment_from_dict(_task(workers=2))
    assert worker_task(task, run_config_of(task)).learner["batch_size"] == 32
    one, _, _ = experiment_from_dict(_task(workers=1))
    assert worker_task(one, run_config_of(one)) is one  # N = 1: today's task, today's path


# -- one update on 2 workers == one update on the concatenated batch ---------------------------------------


def test_two_workers_take_the_step_of_the_concatenated_batch(ray_session):
    import torch.distributed as dist

    task, run, _ = experiment_from_dict(_task(workers=2))
    task = worker_task(task, run)  # 32 paths per worker, 64 in all

    # reference, in this process: rank 0's learner R; rank 1's half batch from a learner S on rank 1's stream
    ref = _learner(task)
    ref.setup()
    ref.setup_done = True
    setup_queries = ref.reward_queries
    half = _learner(task)
    load_bytes(half, state_bytes(ref))
    half._rng.manual_seed(stream_seed(task, 1, half.drift_updates))
    objectives = []

    def mean_with_other_half(params):  # (grad of R's half + grad of S's half) / 2: the concatenated batch's gradient
        obj, metrics = half.objective()
        objectives.append(float(obj.detach()))
        grads = torch.autograd.grad(obj, half._drift_params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = (p.grad - (g if g is not None else torch.zeros_like(p))) / 2  # p.grad holds -dJ_R/dtheta

    ref.grad_reducer = mean_with_other_half
    ref_metrics = ref.train_iteration()

    # the same update on 2 ranks: this process is rank 0, one Ray actor is rank 1
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    other = ray_session.remote(RankOne).options(num_cpus=0.5).remote(task)
    future = other.iteration.remote(address)
    learner = _learner(task)
    _join(address, 0)
    try:
        group = Rank(learner, task)
        group.sync()
        metrics = group.train_iteration()
        group.close()
    finally:
        dist.destroy_process_group()
    other_metrics, other_params = ray_session.get(future)
    ray_session.kill(other)
    for p_dp, p_ref, p_other in zip(learner._drift_params, ref._drift_params, other_params):
        torch.testing.assert_close(p_dp.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p_dp.detach(), p_ref.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p_other, p_dp.detach(), rtol=0, atol=0)  # the replicas stay identical
    key = next(k for k in metrics if k.endswith("objective"))
    assert metrics[key] == pytest.approx((ref_metrics[key] + objectives[0]) / 2, rel=1e-5)  # concatenated batch's J
    assert other_metrics[key] == metrics[key]  # every rank reports the same mean
    assert abs(objectives[0] - ref_metrics[key]) > 1e-3  # the two halves come from different seed streams
    assert learner.reward_queries == ref.reward_queries + (half.reward_queries - setup_queries)  # counted once each
    assert learner.grad_reducer is type(learner).grad_reducer  # closed: back to the one-process no-op


@pytest.mark.slow
def test_rlft_train_with_two_workers_reports_world_size(ray_session, tmp_path, capsys):
    """A 2-worker `rlft train` of a GMM task ends near the 1-worker run's gap closure and reports world_size 2,
    with every iteration recorded once."""
    import yaml

    from rlft import cli

    out = {}
    for workers in (1, 2):
        data = _task(workers=workers, batch_size=128, drift_iterations=40, lr=3e-2)
        data["learner"]["type"] = "elegant"
        data["learner"].pop("max_grad_norm")
        data["run"] = {**data["run"], "iterations": 20, "eval_every": 20, "eval_samples": 2000, "checkpoint_every": 10,
                       "storage_path": str(tmp_path), "name": f"dp{workers}", "loggers": ["csv"]}
        path = tmp_path / f"dp{workers}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert cli.main(["train", str(path), "--json"]) == 0
        out[workers] = json.loads(capsys.readouterr().out)
    assert out[2]["world_size"] == 2 and out[1]["world_size"] == 1
    assert out[2]["iteration"] == 20
    rows = [json.loads(line) for line in open(out[2]["history_path"])]
    assert [r["iteration"] for r in rows] == list(range(1, 21))
    assert abs(out[2]["gap_closure"] - out[1]["gap_closure"]) < 0.15, (out[1]["gap_closure"], out[2]["gap_closure"])


# -- a data-parallel worker killed mid-run ------------------------------------------------------------------

from rlft.control.baselines import NoKLLearner, NoKLOptions  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DyingOptions(NoKLOptions):
    """NO KL's options and `die_times` failures of data-parallel rank 1."""

    die_at: int = 0
    """The iteration at which rank 1's process exits (`die_times` times in all: `marker` counts them)."""
    die_times: int = 1
    """How many times rank 1 dies at `die_at`."""
    marker: str = ""
    """A file that counts rank 1's deaths, so the restarted rank 1 lives once it has died `die_times` times."""


class DyingLearner(NoKLLearner):
    """NO KL, except that rank 1 of a data-parallel group exits at iteration `die_at` (as on a lost node)."""

    Options = DyingOptions
    name = "tests.run.test_scale:DyingLearner"

    def train_iteration(self):
        import os

        import torch.distributed as dist

        o = self.options
        deaths = len(Path(o.marker).read_text()) if Path(o.marker).exists() else 0
        if dist.is_initialized() and dist.get_rank() == 1 and self.iteration + 1 == o.die_at and deaths < o.die_times:
            Path(o.marker).write_text("x" * (deaths + 1))
            os._exit(1)
        return super().train_iteration()


def _dying_run(tmp_path, capsys, die_times: int) -> tuple[dict, list[dict]]:
    import yaml

    from rlft import cli

    marker = tmp_path / "died"
    data = _task(workers=2, type="tests.run.test_scale:DyingLearner", die_at=4, die_times=die_times, marker=str(marker))
    data["run"] = {**data["run"], "iterations": 5, "eval_every": 5, "eval_samples": 200, "checkpoint_every": 2,
                   "storage_path": str(tmp_path), "name": "dying", "loggers": ["csv"], "max_failures": 1}
    path = tmp_path / "dying.yaml"
    path.write_text(yaml.safe_dump(data))
    code = cli.main(["train", str(path), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert marker.read_text() == "x" * die_times and out["iteration"] == 5 and out["world_size"] == 2
    rows = [json.loads(line) for line in open(out["history_path"])]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["reward_queries"] for r in rows] == [64 * i for i in range(1, 6)]  # the re-run 3, 4 counted once
    progress = (Path(out["history_path"]).parent / "progress.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in progress[1:]] == [1, 2, 3, 4, 5]
    return out, rows


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_killed_worker_restarts_the_trial_from_its_checkpoint(ray_session, tmp_path, capsys):
    """Rank 1 (a Ray Train worker) dies at iteration 4 (checkpoint at 2): rank 0's collective fails, Train restarts
    the worker group from the checkpoint at 2 under FailureConfig(max_failures = 1) inside the same Tune trial (which
    never fails: no error file), and progress.csv and the history hold every iteration exactly once."""
    out, _ = _dying_run(tmp_path, capsys, die_times=1)
    trial = Path(out["history_path"]).parent
    assert not (trial / "error.txt").exists()  # Train's retry, not Tune's
    assert not (trial.parent / ".train").exists()  # Train's own copies of the checkpoints are removed at the end


@pytest.mark.slow
@pytest.mark.timeout(560)
def test_a_train_run_out_of_retries_resumes_from_tunes_checkpoint(ray_session, tmp_path, capsys):
    """Rank 1 dies twice at iteration 4: Train's one retry is spent, the Train run and the Tune trial fail, Tune
    retries the trial, and its new TorchTrainer resumes from Tune's checkpoint at 2 (`resume_from_checkpoint`, the
    path `rlft train --resume` takes too); every iteration is still recorded exactly once."""
    out, _ = _dying_run(tmp_path, capsys, die_times=2)
    assert (Path(out["history_path"]).parent / "error.txt").exists()  # this time Tune's retry
