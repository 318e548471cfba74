"""Faults injected into running sweeps, and survived.

(a) a trial's process is SIGKILLed mid-run: Tune restarts it (`run.max_failures`) from its last
    checkpoint; every iteration is reported exactly once and the final figures are exact;
(b) the sweep's driver is SIGKILLed: `rlft sweep --resume` finishes every trial from its checkpoints;
(c) an RLlib EnvRunner process dies: RLlib restarts it and sampling and training go on;
(d) a worker node of a three-node local cluster is killed: the sweep still finishes;
(e) a kill while a checkpoint is being written never leaves a checkpoint that loads.

The learner is `tests.cluster.faulty.CountingLearner`: theta after n iterations is n(n+1)/2, so a lost
or repeated iteration changes every later row's `train/theta` and the final `objective`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from rlft import cli
from rlft.checkpoint import CheckpointError
from rlft.run.keys import MANIFEST, STATE_FILE
from rlft.run.storage import atomic_write
from rlft.run.trial import read_checkpoint_state, write_checkpoint
from rlft.run.tune import run_experiment
from rlft.run_config import experiment_from_dict
from tests.cluster.faulty import ROOT, experiment, theta_after, write_yaml

pytestmark = pytest.mark.timeout(300)


def progress_rows(trial_dir: str | Path) -> list[dict]:
    return list(csv.DictReader(Path(trial_dir, "progress.csv").open()))


def assert_every_iteration_once(trial_dir: str | Path, iterations: int) -> None:
    """progress.csv holds iterations 1..N once each, in order, each with the exact theta of that iteration."""
    rows = progress_rows(trial_dir)
    assert [int(r["iteration"]) for r in rows] == list(range(1, iterations + 1))
    assert [float(r["train/theta"]) for r in rows] == [theta_after(i) for i in range(1, iterations + 1)]


def learner_iterations(path: Path) -> list[int]:
    """The iterations a trial's learner computed, in order, across restarts (its progress_file)."""
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


def isolated_env(tmp: str) -> dict[str, str]:
    """Environment of a child that starts its own Ray: own temp dir (short: Unix sockets), no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs a child started with start_new_session=True: its process group and every descendant
    (Ray starts its workers in process groups of their own)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(descendants, timeout=15)


# -- (a) a trial process killed mid-run ---------------------------------------------------------------


def test_killed_trial_process_restarts_from_its_last_checkpoint(ray_session, tmp_path):
    iterations, every, kill_at = 10, 4, 7
    (tmp_path / "killed_1.0").write_text("")  # marker already there: only the alpha=0.5 trial is killed
    data = experiment(tmp_path / "results", "trial_kill", iterations, every, kill_at=kill_at,
                      kill_marker=str(tmp_path / "killed_{alpha}"),
                      progress_file=str(tmp_path / "progress_{alpha}.txt"))
    task, run, grid = experiment_from_dict(data)
    assert run.max_failures == 1

    results = run_experiment(data, run, grid, str(tmp_path / "results" / "trial_kill"))

    by_alpha = {r.config["alpha"]: r for r in results}
    for alpha, result in by_alpha.items():
        assert result.error is None
        assert result.metrics["iteration"] == iterations and result.metrics["objective"] == theta_after(iterations)
        assert_every_iteration_once(result.path, iterations)
    killed = Path(by_alpha[0.5].path, "error.txt").read_text()
    assert "actor died" in killed or "died unexpectedly" in killed  # a real process death, not an exception
    # the killed trial lost iterations 5 and 6 (computed, never reported), redid them from the checkpoint at 4
    assert learner_iterations(tmp_path / "progress_0.5.txt") == [*range(1, kill_at), *range(every + 1, iterations + 1)]
    assert learner_iterations(tmp_path / "progress_1.0.txt") == list(range(1, iterations + 1))


# -- (b) the driver killed, then `rlft sweep --resume` ----------------------------------------------------


def reported_checkpoint(trial_dir: Path) -> tuple[int, float]:
    """(iteration, time) of the newest checkpoint the driver has processed: the last progress.csv row
    naming a checkpoint, and the file's mtime ((0, 0.0) while there is none)."""
    path = trial_dir / "progress.csv"
    if not path.exists():
        return 0, 0.0
    mtime = path.stat().st_mtime
    rows = [r for r in progress_rows(trial_dir) if r.get("checkpoint_dir_name")]
    return (int(rows[-1]["iteration"]), mtime) if rows else (0, 0.0)


@pytest.mark.slow  # ~50-100 s on 2 busy cores: a second Ray instance for the driver, trials started twice
def test_interrupted_sweep_resumes_with_rlft_sweep_resume(ray_session, tmp_path, capsys):
    iterations, every = 15, 3
    data = experiment(tmp_path / "results", "driver_kill", iterations, every, sleep_s=0.4,
                      progress_file=str(tmp_path / "progress_{alpha}.txt"))
    config = write_yaml(tmp_path / "sweep.yaml", data)
    experiment_dir = tmp_path / "results" / "driver_kill"
    ray_tmp = tempfile.mkdtemp(prefix="rlftb", dir="/tmp")
    # Tune snapshots its experiment state (what --resume restores) every 10 s, and after num_to_keep
    # checkpoints of a trial; 0 = after every step, so the kill below finds each trial's newest
    # processed checkpoint in the snapshot (with the default a trial may go back to an older one)
    env = {**isolated_env(ray_tmp), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "rlft.cli", "sweep", str(config)], cwd=ROOT, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "driver.log", "w"))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            trials = sorted(experiment_dir.glob("trial_*"))
            states = sorted(experiment_dir.glob("experiment_state-*.json"))
            reported = [reported_checkpoint(t) for t in trials]
            if len(trials) == 2 and states and all(it >= every for it, _ in reported) and \
                    states[-1].stat().st_mtime > max(t for _, t in reported):  # snapshot after both checkpoints
                break
            time.sleep(0.05)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        killed_after = {t.name: len(learner_iterations(tmp_path / f"progress_{a}.txt"))
                        for t, a in zip(trials, ("0.5", "1.0"))}
    finally:
        kill_tree(driver)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not (experiment_dir / "rlft_results.json").exists()
    at_kill = {t.name: it for t, (it, _) in zip(trials, reported)}
    assert all(it < iterations for it in killed_after.values())

    code = cli.main(["sweep", str(config), "--resume", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["num_trials"] == 2 and out["num_errors"] == 0
    for trial in out["trials"]:
        assert trial["iteration"] == iterations and trial["objective"] == theta_after(iterations)
        name = Path(trial["trial_path"]).name
        computed = learner_iterations(tmp_path / f"progress_{trial['config']['alpha']}.txt")
        first_run, resumed = computed[:killed_after[name]], computed[killed_after[name]:]
        assert first_run == list(range(1, len(first_run) + 1))
        # resumed from the newest checkpoint the snapshot held (or one that landed between check and kill)
        restart = resumed[0]
        assert restart - 1 >= at_kill[name] and (restart - 1) % every == 0
        assert resumed == list(range(restart, iterations + 1))
        # the log holds each iteration once, exact, and all of them from the restore point on; rows from
        # before it can be cut short: Tune copies its driver-side logs to storage non-atomically, so a
        # driver killed during that copy leaves a truncated progress.csv behind (Ray 2.60)
        rows = progress_rows(trial["trial_path"])
        logged = [int(r["iteration"]) for r in rows]
        assert logged == sorted(set(logged)) and logged[-len(resumed):] == resumed
        assert all(float(r["train/theta"]) == theta_after(int(r["iteration"])) for r in rows)


# -- (c) an RLlib EnvRunner that crashes ---------------------------------------------------------------


def test_crashed_env_runner_is_restarted_and_training_continues(ray_session, tmp_path):
    from ray.rllib.algorithms.ppo import PPOConfig

    from tests.cluster.faulty import CrashingEnv

    batch = 200
    config = (
        PPOConfig()
        .environment(CrashingEnv, env_config={"crash_at_step": 250, "crash_marker": str(tmp_path / "crashed")})
        .env_runners(num_env_runners=1, num_envs_per_env_runner=1, rollout_fragment_length=100, sample_timeout_s=60)
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=3,
                         delay_between_env_runner_restarts_s=0.0)
        .training(train_batch_size_per_learner=batch, minibatch_size=100, num_epochs=1)
        .learners(num_learners=0)
    )
    algo = config.build_algo()
    try:
        history = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            result = algo.train()
            history.append((result["fault_tolerance"]["num_remote_worker_restarts"],
                            result["fault_tolerance"]["num_healthy_workers"],
                            result["env_runners"]["num_env_steps_sampled_lifetime"]))
            if history[-1][0] >= 1 and len([h for h in history if h[0] >= 1]) >= 3:
                break
    finally:
        algo.stop()
    assert (tmp_path / "crashed").exists(), "the env runner never crashed"
    restarts, healthy, steps = zip(*history)
    assert restarts[-1] == 1 and healthy[-1] == 1
    assert 0 in healthy  # it was really down for a while
    after = [s for r, s in zip(restarts, steps) if r >= 1]
    assert all(b - a == batch for a, b in zip(after, after[1:])), history  # full batches again after restart


# -- (d) a worker node removed from a local multi-node cluster ----------------------------------------------


@pytest.mark.slow  # ~45 s: a three-node cluster started in a child process, trials started three times
def test_worker_node_loss_does_not_end_the_sweep(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rlftd", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.node_loss", str(tmp_path)], cwd=ROOT,
                            env=isolated_env(ray_tmp), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "node_loss.log", "w"), text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (tmp_path / "node_loss.log").read_text()[-3000:]
    summary = json.loads(lines[-1][len("RESULT "):])
    assert summary["removed_node"] is not None and summary["removed_at_iteration"] >= 4

    from tests.cluster.node_loss import ITERATIONS

    assert len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert trial["error"] is None and trial["iteration"] == ITERATIONS
        assert trial["objective"] == theta_after(ITERATIONS)
        assert_every_iteration_once(trial["path"], ITERATIONS)
    moved = [line.split()[1] for line in (tmp_path / "progress_0.5.txt").read_text().splitlines()]
    assert moved[0] == summary["removed_node"] and moved[-1] != summary["removed_node"]  # finished elsewhere


# -- (e) checkpoints are written atomically --------------------------------------------------------------


def counting_learner(**kwargs):
    from rlft.config import task_from_dict
    from rlft.models import build_model
    from rlft.rewards import build_reward
    from tests.cluster.faulty import GMM, CountingLearner

    task = task_from_dict({"model": GMM, "reward": {"type": "quadratic", "center": [1.0, 0.0]}, "num_steps": 4})
    model = build_model(task.model, task.num_steps)
    return CountingLearner(task, model, build_reward(task.reward, model=model), **kwargs)


def in_child(func) -> int:
    """Runs func() in a forked child that never returns to pytest; returns its wait status as a signal
    number (negative) or exit code. The child touches only files (no Ray, no torch), so forking a
    process with Ray threads is safe here."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            func()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_kill_while_writing_a_checkpoint_never_leaves_one_that_loads(tmp_path):
    torn, whole = tmp_path / "torn", tmp_path / "whole"
    torn.mkdir(), whole.mkdir()
    learner = counting_learner(kill_in_save=True)
    for _ in range(3):
        learner.train_iteration()
    state = {"iteration": 3, "reward_queries": 3, "wall_time": 0.0}
    assert in_child(lambda: write_checkpoint(str(torn), learner, state)) == -signal.SIGKILL
    assert (torn / "learner" / "counting.json").exists() and not (torn / STATE_FILE).exists()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_checkpoint_state(str(torn))

    learner.kill_in_save = False
    write_checkpoint(str(whole), learner, state)
    assert read_checkpoint_state(str(whole))[MANIFEST].keys() == {"learner/counting.json"}
    # a copy cut short (as by a kill during Tune's upload): the state file is there, a learner file is not whole
    cut = tmp_path / "cut"
    (cut / "learner").mkdir(parents=True)
    (cut / STATE_FILE).write_bytes((whole / STATE_FILE).read_bytes())
    (cut / "learner" / "counting.json").write_bytes((whole / "learner" / "counting.json").read_bytes()[:10])
    with pytest.raises(CheckpointError, match="differs"):
        read_checkpoint_state(str(cut))


def test_kill_between_write_and_rename_keeps_the_previous_file(tmp_path):
    target = tmp_path / "rlft_state.json"
    atomic_write(str(target), b'{"iteration": 1}')

    def die_before_rename() -> None:
        os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # only in the child
        atomic_write(str(target), b'{"iteration": 2}')

    assert in_child(die_before_rename) == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"iteration": 1}  # never half of the new one
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert leftovers and all(name.startswith(".tmp_") for name in leftovers)


def test_write_checkpoint_restores_exactly(tmp_path):
    learner = counting_learner()
    for _ in range(5):
        learner.train_iteration()
    write_checkpoint(str(tmp_path), learner, {"iteration": 5, "reward_queries": 5, "wall_time": 0.0})
    fresh = counting_learner()
    assert read_checkpoint_state(str(tmp_path))["iteration"] == 5
    fresh.load_checkpoint(str(tmp_path / "learner"))
    assert (fresh.iteration, fresh.theta) == (5, theta_after(5))
