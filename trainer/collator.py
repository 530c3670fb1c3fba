"""Batch collation: images and texts through the processor, labels checked, bad items named (or skipped)."""

from __future__ import annotations

import logging
import multiprocessing
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from cfmoe.modeling_cfmoe.preprocessing import (
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

    Images may be PIL images, paths or undecoded datasets dicts (`datasets.Image(decode=False)`: then a corrupt
    file is caught here, per item, instead of inside the dataset). Truncation (`max_length`, default the
    tokenizer's `model_max_length`) shortens texts only: image tokens are never cut. A missing or corrupt image,
    an empty text, a text holding the image placeholder, a missing image in a batch of images, or a label outside
    `[0, num_labels)` raises [`BadExampleError`] naming the item; with `skip_bad_examples=True` such items are
    dropped, logged and counted in `num_skipped` (shared by the DataLoader's worker processes).
    `return_groups=True` also passes the `group` column (for group DRO; never given to the model).
    """

    processor: Any
    num_labels: int
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    max_length: int | None = None
    skip_bad_examples: bool = False
    return_groups: bool = False
    _skipped: Any = field(default=None, init=False, repr=False, compare=False)
    _quiet: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # shared memory, so that skips in DataLoader workers (forked or spawned) reach the main process's count
        self._skipped = multiprocessing.get_context("spawn").Value("q", 0)

    @property
    def num_skipped(self) -> int:
        """Items skipped as bad so far, over every process that shares this collator (its DataLoader workers)."""
        return int(self._skipped.value)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image_token = getattr(self.processor, "image_token", "<image>")
        items = []  # (name, image, text, label, group) of the good items
        for index, feature in enumerate(features):
            name = str(feature.get("id", f"#{index} of the batch")) if isinstance(feature, dict) else f"#{index}"
            try:
                items.append(self._check_item(feature, name, image_token))
            except BadExampleError as error:
                self._bad(error)
        with_image = [item for item in items if item[1] is not None]
        if with_image and len(with_image) < len(items):  # a multimodal batch: items without an image are bad
            for item in items:
                if item[1] is None:
                    self._bad(BadExampleError(f"item {item[0]}: no image (the other items have one); add the image"))
            items = with_image
        if not items:
            raise BadExampleError(f"every item of this batch of {len(features)} was bad; see the warnings above")
        _, images, texts, labels, groups = zip(*items, strict=True)
        batch = dict(encode_examples(self.processor, list(images), list(texts), self.prompt_template, self.max_length))
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.return_groups:
            batch["groups"] = torch.tensor(groups, dtype=torch.long)
        return batch

    def _check_item(self, feature: Any, name: str, image_token: str) -> tuple[str, Any, str, int, int]:
        if not isinstance(feature, dict):
            raise BadExampleError(f"item {name}: expected a dict with image, text and label, got {type(feature)}")
        image = feature.get("image")
        image = None if image is None else load_rgb_image(image, name)
        text = check_text(feature.get("text"), name, image_token)
        label = self._check_label(feature.get("label"), name)
        group = feature.get("group", -1)
        try:
            group = operator.index(group)
        except TypeError as error:
            raise BadExampleError(f"item {name}: group {group!r} is not an integer; fix the group column") from error
        return name, image, text, label, group

    def _check_label(self, label: Any, name: str) -> int:
        try:
            value = None if isinstance(label, bool) else operator.index(label)  # int, numpy or 0-d torch integers
        except TypeError:
            value = None
        if value is None or not 0 <= value < self.num_labels:
            raise BadExampleError(
                f"item {name}: label {label!r} is not a class id in [0, {self.num_labels}); map the data set's "
                "labels to the model's id2label"
            )
        return value

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Collate without counting or logging skipped items (items seen again, e.g. by an audit)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _bad(self, error: BadExampleError) -> None:
        """Raise `error`, or (skip_bad_examples) log it and count the item."""
        if not self.skip_bad_examples:
            raise error
        if self._quiet:
            return
        with self._skipped.get_lock():
            self._skipped.value += 1
            count = self._skipped.value
        logger.warning("skipping bad example (%d skipped so far): %s", count, error)
