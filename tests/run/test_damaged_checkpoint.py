"""A damaged newest checkpoint (a truncated file, a torn state file) is skipped with a warning naming it, and the
previous good one is used: by a trial restoring (`rlft.run.trial._restore`, what `rlft train --resume` runs), by
`rlft.load` / `rlft sample` on a trial or experiment folder, and end to end by `rlft train --resume` (slow)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

import rlft.cli as cli
from rlft.api import load
from rlft.checkpoint import CheckpointError
from rlft.config import task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.run.keys import ITERATION, LEARNER_DIR, REWARD_QUERIES, STATE_FILE
from rlft.run.sample_cli import sample_command
from rlft.run.trial import _restore, read_checkpoint_state, write_checkpoint

TASK = {
    "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 1.0], [-1.0, -1.0]], "stds": [0.5, 0.5]},
    "reward": {"type": "quadratic", "center": [1.0, 1.0]},
    "alpha": 1.0, "num_steps": 8, "seed": 3,
    "learner": {"type": "no_kl", "batch_size": 8, "learn_init": False},
}


def _learner():
    task = task_from_dict(TASK)
    torch.manual_seed(task.seed)
    model = build_model(task.model, task.num_steps)
    return build_learner(task, model, build_reward(task.reward, model=model))


def _trial(tmp_path: Path) -> tuple[Path, dict[int, torch.Tensor]]:
    """A trial folder with checkpoints at iterations 1, 2, 3 whose control weights differ; returns the weights."""
    learner = _learner()
    trial = tmp_path / "exp" / "trial_0"
    weights = {}
    for it in (1, 2, 3):
        with torch.no_grad():
            for p in learner.control().net.parameters():
                p.add_(0.1 * it)
        learner.iteration = it
        weights[it] = torch.cat([p.detach().flatten().clone() for p in learner.control().net.parameters()])
        ckpt = trial / f"checkpoint_{it - 1:06d}"
        ckpt.mkdir(parents=True)
        write_checkpoint(str(ckpt), learner, {ITERATION: it, REWARD_QUERIES: it})
    (tmp_path / "exp" / "rlft_experiment.json").write_text(__import__("json").dumps({"task": TASK, "grid": {}}))
    return trial, weights


def _flat(learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in learner.control().net.parameters()])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _control_file(ckpt: Path) -> Path:
    return next(p for p in (ckpt / LEARNER_DIR).iterdir() if p.suffix == ".safetensors")


@pytest.mark.parametrize("damage", ["control", "state", "learner_json", "missing_state"])
def test_restore_skips_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    from ray import tune  # Checkpoint objects only: Ray is not started

    trial, weights = _trial(tmp_path)
    newest = trial / "checkpoint_000002"
    if damage == "control":
        _truncate(_control_file(newest))
    elif damage == "state":
        _truncate(newest / STATE_FILE)
    elif damage == "learner_json":
        _truncate(newest / LEARNER_DIR / "rlft.json")
    else:
        (newest / STATE_FILE).unlink()
    with pytest.raises(CheckpointError):
        read_checkpoint_state(str(newest))
    learner = _learner()
    state, _ = _restore(learner, tune.Checkpoint(str(newest)), "t")
    err = capsys.readouterr().err
    assert state[ITERATION] == 2 and learner.iteration == 2
    assert torch.equal(_flat(learner), weights[2])  # the previous checkpoint's weights, not the damaged ones
    assert f"skipping the damaged checkpoint {newest}" in err


def test_restore_of_a_good_checkpoint_is_unchanged(tmp_path, capsys):
    from ray import tune

    trial, weights = _trial(tmp_path)
    learner = _learner()
    state, _ = _restore(learner, tune.Checkpoint(str(trial / "checkpoint_000002")), "t")
    assert state[ITERATION] == 3 and torch.equal(_flat(learner), weights[3])
    assert "damaged" not in capsys.readouterr().err


def test_restore_with_no_good_checkpoint_says_so(tmp_path):
    from ray import tune

    trial, _ = _trial(tmp_path)
    for ckpt in trial.iterdir():
        _truncate(_control_file(ckpt))
    with pytest.raises(CheckpointError, match="differs from what was written.*no older checkpoint of this trial passes"):
        _restore(_learner(), tune.Checkpoint(str(trial / "checkpoint_000002")), "t")


def test_load_and_sample_pick_the_newest_good_checkpoint(tmp_path, capsys):
    trial, weights = _trial(tmp_path)
    newest = trial / "checkpoint_000002"
    _truncate(_control_file(newest))
    for path in (trial, tmp_path / "exp"):
        sampler = load(path)
        assert sampler.checkpoint == trial / "checkpoint_000001" / LEARNER_DIR
        assert torch.equal(torch.cat([p.detach().flatten() for p in sampler.control.net.parameters()]), weights[2])
    assert f"skipping the damaged checkpoint {newest}" in capsys.readouterr().err
    out = tmp_path / "s.npy"
    args = argparse.Namespace(path=str(tmp_path / "exp"), num_samples=16, out=str(out), seed=None, png=False)
    assert sample_command(args) == 0  # `rlft sample EXPERIMENT -n 16 --out s.npy`
    import numpy as np

    x = np.load(out)
    assert x.shape == (16, 2)
    assert np.array_equal(x, load(trial / "checkpoint_000001").sample(16).numpy())


# -- end to end: rlft train, a trial killed at iteration 4, the newest checkpoint truncated, --resume ---------


@pytest.mark.slow
def test_train_resume_uses_the_previous_checkpoint(ray_session, tmp_path, capsys):
    from tests.cluster.faulty import LEARNER, theta_after, write_yaml

    progress = tmp_path / "progress.txt"
    data = {
        "model": TASK["model"], "reward": TASK["reward"], "num_steps": 4,
        "learner": {"type": LEARNER, "kill_at": 4, "kill_marker": str(tmp_path / "killed"),
                    "progress_file": str(progress)},
        "run": {"iterations": 5, "checkpoint_every": 1, "keep_checkpoints": 5, "eval_every": 1, "eval_samples": 10,
                "storage_path": str(tmp_path / "results"), "name": "damaged", "loggers": ["csv"], "max_failures": 0},
    }
    config = str(write_yaml(tmp_path / "damaged.yaml", data))
    assert cli.main(["train", config]) == 1  # the trial's process is killed at iteration 4: an errored trial
    (trial,) = [p for p in (tmp_path / "results" / "damaged").iterdir() if p.name.startswith("trial_")]
    checkpoints = sorted(p for p in trial.iterdir() if p.name.startswith("checkpoint_"))
    newest = checkpoints[-1]
    assert read_checkpoint_state(str(newest))[ITERATION] == 3
    _truncate(newest / LEARNER_DIR / "counting.json")
    capsys.readouterr()
    assert cli.main(["train", config, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"skipping the damaged checkpoint {newest}" in err  # the check's warning on the driver
    runs = [int(line.split()[0]) for line in progress.read_text().splitlines()]
    assert runs == [1, 2, 3, 3, 4, 5]  # resumed from the checkpoint at 2: iteration 3 ran again
    final = read_checkpoint_state(str(sorted(p for p in trial.iterdir() if p.name.startswith("checkpoint_"))[-1]))
    assert final[ITERATION] == 5 and final["last_eval"]["objective"] == theta_after(5)
    assert os.path.isfile(tmp_path / "results" / "damaged" / "rlft_results.json")
