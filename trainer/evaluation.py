"""Evaluation of a trained model: per-split debiasing metrics and the label-free model-selection criterion."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import Dataset
from transformers import EvalPrediction, Trainer

from .data.synthetic import NO_CUE
from .metrics import accuracy, binary_f1, cue_reliance, macro_f1, worst_group_accuracy

MIN_GROUP_SIZE = 10  # worst-group accuracy ignores groups smaller than this (too noisy to rank)


def _logits(predictions) -> tuple[np.ndarray, ...]:
    return predictions if isinstance(predictions, tuple) else (predictions,)


def bias_split_accuracies(
    logits: np.ndarray, text_logits: np.ndarray, image_logits: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Accuracies over groups inferred from the bias branches, with no group labels.

    Items are grouped by which unimodal branch gets them wrong: `aligned` (both right), `text_conflicting`
    (text-only branch wrong), `image_conflicting` (image-only branch wrong); an item can be in both
    conflicting groups. A model that follows one modality's cue fails that modality's conflicting group, so
    `inferred_worst_group_accuracy` (the minimum over groups of at least `MIN_GROUP_SIZE` items) is the
    model-selection criterion; `balanced_bias_accuracy` averages the three groups.
    """
    predictions = logits.argmax(-1)
    groups = {
        "aligned": (text_logits.argmax(-1) == labels) & (image_logits.argmax(-1) == labels),
        "text_conflicting": text_logits.argmax(-1) != labels,
        "image_conflicting": image_logits.argmax(-1) != labels,
    }
    metrics, kept = {}, []
    for name, members in groups.items():
        acc = accuracy(predictions[members], labels[members]) if members.any() else float("nan")
        metrics[f"{name}_accuracy"] = acc
        metrics[f"{name}_fraction"] = float(members.mean())
        if members.sum() >= MIN_GROUP_SIZE:
            kept.append(acc)
    metrics["balanced_bias_accuracy"] = float(np.mean(kept)) if kept else float("nan")
    metrics["inferred_worst_group_accuracy"] = min(kept) if kept else float("nan")
    return metrics


def build_debiasing_compute_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for [`CFMoETrainer`]: accuracy, F1, the bias-split accuracies and, for cfmoe, the accuracy
    and macro-F1 on context-swapped rows (`counterfactual_accuracy`, `counterfactual_macro_f1`: the items' cores with
    other items' contexts)."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits, text_logits, image_logits = _logits(prediction.predictions)[:3]
        labels = np.asarray(prediction.label_ids)
        predictions = logits.argmax(-1)
        metrics = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
        if num_labels == 2:
            metrics["binary_f1"] = binary_f1(predictions, labels)
        metrics.update(bias_split_accuracies(logits, text_logits, image_logits, labels))
        if len(_logits(prediction.predictions)) > 3:  # cfmoe: the fused head on context-swapped rows
            swapped = _logits(prediction.predictions)[3]
            kept = ~np.isnan(swapped).any(-1)
            if kept.any():
                predicted, references = swapped[kept].argmax(-1), labels[kept]
                metrics["counterfactual_accuracy"] = accuracy(predicted, references)
                metrics["counterfactual_macro_f1"] = macro_f1(predicted, references)
        return metrics

    return compute_metrics


def predict_labels(trainer: Trainer, dataset: Dataset) -> np.ndarray:
    """Argmax predictions of the model (its inference mode) on `dataset`, in order."""
    return _logits(trainer.predict(dataset).predictions)[0].argmax(-1)


def evaluate_split(
    trainer: Trainer, dataset: Dataset, flipped: Dataset | None = None, predictions: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy, macro-F1 (+ binary F1), worst-group accuracy (where `group` exists), accuracy on the items whose
    text holds a sarcasm marker (`core_kept`, where the `marker` column has some), on the items that carry no cue
    (`clean_accuracy`, synthetic splits with such items) and cue reliance (where a
    cue-flipped copy of the split is given), from the model's `predictions` `(items,)` (made here when None)."""
    labels = np.asarray(dataset["label"])
    predictions = predict_labels(trainer, dataset) if predictions is None else predictions
    metrics = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    if int(labels.max()) <= 1:
        metrics["binary_f1"] = binary_f1(predictions, labels)
    if "group" in dataset.column_names:
        metrics["worst_group_accuracy"] = worst_group_accuracy(
            predictions, labels, np.asarray(dataset["group"]), MIN_GROUP_SIZE
        )
    if "marker" in dataset.column_names and any(dataset["marker"]):  # items whose core predicts alone
        markers = np.asarray(dataset["marker"]) == 1
        metrics["core_kept"] = accuracy(predictions[markers], labels[markers])
    if {"text_cue", "image_cue"} <= set(dataset.column_names):  # synthetic: items carrying no cue at all
        clean = (np.asarray(dataset["text_cue"]) == NO_CUE) & (np.asarray(dataset["image_cue"]) == NO_CUE)
        if clean.any():
            metrics["clean_accuracy"] = accuracy(predictions[clean], labels[clean])
    if flipped is not None:
        metrics["cue_reliance"] = cue_reliance(predictions, predict_labels(trainer, flipped))
    return metrics
