"""The names a run writes: reported keys, summary keys, status values and file names, defined once.

A row Tune records for every iteration (and the `--json` object of `rlft train`) carries the run keys
below and the figures of `rlft.evaluation` (re-exported here so that `rlft.run` reads every key from one
module; they are defined there, beside the code that computes them).
"""

from __future__ import annotations

from rlft.evaluation import (  # noqa: F401  (the figures every reported row carries)
    DIVERSITY,
    ENERGY_DISTANCE,
    ENERGY_DISTANCE_FLOOR,
    GAP_CLOSURE,
    KL,
    OBJECTIVE,
    OPTIMAL_OBJECTIVE,
    OPTIMAL_OBJECTIVE_EXACT,
    OPTIMAL_OBJECTIVE_SE,
    PRETRAINED,
    REWARD,
)

# -- keys of a reported row ---------------------------------------------------------------------------
ITERATION = "iteration"
"""Learner iterations done (1 on the first row)."""
EVAL_ITERATION = "eval_iteration"
"""The iteration the row's figures were evaluated at (figures are carried forward between evaluations)."""
REWARD_QUERIES = "reward_queries"
"""Reward evaluations so far."""
WALL_TIME = "wall_time"
"""Seconds of training and evaluation so far, summed over restarts."""
ITERATION_TIME = "iteration_time"
"""Seconds of this iteration (training and, when it evaluated, evaluation)."""
TRAIN = "train"
"""The learner's own metrics of this iteration (`train/<metric>` in Tune's flattened logs)."""

# -- keys of a trial in the results -------------------------------------------------------------------
CONFIG = "config"
STATUS = "status"
ERROR = "error"
TRIAL_PATH = "trial_path"
HISTORY_PATH = "history_path"
CHECKPOINT_PATH = "checkpoint_path"
OPTIMAL_REWARD = "optimal_reward"
"""E[r] under the exact target (2-D tasks with an exact target only)."""
OPTIMAL_KL = "optimal_kl"
"""KL(target || pretrained) = (E*[r] - J*) / alpha (exact target only)."""
SAMPLES = "samples"
"""Plot key of the sample scatter (of a sweep: the grid of scatters)."""
PARETO = "pareto"
"""Plot key of the reward-vs-KL picture of a sweep."""

# -- the clouds of samples.safetensors (2-D tasks) ---------------------------------------------------------
SAMPLES_FINETUNED = "finetuned"
SAMPLES_PRETRAINED = "pretrained"
SAMPLES_TARGET = "target"

# -- keys of the summary object -----------------------------------------------------------------------
EXPERIMENT_PATH = "experiment_path"
PLOTS = "plots"
NAME = "name"
GRID = "grid"
NUM_TRIALS = "num_trials"
NUM_ERRORS = "num_errors"
TRIALS = "trials"

# -- trial status (Tune's names) ----------------------------------------------------------------------
TERMINATED = "TERMINATED"
ERRORED = "ERROR"

# -- checkpoint state (rlft_state.json) ---------------------------------------------------------------
LAST_EVAL = "last_eval"
"""The latest figures, carried into the rows after a restore."""
MANIFEST = "manifest"
"""{relative path: {bytes, sha256}} of every other file of the checkpoint."""

# -- files ----------------------------------------------------------------------------------------------
TASK_KEY = "rlft_task"
"""The base task mapping inside every trial's Tune config."""
LEARNER_DIR = "learner"
STATE_FILE = "rlft_state.json"
SAMPLES_FILE = "samples.safetensors"
HISTORY_FILE = "history.jsonl"
"""In a checkpoint: every row from iteration 1 up to it."""
TRIAL_HISTORY_FILE = "rlft_history.jsonl"
"""In a trial directory after the run: the final checkpoint's history."""
EXPERIMENT_FILE = "rlft_experiment.json"
RESULTS_FILE = "rlft_results.json"
PLOTS_DIR = "plots"
