"""Ray's log lines that say nothing to an rlft user, dropped on the driver and in the trial processes.

Every `rlft train` used to print Ray's token-authentication notice (authentication stays on: the notice
is what goes), RLlib's "new API stack" and deprecation notices about its own internals, Tune's
"Install gputil", "Wrote the latest version of all result files" and "Checkpoint successfully created"
lines, and, for a failed trial, a 55-line Ray traceback (twice with a retry). rlft prints its own
lines instead: where results go, one progress line per iteration, and a failed trial's reason in one
line with the path of its full traceback (`error.txt` in the trial directory).

`quiet_ray()` adds one filter to the handlers of Ray's "ray" logger (which does not propagate to the
root logger, so a handler filter sees every ray.* record); it is idempotent. `RLFT_RAY_LOGS=1` keeps
everything (for debugging Ray itself).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

#: substrings of Ray log messages that are dropped
DROPPED = (
    "Token authentication is enabled for this Ray cluster",
    "Started a local Ray instance",
    "You are running PPO on the new API stack",
    "on the new API stack! This is the new default",
    "has been deprecated. Use `RLModule(",
    "Install gputil for GPU system monitoring",
    "Wrote the latest version of all result files",
    "Checkpoint successfully created at",
    "`RLModule(config=",
    "Reporting training result",  # Ray Train (rlft.run.train_workers): every report, with its metrics
)
#: Tune's message for a failed trial (its traceback follows): replaced by one line
TRIAL_FAILED = re.compile(r"Trial task failed for trial (\S+)")


class RayNoiseFilter(logging.Filter):
    """Drops the messages in DROPPED; shortens a failed trial's traceback to its last line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler
            return True
        if any(s in message for s in DROPPED):
            return False
        match = TRIAL_FAILED.search(message)
        if match and record.exc_info:
            error = record.exc_info[1]
            record.msg, record.args = f"trial {match.group(1)} failed: {one_line(error)}", ()
            record.exc_info = record.exc_text = None
        return True


_FILTER = RayNoiseFilter()


def one_line(error: object) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause's 'Type: message' last)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if ":" in text or not isinstance(error, BaseException) else f"{type(error).__name__}: {text}"


def quiet_ray() -> None:
    """Installs the filter on Ray's log handlers and silences Ray's DeprecationWarnings (idempotent)."""
    if os.environ.get("RLFT_RAY_LOGS") == "1":
        return
    for name in ("ray", "ray.tune", "ray.rllib", "ray.train"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's experiment box and TensorBoard hint (verbose=0)
