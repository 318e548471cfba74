"""The `run:` and `sweep:` sections: defaults, errors that name the key path, grids, overrides, resources."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlft.config import ConfigError
from rlft.learners import Learner
from rlft.run_config import (
    RunConfig, SweepGrid, apply_overrides, load_experiment, parse_assignments, parse_run, run_config_of,
)

ROOT = Path(__file__).resolve().parents[2]
DUMMY = "tests.run.test_runner:LinearLearner"
TYPED = "tests.run.test_run_config:TypedLearner"


@dataclasses.dataclass(frozen=True)
class TypedOptions:
    """Options of `TypedLearner`."""

    lr: float = 0.1
    """Step size (> 0)."""
    batch_size: int = 8
    """Samples per step."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learner.lr must be > 0 (got {self.lr}); use e.g. lr: 1.0e-3")


class TypedLearner(Learner):
    """A learner with typed options, only parsed here (never built)."""

    Options = TypedOptions


def _task(**extra) -> dict:
    data = {
        "model": {"type": "gmm", "weights": [1.0], "means": [[0.0, 0.0]], "stds": [1.0]},
        "reward": {"type": "quadratic", "center": [1.0, 1.0]},
        "learner": {"type": DUMMY},
    }
    data.update(extra)
    return data


def _load(tmp_path: Path, data: dict, overrides: dict | None = None):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_experiment(path, overrides)


def test_defaults_and_storage_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task, run, grid = _load(tmp_path, _task(run={"storage_path": "out/results"}))
    assert run.storage_path == str(tmp_path / "out" / "results")
    assert (run.iterations, run.eval_every, run.checkpoint_every, run.max_failures) == (200, 10, 10, 0)
    assert run.loggers == ["tensorboard", "csv"] and not grid and grid.num_trials == 1
    assert run_config_of(task) == run  # the hook learners read their resources through
    assert parse_run({"storage_path": "s3://bucket/prefix"}).storage_path == "s3://bucket/prefix"
    assert parse_run({"storage_path": "~/x"}).storage_path == os.path.expanduser("~/x")


@pytest.mark.parametrize("run, message", [
    ({"iteratons": 5}, r"run\.iteratons is not a known key"),
    ({"gpus_per_trial": "half"}, r"run\.gpus_per_trial must be a number"),
    ({"eval_every": 0}, r"run\.eval_every must be >= 1 \(got 0\)"),
    ({"cpus_per_trial": 0}, r"run\.cpus_per_trial must be > 0"),
    ({"gpus_per_trial": 1.5}, r"run\.gpus_per_trial must be <= 1 or a whole number"),
    ({"max_failures": -2}, r"run\.max_failures must be >= -1"),
    ({"loggers": ["tensorboard", "neptune"]}, r"run\.loggers\[1\] must be one of"),
    ({"mlflow": {"tracking": "x"}}, r"run\.mlflow\.tracking is not a known key"),
    ({"name": "a/b"}, r"run\.name must be a plain directory name"),
])
def test_run_errors_name_the_key(tmp_path, run, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, _task(run=run))


def test_learner_and_reward_arguments_are_checked_without_building(tmp_path):
    # a learner without an Options dataclass: its constructor's keyword arguments
    with pytest.raises(ConfigError, match=r"learner\.lrr is not a parameter of LinearLearner"):
        _load(tmp_path, _task(learner={"type": DUMMY, "lrr": 0.1}))
    with pytest.raises(ConfigError, match=r"learner\.lr must be a number"):
        _load(tmp_path, _task(learner={"type": DUMMY, "lr": "fast"}))
    # a learner with typed options: parsed into them, errors name the key, the value and the rule
    with pytest.raises(ConfigError, match=r"learner\.lrr is not a known key; valid keys here: \['batch_size', 'lr'\]"):
        _load(tmp_path, _task(learner={"type": TYPED, "lrr": 0.1}))
    with pytest.raises(ConfigError, match=r"learner\.batch_size must be an integer \(got 'many'\)"):
        _load(tmp_path, _task(learner={"type": TYPED, "batch_size": "many"}))
    with pytest.raises(ConfigError, match=r"learner\.lr must be > 0 \(got -1\.0\); use e\.g\. lr"):
        _load(tmp_path, _task(learner={"type": TYPED, "lr": -1.0}))
    _load(tmp_path, _task(learner={"type": TYPED, "lr": 0.5}))
    with pytest.raises(ConfigError, match=r"learner\.type: learner type 'nope' is not known; choose one of \[.*'elegant'"):
        _load(tmp_path, _task(learner={"type": "nope"}))
    with pytest.raises(ConfigError, match=r"learner\.type: .*'no_such_module:X'.*cannot be imported"):
        _load(tmp_path, _task(learner={"type": "no_such_module:X"}))
    with pytest.raises(ConfigError, match=r"reward\.centre is not a parameter"):
        _load(tmp_path, _task(reward={"type": "quadratic", "centre": [1.0, 1.0]}))
    # an f-regularised reward carries its own divergence weight: the task's alpha must be 1, caught before Ray
    fr = {"type": "f_regularised", "base": {"type": "quadratic", "center": [1.0, 1.0]}, "divergence": "chi2", "alpha": 0.5}
    with pytest.raises(ConfigError, match=r"alpha must be 1 with reward\.type 'f_regularised' \(got 0\.3\).*reward\.alpha"):
        _load(tmp_path, {**_task(reward=fr), "alpha": 0.3})


def test_learner_section_errors_come_before_ray_is_imported(tmp_path):
    """`load_experiment` (what `rlft train` and `rlft submit` run first) rejects a bad learner key or value
    with its path, in a process that has not imported Ray."""
    cases = {
        "typed_key": _task(learner={"type": TYPED, "lrr": 0.1}),
        "typed_value": _task(learner={"type": TYPED, "lr": "fast"}),
        "elegant_key": _task(learner={"type": "elegant", "lrr": 0.1}),
        "good": _task(learner={"type": TYPED}),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = str(tmp_path / f"{name}.yaml")
        Path(paths[name]).write_text(yaml.safe_dump(data))
    script = (
        "import json, sys\n"
        "from rlft.config import ConfigError\n"
        "from rlft.run_config import load_experiment\n"
        "out = {}\n"
        f"for name, path in {paths!r}.items():\n"
        "    try:\n"
        "        load_experiment(path)\n"
        "        out[name] = 'ok'\n"
        "    except ConfigError as err:\n"
        "        out[name] = str(err)\n"
        "out['ray_imported'] = any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["typed_key"].startswith("learner.lrr is not a known key")
    assert out["typed_value"].startswith("learner.lr must be a number")
    assert "learner.lrr" in out["elegant_key"]
    assert out["good"] == "ok" and out["ray_imported"] is False


def test_sweep_grid_alpha_first_and_combinations(tmp_path):
    task, run, grid = _load(tmp_path, _task(sweep={"learner.lr": [0.01, 0.1], "alpha": [0.1, 1.0], "seed": [0]}))
    assert list(grid.params) == ["alpha", "learner.lr", "seed"]
    assert grid.num_trials == 4
    assert grid.combinations() == [
        {"alpha": 0.1, "learner.lr": 0.01, "seed": 0}, {"alpha": 0.1, "learner.lr": 0.1, "seed": 0},
        {"alpha": 1.0, "learner.lr": 0.01, "seed": 0}, {"alpha": 1.0, "learner.lr": 0.1, "seed": 0},
    ]
    assert SweepGrid({}).combinations() == [{}]


@pytest.mark.parametrize("sweep, message", [
    ({"alpha": [0.1, -1.0]}, r"sweep\.alpha\[1\] = -1\.0 gives an invalid task: alpha must be > 0"),
    ({"learner.lr": [0.1, "x"]}, r"sweep\.learner\.lr\[1\] = 'x' gives an invalid task: learner\.lr must be a number"),
    ({"learner.momentum": [0.9]}, r"sweep\.learner\.momentum\[0\].*learner\.momentum is not a parameter"),
    ({"alpha": []}, r"sweep\.alpha must be a non-empty list"),
    ({"alpha": 0.1}, r"sweep\.alpha must be a non-empty list"),
    ({"lr": [0.1]}, r"sweep\.lr is not a task key a trial can vary"),
    ({"run.iterations": [1, 2]}, r"sweep\.run\.iterations is not a task key a trial can vary"),
    ({"num_steps": [10, 0]}, r"sweep\.num_steps\[1\] = 0 gives an invalid task: num_steps must be >= 1"),
])
def test_sweep_values_are_validated_on_the_task(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, _task(sweep=sweep))


def test_overrides_and_set_assignments(tmp_path):
    assert parse_assignments(["learner.lr=1e-3", "alpha=0.3", "run.loggers=[csv]", "run.name=x"]) == {
        "learner.lr": 1e-3, "alpha": 0.3, "run.loggers": ["csv"], "run.name": "x"}
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_assignments(["alpha"])
    base = _task()
    out = apply_overrides(base, {"run.iterations": 3, "learner.lr": 0.5})
    assert out["run"] == {"iterations": 3} and out["learner"] == {"type": DUMMY, "lr": 0.5}
    assert "run" not in base and base["learner"] == {"type": DUMMY}  # the input is not modified
    with pytest.raises(ConfigError, match=r"cannot set alpha\.x: alpha is 1\.0, not a mapping"):
        apply_overrides({"alpha": 1.0}, {"alpha.x": 2})
    task, run, _ = _load(tmp_path, _task(), {"run.iterations": 7, "alpha": 0.5})
    assert run.iterations == 7 and task.alpha == 0.5
    assert run_config_of(task).iterations == 7  # the task carries the overridden run: what learners read


def test_resource_bundles_match_rllib_for_the_same_settings():
    """The trial's placement group reserves what an RLlib Algorithm built inside it asks for."""
    pytest.importorskip("ray.rllib")
    from ray.rllib.algorithms.ppo import PPO, PPOConfig

    for runners, learners, gpus in [(2, 0, 0.0), (2, 1, 0.5), (0, 2, 0.0), (3, 2, 1.0)]:
        cfg = PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=runners)
        cfg = cfg.learners(num_learners=learners, num_gpus_per_learner=gpus)
        rllib = [{k: float(v) for k, v in b.items() if v} for b in PPO.default_resource_request(cfg).bundles]
        ours = RunConfig(num_env_runners=runners, num_learners=learners, gpus_per_learner=gpus).resource_bundles()
        assert ours == rllib, (runners, learners, gpus)
    assert RunConfig(cpus_per_trial=0.5, gpus_per_trial=0.25).resource_bundles() == [{"CPU": 0.5, "GPU": 0.25}]


def test_optional_logger_missing_package_is_a_clear_error():
    from rlft.run.tune import callbacks

    for package in ("mlflow", "wandb"):
        if importlib.util.find_spec(package) is not None:
            continue
        with pytest.raises(ConfigError, match=rf"run\.loggers includes '{package}' but the {package} package is not installed"):
            callbacks(parse_run({"loggers": ["csv", package]}), "exp")


def test_shipped_tune_configs_are_valid():
    task, run, grid = load_experiment(ROOT / "tune_configs" / "gmm_elegant.yaml")
    assert not grid and task.learner == {"type": "elegant"}
    task, run, grid = load_experiment(ROOT / "tune_configs" / "gmm_alpha_sweep.yaml")
    assert grid.params == {"alpha": [0.1, 0.3, 1.0]} and run.max_concurrent_trials == 2
