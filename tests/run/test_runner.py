"""`rlft train` / `rlft sweep` on the session's local Ray: standard keys, JSON shape, plots, checkpoints,
and a sweep that fails mid-run and is finished by `--resume` with every iteration reported exactly once.

The runner sees learners only through `rlft.learners.Learner`; these tests use `LinearLearner` below
(a constant drift trained by back-propagation through the chain), named in YAML by its import path so
Ray's workers import it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from rlft import cli
from rlft.checkpoint import CheckpointError, load_tensors, save_tensors
from rlft.config import task_from_dict
from rlft.learners import Learner, build_learner
from rlft.models import build_model
from rlft.rewards import build_reward, evaluate
from rlft.run.keys import (
    CHECKPOINT_PATH, CONFIG, DIVERSITY, ENERGY_DISTANCE, ENERGY_DISTANCE_FLOOR, ERROR, ERRORED, EVAL_ITERATION,
    EXPERIMENT_FILE, EXPERIMENT_PATH, GAP_CLOSURE, GRID, HISTORY_PATH, ITERATION, KL, LAST_EVAL, LEARNER_DIR,
    MANIFEST, NUM_ERRORS, NUM_TRIALS, OBJECTIVE, OPTIMAL_KL, OPTIMAL_OBJECTIVE, OPTIMAL_REWARD, PARETO, PLOTS,
    PRETRAINED, RESULTS_FILE, REWARD, REWARD_QUERIES, SAMPLES, STATE_FILE, STATUS, TERMINATED, TRAIN, TRIALS,
    TRIAL_HISTORY_FILE, TRIAL_PATH, WALL_TIME,
)
from rlft.run.trial import TRIAL_FORMAT, TRIAL_VERSION, _restore, read_checkpoint_state, write_checkpoint
from rlft.run_config import run_config_of
from rlft.sampling import rollout

DUMMY = "tests.run.test_runner:LinearLearner"
STANDARD_KEYS = {REWARD, KL, OBJECTIVE, OPTIMAL_OBJECTIVE, GAP_CLOSURE, DIVERSITY, ENERGY_DISTANCE,
                 ENERGY_DISTANCE_FLOOR, PRETRAINED}
ROW_KEYS = STANDARD_KEYS | {ITERATION, REWARD_QUERIES, WALL_TIME, EVAL_ITERATION}
RUN_ITERATIONS = "run_iterations"  # LinearLearner's metric: run_config_of(task).iterations as the learner saw it


class LinearLearner(Learner):
    """delta_k = dt_k * theta: a constant drift, one Adam step on -J per iteration (test learner).

    `fail_at`/`fail_marker`/`fail_mode` inject one failure: the first attempt of iteration `fail_at`
    raises (or SIGKILLs its own process) after creating the marker file (formatted with the task's
    alpha); later attempts pass.
    """

    def __init__(self, task, model, reward, lr: float = 0.1, batch_size: int = 64, fail_at: int = 0,
                 fail_marker: str = "", fail_mode: str = "raise") -> None:
        super().__init__(task, model, reward)
        self.theta = torch.zeros(model.event_dim, dtype=model.dtype, requires_grad=True)
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.batch_size, self.fail_at, self.fail_marker = batch_size, fail_at, fail_marker
        self.fail_mode = fail_mode
        self.generator = torch.Generator().manual_seed(task.seed)

    def _control(self, theta):
        return lambda k, x, cond: (self.model.dt(k) * theta).expand_as(x)

    def control(self):
        return self._control(self.theta.detach().clone())

    def train_iteration(self) -> dict[str, float]:
        if self.fail_at and self.iteration + 1 == self.fail_at:
            marker = Path(self.fail_marker.format(alpha=self.task.alpha))
            if not marker.exists():
                marker.write_text("failed once")
                if self.fail_mode == "kill":  # the trial's process dies as on a lost node or an OOM kill
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure at iteration {self.fail_at}")
        x0 = self.model.prior_sample(self.batch_size, self.generator)
        out = rollout(self.model, x0, self._control(self.theta), generator=self.generator)
        loss = -(evaluate(self.reward, out.x) - self.task.alpha * out.kl).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.iteration += 1
        self.reward_queries += self.batch_size
        return {"loss": float(loss.detach()), "theta_norm": torch.linalg.norm(self.theta.detach()),
                RUN_ITERATIONS: run_config_of(self.task).iterations}

    def save_checkpoint(self, directory: str) -> None:
        st = self.opt.state[self.theta]
        save_tensors(os.path.join(directory, "linear.safetensors"),
                     {"theta": self.theta, "m": st["exp_avg"], "v": st["exp_avg_sq"]})
        state = {"iteration": self.iteration, "reward_queries": self.reward_queries, "step": float(st["step"])}
        Path(directory, "state.json").write_text(json.dumps(state))

    def load_checkpoint(self, directory: str) -> None:
        tensors = load_tensors(os.path.join(directory, "linear.safetensors"))
        state = json.loads(Path(directory, "state.json").read_text())
        with torch.no_grad():
            self.theta.copy_(tensors["theta"])
        self.opt.state[self.theta] = {"step": torch.tensor(state["step"]), "exp_avg": tensors["m"],
                                      "exp_avg_sq": tensors["v"]}
        self.iteration, self.reward_queries = state["iteration"], state["reward_queries"]


def _task_dict(tmp_path: Path, **learner) -> dict:
    return {
        "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.5, 1.0], [-1.5, -1.0]], "stds": [0.5, 0.5]},
        "reward": {"type": "quadratic", "center": [1.0, 0.5], "scale": 1.0},
        "alpha": 1.0, "num_steps": 10, "seed": 3,
        "learner": {"type": DUMMY, **learner},
        "run": {"iterations": 5, "eval_every": 2, "eval_samples": 200, "checkpoint_every": 2,
                "storage_path": str(tmp_path / "results"), "max_concurrent_trials": 1, "max_failures": 0},
    }


def _write(tmp_path: Path, data: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _rows(trial_path: str, name: str = "result.json") -> list[dict]:
    """Tune's log of a trial (result.json), or the runner's checkpointed history (rlft_history.jsonl)."""
    return [json.loads(line) for line in Path(trial_path, name).read_text().splitlines() if line.strip()]


def _build(task_data: dict) -> Learner:
    """The learner task_data names (LinearLearner unless its learner.type says otherwise), built in this process."""
    task = task_from_dict(task_data)
    model = build_model(task.model, task.num_steps)
    return build_learner(task, model, build_reward(task.reward, model=model))


# -- without Ray ------------------------------------------------------------------------------------


def test_checkpoint_manifest_refuses_a_damaged_copy(tmp_path):
    learner = _build(_task_dict(tmp_path))
    learner.train_iteration()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(str(ckpt), learner, {ITERATION: 1, REWARD_QUERIES: 64}, history=[{ITERATION: 1}])
    state = read_checkpoint_state(str(ckpt))
    assert state[ITERATION] == 1 and (state["format"], state["version"]) == (TRIAL_FORMAT, TRIAL_VERSION)
    assert set(state[MANIFEST]) == {"history.jsonl", "learner/linear.safetensors", "learner/state.json"}
    weights = ckpt / LEARNER_DIR / "linear.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="linear.safetensors is missing or differs"):
        read_checkpoint_state(str(ckpt))
    (ckpt / STATE_FILE).unlink()  # a copy interrupted before the state file (written last) arrived
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint_state(str(ckpt))


class _TuneCheckpoint:
    """What `ray.tune.get_checkpoint()` returns, for `_restore` without Ray: a directory."""

    def __init__(self, directory) -> None:
        self.directory = str(directory)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.directory


def _version0_checkpoint(directory: Path, learner: Learner, history: list[dict]) -> None:
    """A trial checkpoint as rlft wrote it before rlft_state.json named its format (layout "version 0")."""
    import hashlib

    (directory / LEARNER_DIR).mkdir(parents=True)
    learner.save_checkpoint(str(directory / LEARNER_DIR))
    (directory / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    manifest = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        manifest[str(path.relative_to(directory))] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = {ITERATION: learner.iteration, REWARD_QUERIES: learner.reward_queries, WALL_TIME: 1.5,
             LAST_EVAL: {REWARD: 0.25}, MANIFEST: manifest}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def test_a_checkpoint_written_before_the_format_version_still_restores(tmp_path):
    old = _build(_task_dict(tmp_path))
    for _ in range(2):
        old.train_iteration()
    rows = [{ITERATION: 1}, {ITERATION: 2}]
    _version0_checkpoint(tmp_path / "v0", old, rows)
    fresh = _build(_task_dict(tmp_path))
    state, history = _restore(fresh, _TuneCheckpoint(tmp_path / "v0"), "test")
    assert state[ITERATION] == 2 and state[LAST_EVAL] == {REWARD: 0.25} and history == rows
    assert fresh.iteration == 2 and fresh.reward_queries == 2 * 64 and torch.equal(fresh.theta, old.theta)
    # the manifest of a version-0 checkpoint is checked as before
    (tmp_path / "v0" / "history.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="history.jsonl is missing or differs"):
        read_checkpoint_state(str(tmp_path / "v0"))


def test_a_checkpoint_of_a_newer_version_is_refused_with_what_to_do(tmp_path):
    learner = _build(_task_dict(tmp_path))
    learner.train_iteration()
    write_checkpoint(str(tmp_path), learner, {ITERATION: 1, REWARD_QUERIES: 64})
    state = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**state, "version": TRIAL_VERSION + 1}))
    with pytest.raises(CheckpointError, match=rf"written by {TRIAL_FORMAT} version {TRIAL_VERSION + 1}.*upgrade rlft"):
        _restore(_build(_task_dict(tmp_path)), _TuneCheckpoint(tmp_path), "test")
    (tmp_path / STATE_FILE).write_text(json.dumps({**state, "format": "rlft_other"}))
    with pytest.raises(CheckpointError, match="is a 'rlft_other' checkpoint"):
        read_checkpoint_state(str(tmp_path))


class RewardSpecLearner(LinearLearner):
    """LinearLearner that also builds the reward from its task's spec, as an RLlib env runner does, and
    reports the lambda_ the spec carried."""

    def __init__(self, task, model, reward, **kwargs) -> None:
        super().__init__(task, model, reward, **kwargs)
        self.spec_lambda = task.reward.get("lambda_")
        self.rebuilt = build_reward(task.reward, model=model)

    def train_iteration(self) -> dict[str, float]:
        return {**super().train_iteration(), "spec_lambda": self.spec_lambda, "rebuilt_lambda": self.rebuilt.lambda_}


def test_trial_solves_lambda_once_and_its_learner_sees_the_run_length(tmp_path, monkeypatch):
    """`trial_main` in this process (Tune's report/checkpoint calls recorded): an f-regularised reward's lambda
    is solved once for the trial and reaches the learner in its task's reward spec; `run_config_of(task)` in
    the learner gives the number of iterations the loop runs."""
    from ray import tune

    import rlft.rewards.f_regularised as f_regularised
    from rlft.run import trial
    from rlft.run.keys import TASK_KEY

    solves = []
    solve = f_regularised.pretrained_lambda
    monkeypatch.setattr(f_regularised, "pretrained_lambda", lambda *a, **k: solves.append(1) or solve(*a, **k))
    reported = []
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda row, checkpoint=None: reported.append((row, checkpoint is not None)))
    monkeypatch.setattr(trial, "_trial_device", lambda run: "cpu")
    data = _task_dict(tmp_path)
    data["learner"] = {"type": "tests.run.test_runner:RewardSpecLearner"}
    data["reward"] = {"type": "f_regularised", "base": {"type": "quadratic", "center": [1.0, 0.5]},
                      "divergence": "kl", "alpha": 0.5, "num_samples": 256}
    data["run"].update(iterations=3, checkpoint_every=2)
    trial.trial_main({TASK_KEY: data})
    assert len(solves) == 1  # the trial's own reward, the learner's and any env runner's share one solve
    rows = [row for row, _ in reported]
    assert [r[ITERATION] for r in rows] == [1, 2, 3] and [c for _, c in reported] == [False, True, True]
    assert all(r[TRAIN][RUN_ITERATIONS] == 3 for r in rows)
    lam = rows[0][TRAIN]["spec_lambda"]
    assert isinstance(lam, float) and all(r[TRAIN]["rebuilt_lambda"] == lam for r in rows)


def test_experiments_started_before_rlft_run_still_resume():
    """Tune pickled `rlft.runner._trial_dirname` into the tuner.pkl of experiments started before the runner
    became `rlft.run`; `--resume` unpickles it (checked by hand on such an experiment: it resumed from its
    version-0 checkpoint to the end)."""
    import pickle

    from rlft import runner
    from rlft.run import tune

    old_reference = b"crlft.runner\n_trial_dirname\n."  # a pickle GLOBAL opcode, as in an old tuner.pkl
    assert pickle.loads(old_reference) is tune._trial_dirname
    assert runner._trial_resources is tune.trial_resources and runner.trial_main.__module__ == "rlft.run.trial"


def test_dummy_learner_checkpoint_round_trip(tmp_path):
    a = _build(_task_dict(tmp_path))
    for _ in range(3):
        a.train_iteration()
    a.save_checkpoint(str(tmp_path))
    b = _build(_task_dict(tmp_path))
    b.load_checkpoint(str(tmp_path))
    assert b.iteration == 3 and b.reward_queries == 3 * 64
    assert torch.equal(a.theta, b.theta)


# -- on Ray -----------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_train_survives_a_killed_trial_and_reports_standard_figures(ray_session, tmp_path, capsys):
    # the trial's process is killed at iteration 4 after iteration 3 ran but before its row was
    # reported (checkpoint at 2); max_failures=1 restarts it from the checkpoint at 2
    data = _task_dict(tmp_path, fail_at=4, fail_marker=str(tmp_path / "killed"), fail_mode="kill")
    data["run"]["max_failures"] = 1
    config = _write(tmp_path, data, "gmm_dummy.yaml")
    code = cli.main(["train", config, "--json", "--iterations", "4", "--set", "learner.lr=5e-2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)  # stdout holds exactly one JSON object
    assert STANDARD_KEYS <= set(out) and out[STATUS] == TERMINATED and out[ITERATION] == 4
    assert out[REWARD_QUERIES] == 4 * 64 and out[EVAL_ITERATION] == 4 and out[CONFIG] == {}
    assert set(out[PRETRAINED]) >= {REWARD, KL, OBJECTIVE} and out[PRETRAINED][KL] == 0.0
    assert out[OBJECTIVE] == pytest.approx(out[REWARD] - 1.0 * out[KL], rel=1e-9, abs=1e-12)
    assert Path(out[PLOTS][SAMPLES]).is_file() and Path(out[PLOTS][SAMPLES]).stat().st_size > 1000
    assert json.loads(Path(out[EXPERIMENT_PATH], RESULTS_FILE).read_text())[REWARD] == out[REWARD]
    # every iteration reported once, each row with the standard figures (first row evaluated too)
    assert (tmp_path / "killed").is_file()
    rows = _rows(out[TRIAL_PATH])
    assert [r[ITERATION] for r in rows] == [1, 2, 3, 4]
    assert [r["iterations_since_restore"] for r in rows] == [1, 2, 1, 2]  # 3 and 4 ran after the restart
    assert out[HISTORY_PATH] == str(Path(out[TRIAL_PATH], TRIAL_HISTORY_FILE))
    history = _rows(out[TRIAL_PATH], TRIAL_HISTORY_FILE)
    assert [r[ITERATION] for r in history] == [1, 2, 3, 4]
    assert [r[REWARD] for r in history] == [r[REWARD] for r in rows]
    assert all(ROW_KEYS <= set(r) and "loss" in r[TRAIN] for r in rows)
    assert [r[EVAL_ITERATION] for r in rows] == [1, 2, 2, 4]
    # the learner saw the run length the loop ran (--iterations 4, not the file's 5), before and after the restart
    assert [r[TRAIN][RUN_ITERATIONS] for r in rows] == [4, 4, 4, 4]
    assert Path(out[TRIAL_PATH], "progress.csv").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in Path(out[TRIAL_PATH]).iterdir())
    # the reported figures are the learner's evaluate() of the final checkpoint (same seed, same numbers)
    learner = _build({**data, "learner": {"type": DUMMY}})
    learner.load_checkpoint(os.path.join(out[CHECKPOINT_PATH], LEARNER_DIR))
    again = learner.evaluate(num_samples=200)
    assert learner.iteration == 4
    assert again[REWARD] == pytest.approx(out[REWARD], rel=1e-6)
    assert again[KL] == pytest.approx(out[KL], rel=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_sweep_fails_mid_run_and_resume_finishes_from_checkpoints(ray_session, tmp_path, capsys):
    data = _task_dict(tmp_path, fail_at=3, fail_marker=str(tmp_path / "failed_{alpha}"))
    data["sweep"] = {"alpha": [0.5, 2.0]}
    data["run"]["name"] = "sweep_fail"
    config = _write(tmp_path, data, "sweep.yaml")

    code = cli.main(["sweep", config, "--json"])
    first = json.loads(capsys.readouterr().out)
    assert code == 1 and first[NUM_ERRORS] == 2
    assert [t[CONFIG] for t in first[TRIALS]] == [{"alpha": 0.5}, {"alpha": 2.0}]
    for t in first[TRIALS]:
        assert t[STATUS] == ERRORED and "injected failure" in t[ERROR]
        assert [r[ITERATION] for r in _rows(t[TRIAL_PATH])] == [1, 2]  # reported with the checkpoint at 2
        assert [r[ITERATION] for r in _rows(t[TRIAL_PATH], TRIAL_HISTORY_FILE)] == [1, 2]

    code = cli.main(["sweep", config, "--json", "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert out[NUM_TRIALS] == 2 and out[NUM_ERRORS] == 0 and out[GRID] == {"alpha": [0.5, 2.0]}
    assert [t[CONFIG] for t in out[TRIALS]] == [{"alpha": 0.5}, {"alpha": 2.0}]
    for t in out[TRIALS]:
        assert t[STATUS] == TERMINATED and t[ITERATION] == 5 and STANDARD_KEYS <= set(t)
        rows = _rows(t[TRIAL_PATH])
        assert [r[ITERATION] for r in rows] == [1, 2, 3, 4, 5]  # after the checkpoint once, none lost before
        assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r[ITERATION] for r in _rows(t[TRIAL_PATH], TRIAL_HISTORY_FILE)] == [1, 2, 3, 4, 5]
        assert rows[2]["iterations_since_restore"] == 1  # iteration 3 ran in the restored process
        assert t[REWARD_QUERIES] == 5 * 64
        assert t[OPTIMAL_KL] > 0 and t[OPTIMAL_REWARD] > t[PRETRAINED][REWARD]
    for key in (PARETO, SAMPLES):
        assert Path(out[PLOTS][key]).is_file()
    assert Path(out[EXPERIMENT_PATH], EXPERIMENT_FILE).is_file()


def test_storage_helpers_on_a_uri_and_a_local_path(tmp_path):
    """Cloud storage goes through pyarrow.fs; file:// exercises the same code path as s3:// or gs://."""
    from rlft.run.storage import exists, join, list_dirs, read_bytes, uri, write_bytes

    for root in (f"file://{tmp_path}/uri", str(tmp_path / "local")):
        target = join(root, "exp_1", RESULTS_FILE)
        assert not exists(join(root, "exp_1")) and list_dirs(root) == []
        write_bytes(target, b'{"a": 1}')
        write_bytes(target, b'{"a": 2}')  # replaced whole
        assert read_bytes(target) == b'{"a": 2}' and exists(join(root, "exp_1"))
        assert list_dirs(root) == ["exp_1"]
    assert uri("/x/trial", "file:///x") == "file:///x/trial" and uri("b/p/t", "s3://b/p") == "s3://b/p/t"
    assert uri("/x/trial", "/x") == "/x/trial"


TINY_ELEGANT = {"batch_size": 32, "drift_iterations_per_train_iteration": 2, "hidden": 16, "depth": 1, "init_steps": 5,
                "init_iterations": 10, "init_batch_size": 64, "value_starts": 64, "value_rollouts": 2, "value_iterations": 20}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elegant_learner_runs_and_resumes_under_the_runner(ray_session, tmp_path, capsys):
    """Smoke test with the real ELEGANT learner (tiny budgets): train, then --resume a finished run."""
    data = {**_task_dict(tmp_path), "learner": {"type": "elegant", **TINY_ELEGANT}}
    data["run"].update(name="elegant_smoke", iterations=3)
    config = _write(tmp_path, data, "elegant.yaml")
    code = cli.main(["train", config, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert out[ITERATION] == 3 and STANDARD_KEYS <= set(out) and out[KL] > 0
    assert [r[ITERATION] for r in _rows(out[TRIAL_PATH])] == [1, 2, 3]
    assert Path(out[PLOTS][SAMPLES]).is_file()
    assert cli.main(["train", config, "--json", "--resume"]) == 0  # nothing left to do: same result
    again = json.loads(capsys.readouterr().out)
    assert again[ITERATION] == 3 and again[REWARD] == out[REWARD]


class FailingElegant(Learner):
    """The real ELEGANT learner (`inner`, built through the registry with the other keys as its options),
    whose first attempt at iteration `fail_at` raises (marker file as above)."""

    def __init__(self, task, model, reward, fail_at: int = 0, fail_marker: str = "", **elegant_options) -> None:
        self.inner = build_learner(dataclasses.replace(task, learner={"type": "elegant", **elegant_options}), model, reward)
        super().__init__(task, model, reward)
        self.fail_at, self.fail_marker = fail_at, fail_marker

    iteration = property(lambda self: self.inner.iteration, lambda self, v: setattr(self.inner, "iteration", v))
    reward_queries = property(lambda self: self.inner.reward_queries,
                              lambda self, v: setattr(self.inner, "reward_queries", v))

    def train_iteration(self) -> dict[str, float]:
        marker = Path(self.fail_marker.format(alpha=self.task.alpha)) if self.fail_marker else None
        if self.fail_at and self.iteration + 1 == self.fail_at and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"injected failure at iteration {self.fail_at}")
        return self.inner.train_iteration()

    def control(self):
        return self.inner.control()

    def init_dist(self):
        return self.inner.init_dist()

    def evaluate(self, *args, **kwargs):
        return self.inner.evaluate(*args, **kwargs)

    def save_checkpoint(self, directory: str) -> None:
        self.inner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str) -> None:
        self.inner.load_checkpoint(directory)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_elegant_alpha_sweep_is_interrupted_and_restored_to_the_uninterrupted_learner(ray_session, tmp_path, capsys):
    """Two alphas of the real ELEGANT learner under Tune: a failure at iteration 3, `--resume` from the checkpoint
    at 2; each restored trial's final learner equals one trained in this process without interruption."""
    data = _task_dict(tmp_path)
    data["learner"] = {"type": "tests.run.test_runner:FailingElegant", **TINY_ELEGANT, "fail_at": 3,
                       "fail_marker": str(tmp_path / "failed_{alpha}")}
    data["sweep"] = {"alpha": [0.5, 2.0]}
    data["run"].update(name="elegant_sweep", iterations=4, max_concurrent_trials=2)
    config = _write(tmp_path, data, "sweep.yaml")
    code = cli.main(["sweep", config, "--json"])
    first = json.loads(capsys.readouterr().out)
    assert code == 1 and first[NUM_ERRORS] == 2
    code = cli.main(["sweep", config, "--json", "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert [t[CONFIG] for t in out[TRIALS]] == [{"alpha": 0.5}, {"alpha": 2.0}] and out[NUM_ERRORS] == 0
    for trial in out[TRIALS]:
        assert trial[STATUS] == TERMINATED and trial[ITERATION] == 4 and STANDARD_KEYS <= set(trial)
        rows = _rows(trial[TRIAL_PATH])
        assert [r[ITERATION] for r in rows] == [1, 2, 3, 4] and rows[2]["iterations_since_restore"] == 1
        # the newest checkpoint against the same learner trained 4 iterations in one go
        newest = sorted(Path(trial[TRIAL_PATH]).glob("checkpoint_*"))[-1]
        assert read_checkpoint_state(str(newest))[ITERATION] == 4
        task_data = {**data, "alpha": trial[CONFIG]["alpha"], "learner": {**data["learner"], "fail_at": 0}}
        task_data.pop("sweep"), task_data.pop("run")
        restored, reference = _build(task_data).inner, _build(task_data).inner
        restored.load_checkpoint(str(newest / LEARNER_DIR))
        for _ in range(4):
            reference.train_iteration()
        assert restored.drift_updates == reference.drift_updates == 8
        for (name, a), b in zip(restored.drift_net.state_dict().items(), reference.drift_net.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        x0 = torch.zeros(16, 2)
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        torch.testing.assert_close(rollout(restored.model, x0, restored.control(), generator=gen()).x,
                                   rollout(reference.model, x0, reference.control(), generator=gen()).x)
    assert Path(out[PLOTS][PARETO]).is_file()
