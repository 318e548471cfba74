"""`rlft submit` / `rlft jobs` against a token-authenticated two-node cluster on 127.0.0.1.

A job submitted with the token runs `rlft sweep` on the cluster and its results are readable where the
config's storage path says; a request without the token is refused with HTTP 401 and one with a wrong
token with HTTP 403 (and rlft says which, and how to fix it); a malformed config is rejected by
`rlft submit` before anything is sent.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest

from rlft import cli, jobs
from rlft.run.package import build_package
from tests.cluster.faulty import experiment, theta_after, write_yaml

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    """No token anywhere: RAY_AUTH_TOKEN(_PATH) unset and an empty home directory."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


# -- without a cluster ---------------------------------------------------------------------------------


@pytest.mark.parametrize("broken, key", [
    ({"alpah": 0.3}, "alpah"),                              # unknown top-level key
    ({"run": {"gpus_per_trial": -0.5}}, "run.gpus_per_trial"),  # rule broken inside run:
    ({"sweep": {"alpha": [0.5, -1.0]}}, "sweep.alpha[1]"),   # a grid value that gives an invalid task
    ({"learner": {"sleep_seconds": 1}}, "learner.sleep_seconds"),  # not a parameter of the learner
])
def test_malformed_config_is_rejected_before_anything_is_sent(tmp_path, monkeypatch, capsys, broken, key):
    def no_network(*args, **kwargs):
        raise AssertionError("rlft submit contacted the cluster for a malformed config")

    monkeypatch.setattr(jobs, "connect", no_network)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", no_network)
    data = experiment(tmp_path / "results", "bad", 4, 2)
    for section, value in broken.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) and section in data else value
    config = write_yaml(tmp_path / "bad.yaml", data)
    code = cli.main(["submit", str(config), "--sweep", "--address", "http://127.0.0.1:9", "--wait"])
    err = capsys.readouterr().err
    assert code == 2 and "configuration error" in err and key in err


def test_token_lookup_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "token").write_text("from-file\n")
    assert jobs.find_token({}, home).value == "from-home"
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home).value == "from-file"
    token = jobs.find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home)
    assert (token.value, token.source) == ("from-env", "RAY_AUTH_TOKEN")
    assert jobs.find_token({}, tmp_path / "nobody") is None
    with pytest.raises(jobs.JobsError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_package_holds_the_project_and_the_merged_config_not_caches(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", experiment(tmp_path / "results", "pkg", 4, 2))
    write_yaml(tmp_path / "child.yaml", {"base": "base.yaml", "alpha": 0.7})
    text, data, task, run, grid = jobs.prepare_config(tmp_path / "child.yaml", {"run.iterations": 3})
    assert base.exists() and task.alpha == 0.7 and run.iterations == 3 and "base" not in data
    package = build_package(tmp_path / "job.zip", "child.yaml", text)
    names = set(zipfile.ZipFile(package).namelist())
    assert {"rlft/jobs.py", "rlft/cli.py", "pyproject.toml", "tests/cluster/faulty.py", "rlft_job/child.yaml"} <= names
    assert not any(part in {".git", ".venv", "__pycache__", "runs"} for n in names for part in Path(n).parts)
    shipped = zipfile.ZipFile(package).read("rlft_job/child.yaml").decode()
    assert "alpha: 0.7" in shipped and "iterations: 3" in shipped  # the base chain and overrides travel merged
    again = build_package(tmp_path / "again.zip", "child.yaml", text)
    assert package.read_bytes() == again.read_bytes()  # deterministic: Ray reuses the cached upload


class _FakeClient:
    """Job status and logs advancing one step per status query (RUNNING, RUNNING, then `final`)."""

    def __init__(self, final: str) -> None:
        self.statuses = ["RUNNING", "RUNNING", final]
        self.calls = 0

    def get_job_status(self, job_id):
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(value=self.statuses[min(self.calls, len(self.statuses)) - 1])

    def get_job_logs(self, job_id):
        return "".join(f"line {i}\n" for i in range(self.calls))


def test_log_polling_prints_each_line_once_and_exit_codes_follow_the_status():
    import io

    out = io.StringIO()
    client = _FakeClient("SUCCEEDED")
    assert jobs._poll_logs(client, "j", out, timeout=10, poll_s=0.0) is True
    assert out.getvalue() == "line 0\nline 1\nline 2\n"
    assert jobs.wait_for_status(client, "j", poll_s=0.0) == "SUCCEEDED"
    assert [jobs.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING")] == [0, 1, 1, 124]
    assert jobs._poll_logs(_FakeClient("FAILED"), "j", io.StringIO(), timeout=0.0, poll_s=0.0) is False


# -- on the local cluster --------------------------------------------------------------------------------


def test_requests_without_or_with_a_wrong_token_are_refused(local_cluster, no_token_env, capsys, tmp_path):
    import requests

    url = f"{local_cluster.address}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code == 403
    assert requests.get(url, headers={"Authorization": f"Bearer {local_cluster.token}"}, timeout=10).status_code == 200
    jobs_before = requests.get(url, headers={"Authorization": f"Bearer {local_cluster.token}"}, timeout=10).json()

    config = write_yaml(tmp_path / "ok.yaml", experiment(tmp_path / "results", "refused", 2, 1))
    assert cli.main(["submit", str(config), "--sweep", "--address", local_cluster.address]) == 1
    err = capsys.readouterr().err
    assert "token missing" in err and "HTTP 401" in err and "ray get-auth-token" in err

    no_token_env.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert cli.main(["submit", str(config), "--sweep", "--address", local_cluster.address]) == 1
    err = capsys.readouterr().err
    assert "token invalid" in err and "HTTP 403" in err and "RAY_AUTH_TOKEN" in err

    assert cli.main(["jobs", "list", "--address", local_cluster.address]) == 1
    assert "token invalid" in capsys.readouterr().err
    jobs_after = requests.get(url, headers={"Authorization": f"Bearer {local_cluster.token}"}, timeout=10).json()
    assert len(jobs_after) == len(jobs_before)  # nothing was submitted


def test_submitted_sweep_succeeds_and_its_results_are_readable(local_cluster, no_token_env, capsys, tmp_path):
    iterations = 6
    storage = tmp_path / "results"  # one machine: a local path is shared by both nodes
    write_yaml(tmp_path / "base.yaml", experiment(storage, "job_sweep", iterations, 3,
                                                   progress_file=str(tmp_path / "progress_{alpha}.txt")))
    config = write_yaml(tmp_path / "alpha_sweep.yaml", {"base": "base.yaml"})
    no_token_env.setenv("RAY_AUTH_TOKEN_PATH", str(local_cluster.token_path))

    code = cli.main(["submit", str(config), "--sweep", "--address", local_cluster.address, "--wait",
                     "--timeout", "240", "--json"])
    captured = capsys.readouterr()
    assert captured.out.strip(), captured.err[-3000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "SUCCEEDED", captured.err[-3000:]
    assert summary["entrypoint"] == "python -m rlft.cli sweep rlft_job/alpha_sweep.yaml"

    # results: where run.storage_path says, written by the job's `rlft sweep`
    experiment_dir = storage / "job_sweep"
    results = json.loads((experiment_dir / "rlft_results.json").read_text())
    assert results["num_trials"] == 2 and results["num_errors"] == 0
    for trial in results["trials"]:
        assert trial["status"] == "TERMINATED" and trial["iteration"] == iterations
        assert trial["objective"] == theta_after(iterations)
        trial_dir = Path(trial["trial_path"])
        rows = list(csv.DictReader((trial_dir / "progress.csv").open()))
        assert [int(r["iteration"]) for r in rows] == list(range(1, iterations + 1))
        assert list(trial_dir.glob("events.out.tfevents.*")), "no TensorBoard events"

    # trials ran on the worker node: the head offers no CPUs
    head = [n["node_id"] for n in local_cluster.nodes() if n["is_head_node"]]
    trial_nodes = {line.split()[1] for f in tmp_path.glob("progress_*.txt") for line in f.read_text().splitlines()}
    assert len(head) == 1 and trial_nodes and head[0] not in trial_nodes

    assert cli.main(["jobs", "status", summary["job_id"], "--address", local_cluster.address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "SUCCEEDED" and status["metadata"]["rlft_command"] == "sweep"
    assert cli.main(["jobs", "logs", summary["job_id"], "--address", local_cluster.address]) == 0
    assert "TERMINATED" in capsys.readouterr().out


# -- logging ----------------------------------------------------------------------------------------------


def test_runs_log_tensorboard_and_csv_by_default_and_optional_loggers_fail_clearly():
    import importlib.util

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from rlft.config import ConfigError
    from rlft.run_config import parse_run
    from rlft.run.tune import callbacks as tune_callbacks

    callbacks = tune_callbacks(parse_run({}), "exp")  # run.loggers defaults to [tensorboard, csv]
    # the JSON logger is the runner's subclass that keeps the local result.json on trial restarts
    expected = [JsonLoggerCallback, TBXLoggerCallback, CSVLoggerCallback]
    assert len(callbacks) == 3 and all(isinstance(c, k) for c, k in zip(callbacks, expected))
    for name, extra in (("mlflow", "mlflow"), ("wandb", "wandb")):
        run = parse_run({"loggers": ["csv", name]})
        if importlib.util.find_spec(name) is None:  # not installed here: the error says how to get it
            with pytest.raises(ConfigError, match=rf"pip install 'rlft\[{extra}\]'"):
                tune_callbacks(run, "exp")
        else:
            assert len(tune_callbacks(run, "exp")) == 3
