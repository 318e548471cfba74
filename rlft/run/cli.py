"""`rlft train` and `rlft sweep`: any learner, one trial or a grid over alpha (or any task key), on Ray Tune.

`run_command` validates the experiment (task, learner options, `run:`, `sweep:`) before Ray starts, writes
`rlft_experiment.json` (the validated config; `--resume` reads it), runs or resumes the Tune experiment
(`rlft.run.tune`), each trial being `rlft.run.trial.trial_main`, then collects the trials, writes
`rlft_results.json` (the `--json` object, `rlft.run.results`) and `plots/*.png`, and prints the table.

Experiment directory `<run.storage_path>/<name>/`: Tune's files (one directory per trial with progress.csv,
result.json, TensorBoard events, checkpoint_*, and after the run rlft_history.jsonl, the latest
checkpoint's history), rlft_experiment.json, rlft_results.json and plots/.

Exit status: 0 when every trial finished, 1 when one failed (continue with `--resume`), 2 for a
configuration error (`rlft.cli.main`), 130 / 143 when stopped by Ctrl-C (SIGINT) / SIGTERM: Tune saves the
experiment state, the driver prints the `--resume` command and writes no results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from rlft.config import ConfigError, load_yaml
from rlft.run.check import check_args
from rlft.run.results import collect_trials, make_plots, print_table, summary
from rlft.run.tune import init_ray, run_experiment, stop_on_signals, warn_if_unplaceable
from rlft.run.keys import ERRORED, EXPERIMENT_FILE, RESULTS_FILE, STATUS
from rlft.run.storage import dumps, experiment_path, join, json_default, log, read_bytes, write_bytes
from rlft.run_config import SweepGrid, apply_overrides, experiment_from_dict, parse_assignments

# keys of rlft_experiment.json
_TASK, _GRID, _CONFIG_PATH, _COMMAND = "task", "grid", "config_path", "command"


def register(subparsers) -> None:
    """Adds `rlft train` and `rlft sweep`."""
    for name, help_text in (
        ("train", "fine-tune one task as a one-trial Ray Tune experiment"),
        ("sweep", "run the config's `sweep:` grid (alpha first) as one Ray Tune experiment"),
    ):
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="task YAML with optional run: and sweep: sections (tune_configs/*.yaml)")
        p.add_argument("--json", action="store_true", help="print the final figures as one JSON object on stdout")
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted experiment (run.name, else the latest <config stem>_*)")
        p.add_argument("--storage-path", help="override run.storage_path (local directory or s3://, gs:// URI)")
        p.add_argument("--name", help="override run.name (the experiment directory under the storage path)")
        p.add_argument("--iterations", type=int, help="override run.iterations")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                       help="override any dotted key, e.g. --set alpha=0.3 --set learner.lr=1e-3 (repeatable)")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
        p.set_defaults(func=lambda args, _sweep=(name == "sweep"): run_command(args, sweep=_sweep))


def run_command(args: argparse.Namespace, sweep: bool) -> int:
    """`rlft train` / `rlft sweep`: validate, run (or resume) the Tune experiment, summarise, plot."""
    if os.getcwd() not in sys.path:  # a user's "module:Class" rewards/learners next to them, as on the workers
        sys.path.insert(0, os.getcwd())
    check_args(args, sweep=sweep)  # every configuration error now, before anything is written and Ray starts
    overrides = parse_assignments(args.set)
    for key, value in (("run.iterations", args.iterations), ("run.storage_path", args.storage_path),
                       ("run.name", args.name)):
        if value is not None:
            overrides[key] = value
    # the run: section travels inside the task mapping, so every trial's task carries these overrides and
    # a learner's `run_config_of(task).iterations` is the loop's count
    data = apply_overrides(load_yaml(args.config), overrides)
    task, run, grid = experiment_from_dict(data)
    command = "sweep" if sweep else "train"
    if sweep and not grid:
        raise ConfigError(f"{args.config} has no sweep: section; add e.g. `sweep: {{alpha: [0.1, 1.0]}}` or use rlft train")
    if not sweep:
        data.pop("sweep", None)
        grid = SweepGrid({})
    path = experiment_path(run, Path(args.config).stem, args.resume)
    if args.resume:
        saved = json.loads(read_bytes(join(path, EXPERIMENT_FILE)))
        if set(overrides) - {"run.storage_path", "run.name"}:
            log(f"--resume continues {path} with its saved config; --set/--iterations are ignored")
        data = saved[_TASK]
        task, run, grid = experiment_from_dict(data)
        grid = SweepGrid(saved[_GRID])
    else:
        saved = {_TASK: data, _GRID: grid.params, _CONFIG_PATH: os.path.abspath(args.config), _COMMAND: command}
        write_bytes(join(path, EXPERIMENT_FILE), dumps(saved))
    log(f"rlft {command}: {grid.num_trials} trial(s) x {run.iterations} iterations -> {path}")
    resume = _resume_command(args, command, path, run)
    stdout = sys.stdout
    received: list[int] = []  # the stop signals (SIGINT, SIGTERM) that reached the driver
    try:
        init_ray(args.address)
        warn_if_unplaceable(run)
        # Tune's and the workers' printing is progress: stderr
        with stop_on_signals(received), contextlib.redirect_stdout(sys.stderr):
            result_grid = run_experiment(data, run, grid, path, resume=args.resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune started
        received = received or [signal.SIGINT]
    if received:
        log(f"rlft {command}: interrupted by {signal.Signals(received[0]).name}; the experiment {path} keeps its "
            f"checkpoints and state. Continue it with:\n  {resume}")
        return 128 + int(received[0])
    with contextlib.redirect_stdout(sys.stderr):
        trials = collect_trials(result_grid, grid, path)
        plots = make_plots(trials, grid, path)
    out = summary(trials, grid, path, plots, sweep)
    write_bytes(join(path, RESULTS_FILE), dumps(out))
    print_table(trials, grid, stream=sys.stderr if args.json else stdout)
    if args.json:
        print(json.dumps(out, default=json_default), file=stdout)
    errors = sum(t[STATUS] == ERRORED for t in trials)
    log(f"results in {path}: {RESULTS_FILE} (the figures above), {len(plots)} plot(s) under plots/, one folder per "
        f"trial (progress.csv, checkpoints); sample the fine-tuned model with: rlft sample "
        f"{path if grid.num_trials <= 1 else '<its trial folder>'} -n 1000 --out samples.npy")
    if errors:
        log(f"{errors} trial(s) failed; continue them from their last checkpoints with: {resume}")
    return 1 if errors else 0


def _resume_command(args: argparse.Namespace, command: str, path: str, run) -> str:
    """The command that continues this experiment (`--resume` finds it by name under its storage path)."""
    return (f"rlft {command} {args.config} --resume --name {os.path.basename(path)}"
            + (f" --storage-path {run.storage_path}" if args.storage_path or "run.storage_path" in parse_assignments(args.set)
               else ""))
