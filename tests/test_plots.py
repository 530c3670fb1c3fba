"""`training.png`: the panels a run's log history calls for, and what marks them; `context_report.png`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from cfmoe.trainer.audit import context_figure
from cfmoe.trainer.plots import plot_training, training_figure


def _history(num_experts: int, evaluations: bool = True) -> list[dict]:
    history = []
    for step in (10, 20, 30, 40):
        entry = {"step": step, "loss": 1.0 / step, "loss_cf_task": 0.5 / step, "loss_bias_text": 0.7 / step}
        for site in ("visual", "text"):
            entry.update({f"routing_{site}_expert_{i}": 1.0 / num_experts for i in range(num_experts)})
        history.append(entry)
        if evaluations and step % 20 == 0:
            history.append({"step": step, "eval_loss": 0.6, "eval_accuracy": 0.8, "eval_macro_f1": 0.79,
                            "eval_inferred_worst_group_accuracy": 0.6 + step / 100})  # fmt: skip
    history.append({"step": 40, "train_loss": 0.05, "train_runtime": 12.0})
    return history


def _panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    fig = training_figure(history, "inferred_worst_group_accuracy")
    panels = [(ax.get_title(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes]
    plt.close(fig)
    return panels


def test_one_expert_per_site_plots_loss_and_validation_without_routing(tmp_path):
    loss, validation = _panels(_history(num_experts=1))
    assert loss == ("training loss (total and components)", ["total", "bias_text", "cf_task"])
    assert validation == (
        "validation (model selection: inferred_worst_group_accuracy)",
        ["accuracy", "inferred_worst_group_accuracy"],
    )
    assert plot_training(_history(1), tmp_path / "training.png").stat().st_size > 0


def test_routing_shares_are_plotted_where_a_site_has_several_experts():
    panels = _panels(_history(num_experts=2))
    assert [title for title, _ in panels][-1] == "routing share per expert"
    assert len(panels) == 3 and "visual_expert_1" in panels[-1][1]


def test_a_run_without_evaluations_plots_its_loss_only():
    assert [title for title, _ in _panels(_history(num_experts=1, evaluations=False))] == [
        "training loss (total and components)"
    ]


def test_marks_the_warmup_end_and_the_kept_checkpoint_with_legends_off_the_curves():
    """A flat validation metric (0.0004 apart) keeps a readable axis, and the note says why validation accuracy
    sits below test accuracy."""
    history = _history(num_experts=1)
    for entry in history:
        if "eval_accuracy" in entry:
            entry["eval_accuracy"] = 0.7900 + entry["step"] / 100_000
    fig = training_figure(history, "inferred_worst_group_accuracy", warmup_end=10, kept_step=20,
                          validation_note="validation labels carry the synthetic label noise")  # fmt: skip
    loss, validation = fig.axes
    for ax in (loss, validation):
        labels = [line.get_label() for line in ax.get_lines()]
        assert "warm-up ends (step 10)" in labels and "kept checkpoint-20" in labels
        legend = ax.get_legend()
        assert legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y1 < 0  # below the axes
    low, high = validation.get_ylim()
    assert high - low >= 0.1 and high <= 1.02
    assert "validation labels carry the synthetic label noise" in validation.get_title()
    low, high = loss.get_ylim()
    assert high / low >= 10  # one decade at least on the log-scale loss
    plt.close(fig)


def _report(core_tokens: bool) -> tuple[dict, tuple]:
    """A context report of one context token, no token kept as core (or one, with `core_tokens`), and one item whose
    image is a grey placeholder, normalised as CLIP's processor does."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    grey = torch.stack([(torch.full((8, 8), 0.5) - m) / s for m, s in zip(mean, std, strict=True)])
    token = {"token": "#facts", "text": "#facts", "items_per_class": [3, 40], "determination": 0.9, "dependence": 0.0}
    item = {"text": "a long caption " * 8, "image": grey, "image_context": torch.zeros(8, 8, dtype=torch.bool)}
    report = {"stage": "end", "tokens": {"context": [token], "kept_as_core": []}, "shown": [item]}
    if core_tokens:
        report["tokens"]["kept_as_core"] = [{**token, "token": "rain", "text": "rain", "dependence": 0.6}]
    return report, (mean, std)


def test_context_figure_draws_real_colours_whole_captions_and_says_what_it_shows():
    report, stats = _report(core_tokens=False)
    fig = context_figure(report, stats)
    bars, picture = fig.axes
    assert bars.get_title() == "tokens (end): 1 strongest context, no strong token kept as core"
    pixels = picture.get_images()[0].get_array()
    assert np.allclose(pixels, 0.5, atol=1e-3)  # grey stays grey (not a per-image stretch to pure blue)
    caption = picture.get_title()
    assert "\n" in caption and caption.replace("\n", " ").startswith("a long caption a long caption")
    assert max(len(line) for line in caption.splitlines()) <= 34
    plt.close(fig)

    fig = context_figure(_report(core_tokens=True)[0], stats)
    bars = fig.axes[0]
    assert bars.get_title() == "tokens (end): 1 strongest context, 1 strongest kept as core"
    assert [label.get_text() for label in bars.get_yticklabels()] == ["#facts (context)", "rain (core)"]
    plt.close(fig)
