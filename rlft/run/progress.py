"""One progress line per training iteration: where the run is, how fast, when it ends, how good it is.

    [alpha=0.3] 12/40  1.31 s/it  ETA 0:36 | train objective -2.61 | eval@10 reward -2.61 kl 0.618 gap 0.673

The trial process prints it to stderr (Ray forwards it to the driver's terminal, without colour codes
when that is not a terminal: `rlft.run.tune.init_ray`). The ETA is the mean time of the iterations run
by this process (a resumed run does not count the time before its restart) times those left.
Evaluation figures are the last evaluation's, tagged with its iteration.
"""

from __future__ import annotations

import math
import time
from typing import Any

#: training metrics shown when a learner reports them (the first present of each group)
TRAIN_KEYS = (("train_objective", "episode_return_mean", "objective", "loss"),)
#: evaluation figures shown (when numbers)
EVAL_KEYS = (("reward", "reward"), ("kl", "kl"), ("gap_closure", "gap"), ("energy_distance", "E-dist"))


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Formats the per-iteration line; `start` is the iteration this process begins at (after a restore)."""

    def __init__(self, label: str, total: int, start: int = 0) -> None:
        self.label, self.total, self.start = label, int(total), int(start)
        self.began = time.perf_counter()

    def eta(self, iteration: int, now: float | None = None) -> float:
        done = iteration - self.start
        if done <= 0:
            return float("nan")
        elapsed = (time.perf_counter() if now is None else now) - self.began
        return elapsed / done * max(self.total - iteration, 0)

    def line(self, iteration: int, train: dict[str, Any], last_eval: dict[str, Any], eval_iteration: int | None = None,
             now: float | None = None) -> str:
        done = iteration - self.start
        elapsed = (time.perf_counter() if now is None else now) - self.began
        rate = f"{elapsed / done:.3g} s/it" if done > 0 else "? s/it"
        parts = [f"[{self.label}] {iteration}/{self.total}  {rate}  ETA {clock(self.eta(iteration, now))}"]
        shown = []
        for group in TRAIN_KEYS:
            for key in group:
                if _number(train.get(key)):
                    shown.append(f"train {key.removeprefix('train_').replace('_', ' ')} {train[key]:.4g}")
                    break
        if shown:
            parts.append(" ".join(shown))
        figures = [f"{name} {last_eval[key]:.4g}" for key, name in EVAL_KEYS if _number(last_eval.get(key))]
        if figures:
            parts.append((f"eval@{eval_iteration} " if eval_iteration is not None else "eval ") + " ".join(figures))
        return " | ".join(parts)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
