"""Each iteration once in a trial's result.json and progress.csv, whatever checkpoint the trial restarts from.

A trial reports its rows with the checkpoint that covers them, so after a restart it re-runs the iterations
after its checkpoint. Tune's logger appends whatever arrives, so a row can appear twice: when the driver
was stopped between writing a row and recording its checkpoint (a Ctrl-C that lands in that window), or when
the newest checkpoint was damaged and the trial restarted from an older one (`rlft.run.trial._restore`).
The fix lives where the rows are written: before a row for iteration i is appended, rows for iterations
>= i are dropped from the file (the re-run's figures replace the first run's), so the file holds iterations
1..i exactly once. `drop_rows_from` rewrites the file atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

#: the key of rlft's iteration count in every reported row
ITERATION = "iteration"


def last_iteration(path: str) -> int:
    """The largest iteration in a result.json (JSON lines) or progress.csv file; 0 when none."""
    return max(_iterations(path), default=0)


def drop_rows_from(path: str, iteration: int) -> int:
    """Rewrites `path` without its rows for iterations >= `iteration`; returns how many it dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        text = f.read()
    if path.endswith(".csv"):
        lines = text.splitlines(keepends=True)
        if not lines:
            return 0
        header, kept, dropped = lines[0], [], 0
        for line in lines[1:]:
            row = next(csv.DictReader(io.StringIO(header + line)), None) or {}
            if _as_int(row.get(ITERATION)) is not None and _as_int(row.get(ITERATION)) >= iteration:
                dropped += 1
            else:
                kept.append(line)
        out = header + "".join(kept)
    else:
        kept, dropped = [], 0
        for line in text.splitlines(keepends=True):
            it = _json_iteration(line)
            if it is not None and it >= iteration:
                dropped += 1
            else:
                kept.append(line)
        out = "".join(kept)
    if dropped:
        _atomic_write(path, out)
    return dropped


def _iterations(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            return [i for row in csv.DictReader(f) if (i := _as_int(row.get(ITERATION))) is not None]
        return [i for line in f if (i := _json_iteration(line)) is not None]


def _json_iteration(line: str) -> int | None:
    if not line.strip():
        return None
    try:
        return _as_int(json.loads(line).get(ITERATION))
    except (ValueError, AttributeError):
        return None


def _as_int(v) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".rows_", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
