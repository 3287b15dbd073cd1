"""The learning curves of a report, drawn as PNG files next to it."""

from __future__ import annotations

from pathlib import Path

from sa2va_tui.analysis import PPO_METRICS, REWARD_NET_METRICS
from sa2va_tui.report.facts import ReportData
from sa2va_tui.runstate import EPISODE_REWARD


def curve_panels(data: ReportData) -> dict[str, list[str]]:
    """The metrics each curve image shows (those the run has): the episode reward; the
    main PPO metrics (the app's table, less the speed counters); the reward network's."""
    ppo = [row.key for row in PPO_METRICS if row.key != EPISODE_REWARD and not row.key.startswith("time/")]
    reward_net = [row.key for row in REWARD_NET_METRICS]
    have = {key for exp in data.experiments.values() for key in exp.series}
    panels = {"episode_reward": [EPISODE_REWARD], "ppo_metrics": ppo, "reward_net": reward_net}
    return {name: [k for k in keys if k in have] for name, keys in panels.items() if any(k in have for k in keys)}


def curve_path(report_file: Path, curve: str) -> Path:
    return report_file.with_name(f"{report_file.stem}-{curve}.png")


def write_curves(data: ReportData, report_file: Path) -> dict[str, Path]:
    """Draw every experiment's curves over its steps as PNG files next to `report_file`;
    returns them by curve name."""
    # The Figure API draws with the Agg canvas for a PNG and leaves pyplot's global
    # state (and any GUI backend) alone.
    from matplotlib.figure import Figure

    written = {}
    for curve, keys in curve_panels(data).items():
        columns = min(3, len(keys))
        rows = -(-len(keys) // columns)
        figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            for name, exp in data.experiments.items():
                points = exp.series.get(key)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                            label=name)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        path = curve_path(report_file, curve)
        figure.savefig(path, dpi=100)
        written[curve] = path
    return written
