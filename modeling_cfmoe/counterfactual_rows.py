"""[`CounterfactualRowBuilder`]: the one owner of context discovery and of the counterfactual rows (docs/method.md,
section 4). It holds the label statistics ([`ContextStatistics`]) and the config, and the body asks it for:

* how strongly each token and pixel carries a shortcut (`strength`), and each item's bias evidence (`evidence`);
* each item's context (`context`): the words holding a strong token (or declared), and the image's background colour
  plus its strong pixels, grown to the marks they outline (or declared regions);
* the rows (`build`): which items get rows and their partners, and each kind of row: a context-swapped row keeps its
  core and takes its partner's context (tokens where they stood in the partner, pixels in pixel space), a core-masked
  row keeps only its own context; the body's image encoder turns their edited images into features;
* the image-core readings of a warm-up step (`image_core_readings`).

The trainer counts training batches into it (`update`, `update_core_readings`); audits read it (`find_context`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_cfmoe import CFMoEConfig, CounterfactualType, Modality
from .context import SIGNIFICANCE, ContextStatistics, ContextStrength, mean_colour, spread
from .counterfactual import (
    CounterfactualRows,
    close_holes,
    dilate,
    keep_only_context,
    pad_to,
    region_mask,
    strong_context,
    transplant_pixels,
    transplant_tokens,
)

LOCAL_RADIUS = 1  # a pixel's local descriptor covers its 3x3 neighbourhood
MARK_RADIUS = 3  # pixel context is closed by this much: the surround of the local evidence (7x7)


@dataclass
class RowBatch:
    """A batch as its counterfactual rows read it: `input_ids`, `attention_mask` and `image_mask` `(batch, length)`
    (masks bool), `inputs_embeds` `(batch, length, hidden)` with the image features inserted, `pixel_values`
    `(batch, ..., channels, height, width)` (one image per item) and how strongly each part carries a shortcut."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    pixel_values: torch.Tensor
    strength: ContextStrength


@dataclass
class BatchContext:
    """Each item's context: `text` `(batch, length)` bool, the `candidates` `(batch, length)` bool it was chosen among,
    and `pixels` `(batch, ..., height, width)` bool (None where the rows do not edit the images)."""

    text: torch.Tensor
    candidates: torch.Tensor
    pixels: torch.Tensor | None


@dataclass
class RowDraw:
    """The items `rows` `(n,)` that get counterfactual rows, and the `partner` `(n,)` whose context each takes."""

    rows: torch.Tensor
    partner: torch.Tensor


@dataclass
class RowEdit:
    """One kind of counterfactual row of the drawn items: `embeds` `(n, width, hidden)`, `mask` and `image_mask`
    `(n, width)` bool, the edited `images` `(n, ..., channels, height, width)` whose features still have to replace
    those in `embeds` (None where the images are not edited), and the rows' bias `evidence` `(n, 3)` (None unless a
    router reads it)."""

    kind: CounterfactualType
    embeds: torch.Tensor
    mask: torch.Tensor
    image_mask: torch.Tensor
    images: torch.Tensor | None
    evidence: torch.Tensor | None


# what the body's image encoder does for `build`: an edit of the drawn items `(n,)` -> (its embeddings with its
# images' features inserted `(n, width, hidden)`, the images' projected features pooled `(n, hidden)`)
EncodeImages = Callable[[RowEdit, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CounterfactualRowBuilder(nn.Module):
    """Context discovery and the counterfactual rows of [`CFMoEModel`] (`model.rows`), from the label statistics it
    holds (`statistics`, saved with the model) and `config.context_config`."""

    def __init__(self, config: CFMoEConfig):
        super().__init__()
        self.config = config
        channels = config.base_config.vision_config.num_channels
        self.statistics = ContextStatistics(
            config.base_config.text_config.vocab_size,
            channels * (2 * LOCAL_RADIUS + 1) ** 2,
            config.num_labels,
            channels,
            support=config.context_config.context_support,
            feature_dim=config.hidden_size,
            covariance_pixels=config.context_config.context_covariance_pixels,
        )
        self._warned_images = False

    # ------------------------------------------------------------------------------------------ counting
    def set_vocabulary(self, tokenizer) -> None:
        """Read the tokenizer's vocabulary into the statistics (`ContextStatistics.set_vocabulary`): which pieces
        continue a word (text context is taken a whole word at a time), and the pieces of `declared_text_context`
        (always context) and `protected_words` (never context)."""
        context = self.config.context_config
        self.statistics.set_vocabulary(tokenizer, context.declared_text_context, context.protected_words)

    @torch.no_grad()
    def update(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> None:
        """Count a training batch (`input_ids` `(batch, length)`, `labels` `(batch,)`) into the label statistics that
        pick each item's context and route the experts; its pixels only with one image per item."""
        one_image_each = pixel_values is not None and pixel_values.shape[0] == input_ids.shape[0]
        text_mask = self._text_mask(input_ids, attention_mask)
        self.statistics.update(input_ids, text_mask, pixel_values if one_image_each else None, labels)

    @torch.no_grad()
    def update_core_readings(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        image_core_features: torch.Tensor,
        image_core_source: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Count what the images of a forward's items `image_core_source` `(n,)` say without their context
        (`CFMoEOutput.image_core_features` `(n, hidden)`) against the tokens of their texts
        (`ContextStatistics.update_core_readings`)."""
        rows, text_mask = image_core_source, self._text_mask(input_ids, attention_mask)
        self.statistics.update_core_readings(input_ids[rows], text_mask[rows], labels[rows], image_core_features)

    def _text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`(batch, length)` bool: the attended tokens that are no image placeholder."""
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        return attention_mask.bool() & (input_ids != self.config.base_config.image_token_id)

    # ------------------------------------------------------------------------------------------ discovery
    def strength(self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None, warn: bool) -> ContextStrength:
        """The shortcut strength of each token `(batch, length)` (`ContextStatistics.token_strength`; only declared
        context when text discovery is off) and pixel (`spread` of its local scores; None unless there is one image
        per item, which `warn` reports once)."""
        if pixel_values is not None and pixel_values.shape[0] != token_ids.shape[0]:
            if warn and not self._warned_images:
                warnings.warn("items hold several images: counterfactual rows keep their own images", stacklevel=3)
                self._warned_images = True
            pixel_values = None
        context, statistics = self.config.context_config, self.statistics
        if context.discover_text_context:
            leaks = statistics.leak_occurrences(token_ids, torch.ones_like(token_ids, dtype=torch.bool))
            tokens = statistics.token_strength(
                token_ids, context.core_dependence_threshold, context.context_without_core_evidence, leaks
            )
        else:
            tokens = statistics.flag("declared_token", token_ids).float()
        pixels = None if pixel_values is None else spread(statistics.local_scores(pixel_values))
        return ContextStrength(tokens=tokens, pixels=pixels)

    def evidence(
        self, strength: ContextStrength, text_mask: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """`(batch, 3)` each item's bias evidence (`ContextStatistics.bias_evidence`) from the strengths of its text
        tokens (`text_mask` `(batch, length)`) and pixels."""
        local = colour = None
        if strength.pixels is not None:
            local, colour = strength.pixels.flatten(1).amax(1), mean_colour(pixel_values)
        return self.statistics.bias_evidence((strength.tokens * text_mask).amax(1), local, colour)

    def context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor, strength: ContextStrength
    ) -> BatchContext:
        """What the rows treat as each item's context (masks `(batch, length)` bool): its text context and, when the
        rows edit the images (and there is one image per item), its pixel context."""
        text, candidates = self._text_context(input_ids, attention_mask, image_mask, strength.tokens)
        edit_image = Modality.IMAGE in self.config.counterfactual_modalities and strength.pixels is not None
        pixels = self._pixel_context(strength.pixels) if edit_image else None
        return BatchContext(text=text, candidates=candidates, pixels=pixels)

    @torch.no_grad()
    def find_context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What training treats as each item's context now (for audits): `(batch, length)` bool text context and
        `(batch, ..., height, width)` bool image context (None without one image per item)."""
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        image_mask = input_ids == self.config.base_config.image_token_id
        strength = self.strength(input_ids, pixel_values, warn=False)
        context = self.context(input_ids, attention_mask.bool(), image_mask, strength)
        return context.text, context.pixels

    def _text_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor, strength: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`(batch, length)` bool text context, the candidates it was chosen among): the whole words holding a token
        whose strength reaches `text_context_threshold`. The first attended token is never a candidate (it keeps every
        causal query attended), nor is any token when the rows do not edit the text."""
        first = (attention_mask.long().cumsum(1) == 1) & attention_mask
        edits_text = Modality.TEXT in self.config.counterfactual_modalities
        candidates = attention_mask & ~image_mask & ~first & edits_text
        text = strong_context(strength, candidates, self.config.context_config.text_context_threshold)
        return self.statistics.whole_words(input_ids, text, candidates), candidates

    def _pixel_context(self, pixel_strength: torch.Tensor) -> torch.Tensor:
        """`(batch, ..., height, width)` bool, the image context: the pixels whose strength reaches
        `image_context_threshold` of the batch's strongest, grown by a descriptor's reach and closed over the marks
        they outline (with `discover_image_context`, when the pixels carry significant evidence), and the declared
        regions."""
        context = self.config.context_config
        pixels = torch.zeros_like(pixel_strength, dtype=torch.bool)
        if context.discover_image_context:
            evidence = self.statistics.local_p_value() < SIGNIFICANCE
            found = strong_context(pixel_strength, evidence, context.image_context_threshold * pixel_strength.max())
            pixels = close_holes(dilate(found, LOCAL_RADIUS), MARK_RADIUS)
        if context.declared_image_context:
            height, width = pixels.shape[-2:]
            pixels = pixels | region_mask(context.declared_image_context, height, width, pixels.device)
        return pixels

    # ------------------------------------------------------------------------------------------ rows
    def draw(self, batch: int, device: torch.device) -> RowDraw | None:
        """A random `counterfactual_fraction` of the items and the partner of each (the next item), or None when that
        is no item."""
        n_rows = math.ceil(self.config.counterfactual_fraction * batch)
        if n_rows == 0:
            return None
        rows = torch.randperm(batch, device=device)[:n_rows]
        return RowDraw(rows=rows, partner=(rows + 1) % batch)

    def build(self, batch: RowBatch, encode_images: EncodeImages) -> CounterfactualRows | None:
        """The rows of every `counterfactual_types` entry for a random `counterfactual_fraction` of the items, their
        edited images encoded by `encode_images` (so a cue the tower spreads over every patch feature leaves with its
        pixels), with the image-core readings of the context-swapped images. None when the fraction draws no item."""
        draw = self.draw(batch.inputs_embeds.shape[0], batch.inputs_embeds.device)
        if draw is None:
            return None
        context = self.context(batch.input_ids, batch.attention_mask, batch.image_mask, batch.strength)
        edits, image_core = [], None
        for kind in map(CounterfactualType, self.config.counterfactual_types):
            edit = self._edit(kind, batch, context, draw)
            if edit.images is not None:
                edit.embeds, image_pooled = encode_images(edit, draw.rows)
                if edit.kind != CounterfactualType.CORE_MASKED:
                    image_core = image_pooled.detach().float(), draw.rows
            edits.append(edit)
        return _stack(edits, draw, image_core)

    def image_core_readings(
        self, pixel_values: torch.Tensor, strength: ContextStrength
    ) -> tuple[torch.Tensor, RowDraw] | None:
        """(the images of a random `counterfactual_fraction` of the items `(n, ..., channels, height, width)` with
        their image context swapped out, the draw), None when the fraction draws no item."""
        draw = self.draw(pixel_values.shape[0], pixel_values.device)
        if draw is None:
            return None
        return self._swapped_images(pixel_values, self._pixel_context(strength.pixels), draw), draw

    def _swapped_images(self, pixel_values: torch.Tensor, pixels: torch.Tensor, draw: RowDraw) -> torch.Tensor:
        """The drawn items' images with their image context swapped for their partners' (`transplant_pixels`); the
        background colour moves with it when image context is discovered and the colour carries evidence."""
        discover = self.config.context_config.discover_image_context
        recolour = discover and self.statistics.colour_p_value() < SIGNIFICANCE
        return transplant_pixels(pixel_values, pixels, draw.rows, draw.partner, recolour=recolour)

    def _edit(self, kind: CounterfactualType, batch: RowBatch, context: BatchContext, draw: RowDraw) -> RowEdit:
        """The rows of `kind` for the drawn items: their embeddings, masks and edited images, with their bias evidence
        where a router reads it (from what each row keeps of its item and takes from its partner, and the colour of
        the images it shows)."""
        rows, partner, pixels = draw.rows, draw.partner, context.pixels
        text_mask = batch.attention_mask & ~batch.image_mask
        whole = None if batch.strength.pixels is None else torch.ones_like(batch.strength.pixels, dtype=torch.bool)
        if kind == CounterfactualType.CORE_MASKED:  # the item's own context only
            kept = batch.attention_mask & ~(context.candidates & ~context.text)
            embeds, mask, image_mask = batch.inputs_embeds[rows], kept[rows], batch.image_mask[rows]
            images = None if pixels is None else keep_only_context(batch.pixel_values, pixels, rows)
            own, taken = (kept & text_mask, whole if pixels is None else pixels), (None, None)
        else:  # its core, the partner's context
            embeds, mask, image_mask = transplant_tokens(
                batch.inputs_embeds, batch.attention_mask, context.text, rows, partner, batch.image_mask
            )
            images = None if pixels is None else self._swapped_images(batch.pixel_values, pixels, draw)
            own = (text_mask & ~context.text, whole if pixels is None else ~pixels)
            taken = (context.text, pixels)
        evidence = None
        if self.config.routes_by_evidence:
            shown = images if images is not None else batch.pixel_values[rows]
            evidence = self._row_evidence(batch.strength, draw, own, taken, shown)
        return RowEdit(kind=kind, embeds=embeds, mask=mask, image_mask=image_mask, images=images, evidence=evidence)

    def _row_evidence(
        self,
        strength: ContextStrength,
        draw: RowDraw,
        own: tuple[torch.Tensor | None, torch.Tensor | None],
        taken: tuple[torch.Tensor | None, torch.Tensor | None],
        images: torch.Tensor,
    ) -> torch.Tensor:
        """`(n, 3)` the bias evidence of counterfactual rows, from the strongest strength of what each row keeps of
        its item (`own`: a token mask and a pixel mask, each None for nothing) and takes from its partner (`taken`);
        the colour from the row's `images`."""

        def strongest(values: torch.Tensor | None, mask: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
            if values is None or mask is None:
                return strength.tokens.new_zeros(len(items))
            return (values * mask).flatten(1).amax(1)[items]

        rows, partner = draw.rows, draw.partner
        text = torch.maximum(strongest(strength.tokens, own[0], rows), strongest(strength.tokens, taken[0], partner))
        if strength.pixels is None:
            return self.statistics.bias_evidence(text, None, None)
        local = torch.maximum(strongest(strength.pixels, own[1], rows), strongest(strength.pixels, taken[1], partner))
        return self.statistics.bias_evidence(text, local, mean_colour(images))


def _stack(
    edits: list[RowEdit], draw: RowDraw, image_core: tuple[torch.Tensor, torch.Tensor] | None
) -> CounterfactualRows:
    """The edits (their images encoded into `embeds`) as one block of rows, padded to the widest, in their order."""
    width = max(edit.embeds.shape[1] for edit in edits)
    return CounterfactualRows(
        embeds=torch.cat([pad_to(edit.embeds, width) for edit in edits]),
        mask=torch.cat([pad_to(edit.mask, width) for edit in edits]),
        evidence=None if edits[0].evidence is None else torch.cat([edit.evidence for edit in edits]),
        source=draw.rows.repeat(len(edits)),
        kind=torch.cat([torch.full_like(draw.rows, edit.kind.kind) for edit in edits]),
        image_core=image_core,
    )
