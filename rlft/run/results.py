"""What a finished `rlft train` / `rlft sweep` reports: one dict per trial, the summary, a table and plots.

`--json` output (one object on stdout; logs and progress go to stderr):
    rlft train:  {<figures of rlft.evaluation: reward, kl, objective, optimal_objective, gap_closure,
                  diversity, energy_distance, energy_distance_floor, ..., pretrained: {...}>,
                  iteration, reward_queries, wall_time, eval_iteration, train: {...}, config: {},
                  status, error, trial_path, checkpoint_path, history_path, optimal_reward, optimal_kl (exact
                  target only), best: {iteration, objective, reward, kl, gap_closure (where known), checkpoint}
                  (the evaluated iteration with the highest J, and its checkpoint; null where it was not kept),
                  experiment_path, plots: {samples: PATH}}
                 a conditional task (`conditions:`): the figures are means over its training conditions, and
                  heldout: {the same, over the held-out ones}, per_condition: {"train_i" | "eval_i": {condition, ...}}
                  are added (`rlft.evaluation.evaluate_conditional`)
    rlft sweep:  {experiment_path, name, grid: {key: [values]}, num_trials, num_errors,
                  trials: [{config: {key: value}, <the per-trial keys above>}, ...] (grid order),
                  plots: {pareto: PATH, samples: PATH, "samples/<trial_id>": PATH, ...}}
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import rlft.plots as plots
from rlft.run.keys import (
    CHECKPOINT_PATH, CONFIG, DIVERSITY, ENERGY_DISTANCE, ENERGY_DISTANCE_FLOOR, ERROR, ERRORED, EXPERIMENT_PATH,
    GAP_CLOSURE, GRID, HISTORY_FILE, HISTORY_PATH, ITERATION, KL, NAME, NUM_ERRORS, NUM_TRIALS, OBJECTIVE,
    OPTIMAL_KL, OPTIMAL_OBJECTIVE, OPTIMAL_OBJECTIVE_EXACT, OPTIMAL_OBJECTIVE_SE, OPTIMAL_REWARD, PARETO, PLOTS, PLOTS_DIR, PRETRAINED, REWARD, SAMPLES,
    SAMPLES_FINETUNED, SAMPLES_PRETRAINED, SAMPLES_TARGET, STATUS, TASK_KEY, TERMINATED, TRIAL_HISTORY_FILE,
    TRIAL_PATH, TRIALS,
)
from rlft.run.storage import join, uri, write_bytes
from rlft.run.trial import BEST_SCORE, best_evaluated, read_checkpoint_state, read_history, read_samples
from rlft.run_config import SweepGrid

#: keys Tune adds to every result (left out of the final figures)
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id",
    "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "timesteps_total", "episodes_total", "timesteps_since_restore",
}
BEST, CHECKPOINT = "best", "checkpoint"
"""Key of a trial's best evaluated iteration, and of its checkpoint's path inside it."""
# private keys of a trial dict (dropped from the summary)
_SAMPLES, _TRIAL_ID, _ALPHA = "_samples", "_trial_id", "_alpha"


def collect_trials(results, grid: SweepGrid, grid_path: str = "") -> list[dict[str, Any]]:
    """One dict per trial (grid order): its grid values, status, final figures, paths, plot samples.

    `grid_path` is the experiment path; on cloud storage the trial paths are given as URIs of its scheme.
    """
    order = {_key(c): i for i, c in enumerate(grid.combinations())}
    trials = []
    for result in results:
        config = {k: result.config.get(k) for k in grid.params}
        metrics = result.metrics or {}
        trial: dict[str, Any] = {CONFIG: config, STATUS: ERRORED if result.error else TERMINATED,
                                 ERROR: _error_text(result.error)}
        trial.update({k: v for k, v in metrics.items() if k not in _TUNE_KEYS})
        trial[TRIAL_PATH] = uri(result.path, grid_path)
        trial[CHECKPOINT_PATH] = uri(result.checkpoint.path, grid_path) if result.checkpoint else None
        trial[_TRIAL_ID] = metrics.get("trial_id") or os.path.basename(result.path)
        trial[_ALPHA] = result.config.get("alpha", (result.config.get(TASK_KEY) or {}).get("alpha", 1.0))
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                state = read_checkpoint_state(directory)
                if not result.error:
                    trial.update({k: state[k] for k in (OPTIMAL_REWARD, OPTIMAL_KL) if k in state})
                if os.path.isfile(os.path.join(directory, HISTORY_FILE)):
                    trial[HISTORY_PATH] = join(trial[TRIAL_PATH], TRIAL_HISTORY_FILE)
                    write_bytes(trial[HISTORY_PATH], Path(directory, HISTORY_FILE).read_bytes())
                    trial[BEST] = best_of(read_history(directory), _kept_checkpoints(result, grid_path))
                samples = None if result.error else read_samples(directory)
                if samples is not None:
                    trial[_SAMPLES] = samples
        trials.append(trial)
    return sorted(trials, key=lambda t: order.get(_key(t[CONFIG]), len(order)))


def best_of(rows: list[dict[str, Any]], checkpoints: dict[int, str]) -> dict[str, Any] | None:
    """The `best` entry: the evaluated row with the highest J (`rlft.run.trial.best_evaluated`), its figures and the
    path of its checkpoint (`checkpoints`: iteration -> path of those Tune kept; None when that one was not kept)."""
    row = best_evaluated(rows)
    if row is None:
        return None
    best = {ITERATION: row[ITERATION], **{k: row[k] for k in (BEST_SCORE, REWARD, KL, GAP_CLOSURE) if k in row}}
    return {**best, CHECKPOINT: checkpoints.get(row[ITERATION])}


def _kept_checkpoints(result, grid_path: str) -> dict[int, str]:
    """iteration -> path (a URI on cloud storage) of every checkpoint Tune kept for the trial."""
    out = {}
    for ckpt, metrics in getattr(result, "best_checkpoints", None) or []:
        if isinstance((metrics or {}).get(ITERATION), int):
            out[metrics[ITERATION]] = uri(ckpt.path, grid_path)
    return out


def make_plots(trials: list[dict[str, Any]], grid: SweepGrid, path: str) -> dict[str, str]:
    """Writes the sample scatter(s), the per-trial sample grid and the reward-vs-KL (Pareto) picture."""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rlft_plots_") as tmp:
        local = {}
        with_samples = [t for t in trials if _SAMPLES in t]
        for t in with_samples:
            s = t[_SAMPLES]
            name = "samples.png" if not grid else f"samples_{t[_TRIAL_ID]}.png"
            title = _label(t[CONFIG] if "alpha" in t[CONFIG] else {"alpha": t[_ALPHA], **t[CONFIG]})
            title += f"  (reward {t.get(REWARD, float('nan')):.3f}, KL {t.get(KL, float('nan')):.3f})"
            local[SAMPLES if not grid else f"{SAMPLES}/{t[_TRIAL_ID]}"] = plots.scatter_samples(
                os.path.join(tmp, name), s[SAMPLES_FINETUNED], s.get(SAMPLES_TARGET), s.get(SAMPLES_PRETRAINED), title)
        if grid and with_samples:
            panels = [{"finetuned": t[_SAMPLES][SAMPLES_FINETUNED], "target": t[_SAMPLES].get(SAMPLES_TARGET),
                       "pretrained": t[_SAMPLES].get(SAMPLES_PRETRAINED), "title": _label(t[CONFIG])}
                      for t in with_samples]
            local[SAMPLES] = plots.sample_grid(os.path.join(tmp, "samples_grid.png"), panels)
        points = [_pareto_point(t) for t in trials if isinstance(t.get(REWARD), float)]
        if grid and points:
            local[PARETO] = plots.pareto_plot(os.path.join(tmp, "pareto.png"), points)
        for key, file in local.items():
            target = join(path, PLOTS_DIR, os.path.basename(file))
            write_bytes(target, Path(file).read_bytes())
            out[key] = target
    return out


def _pareto_point(trial: dict[str, Any]) -> dict[str, Any]:
    """One point of `rlft.plots.pareto_plot` (its keys are that function's)."""
    config = trial[CONFIG]
    others = {k: v for k, v in config.items() if k != "alpha"}
    return {
        "kl": trial.get(KL), "reward": trial.get(REWARD), "alpha": config.get("alpha", trial.get(_ALPHA, 0.0)),
        "label": f"α={config['alpha']:g}" if "alpha" in config else _label(config),
        "group": _label(others) if others and "alpha" in config else "",  # one line per setting of the rest
        OPTIMAL_KL: trial.get(OPTIMAL_KL), OPTIMAL_REWARD: trial.get(OPTIMAL_REWARD),
        "pretrained_reward": (trial.get(PRETRAINED) or {}).get(REWARD),
    }


def summary(trials, grid: SweepGrid, path: str, plot_paths: dict[str, str], sweep: bool) -> dict[str, Any]:
    """The `--json` object: the one trial's dict (`rlft train`) or the sweep's summary with every trial."""
    public = [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials]
    if not public:
        raise RuntimeError(f"Tune returned no trial results for {path}; see the log above")
    if not sweep:
        return {**public[0], EXPERIMENT_PATH: path, PLOTS: plot_paths}
    return {EXPERIMENT_PATH: path, NAME: os.path.basename(path.rstrip("/")), GRID: grid.params,
            NUM_TRIALS: len(public), NUM_ERRORS: sum(t[STATUS] == ERRORED for t in public),
            TRIALS: public, PLOTS: plot_paths}


def print_table(trials: list[dict[str, Any]], grid: SweepGrid, stream=None) -> None:
    """A fixed-width table of the final figures, one row per trial."""
    stream = stream or sys.stdout
    columns = [(k, k) for k in grid.params] + [
        (STATUS, "status"), (ITERATION, "iter"), (REWARD, "reward"), (KL, "KL"), (OBJECTIVE, "J"),
        (OPTIMAL_OBJECTIVE, "J*"), (GAP_CLOSURE, "gap"), (ENERGY_DISTANCE, "E-dist"),
        (ENERGY_DISTANCE_FLOOR, "floor"), (DIVERSITY, "div"),
    ]
    rows = [[_j_star_cell(t) if k == OPTIMAL_OBJECTIVE else _cell(t[CONFIG].get(k) if k in grid.params else t.get(k))
             for k, _ in columns] for t in trials]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths)), file=stream)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)), file=stream)
    for t in trials:  # the rows are the last iteration; this names the best evaluated one
        if t.get(BEST):
            print(best_line(t[BEST], _label(t[CONFIG]) if grid.params else ""), file=stream)
    kinds = {t.get(OPTIMAL_OBJECTIVE_EXACT) for t in trials if t.get(OPTIMAL_OBJECTIVE) is not None} - {None}
    if kinds:
        print("J*: " + " / ".join(sorted(
            ["exact (closed form for this model and reward)"] * (True in kinds)
            + ["estimated, ± its s.e.: alpha log-mean-exp(r/alpha) over pretrained samples, so gap is estimated too"]
            * (False in kinds))), file=stream)
    for t in trials:  # a failed trial: why, in one line, and where its full traceback is
        if t.get(STATUS) == ERRORED:
            where = os.path.join(t[TRIAL_PATH], "error.txt") if t.get(TRIAL_PATH) else "its trial directory"
            print(f"failed ({_label(t[CONFIG])}): {t.get(ERROR) or 'unknown error'}  [traceback: {where}]", file=stream)


def best_line(best: dict[str, Any], label: str = "") -> str:
    """One line naming the best evaluated iteration, its figures and its checkpoint."""
    names = ((BEST_SCORE, "J"), (GAP_CLOSURE, "gap"), (REWARD, "reward"), (KL, "KL"))
    figures = "  ".join(f"{name} {_cell(best[k])}" for k, name in names if k in best)
    where = best.get(CHECKPOINT) or "not kept (raise run.keep_checkpoints)"
    return f"best evaluated{f' ({label})' if label else ''}: iteration {best[ITERATION]}  {figures}  checkpoint: {where}"


def _label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()) or "run"


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _j_star_cell(trial: dict[str, Any]) -> str:
    """J*, with '± s.e.' when it is a Monte-Carlo estimate (`optimal_objective_exact` False)."""
    v, se = trial.get(OPTIMAL_OBJECTIVE), trial.get(OPTIMAL_OBJECTIVE_SE)
    if v is None or trial.get(OPTIMAL_OBJECTIVE_EXACT, True) or se is None:
        return _cell(v)
    return f"{_cell(v)}±{se:.2g}"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _error_text(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
