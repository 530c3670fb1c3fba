"""Evaluation of a trained model: per-split debiasing metrics and the label-free model-selection criterion."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import Dataset
from transformers import EvalPrediction, Trainer

from .metrics import accuracy, binary_f1, cue_reliance, group_accuracies, macro_f1

MIN_GROUP_SIZE = 10  # worst-group accuracy ignores groups smaller than this (too noisy to rank)


def _logits(predictions) -> tuple[np.ndarray, ...]:
    return predictions if isinstance(predictions, tuple) else (predictions,)


def bias_split_accuracies(
    logits: np.ndarray, text_logits: np.ndarray, image_logits: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Accuracy on items the bias branches get right (aligned) and wrong (conflicting), and their mean.

    Needs no group labels: "conflicting" items are those whose combined unimodal prediction (sum of the
    two log-softmaxes) contradicts the label. `balanced_bias_accuracy` is the model-selection criterion.
    """

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    predictions = logits.argmax(-1)
    conflicting = (log_softmax(text_logits) + log_softmax(image_logits)).argmax(-1) != labels
    aligned_acc = accuracy(predictions[~conflicting], labels[~conflicting]) if (~conflicting).any() else 0.0
    conflicting_acc = accuracy(predictions[conflicting], labels[conflicting]) if conflicting.any() else 0.0
    return {
        "bias_aligned_accuracy": aligned_acc,
        "bias_conflicting_accuracy": conflicting_acc,
        "balanced_bias_accuracy": (aligned_acc + conflicting_acc) / 2,
        "bias_conflicting_fraction": float(conflicting.mean()),
    }


def build_debiasing_compute_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for [`CFMoETrainer`]: accuracy, F1 and the bias-split accuracies."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits, text_logits, image_logits = _logits(prediction.predictions)[:3]
        labels = np.asarray(prediction.label_ids)
        predictions = logits.argmax(-1)
        metrics = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
        if num_labels == 2:
            metrics["binary_f1"] = binary_f1(predictions, labels)
        metrics.update(bias_split_accuracies(logits, text_logits, image_logits, labels))
        return metrics

    return compute_metrics


def predict_labels(trainer: Trainer, dataset: Dataset) -> np.ndarray:
    """Argmax predictions of the model (its inference mode) on `dataset`, in order."""
    return _logits(trainer.predict(dataset).predictions)[0].argmax(-1)


def evaluate_split(trainer: Trainer, dataset: Dataset, flipped: Dataset | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 (+ binary F1), worst-group accuracy (where `group` exists) and cue reliance
    (where a cue-flipped copy of the split is given)."""
    labels = np.asarray(dataset["label"])
    predictions = predict_labels(trainer, dataset)
    metrics = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    if int(labels.max()) <= 1:
        metrics["binary_f1"] = binary_f1(predictions, labels)
    if "group" in dataset.column_names:
        groups = np.asarray(dataset["group"])
        sizes = np.bincount(groups)
        per_group = group_accuracies(predictions, labels, groups)
        kept = [acc for group, acc in per_group.items() if sizes[group] >= MIN_GROUP_SIZE]
        metrics["worst_group_accuracy"] = min(kept) if kept else float("nan")
    if flipped is not None:
        metrics["cue_reliance"] = cue_reliance(predictions, predict_labels(trainer, flipped))
    return metrics
