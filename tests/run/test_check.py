"""`rlft check` on good configs: exit 0, a one-screen summary, nothing written, Ray not started."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rlft.cli as cli
from rlft.config import ConfigError
from rlft.run.check import CHECK_BATCH, check_experiment

ROOT = Path(__file__).resolve().parents[2]

TASK = {
    "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 1.0], [-1.0, -1.0]], "stds": [0.5, 0.5]},
    "reward": {"type": "linear", "direction": [1.0, 0.0]},
    "alpha": 1.0,
    "num_steps": 10,
    "learner": {"type": "elegant"},
    "run": {"iterations": 3, "name": "exp"},
}


def _write(tmp_path: Path, task: dict) -> Path:
    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({**task, "run": {**task["run"], "storage_path": str(tmp_path / "storage")}}))
    return config


def test_valid_config_prints_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _write(tmp_path, TASK)
    before = "ray" in sys.modules
    code = cli.main(["check", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) <= 24  # one screen
    text = "\n".join(lines)
    for word in ("model     gmm: event shape (2,), K = 10", "reward    linear:", "mean ± s.e.", "learner   elegant",
                 "resources per trial 1 CPU", "this machine:", f"results   {tmp_path / 'storage' / 'exp'}", "ok:"):
        assert word in text, f"{word!r} not in\n{text}"
    assert not (tmp_path / "storage").exists()
    if not before:
        assert "ray" not in sys.modules


def test_reward_mean_is_the_pretrained_mean(tmp_path):
    """The summary's mean ± s.e. is of r on pretrained samples: for r(x) = x_1 under a symmetric two-mode mixture
    the mean is 0 in law, so the printed mean lies within 4 of its printed standard errors of 0, and the standard
    error is the mixture's std sqrt(1 + 0.25) over sqrt(N) (within 30 %)."""
    report = check_experiment(str(_write(tmp_path, TASK)), {})
    line = next(x for x in report.lines if x.startswith("reward"))
    mean, se = (float(v) for v in line.split(": ", 1)[1].split(" (")[0].split(" ± "))
    assert abs(mean) < 4 * se
    assert abs(se - math.sqrt(1.25 / CHECK_BATCH)) < 0.3 * math.sqrt(1.25 / CHECK_BATCH)


def test_integer_reward_is_cast_and_said(tmp_path, monkeypatch):
    """An int64 reward passes (rlft casts it to float) and the summary says so, instead of failing later in
    `std()` with "std and var only support floating point"."""
    (tmp_path / "int_reward_mod.py").write_text("def sign(x):\n    return (x[:, 0] > 0).long()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = {**TASK, "reward": {"type": "int_reward_mod:sign"}}
    report = check_experiment(str(_write(tmp_path, task)), {})
    line = next(x for x in report.lines if x.startswith("reward"))
    assert "torch.int64; rlft casts it to float" in line

    from rlft.rewards.base import check_reward_values

    values = check_reward_values(torch.tensor([0, 1, 1]), 3, "sign")
    assert values.dtype == torch.get_default_dtype() and values.std() > 0


def test_sweep_and_resume_summary(tmp_path):
    task = {**TASK, "sweep": {"alpha": [0.5, 1.0]}}
    report = check_experiment(str(_write(tmp_path, task)), {}, sweep=True)
    assert any("2 x 3 iterations" in line and "alpha" in line for line in report.lines)


def test_submit_resume_is_not_looked_up_locally(tmp_path):
    """`rlft submit --resume` continues an experiment in the cluster's storage: nothing local is required."""
    config = str(_write(tmp_path, TASK))
    check_experiment(config, {}, resume=True, where="submit")
    with pytest.raises(ConfigError, match="holds no rlft experiment"):
        check_experiment(config, {}, resume=True)
