"""Plots written next to a run's results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(log_history: list[dict], path: str | Path) -> Path:
    """Two panels over training steps: each logged loss component, and the routing share of each expert."""
    logs = [entry for entry in log_history if "step" in entry and "loss" in entry]
    fig, (loss_ax, route_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [entry["step"] for entry in logs]
    for key in sorted({k for entry in logs for k in entry if k.startswith("loss_")}):
        loss_ax.plot(steps, [entry.get(key, float("nan")) for entry in logs], label=key.removeprefix("loss_"))
    loss_ax.set(title="loss components", xlabel="step", yscale="log")
    for key in sorted({k for entry in logs for k in entry if k.startswith("routing_")}):
        route_ax.plot(steps, [entry.get(key, float("nan")) for entry in logs], label=key.removeprefix("routing_"))
    route_ax.set(title="routing share per expert", xlabel="step", ylim=(0, 1))
    for ax in (loss_ax, route_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
