"""Honest exits (issue 21 item 2): Ctrl-C during `rlft train` exits 130 with rlft's own `--resume` command, and
that command finishes the run from the saved state; SIGTERM is the same stop with 143.

The driver runs in a subprocess (a signal must reach a real process), connected to the test session's Ray; the
learner sleeps in each iteration so that the signal arrives mid-run, after the first iteration rows.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlft import cli
from rlft.run.keys import ITERATION, STATUS, TERMINATED, TRIAL_PATH
from tests.run.test_runner import LinearLearner

ROOT = Path(__file__).resolve().parents[2]
SLOW = "tests.run.test_interrupt:SlowLearner"
ITERATIONS = 12


class SlowLearner(LinearLearner):
    """`LinearLearner` that sleeps `sleep` seconds per iteration (so that a signal lands mid-run)."""

    def __init__(self, task, model, reward, sleep: float = 0.5, **kwargs) -> None:
        super().__init__(task, model, reward, **kwargs)
        self.sleep = sleep

    def train_iteration(self) -> dict[str, float]:
        time.sleep(self.sleep)
        return super().train_iteration()


def _config(tmp_path: Path) -> str:
    data = {
        "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.5, 1.0], [-1.5, -1.0]], "stds": [0.5, 0.5]},
        "reward": {"type": "quadratic", "center": [1.0, 0.5], "scale": 1.0},
        "alpha": 1.0, "num_steps": 10, "seed": 3,
        "learner": {"type": SLOW, "sleep": 0.5},
        "run": {"iterations": ITERATIONS, "eval_every": 1, "eval_samples": 100, "checkpoint_every": 1, "name": "stopped",
                "storage_path": str(tmp_path / "results"), "max_failures": 0},
    }
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run_until_first_rows(config: str, address: str, sig: int, timeout: float = 180.0,
                          command: str = "train") -> tuple[int, str]:
    """Starts `rlft train config` in a subprocess, sends `sig` once the second iteration row is printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "rlft.cli", command, config, "--address", address], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent, deadline = [], False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            # after iteration 2's row, iteration 1's checkpoint is surely written (report() returned)
            if not sent and f"] 2/{ITERATIONS}  " in line:  # iteration 2's progress line (rlft.run.progress)
                proc.send_signal(sig)
                sent = True
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, "no iteration row appeared:\n" + "".join(lines)[-3000:]
    return code, "".join(lines)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_resume_command_and_resume_finishes(ray_session, tmp_path, capsys):
    config = _config(tmp_path)
    address = ray_session.get_runtime_context().gcs_address
    code, out = _run_until_first_rows(config, address, signal.SIGINT)
    assert code == 130, out[-3000:]
    resume = f"rlft train {config} --resume --name stopped"
    assert "interrupted by SIGINT" in out and resume in out and "Tuner.restore(" not in out  # rlft's command only
    experiment = tmp_path / "results" / "stopped"
    assert not (experiment / "rlft_results.json").exists()  # nothing reported as finished
    stopped = [json.loads(line) for f in experiment.glob("trial_*/result.json") for line in f.read_text().splitlines()]
    last = max((row[ITERATION] for row in stopped), default=0)
    assert 2 <= last < ITERATIONS, f"the run must stop after the signal (sent after iteration 2), not at {last}"
    assert cli.main(resume.split()[1:] + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result[STATUS] == TERMINATED and result[ITERATION] == ITERATIONS
    # every iteration once, and the resumed process continued from a checkpoint instead of starting over
    rows = [json.loads(line) for line in Path(result[TRIAL_PATH], "result.json").read_text().splitlines() if line.strip()]
    assert [r[ITERATION] for r in rows] == list(range(1, ITERATIONS + 1))
    restarts = [r[ITERATION] for r in rows if r["iterations_since_restore"] == 1]
    assert restarts[0] == 1 and len(restarts) == 2 and restarts[1] > 1, restarts


@pytest.mark.slow
def test_sigterm_exits_143(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    code, out = _run_until_first_rows(_config(tmp_path), address, signal.SIGTERM)
    assert code == 143 and "interrupted by SIGTERM" in out and "--resume --name stopped" in out, out[-3000:]


@pytest.mark.slow
def test_ctrl_c_during_a_sweep_exits_130_and_resume_finishes_every_trial(ray_session, tmp_path, capsys):
    config = _config(tmp_path)
    data = yaml.safe_load(Path(config).read_text())
    data["sweep"] = {"alpha": [0.5, 1.0]}
    data["run"]["max_concurrent_trials"] = 1  # one trial at a time: the second has not started when the signal lands
    Path(config).write_text(yaml.safe_dump(data))
    address = ray_session.get_runtime_context().gcs_address
    code, out = _run_until_first_rows(config, address, signal.SIGINT, command="sweep")
    assert code == 130, out[-3000:]
    resume = f"rlft sweep {config} --resume --name stopped"
    assert "interrupted by SIGINT" in out and resume in out and "Tuner.restore(" not in out
    assert not (tmp_path / "results" / "stopped" / "rlft_results.json").exists()
    assert cli.main(resume.split()[1:] + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_trials"] == 2 and result["num_errors"] == 0
    for trial in result["trials"]:
        assert trial[STATUS] == TERMINATED and trial[ITERATION] == ITERATIONS
        rows = [json.loads(line) for line in Path(trial[TRIAL_PATH], "result.json").read_text().splitlines() if line.strip()]
        assert [r[ITERATION] for r in rows] == list(range(1, ITERATIONS + 1))  # every iteration exactly once
