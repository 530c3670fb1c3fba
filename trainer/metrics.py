"""Evaluation metrics for debiasing: accuracy, F1, worst-group accuracy and cue reliance.

Three layers over the same functions:

* plain functions over integer numpy arrays (``accuracy``, ``macro_f1``, ``worst_group_accuracy``, ...);
* ``DebiasingMetrics``, an ``evaluate.Metric`` that works offline, either instantiated directly or loaded
  by path with ``evaluate.load("trainer/metrics.py")`` (this file has no relative imports, so the copy
  that ``evaluate`` makes into its module cache imports cleanly);
* ``build_compute_metrics`` for ``transformers.Trainer``.

``robust_accuracy`` is the headline of a debiasing run; ``summarize_runs`` reports the spread of a metric over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

if TYPE_CHECKING:
    from transformers import EvalPrediction

ArrayLike = np.ndarray | Sequence[int]


def _labels(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a 1-D integer array, or raise ``ValueError``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    return array.astype(np.int64)


def _pair(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate two aligned, non-empty label arrays."""
    x, y = _labels(a, names[0]), _labels(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in shape: {x.shape} vs {y.shape}")
    if x.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")
    return x, y


def _is_binary(predictions: np.ndarray, references: np.ndarray) -> bool:
    """Whether every label is 0 or 1."""
    return bool(np.isin(np.concatenate([predictions, references]), (0, 1)).all())


def accuracy(predictions: ArrayLike, references: ArrayLike) -> float:
    """Fraction of predictions equal to their reference."""
    preds, refs = _pair(predictions, references, ("predictions", "references"))
    return float(np.mean(preds == refs))


def macro_f1(predictions: ArrayLike, references: ArrayLike) -> float:
    """Unweighted mean of per-class F1 over the classes present in predictions or references."""
    preds, refs = _pair(predictions, references, ("predictions", "references"))
    return float(f1_score(refs, preds, average="macro", zero_division=0))


def binary_f1(predictions: ArrayLike, references: ArrayLike) -> float:
    """F1 of the positive class 1 (labels must be 0/1)."""
    preds, refs = _pair(predictions, references, ("predictions", "references"))
    if not _is_binary(preds, refs):
        raise ValueError("binary_f1 needs labels in {0, 1}")
    return float(f1_score(refs, preds, average="binary", pos_label=1, zero_division=0))


def group_accuracies(predictions: ArrayLike, references: ArrayLike, groups: ArrayLike) -> dict[int, float]:
    """Accuracy within each group id that occurs in ``groups`` (groups with no items do not appear)."""
    preds, refs = _pair(predictions, references, ("predictions", "references"))
    _, group_ids = _pair(preds, groups, ("predictions", "groups"))
    correct = preds == refs
    return {int(g): float(np.mean(correct[group_ids == g])) for g in np.unique(group_ids)}


def worst_group_accuracy(
    predictions: ArrayLike, references: ArrayLike, groups: ArrayLike, min_group_size: int = 1
) -> float:
    """Lowest accuracy over the groups that hold at least ``min_group_size`` items (NaN when none does)."""
    sizes = np.bincount(_labels(groups, "groups"))
    kept = [acc for g, acc in group_accuracies(predictions, references, groups).items() if sizes[g] >= min_group_size]
    return min(kept) if kept else float("nan")


def cue_reliance(predictions: ArrayLike, flipped_predictions: ArrayLike) -> float:
    """Fraction of items whose prediction changes when only the planted spurious cue is flipped.

    ``predictions`` are on the original items, ``flipped_predictions`` on the same items, in the same
    order, with their cues flipped. 0 means the model ignores the cues; 1 means every decision follows them.
    """
    preds, flipped = _pair(predictions, flipped_predictions, ("predictions", "flipped_predictions"))
    return float(np.mean(preds != flipped))


def robust_accuracy(iid_accuracy: float, ood_accuracy: float) -> float:
    """``min(iid_accuracy, ood_accuracy)``: high only when a model is right both where the spurious cues agree with
    the label and where they are flipped, so neither following the cues (low OOD) nor inverting them (low IID)
    scores. NaN when either is NaN."""
    if math.isnan(iid_accuracy) or math.isnan(ood_accuracy):
        return math.nan
    return float(min(iid_accuracy, ood_accuracy))


def _classification_scores(predictions: np.ndarray, references: np.ndarray, binary: bool) -> dict[str, float]:
    """Accuracy and macro-F1, plus binary F1 when ``binary``."""
    scores = {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references)}
    if binary:
        scores["binary_f1"] = binary_f1(predictions, references)
    return scores


_DESCRIPTION = """Accuracy, macro-F1, binary F1 (binary tasks), per-group and worst-group accuracy, and
cue reliance (how often a prediction flips when only the spurious cue is flipped)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): gold labels.
    groups (`list` of `int`, *optional*): group id of each item (e.g. label x cue), aligned with all the
        predictions of the compute call, including those added earlier with `add_batch`.
    flipped_predictions (`list` of `int`, *optional*): predictions on the same items with cues flipped,
        aligned the same way.
    num_labels (`int`, *optional*): number of classes; `binary_f1` is reported when it is 2, or, when it is
        not given, when every label is 0 or 1.
Returns:
    accuracy, macro_f1, binary_f1 (binary only), worst_group_accuracy and group_accuracy_<g> (with groups),
    cue_reliance (with flipped_predictions).
Example:
    >>> metric = DebiasingMetrics()
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], groups=[0, 0, 1])["worst_group_accuracy"]
    0.0
"""


class DebiasingMetrics(evaluate.Metric):
    """``evaluate`` metric for debiasing runs.

    Only ``predictions`` and ``references`` are features (stored, and accumulated by ``add_batch``).
    ``groups``, ``flipped_predictions`` and ``num_labels`` are keyword arguments of ``compute``:
    ``evaluate`` forwards any non-feature keyword of ``compute`` to ``_compute`` unchanged, whereas it
    takes feature names from the first ``Features`` of a list only, so an optional feature column is not
    possible. In distributed evaluation they are used by process 0 and must cover all processes' items.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(
        self,
        predictions: np.ndarray,
        references: np.ndarray,
        groups: ArrayLike | None = None,
        flipped_predictions: ArrayLike | None = None,
        num_labels: int | None = None,
    ) -> dict[str, float]:
        preds, refs = _pair(predictions, references, ("predictions", "references"))
        binary = num_labels == 2 if num_labels is not None else _is_binary(preds, refs)
        scores = _classification_scores(preds, refs, binary)
        if groups is not None:
            per_group = group_accuracies(preds, refs, groups)
            scores["worst_group_accuracy"] = min(per_group.values())
            scores.update({f"group_accuracy_{g}": acc for g, acc in per_group.items()})
        if flipped_predictions is not None:
            scores["cue_reliance"] = cue_reliance(preds, flipped_predictions)
        return scores


def build_compute_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """Return a ``Trainer`` ``compute_metrics`` that scores the argmax of the logits.

    ``EvalPrediction.predictions`` may be the logits ``(N, num_labels)`` or a tuple whose first element
    is the logits; ``label_ids`` are the labels. ``binary_f1`` is included when ``num_labels == 2``.
    """

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        return _classification_scores(predictions, np.asarray(eval_pred.label_ids), num_labels == 2)

    return compute_metrics


def summarize_runs(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, spread and count of one metric over runs (e.g. seeds).

    ``std`` is the sample standard deviation (``ddof=1``) when there are two or more values, else 0.0.
    """
    if len(values) == 0:
        raise ValueError("summarize_runs needs at least one value")
    array = np.asarray(values, dtype=np.float64)
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(np.mean(array)), "std": std, "n": int(array.size)}
