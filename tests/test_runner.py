"""`rlft train` / `rlft sweep` on the session's local Ray: standard keys, JSON shape, plots, checkpoints,
and a sweep that fails mid-run and is finished by `--resume` with every iteration reported exactly once.

The runner sees learners only through `rlft.learners.Learner`; these tests use `LinearLearner` below
(a constant drift trained by back-propagation through the chain), named in YAML by its import path so
Ray's workers import it too.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlft import cli
from rlft.config import task_from_dict
from rlft.control.elegant import ElegantLearner
from rlft.learners import Learner
from rlft.models import build_model
from rlft.rewards import build_reward, evaluate
from rlft.runner import (
    LEARNER_DIR, STATE_FILE, read_checkpoint_state, write_checkpoint,
)
from rlft.sampling import rollout

DUMMY = "tests.test_runner:LinearLearner"
STANDARD_KEYS = {"reward", "kl", "objective", "optimal_objective", "gap_closure", "diversity",
                 "energy_distance", "energy_distance_floor", "pretrained"}
ROW_KEYS = STANDARD_KEYS | {"iteration", "reward_queries", "wall_time", "eval_iteration"}


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
        return {"loss": float(loss.detach()), "theta_norm": torch.linalg.norm(self.theta.detach())}

    def save_checkpoint(self, directory: str) -> None:
        st = self.opt.state[self.theta]
        save_file({"theta": self.theta.detach(), "m": st["exp_avg"], "v": st["exp_avg_sq"]},
                  os.path.join(directory, "linear.safetensors"))
        state = {"iteration": self.iteration, "reward_queries": self.reward_queries, "step": float(st["step"])}
        Path(directory, "state.json").write_text(json.dumps(state))

    def load_checkpoint(self, directory: str) -> None:
        tensors = load_file(os.path.join(directory, "linear.safetensors"))
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
    from rlft.learners import build_learner

    task = task_from_dict(task_data)
    model = build_model(task.model, task.num_steps)
    return build_learner(task, model, build_reward(task.reward, model=model))


# -- without Ray ------------------------------------------------------------------------------------


def test_checkpoint_manifest_refuses_a_damaged_copy(tmp_path):
    learner = _build(_task_dict(tmp_path))
    learner.train_iteration()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(str(ckpt), learner, {"iteration": 1, "reward_queries": 64}, history=[{"iteration": 1}])
    assert read_checkpoint_state(str(ckpt))["iteration"] == 1
    assert set(read_checkpoint_state(str(ckpt))["manifest"]) == {
        "history.jsonl", "learner/linear.safetensors", "learner/state.json"}
    weights = ckpt / LEARNER_DIR / "linear.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="linear.safetensors is missing or differs"):
        read_checkpoint_state(str(ckpt))
    (ckpt / STATE_FILE).unlink()  # a copy interrupted before the state file (written last) arrived
    with pytest.raises(RuntimeError, match="incomplete"):
        read_checkpoint_state(str(ckpt))


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
    assert STANDARD_KEYS <= set(out) and out["status"] == "TERMINATED" and out["iteration"] == 4
    assert out["reward_queries"] == 4 * 64 and out["eval_iteration"] == 4 and out["config"] == {}
    assert set(out["pretrained"]) >= {"reward", "kl", "objective"} and out["pretrained"]["kl"] == 0.0
    assert out["objective"] == pytest.approx(out["reward"] - 1.0 * out["kl"], rel=1e-9, abs=1e-12)
    assert Path(out["plots"]["samples"]).is_file() and Path(out["plots"]["samples"]).stat().st_size > 1000
    assert json.loads(Path(out["experiment_path"], "rlft_results.json").read_text())["reward"] == out["reward"]
    # every iteration reported once, each row with the standard figures (first row evaluated too)
    assert (tmp_path / "killed").is_file()
    rows = _rows(out["trial_path"])
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["iterations_since_restore"] for r in rows] == [1, 2, 1, 2]  # 3 and 4 ran after the restart
    assert out["history_path"] == str(Path(out["trial_path"], "rlft_history.jsonl"))
    history = _rows(out["trial_path"], "rlft_history.jsonl")
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    assert [r["reward"] for r in history] == [r["reward"] for r in rows]
    assert all(ROW_KEYS <= set(r) and "loss" in r["train"] for r in rows)
    assert [r["eval_iteration"] for r in rows] == [1, 2, 2, 4]
    assert Path(out["trial_path"], "progress.csv").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in Path(out["trial_path"]).iterdir())
    # the reported figures are the learner's evaluate() of the final checkpoint (same seed, same numbers)
    learner = _build({**data, "learner": {"type": DUMMY}})
    learner.load_checkpoint(os.path.join(out["checkpoint_path"], LEARNER_DIR))
    again = learner.evaluate(num_samples=200)
    assert learner.iteration == 4
    assert again["reward"] == pytest.approx(out["reward"], rel=1e-6)
    assert again["kl"] == pytest.approx(out["kl"], rel=1e-6)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_sweep_fails_mid_run_and_resume_finishes_from_checkpoints(ray_session, tmp_path, capsys):
    data = _task_dict(tmp_path, fail_at=3, fail_marker=str(tmp_path / "failed_{alpha}"))
    data["sweep"] = {"alpha": [0.5, 2.0]}
    data["run"]["name"] = "sweep_fail"
    config = _write(tmp_path, data, "sweep.yaml")

    code = cli.main(["sweep", config, "--json"])
    first = json.loads(capsys.readouterr().out)
    assert code == 1 and first["num_errors"] == 2
    assert [t["config"] for t in first["trials"]] == [{"alpha": 0.5}, {"alpha": 2.0}]
    for t in first["trials"]:
        assert t["status"] == "ERROR" and "injected failure" in t["error"]
        assert [r["iteration"] for r in _rows(t["trial_path"])] == [1, 2]  # reported with the checkpoint at 2
        assert [r["iteration"] for r in _rows(t["trial_path"], "rlft_history.jsonl")] == [1, 2]

    code = cli.main(["sweep", config, "--json", "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert out["num_trials"] == 2 and out["num_errors"] == 0 and out["grid"] == {"alpha": [0.5, 2.0]}
    assert [t["config"] for t in out["trials"]] == [{"alpha": 0.5}, {"alpha": 2.0}]
    for t in out["trials"]:
        assert t["status"] == "TERMINATED" and t["iteration"] == 5 and STANDARD_KEYS <= set(t)
        rows = _rows(t["trial_path"])
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]  # after the checkpoint once, none lost before
        assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r["iteration"] for r in _rows(t["trial_path"], "rlft_history.jsonl")] == [1, 2, 3, 4, 5]
        assert rows[2]["iterations_since_restore"] == 1  # iteration 3 ran in the restored process
        assert t["reward_queries"] == 5 * 64
        assert t["optimal_kl"] > 0 and t["optimal_reward"] > t["pretrained"]["reward"]
    for key in ("pareto", "samples"):
        assert Path(out["plots"][key]).is_file()
    assert Path(out["experiment_path"], "rlft_experiment.json").is_file()


def test_storage_helpers_on_a_uri_and_a_local_path(tmp_path):
    """Cloud storage goes through pyarrow.fs; file:// exercises the same code path as s3:// or gs://."""
    from rlft.runner import _exists, _join, _list_dirs, _read_bytes, _uri, _write_bytes

    for root in (f"file://{tmp_path}/uri", str(tmp_path / "local")):
        target = _join(root, "exp_1", "rlft_results.json")
        assert not _exists(_join(root, "exp_1")) and _list_dirs(root) == []
        _write_bytes(target, b'{"a": 1}')
        _write_bytes(target, b'{"a": 2}')  # replaced whole
        assert _read_bytes(target) == b'{"a": 2}' and _exists(_join(root, "exp_1"))
        assert _list_dirs(root) == ["exp_1"]
    assert _uri("/x/trial", "file:///x") == "file:///x/trial" and _uri("b/p/t", "s3://b/p") == "s3://b/p/t"
    assert _uri("/x/trial", "/x") == "/x/trial"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elegant_learner_runs_and_resumes_under_the_runner(ray_session, tmp_path, capsys):
    """Smoke test with the real ELEGANT learner (tiny budgets): train, then --resume a finished run."""
    pytest.importorskip("rlft.control.elegant")
    tiny = {"type": "elegant", "batch_size": 32, "drift_iterations_per_train_iteration": 2, "hidden": 16,
            "depth": 1, "init_steps": 5, "init_iterations": 10, "init_batch_size": 64, "value_starts": 64,
            "value_rollouts": 2, "value_iterations": 20}
    data = {**_task_dict(tmp_path), "learner": tiny}
    data["run"].update(name="elegant_smoke", iterations=3)
    config = _write(tmp_path, data, "elegant.yaml")
    code = cli.main(["train", config, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert out["iteration"] == 3 and STANDARD_KEYS <= set(out) and out["kl"] > 0
    assert [r["iteration"] for r in _rows(out["trial_path"])] == [1, 2, 3]
    assert Path(out["plots"]["samples"]).is_file()
    assert cli.main(["train", config, "--json", "--resume"]) == 0  # nothing left to do: same result
    again = json.loads(capsys.readouterr().out)
    assert again["iteration"] == 3 and again["reward"] == out["reward"]


class FailingElegant(ElegantLearner):
    """The real ELEGANT learner, whose first attempt at iteration `fail_at` raises (marker file as above)."""

    def __init__(self, task, model, reward, fail_at: int = 0, fail_marker: str = "", **options) -> None:
        super().__init__(task, model, reward, **options)
        self.fail_at, self.fail_marker = fail_at, fail_marker

    def train_iteration(self) -> dict[str, float]:
        marker = Path(self.fail_marker.format(alpha=self.task.alpha)) if self.fail_marker else None
        if self.fail_at and self.iteration + 1 == self.fail_at and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"injected failure at iteration {self.fail_at}")
        return super().train_iteration()


TINY_ELEGANT = {"batch_size": 32, "drift_iterations_per_train_iteration": 2, "hidden": 16, "depth": 1, "init_steps": 5,
                "init_iterations": 10, "init_batch_size": 64, "value_starts": 64, "value_rollouts": 2, "value_iterations": 20}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_elegant_alpha_sweep_is_interrupted_and_restored_to_the_uninterrupted_learner(ray_session, tmp_path, capsys):
    """Two alphas of the real ELEGANT learner under Tune: a failure at iteration 3, `--resume` from the checkpoint
    at 2; each restored trial's final learner equals one trained in this process without interruption."""
    data = _task_dict(tmp_path)
    data["learner"] = {"type": "tests.test_runner:FailingElegant", **TINY_ELEGANT, "fail_at": 3,
                       "fail_marker": str(tmp_path / "failed_{alpha}")}
    data["sweep"] = {"alpha": [0.5, 2.0]}
    data["run"].update(name="elegant_sweep", iterations=4, max_concurrent_trials=2)
    config = _write(tmp_path, data, "sweep.yaml")
    code = cli.main(["sweep", config, "--json"])
    first = json.loads(capsys.readouterr().out)
    assert code == 1 and first["num_errors"] == 2
    code = cli.main(["sweep", config, "--json", "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert [t["config"] for t in out["trials"]] == [{"alpha": 0.5}, {"alpha": 2.0}] and out["num_errors"] == 0
    for trial in out["trials"]:
        assert trial["status"] == "TERMINATED" and trial["iteration"] == 4 and STANDARD_KEYS <= set(trial)
        rows = _rows(trial["trial_path"])
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rows[2]["iterations_since_restore"] == 1
        # the newest checkpoint against the same learner trained 4 iterations in one go
        newest = sorted(Path(trial["trial_path"]).glob("checkpoint_*"))[-1]
        assert read_checkpoint_state(str(newest))["iteration"] == 4
        task_data = {**data, "alpha": trial["config"]["alpha"], "learner": {**data["learner"], "fail_at": 0}}
        task_data.pop("sweep"), task_data.pop("run")
        restored, reference = _build(task_data), _build(task_data)
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
    assert Path(out["plots"]["pareto"]).is_file()
