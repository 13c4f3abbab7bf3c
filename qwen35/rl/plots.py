"""PNG plots of an RL run (matplotlib's Agg backend): the reward curve and where each actor's time went."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rewards(history: Sequence[Mapping[str, Any]], path: Path, label: str | None = None) -> None:
    """Mean reward per update (and per task, thin), against the update."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    if history:
        xs = [h["update"] for h in history]
        tasks = sorted({t for h in history for t in h.get("reward_by_task", {})})
        for t in tasks:
            pts = [(h["update"], h["reward_by_task"][t]) for h in history if t in h.get("reward_by_task", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.8, alpha=0.5, label=t)
        ax.plot(xs, [h["reward"] for h in history], "k-o", markersize=3, linewidth=2, label=label or "mean")
    ax.set_xlabel("update")
    ax.set_ylabel("reward (exact match)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_actor_time(result, path: Path) -> None:
    """Top: a timeline of each actor's calls (generate / weight load / train / checkpoint); bottom: each actor's
    busy share of the wall time."""
    plt = _plt()
    intervals: Mapping[str, list[tuple[str, float, float]]] = result.intervals
    actors = sorted(intervals)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 2 + 1.0 * max(len(actors), 1) * 2),
                                      gridspec_kw={"height_ratios": [2, 1]})
    starts = [t0 for v in intervals.values() for _, t0, _ in v]
    origin = min(starts) if starts else 0.0
    colors = {"generate": "tab:blue", "train": "tab:orange", "checkpoint": "tab:gray", "weights": "tab:green"}
    for row, a in enumerate(actors):
        for kind, t0, t1 in intervals[a]:
            top.barh(row, t1 - t0, left=t0 - origin, color=colors.get(kind, "tab:purple"), height=0.6)
    top.set_yticks(range(len(actors)), actors)
    top.set_xlabel("seconds since the first call")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    top.legend(handles, list(colors), fontsize=7, loc="upper right")
    frac = result.busy_fraction()
    bottom.barh(range(len(actors)), [frac.get(a, 0.0) for a in actors], color="tab:blue")
    bottom.set_yticks(range(len(actors)), actors)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel(f"busy share of the wall time ({result.wall_seconds:.1f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_rewards", "plot_actor_time"]
