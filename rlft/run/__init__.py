"""The run floor: `rlft train` / `rlft sweep` on Ray Tune.

    cli.py      argparse, `run_command`, exit codes
    tune.py     Ray connection, the Tuner, per-trial resources, loggers, resume
    trial.py    the trial loop (Tune function trainable) and its checkpoint manifest
    results.py  trials collected into the summary, the table and the plots
    storage.py  local and cloud paths, whole-file writes, JSON, log lines
    keys.py     every reported key and file name, defined once

Imports point down: cli -> tune, results -> trial -> storage, keys -> learners and the core.
A trial drives its learner only through `rlft.learners.Learner`. Nothing here is imported by this file.
"""
