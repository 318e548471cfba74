"""`rlft demo`: the exact optimal control closes the gap to J* and matches exact target samples."""

from __future__ import annotations

import json

import pytest
import yaml

from rlft.cli import main
from rlft.config import DEFAULT_TASK

REQUIRED = ["reward", "kl", "objective", "optimal_objective", "gap_closure", "energy_distance", "energy_distance_floor"]


def test_demo_json_on_default_task(tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--json", "--samples", "4096", "--no-progress", "--out", str(out_png)]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in REQUIRED:
        assert key in report and key in report["pretrained"] or key == "energy_distance_floor"
    pre = report["pretrained"]
    assert pre["objective"] < report["optimal_objective"] - 1.0  # pretrained J far below J*
    assert report["gap_closure"] >= 0.95
    assert report["energy_distance"] <= 2 * report["energy_distance_floor"]
    assert pre["energy_distance"] > 20 * report["energy_distance_floor"]
    assert out_png.is_file() and out_png.stat().st_size > 10_000


def test_demo_on_a_3d_linear_task_from_yaml(tmp_path, capsys):
    task = {
        "model": {"type": "gmm", "weights": [0.3, 0.7], "means": [[1, 0, 0], [-1, 1, 0]], "stds": [0.5, 0.3]},
        "reward": {"type": "linear", "direction": [1.0, 0.5, 0.0]},
        "alpha": 0.5, "num_steps": 100, "seed": 3,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    assert main(["demo", "--config", str(path), "--json", "--samples", "4096", "--no-progress", "--out", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gap_closure"] >= 0.95
    assert report["energy_distance"] <= 2 * report["energy_distance_floor"]


def test_demo_rejects_non_gmm_and_bad_alpha(tmp_path, capsys):
    bad = dict(DEFAULT_TASK, alpha=-0.5)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["demo", "--config", str(path)]) == 2
    assert "alpha must be > 0 (got -0.5)" in capsys.readouterr().err
    other = dict(DEFAULT_TASK, model={"type": "scorenet", "path": str(tmp_path)})
    path.write_text(yaml.safe_dump(other))
    assert main(["demo", "--config", str(path)]) == 2
    assert "model.type must be 'gmm'" in capsys.readouterr().err
