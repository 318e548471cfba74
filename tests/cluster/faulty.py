"""Tiny learners and envs that fail on purpose, for the fault-tolerance and jobs tests.

`CountingLearner` is deterministic bookkeeping, not learning: after n iterations theta = n(n+1)/2, so a
restore that lost or repeated an iteration shows in every reported row (`train/theta`) and in the final
`objective`. It can SIGKILL its own process once (a trial process dying as under the OOM killer) and
sleep per iteration (to leave time for a driver or a node to be killed mid-run). Named in YAML as
`tests.cluster.faulty:CountingLearner`, importable wherever the project is on the path (the session's
Ray workers, a local cluster's job working_dir).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from rlft.learners import Learner

import yaml

ROOT = Path(__file__).resolve().parents[2]
LEARNER = "tests.cluster.faulty:CountingLearner"
GMM = {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.0, 0.0], [-1.0, 0.0]], "stds": [0.5, 0.5]}


def theta_after(n: int) -> float:
    """theta after n iterations: 1 + 2 + ... + n."""
    return n * (n + 1) / 2


def experiment(storage: str | os.PathLike, name: str, iterations: int, checkpoint_every: int, **learner) -> dict:
    """A two-alpha sweep of CountingLearner on a tiny 2-D mixture (K = 4): seconds per trial, 1 CPU each,
    both at once, one retry (`max_failures: 1`), CSV and TensorBoard logs."""
    return {
        "model": GMM, "reward": {"type": "quadratic", "center": [1.0, 0.0]}, "num_steps": 4,
        "learner": {"type": LEARNER, **learner},
        "run": {"iterations": iterations, "checkpoint_every": checkpoint_every,
                # evaluations only at checkpoints: a new best evaluation is checkpointed too (rlft.run.trial), and the
                # tests count on the restore points being exactly every `checkpoint_every` iterations
                "eval_every": checkpoint_every, "eval_samples": 10,
                "storage_path": str(storage), "name": name, "loggers": ["csv", "tensorboard"],
                "max_concurrent_trials": 2, "max_failures": 1},
        "sweep": {"alpha": [0.5, 1.0]},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _fire_once(marker: str) -> bool:
    """True the first time it is called for `marker` (the marker file records that it fired)."""
    if not marker or os.path.exists(marker):
        return False
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.fsync(fd)
    os.close(fd)
    return True


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"


class CountingLearner(Learner):
    """theta += iteration number; optional one-off SIGKILL at `kill_at` (marker file) or in the middle of
    `save_checkpoint` (`kill_in_save`), `sleep_s` per iteration, (iteration, node id) lines to `progress_file`."""

    def __init__(self, task, model, reward, kill_at: int = 0, kill_marker: str = "", sleep_s: float = 0.0,
                 progress_file: str = "", kill_in_save: bool = False) -> None:
        super().__init__(task, model, reward)
        self.theta = 0.0
        self.kill_at, self.kill_marker, self.sleep_s = kill_at, kill_marker, sleep_s
        self.progress_file, self.kill_in_save = progress_file, kill_in_save

    def train_iteration(self) -> dict[str, float]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        nxt = self.iteration + 1
        if self.kill_at == nxt and _fire_once(self.kill_marker.format(alpha=self.task.alpha)):
            os.kill(os.getpid(), signal.SIGKILL)  # the trial's process dies mid-run, nothing flushed
        self.theta += nxt
        self.iteration = nxt
        self.reward_queries += 1
        if self.progress_file:  # lets a test see where (iteration, node) a trial is without asking Ray
            with open(self.progress_file.format(alpha=self.task.alpha), "a") as f:
                f.write(f"{nxt} {_node_id()}\n")
        return {"theta": self.theta}

    def control(self):
        return None

    def evaluate(self, num_samples: int = 0, seed: int | None = None, progress: bool = False) -> dict[str, Any]:
        return {"objective": self.theta, "reward": self.theta, "kl": 0.0}

    def save_checkpoint(self, directory: str) -> None:
        text = json.dumps({"iteration": self.iteration, "theta": self.theta, "reward_queries": self.reward_queries})
        if self.kill_in_save:  # the process dies with half of the file on disk
            with open(Path(directory, "counting.json"), "w") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        Path(directory, "counting.json").write_text(text)

    def load_checkpoint(self, directory: str) -> None:
        state = json.loads(Path(directory, "counting.json").read_text())
        self.iteration, self.theta, self.reward_queries = state["iteration"], state["theta"], state["reward_queries"]


class CrashingEnv(gym.Env):
    """A 1-D random walk (reward -|x|, 10-step episodes) whose process exits at step `crash_at_step`
    once per marker file: an RLlib EnvRunner that crashes."""

    def __init__(self, config: dict | None = None) -> None:
        config = config or {}
        self.crash_at_step = int(config.get("crash_at_step", 0))
        self.crash_marker = str(config.get("crash_marker", ""))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.steps = 0  # over the env's lifetime
        self.x = np.zeros(1, np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.normal(size=1).astype(np.float32)
        self.t = 0
        return self.x.copy(), {}

    def step(self, action):
        self.steps += 1
        if self.crash_at_step and self.steps >= self.crash_at_step and _fire_once(self.crash_marker):
            os._exit(1)  # the EnvRunner actor's process dies
        self.x = (self.x + np.clip(action, -1, 1)).astype(np.float32)
        self.t += 1
        return self.x.copy(), float(-abs(self.x[0])), False, self.t >= 10, {}
