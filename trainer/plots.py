"""Plots written next to a run's results (matplotlib, headless)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAN = float("nan")


def plot_training(log_history: list[dict], path: str | Path, selection_metric: str | None = None) -> Path:
    """Writes [`training_figure`] to `path` (`training.png` of a run)."""
    fig = training_figure(log_history, selection_metric)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def training_figure(log_history: list[dict], selection_metric: str | None = None) -> plt.Figure:
    """A Trainer's `log_history` over training steps, one panel each for

    - the total training loss and each logged component (`loss_<term>`);
    - the validation metrics of every evaluation: accuracy, the model-selection metric (`selection_metric`, the
      run's `metric_for_best_model`) and robust accuracy where logged (no panel without evaluations);
    - the routing share of each expert (only where a site has several experts: one expert always takes all).
    """
    selection_metric = selection_metric and selection_metric.removeprefix("eval_")
    train = [entry for entry in log_history if "step" in entry and "loss" in entry]
    evals = [entry for entry in log_history if "step" in entry and any(k.startswith("eval_") for k in entry)]
    metrics = [f"eval_{name}" for name in ("accuracy", selection_metric, "robust_accuracy") if name]
    metrics = list(dict.fromkeys(key for key in metrics if any(key in entry for entry in evals)))
    routing = sorted({k for entry in train for k in entry if k.startswith("routing_")})
    routed = any(int(re.search(r"_(\d+)$", key)[1]) > 0 for key in routing)
    panels = ["loss"] + ["validation"] * bool(metrics) + ["routing"] * routed
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for panel, ax in zip(panels, axes[0], strict=True):
        if panel == "loss":
            _lines(ax, train, ["loss"], linewidth=2)
            _lines(ax, train, sorted({k for entry in train for k in entry if k.startswith("loss_")}), linewidth=1)
            ax.set(title="training loss (total and components)", xlabel="step", yscale="log")
        elif panel == "validation":
            _lines(ax, evals, metrics, marker="o")
            ax.set(title="validation (model selection: " + (selection_metric or "none") + ")", xlabel="step")
        else:
            _lines(ax, train, routing, linewidth=1)
            ax.set(title="routing share per expert", xlabel="step", ylim=(0, 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _lines(ax, entries: list[dict], keys: list[str], **style) -> None:
    steps = [entry["step"] for entry in entries]
    for key in keys:
        label = re.sub(r"^(eval_|loss_|routing_)", "", key) if key != "loss" else "total"
        ax.plot(steps, [entry.get(key, NAN) for entry in entries], label=label, **style)
