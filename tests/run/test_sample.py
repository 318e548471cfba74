"""`rlft.load` and `rlft sample`: a checkpoint of every learner family gives back the learner's own sampler.

Each checkpoint is built with `build_learner` + one `train_iteration` (tiny budgets) and saved three ways: the
learner directory, a trial checkpoint (`rlft.run.trial.write_checkpoint`) inside a trial directory, and that trial
inside an experiment folder. Loading any of them must give the same samples as
`rlft.sampling.sample(model, n, control=learner.control(), init=learner.init_dist(), seed=s)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rlft
from rlft.checkpoint import CheckpointError
from rlft.cli import main
from rlft.config import DEFAULT_TASK, task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.rewards import build_reward
from rlft.run.keys import EXPERIMENT_FILE, ITERATION, LEARNER_DIR, REWARD_QUERIES, TASK_KEY, WALL_TIME
from rlft.run.trial import write_checkpoint
from rlft.sampling import sample

ROOT = Path(__file__).resolve().parents[2]
#: ELEGANT / baseline budgets small enough for a unit test
TINY = {
    "batch_size": 16, "drift_iterations_per_train_iteration": 2, "drift_iterations": 10, "hidden": 16, "depth": 2,
    "init_steps": 3, "init_iterations": 2, "init_batch_size": 16, "value_starts": 16, "value_rollouts": 2,
    "value_iterations": 2,
}
PPO_TINY = {"episodes_per_iteration": 16, "num_envs": 16, "minibatch_size": 64, "num_epochs": 1, "hidden": 16,
            "save_rllib_checkpoint": False}
LEARNERS = {
    "elegant": {"type": "elegant", **TINY},
    "no_kl": {"type": "no_kl", **{k: TINY[k] for k in ("batch_size", "drift_iterations_per_train_iteration",
                                                      "drift_iterations", "hidden", "depth")}},
    "truncation": {"type": "truncation", "truncation_steps": 2, **{k: TINY[k] for k in (
        "batch_size", "drift_iterations_per_train_iteration", "drift_iterations", "hidden", "depth")}},
    "random_k": {"type": "random_k", **{k: TINY[k] for k in (
        "batch_size", "drift_iterations_per_train_iteration", "drift_iterations", "hidden", "depth")}},
    "ppo_kl": {"type": "ppo_kl", **PPO_TINY},
    "fpg": {"type": "fpg", **PPO_TINY, "expert": {"type": "gmm", "weights": [1.0], "means": [[1.0, 1.0]], "stds": [0.3]},
            "num_expert_samples": 500, "num_disc_updates": 2, "disc_batch_size": 64},
}
RLLIB = ("ppo_kl", "fpg")
N, SEED = 48, 11


def _task_dict(learner: dict) -> dict:
    return {**DEFAULT_TASK, "num_steps": 5, "seed": 3, "learner": learner, "run": {"iterations": 2}}


def _save(learner, root: Path, data: dict) -> dict[str, Path]:
    """The learner's checkpoint saved as a learner directory, a trial checkpoint, and an experiment folder."""
    plain = root / "learner"
    plain.mkdir()
    learner.save_checkpoint(str(plain))
    experiment = root / "experiment"
    trial = experiment / "trial_0001"
    ckpt = trial / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    state = {ITERATION: learner.iteration, REWARD_QUERIES: int(learner.reward_queries), WALL_TIME: 0.0}
    write_checkpoint(str(ckpt), learner, state, None, [])
    (trial / "params.json").write_text(json.dumps({TASK_KEY: data}))
    (experiment / EXPERIMENT_FILE).write_text(json.dumps({"task": data}))
    return {"learner": plain, "trial_checkpoint": ckpt, "trial": trial, "experiment": experiment}


@pytest.fixture(scope="module", params=list(LEARNERS))
def trained(request, tmp_path_factory):
    """(learner name, the learner after one iteration, its checkpoint paths)."""
    name = request.param
    if name in RLLIB:
        request.getfixturevalue("ray_session")
    data = _task_dict(LEARNERS[name])
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    learner.train_iteration()
    paths = _save(learner, tmp_path_factory.mktemp(name), data)
    yield name, learner, paths
    if name in RLLIB:
        learner.algo.stop()


def _own_samples(learner, seed: int = SEED) -> torch.Tensor:
    return sample(learner.model, N, control=learner.control(), init=learner.init_dist(), seed=seed, progress=False).x


@pytest.mark.parametrize("kind", ["learner", "trial_checkpoint", "trial", "experiment"])
def test_load_gives_the_learners_own_samples(trained, kind):
    name, learner, paths = trained
    loaded = rlft.load(paths[kind])
    x = loaded.sample(N, seed=SEED)
    own = _own_samples(learner)
    assert x.shape == (N, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x, own, rtol=0, atol=1e-6)
    pre = sample(learner.model, N, seed=SEED, progress=False).x
    assert (x - pre).abs().max() > 1e-4, "the fine-tuned sampler must differ from the pretrained one after an update"
    assert isinstance(loaded.model, rlft.models.base.ControlledChain) and loaded.task.learner["type"] == name
    assert (loaded.init is None) == (learner.init_dist() is None)  # ELEGANT's learned initial law travels too
    # the ControlledChain is the same sampler (rlft.models.base.ControlledChain's contract)
    torch.testing.assert_close(sample(loaded.model, N, seed=SEED, progress=False).x, own, rtol=0, atol=1e-6)


def test_sample_cli_writes_the_samples_atomically(trained, tmp_path):
    name, learner, paths = trained
    out = tmp_path / "samples.npy"
    assert main(["sample", str(paths["experiment"]), "-n", str(N), "--out", str(out), "--seed", str(SEED), "--png"]) == 0
    x = np.load(out)
    assert x.shape == (N, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x, _own_samples(learner).numpy(), rtol=0, atol=1e-6)
    assert (tmp_path / "samples.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npy", "samples.png"]  # no temporary left


def test_loading_starts_no_ray(trained):
    """In a fresh interpreter, loading an RLlib learner's checkpoint and sampling leaves ray unimported."""
    name, learner, paths = trained
    if name not in RLLIB:
        pytest.skip("the control learners' modules import no ray at all (tests/test_imports.py keeps it so)")
    code = ("import sys, rlft\n"
            "x = rlft.load(sys.argv[1]).sample(8, seed=1)\n"
            "assert x.shape == (8, 2)\n"
            "assert 'ray' not in sys.modules, 'loading imported ray'\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code, str(paths["trial_checkpoint"])], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_an_rllib_checkpoint_of_an_earlier_rlft_loads_from_its_trial(trained, tmp_path):
    """Before rlft recorded the task and module config in weights' JSON: both come from the trial's params.json."""
    import shutil

    name, learner, paths = trained
    if name not in RLLIB:
        pytest.skip("control learners always recorded their task")
    ckpt = tmp_path / "trial_0001" / "checkpoint_000000"
    shutil.copytree(paths["learner"], ckpt / LEARNER_DIR)
    shutil.copy(paths["trial"] / "params.json", tmp_path / "trial_0001" / "params.json")
    (ckpt / "rlft_state.json").write_text("{}")  # a version-0 trial state (no manifest)
    state_file = ckpt / LEARNER_DIR / "rlft.json"
    state = json.loads(state_file.read_text())
    del state["task"], state["module_config"]
    state_file.write_text(json.dumps(state))
    x = rlft.load(ckpt / LEARNER_DIR).sample(N, seed=SEED)
    torch.testing.assert_close(x, _own_samples(learner), rtol=0, atol=1e-6)


def test_a_path_that_is_not_a_checkpoint_is_refused_with_exit_2(tmp_path, capsys):
    out = tmp_path / "samples.npy"
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        assert main(["sample", str(bad), "-n", "4", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "expected a learner checkpoint" in err and str(bad) in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_several_trials_are_listed_and_a_damaged_newest_checkpoint_is_skipped(tmp_path):
    data = _task_dict(LEARNERS["no_kl"])
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    first = _save(learner, tmp_path, data)
    before = _own_samples(learner)
    learner.train_iteration()
    newer = first["trial"] / "checkpoint_000001"
    newer.mkdir()
    write_checkpoint(str(newer), learner, {ITERATION: 1, REWARD_QUERIES: 0, WALL_TIME: 0.0}, None, [])
    torch.testing.assert_close(rlft.load(first["experiment"]).sample(N, seed=SEED), _own_samples(learner), rtol=0, atol=0)
    (newer / LEARNER_DIR / "control.safetensors").write_bytes(b"torn")  # fails the manifest: the older one is used
    torch.testing.assert_close(rlft.load(first["experiment"]).sample(N, seed=SEED), before, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="differs from what was written"):
        rlft.load(newer)
    second = first["experiment"] / "trial_0002"
    (second / "checkpoint_000000").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds 2 trials") as err:
        rlft.load(first["experiment"])
    assert "trial_0001" in str(err.value) and "trial_0002" in str(err.value)
