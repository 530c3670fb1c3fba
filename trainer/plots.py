"""Plots written next to a run's results (matplotlib, headless)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAN = float("nan")
MIN_SPAN = 0.1  # the least y range of a linear panel (validation metrics in [0, 1])


def plot_training(
    log_history: list[dict],
    path: str | Path,
    selection_metric: str | None = None,
    warmup_end: int | None = None,
    kept_step: int | None = None,
    validation_note: str | None = None,
) -> Path:
    """Writes [`training_figure`] to `path` (`training.png` of a run)."""
    fig = training_figure(log_history, selection_metric, warmup_end, kept_step, validation_note)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def training_figure(
    log_history: list[dict],
    selection_metric: str | None = None,
    warmup_end: int | None = None,
    kept_step: int | None = None,
    validation_note: str | None = None,
) -> plt.Figure:
    """A Trainer's `log_history` over training steps, one panel each for

    - the total training loss and each logged component (`loss_<term>`);
    - the validation metrics of every evaluation: accuracy, the model-selection metric (`selection_metric`, the
      run's `metric_for_best_model`) and robust accuracy where logged (no panel without evaluations), with
      `validation_note` under the title (e.g. that the validation labels are noisy);
    - the routing share of each expert (only where a site has several experts: one expert always takes all).

    Every panel marks the end of the bias-only warm-up (`warmup_end`, its first step after; 0 or None: none) and
    the step of the checkpoint whose weights were kept (`kept_step`; None: the last). Legends sit below the
    panels, and an axis spans at least `MIN_SPAN` (a decade for the log-scale loss), so that noise of 0.0004 does
    not look like a trend.
    """
    selection_metric = selection_metric and selection_metric.removeprefix("eval_")
    train = [entry for entry in log_history if "step" in entry and "loss" in entry]
    evals = [entry for entry in log_history if "step" in entry and any(k.startswith("eval_") for k in entry)]
    metrics = [f"eval_{name}" for name in ("accuracy", selection_metric, "robust_accuracy") if name]
    metrics = list(dict.fromkeys(key for key in metrics if any(key in entry for entry in evals)))
    routing = sorted({k for entry in train for k in entry if k.startswith("routing_")})
    routed = any(int(re.search(r"_(\d+)$", key)[1]) > 0 for key in routing)
    panels = ["loss"] + ["validation"] * bool(metrics) + ["routing"] * routed
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False, layout="constrained")
    for panel, ax in zip(panels, axes[0], strict=True):
        if panel == "loss":
            _lines(ax, train, ["loss"], linewidth=2)
            _lines(ax, train, sorted({k for entry in train for k in entry if k.startswith("loss_")}), linewidth=1)
            ax.set(title="training loss (total and components)", xlabel="step", yscale="log")
            _widen(ax, log=True)
        elif panel == "validation":
            _lines(ax, evals, metrics, marker="o")
            title = "validation (model selection: " + (selection_metric or "none") + ")"
            if validation_note:
                title += "\n" + textwrap.fill(validation_note, 70)
            ax.set_title(title, fontsize=10)
            ax.set(xlabel="step")
            _widen(ax, top=1.02)
        else:
            _lines(ax, train, routing, linewidth=1)
            ax.set(title="routing share per expert", xlabel="step", ylim=(0, 1))
        if warmup_end:
            ax.axvline(warmup_end, color="grey", linestyle="--", linewidth=1, label=f"warm-up ends (step {warmup_end})")
        if kept_step is not None:
            ax.axvline(kept_step, color="black", linestyle=":", linewidth=1.5, label=f"kept checkpoint-{kept_step}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return fig


def _widen(ax, log: bool = False, top: float | None = None) -> None:
    """At least `MIN_SPAN` of y (a factor of 10 on a log axis) around the data's middle, not above `top`."""
    low, high = ax.get_ylim()
    if log and low > 0 and high / low < 10:
        middle = (low * high) ** 0.5
        ax.set_ylim(middle / 10**0.5, middle * 10**0.5)
    elif not log and high - low < MIN_SPAN:
        low = (low + high - MIN_SPAN) / 2
        if top is not None:
            low = min(low, top - MIN_SPAN)
        ax.set_ylim(low, low + MIN_SPAN)


def _lines(ax, entries: list[dict], keys: list[str], **style) -> None:
    steps = [entry["step"] for entry in entries]
    if len(steps) < 20:  # a line of few points shows them (one point alone draws no line)
        style = {"marker": ".", **style}
    for key in keys:
        label = re.sub(r"^(eval_|loss_|routing_)", "", key) if key != "loss" else "total"
        ax.plot(steps, [entry.get(key, NAN) for entry in entries], label=label, **style)
