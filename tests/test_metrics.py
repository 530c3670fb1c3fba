"""Tests for trainer/metrics.py: hand-computed cases, the evaluate module and the Trainer helper."""

from pathlib import Path

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from cfmoe.trainer.metrics import (
    DebiasingMetrics,
    accuracy,
    binary_f1,
    build_compute_metrics,
    cue_reliance,
    group_accuracies,
    macro_f1,
    robust_accuracy,
    summarize_runs,
    worst_group_accuracy,
)

METRICS_PATH = Path(__file__).resolve().parents[1] / "trainer" / "metrics.py"

# correct = [T, T, T, F, T]; groups 3 -> 1.0, 0 -> 0.5, 7 -> 1.0 (ids 1, 2, 4, 5, 6 have no items)
PREDS = np.array([1, 1, 0, 1, 1])
REFS = np.array([1, 1, 0, 0, 1])
GROUPS = np.array([3, 3, 0, 0, 7])
FLIPPED = np.array([0, 1, 0, 1, 0])  # items 0 and 4 change


@pytest.fixture
def metric(tmp_path: Path) -> DebiasingMetrics:
    return DebiasingMetrics(cache_dir=str(tmp_path))


def test_accuracy() -> None:
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_macro_f1_three_classes_by_hand() -> None:
    # class 0: P=1/2 R=1/2 F=1/2; class 1: P=2/3 R=1 F=4/5; class 2: P=1 R=1/2 F=2/3
    preds = [0, 1, 1, 1, 2, 0]
    refs = [0, 0, 1, 1, 2, 2]
    assert macro_f1(preds, refs) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_binary_f1_by_hand() -> None:
    # tp=2, fp=1, fn=1 -> F1 = 4 / 6
    assert binary_f1([1, 0, 1, 0, 1], [1, 1, 0, 0, 1]) == pytest.approx(2 / 3)
    assert binary_f1([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="binary"):
        binary_f1([0, 2], [0, 1])


def test_group_accuracies_skip_empty_groups() -> None:
    assert group_accuracies(PREDS, REFS, GROUPS) == {0: 0.5, 3: 1.0, 7: 1.0}


def test_worst_group_accuracy_is_minimum() -> None:
    assert worst_group_accuracy(PREDS, REFS, GROUPS) == 0.5
    assert worst_group_accuracy([1, 0, 0], [1, 1, 0], [0, 1, 1]) == 0.5


def test_cue_reliance() -> None:
    assert cue_reliance(PREDS, PREDS) == 0.0
    assert cue_reliance([0, 1, 1], [1, 0, 0]) == 1.0
    assert cue_reliance(PREDS, FLIPPED) == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cue_reliance([0, 1, 1], [0, 1]),
        lambda: accuracy([0, 1], [0, 1, 1]),
        lambda: group_accuracies([0, 1], [0, 1], [0]),
        lambda: accuracy([[0, 1]], [[0, 1]]),
        lambda: accuracy([], []),
        lambda: accuracy([0.5, 1.0], [0, 1]),
    ],
)
def test_invalid_inputs_raise(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_evaluate_compute_matches_plain_functions(metric: DebiasingMetrics) -> None:
    result = metric.compute(predictions=PREDS, references=REFS, groups=GROUPS, flipped_predictions=FLIPPED)
    assert result == pytest.approx(
        {
            "accuracy": accuracy(PREDS, REFS),
            "macro_f1": macro_f1(PREDS, REFS),
            "binary_f1": binary_f1(PREDS, REFS),
            "worst_group_accuracy": worst_group_accuracy(PREDS, REFS, GROUPS),
            "group_accuracy_0": 0.5,
            "group_accuracy_3": 1.0,
            "group_accuracy_7": 1.0,
            "cue_reliance": cue_reliance(PREDS, FLIPPED),
        }
    )


def test_evaluate_optional_outputs(metric: DebiasingMetrics) -> None:
    plain = metric.compute(predictions=[0, 1, 2], references=[0, 1, 1])
    assert set(plain) == {"accuracy", "macro_f1"}
    three_way = metric.compute(predictions=[0, 1], references=[0, 1], num_labels=3)
    assert "binary_f1" not in three_way


def test_add_batch_accumulates_like_one_compute(tmp_path: Path) -> None:
    whole = DebiasingMetrics(cache_dir=str(tmp_path / "whole"))
    expected = whole.compute(predictions=PREDS, references=REFS, groups=GROUPS, flipped_predictions=FLIPPED)
    batched = DebiasingMetrics(cache_dir=str(tmp_path / "batched"))
    batched.add_batch(predictions=PREDS[:2], references=REFS[:2])
    batched.add_batch(predictions=PREDS[2:], references=REFS[2:])
    assert batched.compute(groups=GROUPS, flipped_predictions=FLIPPED) == pytest.approx(expected)


def test_load_by_path_offline(tmp_path: Path) -> None:
    loaded = evaluate.load(str(METRICS_PATH), cache_dir=str(tmp_path))
    assert type(loaded).__name__ == "DebiasingMetrics"
    result = loaded.compute(predictions=PREDS, references=REFS, groups=GROUPS)
    assert result["worst_group_accuracy"] == 0.5
    assert result["accuracy"] == accuracy(PREDS, REFS)


def test_compute_metrics_on_logits() -> None:
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0], [0.5, 0.4]])  # argmax 0, 1, 1, 0
    labels = np.array([0, 1, 0, 1])
    scores = build_compute_metrics(num_labels=2)(EvalPrediction(predictions=logits, label_ids=labels))
    assert scores == pytest.approx({"accuracy": 0.5, "macro_f1": 0.5, "binary_f1": 0.5})
    assert all(type(value) is float for value in scores.values())


def test_compute_metrics_on_tuple_of_outputs() -> None:
    logits = np.array([[0.0, 1.0, 3.0], [5.0, 1.0, 0.0], [0.0, 2.0, 1.0]])  # argmax 2, 0, 1
    extra = np.zeros((3, 4))
    labels = np.array([2, 0, 0])
    scores = build_compute_metrics(num_labels=3)(EvalPrediction(predictions=(logits, extra), label_ids=labels))
    assert set(scores) == {"accuracy", "macro_f1"}
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(macro_f1([2, 0, 1], labels))


def test_summarize_runs() -> None:
    assert summarize_runs([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarize_runs([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        summarize_runs([])


def test_robust_accuracy_is_the_worse_of_iid_and_ood() -> None:
    assert robust_accuracy(0.95, 0.05) == 0.05  # follows the cues
    assert robust_accuracy(0.03, 0.93) == 0.03  # inverts them: ood alone would rank it first
    assert robust_accuracy(0.8, 0.8) == 0.8
    assert np.isnan(robust_accuracy(0.8, float("nan"))) and np.isnan(robust_accuracy(float("nan"), 0.8))
