"""The per-iteration progress line, Ray's noise filter, a failed trial's one-line reason, submit's back-off."""

from __future__ import annotations

import io
import logging

import pytest

from rlft.jobs import AGENT_RETRY_TOTAL_S, JobsError, submit_with_retries
from rlft.run.progress import Progress, clock
from rlft.run.quiet import RayNoiseFilter, one_line
from rlft.run.results import print_table
from rlft.run_config import SweepGrid


def test_clock_formats():
    assert clock(0) == "0:00"
    assert clock(61.4) == "1:01"
    assert clock(3725) == "1:02:05"
    assert clock(float("nan")) == "?"


def test_eta_is_mean_time_per_iteration_times_those_left():
    p = Progress("a=1", total=40, start=10)  # resumed at 10: the time before the restart does not count
    p.began = 100.0
    # 5 iterations (10 -> 15) in 20 s: 4 s each, 25 left -> 100 s
    assert p.eta(15, now=120.0) == pytest.approx(100.0)
    line = p.line(15, {"train_objective": -2.5}, {"reward": 1.25, "kl": 0.5, "gap_closure": 0.75}, 10, now=120.0)
    assert line.startswith("[a=1] 15/40  4 s/it  ETA 1:40")
    assert "train objective -2.5" in line and "train train" not in line and "eval@10 reward 1.25 kl 0.5 gap 0.75" in line
    assert "\x1b[" not in line


def test_eta_unknown_before_the_first_iteration():
    p = Progress("t", total=5, start=3)
    assert clock(p.eta(3)) == "?"


def _record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("ray.tune", logging.ERROR, __file__, 1, msg, (), exc_info)


def test_filter_drops_noise_and_keeps_the_rest():
    f = RayNoiseFilter()
    assert not f.filter(_record("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert not f.filter(_record("Install gputil for GPU system monitoring."))
    assert f.filter(_record("a trial needs 8 CPU"))


def test_filter_shortens_a_failed_trial_to_its_reason():
    error = RuntimeError("Traceback (most recent call last):\n  File x\nRuntimeError: boom: the server went away")
    record = _record("Trial task failed for trial trial_main_0c1ab_00000", error)
    assert RayNoiseFilter().filter(record)
    assert record.getMessage() == "trial trial_main_0c1ab_00000 failed: RuntimeError: boom: the server went away"
    assert record.exc_info is None  # no traceback on the terminal


def test_one_line_names_the_type_when_the_text_does_not():
    assert one_line(ValueError("bad value")) == "ValueError: bad value"


def test_failed_trial_row_says_why_and_where():
    trials = [{"config": {"alpha": 0.3}, "status": "ERROR", "error": "RuntimeError: boom", "trial_path": "/x/t0"}]
    out = io.StringIO()
    print_table(trials, SweepGrid({"alpha": [0.3]}), stream=out)
    text = out.getvalue()
    assert "failed (alpha=0.3): RuntimeError: boom  [traceback: /x/t0/error.txt]" in text


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_submit_retries_try_again_later_with_backoff_then_succeeds():
    clk, calls, lines = _Clock(), [], []

    def send():
        calls.append(clk.t)
        if len(calls) < 4:
            raise RuntimeError("HTTP 500: No available agent to submit job, please try again later.")
        return "job-1"

    assert submit_with_retries(send, "http://h:8265", lines.append, sleep=clk.sleep, clock=clk) == "job-1"
    assert calls == [0.0, 1.0, 3.0, 7.0]  # waits 1, 2, 4: doubling
    assert len(lines) == 3 and "try again later" in lines[0] and "retrying in 1s" in lines[0]


def test_submit_gives_up_after_the_bound_and_says_so():
    clk = _Clock()

    def send():
        raise RuntimeError("No available agent to submit job, please try again later.")

    with pytest.raises(JobsError, match="still had no job agent after"):
        submit_with_retries(send, "http://h:8265", lambda m: None, sleep=clk.sleep, clock=clk)
    assert clk.t <= AGENT_RETRY_TOTAL_S


def test_submit_does_not_retry_a_real_refusal():
    calls = []

    def send():
        calls.append(1)
        raise RuntimeError("Job with submission_id x already exists")

    with pytest.raises(JobsError, match="refused the job"):
        submit_with_retries(send, "http://h:8265", lambda m: None, sleep=lambda s: None)
    assert calls == [1]


def test_j_star_is_labelled_exact_or_estimated_with_its_se():
    rows = [{"config": {"alpha": 1.0}, "status": "TERMINATED", "optimal_objective": -2.0365,
             "optimal_objective_exact": True, "optimal_objective_se": 0.0},
            {"config": {"alpha": 0.1}, "status": "TERMINATED", "optimal_objective": 0.8123,
             "optimal_objective_exact": False, "optimal_objective_se": 0.0042}]
    out = io.StringIO()
    print_table(rows, SweepGrid({"alpha": [1.0, 0.1]}), stream=out)
    text = out.getvalue()
    assert "-2.036 " in text or text.split("\n")[1].rstrip().endswith("-") or "-2.036" in text
    assert "0.8123±0.0042" in text
    assert "exact (closed form" in text and "estimated, ± its s.e." in text
