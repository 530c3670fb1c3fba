"""The label-free model-selection criterion: groups inferred from the bias branches."""

from __future__ import annotations

import numpy as np

from cfmoe.trainer.evaluation import bias_split_accuracies


def _one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(2)[classes] * 4.0


def test_inferred_worst_group_penalises_following_one_modality():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    text_cue, image_cue = labels.copy(), labels.copy()
    text_cue[:40] ^= 1  # the text branch is wrong on 40 items
    image_cue[40:80] ^= 1  # the image branch on 40 others
    text_logits, image_logits = _one_hot(text_cue), _one_hot(image_cue)
    follows_text = bias_split_accuracies(_one_hot(text_cue), text_logits, image_logits, labels)
    follows_labels = bias_split_accuracies(_one_hot(labels), text_logits, image_logits, labels)
    assert follows_text["text_conflicting_accuracy"] == 0.0 and follows_text["image_conflicting_accuracy"] == 1.0
    assert follows_text["inferred_worst_group_accuracy"] == 0.0
    assert follows_labels["inferred_worst_group_accuracy"] == 1.0
    assert follows_text["text_conflicting_fraction"] == 40 / 300


def test_groups_below_the_minimum_size_are_ignored():
    labels = np.zeros(50, dtype=int)
    text_cue = labels.copy()
    text_cue[:3] = 1  # 3 conflicting items: too few to rank
    metrics = bias_split_accuracies(_one_hot(text_cue), _one_hot(text_cue), _one_hot(labels), labels)
    assert metrics["text_conflicting_accuracy"] == 0.0
    assert metrics["inferred_worst_group_accuracy"] == 1.0
