"""Figures of runs and sweeps as PNG files (matplotlib's Agg canvas: no display, no global pyplot state).

- `scatter_samples`: 2-D fine-tuned samples against exact target samples (and the pretrained ones).
- `pareto_plot`: reward against path KL across alpha, one point per trial (ELEGANT's reward-vs-KL picture),
  with the exact optimum (E_target[r], KL(target || pretrained)) where the target is known.
- `sample_grid`: one 2-D scatter per trial (per alpha), side by side.

Every function writes its file atomically (a temporary file renamed into place) and returns the path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

_MAX_POINTS = 2000  # points drawn per cloud (more only hides the density)
_COLORS = {"finetuned": "tab:blue", "target": "tab:orange", "pretrained": "0.6"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    from rlft.files import atomic_path

    path = os.fspath(path)
    with atomic_path(path, prefix=".tmp_", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def _points(x: Any) -> np.ndarray | None:
    """(n, 2) float array (at most _MAX_POINTS rows) from a tensor/array, or None."""
    if x is None:
        return None
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"2-D scatter plots need samples of shape (n, 2) (got {arr.shape})")
    return arr[:_MAX_POINTS]


def _draw_clouds(ax, finetuned, target=None, pretrained=None, legend: bool = True) -> None:
    for name, cloud, size, alpha in (
        ("pretrained", _points(pretrained), 3, 0.25),
        ("target", _points(target), 4, 0.35),
        ("finetuned", _points(finetuned), 4, 0.5),
    ):
        if cloud is not None:
            label = {"finetuned": "fine-tuned", "target": "exact target", "pretrained": "pretrained"}[name]
            ax.scatter(cloud[:, 0], cloud[:, 1], s=size, alpha=alpha, color=_COLORS[name], label=label, linewidths=0)
    ax.set_aspect("equal", adjustable="datalim")
    if legend:
        ax.legend(loc="best", fontsize=7, markerscale=3)


def scatter_samples(
    path: str | os.PathLike,
    finetuned: Any,
    target: Any | None = None,
    pretrained: Any | None = None,
    title: str = "",
) -> str:
    """Scatter of 2-D samples: fine-tuned (n, 2) against exact target and pretrained samples (m, 2)."""
    fig = _figure(5, 5)
    ax = fig.add_subplot(1, 1, 1)
    _draw_clouds(ax, finetuned, target, pretrained)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def pareto_plot(path: str | os.PathLike, points: Sequence[dict[str, Any]], title: str = "") -> str:
    """Reward against path KL, one marker per trial, joined in alpha order within each group.

    Args:
        points: dicts with "kl", "reward", "label" (annotation, e.g. "α=0.1"), optional "group" (one line
            per group, e.g. the non-alpha sweep keys), optional "alpha" (sort order), and optional exact
            optimum "optimal_kl", "optimal_reward" (drawn as hollow markers), and "pretrained_reward".
    """
    fig = _figure(6, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if _finite(p.get("kl")) and _finite(p.get("reward")):
            groups.setdefault(str(p.get("group", "")), []).append(p)
    for group, pts in groups.items():
        pts = sorted(pts, key=lambda p: p.get("alpha", 0.0))
        line = ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], "o-", label=group or "fine-tuned")
        for p in pts:
            ax.annotate(p.get("label", ""), (p["kl"], p["reward"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        opt = [p for p in pts if _finite(p.get("optimal_kl")) and _finite(p.get("optimal_reward"))]
        if opt:
            ax.plot([p["optimal_kl"] for p in opt], [p["optimal_reward"] for p in opt], "o--", mfc="none",
                    color=line[0].get_color(), alpha=0.7, label=f"exact optimum{' ' + group if group else ''}")
    pre = [p["pretrained_reward"] for p in points if _finite(p.get("pretrained_reward"))]
    if pre:
        ax.plot([0.0], [pre[0]], "k*", markersize=10, label="pretrained")
    ax.set_xlabel("path KL to the pretrained model")
    ax.set_ylabel("reward E[r(x)]")
    ax.set_title(title or "reward against KL across alpha", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return _save(fig, path)


def sample_grid(path: str | os.PathLike, panels: Sequence[dict[str, Any]], title: str = "") -> str:
    """One 2-D scatter per panel: dicts with "finetuned" (n, 2), optional "target", "pretrained", "title"."""
    if not panels:
        raise ValueError("sample_grid needs at least one panel")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.2 * cols, 3.4 * rows)
    fig.set_layout_engine("constrained")  # room for two-line panel titles under the figure's title
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_clouds(ax, panel["finetuned"], panel.get("target"), panel.get("pretrained"), legend=i == 0)
        ax.set_title(panel.get("title", ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
