"""Each iteration once in result.json / progress.csv after a restart from an older checkpoint (rlft.run.rows)."""

from __future__ import annotations

import csv
import json

from rlft.run.rows import drop_rows_from, last_iteration
from rlft.run.tune import _keep_local_logs


def _json_rows(path):
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]


def test_drop_rows_from_json_lines(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("".join(json.dumps({"iteration": i, "x": i * 1.5}) + "\n" for i in (1, 2, 3, 4)))
    assert last_iteration(str(path)) == 4
    assert drop_rows_from(str(path), 3) == 2
    assert _json_rows(path) == [1, 2]
    assert drop_rows_from(str(path), 9) == 0 and _json_rows(path) == [1, 2]


def test_drop_rows_from_csv_keeps_the_header(tmp_path):
    path = tmp_path / "progress.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["iteration", "reward"])
        w.writeheader()
        for i in (1, 2, 3):
            w.writerow({"iteration": i, "reward": -i})
    assert last_iteration(str(path)) == 3
    assert drop_rows_from(str(path), 2) == 2
    rows = list(csv.DictReader(path.open()))
    assert [r["iteration"] for r in rows] == ["1"] and rows[0]["reward"] == "-1"


class _Trial:
    def __init__(self, path):
        self.local_path = str(path)
        self.config = {}
        self.checkpoint = None  # nothing to restore from storage

    def init_local_path(self):
        pass

    def __hash__(self):
        return id(self)


def test_the_logger_replaces_a_rerun_iteration_instead_of_appending_it(tmp_path):
    """The scenario: rows 1-3 written, the trial restarts from checkpoint 1 and reports 2, 3, 4 again."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    trial = _Trial(tmp_path)
    for base in (JsonLoggerCallback, CSVLoggerCallback):
        logger = _keep_local_logs(base)()
        for i in (1, 2, 3, 2, 3, 4):
            logger.log_trial_result(i, trial, {"iteration": i, "reward": float(i)})
        logger.log_trial_end(trial)
    assert _json_rows(tmp_path / "result.json") == [1, 2, 3, 4]
    assert [r["iteration"] for r in csv.DictReader((tmp_path / "progress.csv").open())] == ["1", "2", "3", "4"]
