"""`rlft demo`: it trains a learner on the embedded task and shows it beside the pretrained model and the exact
optimum (wiring with a tiny budget here; the full demo is a slow test); `--oracle` keeps the exact optimal control,
which closes the gap to J* and matches exact target samples."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from rlft.cli import main
from rlft.config import DEFAULT_TASK, task_from_dict
from rlft.demo import exact_figures
from rlft.models import build_model
from rlft.rewards import build_reward

REQUIRED = ["reward", "kl", "objective", "optimal_objective", "gap_closure", "energy_distance", "energy_distance_floor"]
TINY = {"type": "elegant", "drift_iterations": 4, "batch_size": 64, "learn_init": False}


def test_demo_trains_a_learner_and_prints_it_beside_the_pretrained_model_and_the_exact_optimum(tmp_path, capsys):
    """The default path with a tiny budget: a learner is built from the task, trained 2 iterations with a progress
    line each on stderr, and scored in three columns; the JSON carries the same; the PNG is written."""
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(dict(DEFAULT_TASK, num_steps=20, learner=TINY)))
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--config", str(path), "--iterations", "2", "--samples", "200", "--out", str(out_png)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "elegant trained 2 iterations" in lines[0]
    assert lines[1].split() == ["pretrained", "elegant", "exact", "optimum"]
    gap = next(line for line in lines if line.startswith("gap closure")).split()
    assert gap[2] == "0.000" and gap[-1] == "1.000"  # pretrained 0, exact optimum 1, the learner between
    progress = [line for line in captured.err.splitlines() if "demo: elegant" in line]
    assert [p.split()[2] for p in progress] == ["1/2", "2/2"] and all("ETA" in p for p in progress)
    assert out_png.is_file() and out_png.stat().st_size > 10_000
    assert main(["demo", "--config", str(path), "--iterations", "1", "--samples", "200", "--json", "--no-progress",
                 "--out", ""]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert captured.err.strip() == ""  # --no-progress: nothing on stderr
    assert report["column"] == "elegant" and report["learner"]["type"] == "elegant" and report["learner"]["iterations"] == 1
    assert report["learner"]["train_seconds"] > 0 and "plot" not in report
    for key in REQUIRED:
        assert key in report
    assert report["exact"]["gap_closure"] == 1.0 and report["exact"]["objective"] == report["optimal_objective"]


def test_the_exact_optimum_column_is_the_tilted_target():
    """E*[r], KL(p_tar || p_pre) = (E*[r] - J*) / alpha and J = J*: the KL against the exact mixtures' log-density
    ratio averaged over target samples (within 3 s.e.), on a task whose alpha is not 1."""
    task = task_from_dict(dict(DEFAULT_TASK, alpha=0.5, num_steps=10))
    model = build_model(task.model, task.num_steps)
    reward = build_reward(task.reward, model=model)
    target = model.exact_target(reward, task.alpha)
    x = target.mixture.sample(20_000, torch.Generator().manual_seed(0))
    figures = exact_figures(model, reward, task.alpha, x, {"energy_distance_floor": 0.01})
    log_ratio = target.mixture.log_prob(x) - model.data.log_prob(x)  # log p_tar / p_pre, (n,)
    se = float(log_ratio.std() / len(log_ratio) ** 0.5)
    assert figures["kl"] == pytest.approx(float(log_ratio.mean()), abs=3 * se)
    assert figures["kl"] > 0.1 and figures["objective"] == target.optimal_objective
    assert figures["reward"] - task.alpha * figures["kl"] == pytest.approx(target.optimal_objective, abs=1e-9)
    assert figures["energy_distance"] == 0.01


def test_demo_oracle_json_on_default_task(tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--oracle", "--json", "--samples", "4096", "--no-progress", "--out", str(out_png)]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in REQUIRED:
        assert key in report and key in report["pretrained"] or key == "energy_distance_floor"
    pre = report["pretrained"]
    assert report["column"] == "optimal control" and "learner" not in report
    assert pre["objective"] < report["optimal_objective"] - 1.0  # pretrained J far below J*
    assert report["gap_closure"] >= 0.95
    assert report["energy_distance"] <= 2 * report["energy_distance_floor"]
    assert pre["energy_distance"] > 20 * report["energy_distance_floor"]
    assert out_png.is_file() and out_png.stat().st_size > 10_000


def test_demo_oracle_on_a_3d_linear_task_from_yaml(tmp_path, capsys):
    task = {
        "model": {"type": "gmm", "weights": [0.3, 0.7], "means": [[1, 0, 0], [-1, 1, 0]], "stds": [0.5, 0.3]},
        "reward": {"type": "linear", "direction": [1.0, 0.5, 0.0]},
        "alpha": 0.5, "num_steps": 100, "seed": 3,
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    assert main(["demo", "--oracle", "--config", str(path), "--json", "--samples", "4096", "--no-progress", "--out", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gap_closure"] >= 0.95
    assert report["energy_distance"] <= 2 * report["energy_distance_floor"]


def test_demo_rejects_non_gmm_bad_alpha_and_bad_learner_options_before_training(tmp_path, capsys):
    bad = dict(DEFAULT_TASK, alpha=-0.5)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["demo", "--config", str(path)]) == 2
    assert "alpha must be > 0 (got -0.5)" in capsys.readouterr().err
    other = dict(DEFAULT_TASK, model={"type": "scorenet", "path": str(tmp_path)})
    path.write_text(yaml.safe_dump(other))
    assert main(["demo", "--config", str(path)]) == 2
    assert "model.type must be 'gmm'" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(dict(DEFAULT_TASK, learner={"type": "elegant", "lr": -1.0})))
    assert main(["demo", "--config", str(path)]) == 2
    assert "learner.lr" in capsys.readouterr().err
    assert main(["demo", "--iterations", "0"]) == 2
    assert "--iterations must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_full_demo_closes_90_percent_of_the_gap(tmp_path, capsys):
    """`rlft demo` as the README's quick start runs it (the demo's own learner and budget)."""
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--json", "--no-progress", "--out", str(out_png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["learner"]["type"] == "elegant"
    assert report["gap_closure"] >= 0.9
    assert report["pretrained"]["energy_distance"] > 10 * report["energy_distance"]
    assert out_png.is_file()
