"""`training.png`: the panels a run's log history calls for."""

from __future__ import annotations

import matplotlib.pyplot as plt

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
