"""Where each run's training time went, for `distrnn report`'s bottom panel: summary.json's per-rank split
(distrnn/worker/rank_timing.py), the mean over a run's ranks, as one stacked bar per run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distrnn.run.folder import TIME_PHASES, time_phase_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def time_split(run: Any) -> dict[str, float] | None:
    """Milliseconds per optimizer step in each phase, the mean over the run's ranks (None: not recorded)."""
    ranks = run.summary.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        return None
    split = {}
    for phase in TIME_PHASES:
        values = [r.get(time_phase_key(phase)) for r in ranks if isinstance(r, dict)]
        split[phase] = sum(v for v in values if isinstance(v, (int, float))) / len(ranks)
    return split


def draw_time_split(ax: Axes, runs: list[Any]) -> None:
    """One bar per run: milliseconds per optimizer step waiting for data, in compute, in the gradient
    all-reduce and in the optimizer, the mean over its ranks."""
    shown = [(run.label, split) for run in runs if (split := time_split(run)) is not None]
    for n, (_, split) in enumerate(shown):
        left = 0.0
        for k, phase in enumerate(TIME_PHASES):
            ax.barh(n, split[phase], left=left, color=f"C{k}", label=phase if n == 0 else None, hatch="//" if k % 2
                    else None, edgecolor="white")
            left += split[phase]
    ax.set_yticks(range(len(shown)), [label for label, _ in shown])
    ax.invert_yaxis()
    ax.set_title("where the training time went (mean over ranks)")
    ax.set_xlabel("ms per optimizer step")
    if shown:
        ax.legend(loc="lower right", ncols=len(TIME_PHASES))
    missing = [run.label for run in runs if time_split(run) is None]
    if missing:
        ax.text(0.01, 0.01, f"no time split recorded (written before distrnn kept it): {', '.join(missing)}"[:150],
                transform=ax.transAxes, fontsize=8, color="0.35", va="bottom")
    ax.grid(True, axis="x", alpha=0.3)
