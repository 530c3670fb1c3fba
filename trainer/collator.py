"""Batch collation: images and texts through the processor, labels checked, bad items named (or skipped)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from modeling_cfmoe.preprocessing import (
    DEFAULT_PROMPT_TEMPLATE,
    BadExampleError,
    check_text,
    encode_examples,
    load_rgb_image,
)

logger = logging.getLogger(__name__)


@dataclass
class CFMoECollator:
    """Builds `input_ids`, `attention_mask`, `pixel_values` (+ `image_sizes`...) and `labels` from items
    `{"image", "text", "label", "id"?, "group"?}`.

    Truncation (`max_length`) shortens texts only: image tokens are never cut. A missing or corrupt image,
    an empty text or a label outside `[0, num_labels)` raises [`BadExampleError`] naming the item; with
    `skip_bad_examples=True` such items are dropped, counted in `num_skipped` and logged instead.
    `return_groups=True` also passes the `group` column (for group DRO; never given to the model).
    """

    processor: Any
    num_labels: int
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    max_length: int | None = None
    skip_bad_examples: bool = False
    return_groups: bool = False
    num_skipped: int = field(default=0, init=False)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images, texts, labels, groups = [], [], [], []
        for index, feature in enumerate(features):
            item = str(feature.get("id", f"#{index} of the batch"))
            try:
                image = feature.get("image")
                images.append(None if image is None else load_rgb_image(image, item))
                texts.append(check_text(feature.get("text"), item))
                labels.append(self._check_label(feature.get("label"), item))
                groups.append(int(feature.get("group", -1)))
            except BadExampleError as error:
                if not self.skip_bad_examples:
                    raise
                del images[len(labels) :], texts[len(labels) :]
                self.num_skipped += 1
                logger.warning("skipping bad example (%d skipped so far): %s", self.num_skipped, error)
        if not labels:
            raise BadExampleError(f"every item of this batch of {len(features)} was bad; see the warnings above")
        batch = dict(encode_examples(self.processor, images, texts, self.prompt_template, self.max_length))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.return_groups:
            batch["groups"] = torch.tensor(groups, dtype=torch.long)
        return batch

    def _check_label(self, label: Any, item: str) -> int:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_labels:
            raise BadExampleError(
                f"item {item}: label {label!r} is not a class id in [0, {self.num_labels}); map the data set's "
                "labels to the model's id2label"
            )
        return label
