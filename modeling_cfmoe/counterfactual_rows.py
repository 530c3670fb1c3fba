"""The counterfactual rows of a batch (docs/method.md, section 4), from the context statistics and the config alone.

* how strongly each token and pixel carries a shortcut (`context_strength`), and each item's bias evidence;
* each item's context (`batch_context`): the words holding a strong token (or declared), and the image's background
  colour plus its strong pixels, grown to the marks they outline (or declared regions);
* which items get rows and their partners (`draw_rows`), and each kind of row (`edit_rows`): a context-swapped row
  keeps its core and takes its partner's context (tokens where they stood in the partner, pixels in pixel space), a
  core-masked row keeps only its own context.

Nothing here runs a network: the model encodes the edited images (`CFMoEModel`) and stacks the rows (`stack_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .configuration_cfmoe import CFMoEConfig
from .context import SIGNIFICANCE, ContextStatistics, ContextStrength, mean_colour, spread
from .counterfactual import (
    CORE_MASKED,
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

    kind: int
    embeds: torch.Tensor
    mask: torch.Tensor
    image_mask: torch.Tensor
    images: torch.Tensor | None
    evidence: torch.Tensor | None


def context_strength(
    statistics: ContextStatistics, config: CFMoEConfig, token_ids: torch.Tensor, pixel_values: torch.Tensor | None
) -> ContextStrength:
    """The shortcut strength of each token `(batch, length)` (`ContextStatistics.token_strength`; only declared context
    when text discovery is off) and pixel (`spread` of its local scores; None without `pixel_values`, one per item)."""
    if config.discover_text_context:
        leaks = statistics.leak_occurrences(token_ids, torch.ones_like(token_ids, dtype=torch.bool))
        tokens = statistics.token_strength(
            token_ids, config.core_dependence_threshold, config.context_without_core_evidence, leaks
        )
    else:
        tokens = statistics.flag("declared_token", token_ids).float()
    pixels = None if pixel_values is None else spread(statistics.local_scores(pixel_values))
    return ContextStrength(tokens=tokens, pixels=pixels)


def item_bias_evidence(
    statistics: ContextStatistics,
    strength: ContextStrength,
    text_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
) -> torch.Tensor:
    """`(batch, 3)` each item's bias evidence (`ContextStatistics.bias_evidence`) from the strengths of its text tokens
    (`text_mask` `(batch, length)`) and pixels."""
    local = colour = None
    if strength.pixels is not None:
        local, colour = strength.pixels.flatten(1).amax(1), mean_colour(pixel_values)
    return statistics.bias_evidence((strength.tokens * text_mask).amax(1), local, colour)


def text_context(
    statistics: ContextStatistics,
    config: CFMoEConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    token_strength: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`(batch, length)` bool text context, the candidates it was chosen among): the whole words holding a token
    whose strength reaches `text_context_threshold`. The first attended token is never a candidate (it keeps every
    causal query attended), nor is any token when the rows do not edit the text."""
    first = (attention_mask.long().cumsum(1) == 1) & attention_mask
    candidates = attention_mask & ~image_mask & ~first & ("text" in config.counterfactual_modalities)
    text = strong_context(token_strength, candidates, config.text_context_threshold)
    return statistics.whole_words(input_ids, text, candidates), candidates


def pixel_context(statistics: ContextStatistics, config: CFMoEConfig, pixel_strength: torch.Tensor) -> torch.Tensor:
    """`(batch, ..., height, width)` bool, the image context: the pixels whose strength reaches
    `image_context_threshold` of the batch's strongest, grown by a descriptor's reach and closed over the marks they
    outline (with `discover_image_context`, when the pixels carry significant evidence), and the declared regions."""
    pixels = torch.zeros_like(pixel_strength, dtype=torch.bool)
    if config.discover_image_context:
        evidence = statistics.local_p_value() < SIGNIFICANCE
        found = strong_context(pixel_strength, evidence, config.image_context_threshold * pixel_strength.max())
        pixels = close_holes(dilate(found, LOCAL_RADIUS), MARK_RADIUS)
    if config.declared_image_context:
        height, width = pixels.shape[-2:]
        pixels = pixels | region_mask(config.declared_image_context, height, width, pixels.device)
    return pixels


def batch_context(
    statistics: ContextStatistics,
    config: CFMoEConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    strength: ContextStrength,
) -> BatchContext:
    """What the rows treat as each item's context (masks `(batch, length)` bool): its text context and, when the rows
    edit the images (and there is one image per item), its pixel context."""
    text, candidates = text_context(statistics, config, input_ids, attention_mask, image_mask, strength.tokens)
    edit_image = "image" in config.counterfactual_modalities and strength.pixels is not None
    pixels = pixel_context(statistics, config, strength.pixels) if edit_image else None
    return BatchContext(text=text, candidates=candidates, pixels=pixels)


def draw_rows(fraction: float, batch: int, device: torch.device) -> RowDraw | None:
    """A random `fraction` of the items and the partner of each (the next item), or None when that is no item."""
    n_rows = math.ceil(fraction * batch)
    if n_rows == 0:
        return None
    rows = torch.randperm(batch, device=device)[:n_rows]
    return RowDraw(rows=rows, partner=(rows + 1) % batch)


def swapped_images(
    statistics: ContextStatistics, config: CFMoEConfig, pixel_values: torch.Tensor, pixels: torch.Tensor, draw: RowDraw
) -> torch.Tensor:
    """The drawn items' images with their image context swapped for their partners' (`transplant_pixels`); the
    background colour moves with it when image context is discovered and the colour carries evidence."""
    recolour = config.discover_image_context and statistics.colour_p_value() < SIGNIFICANCE
    return transplant_pixels(pixel_values, pixels, draw.rows, draw.partner, recolour=recolour)


def edit_rows(
    kind: int,
    batch: RowBatch,
    context: BatchContext,
    draw: RowDraw,
    statistics: ContextStatistics,
    config: CFMoEConfig,
) -> RowEdit:
    """The rows of `kind` (`CONTEXT_SWAPPED` / `CORE_MASKED`) for the drawn items: their embeddings, masks and edited
    images, with their bias evidence where a router reads it (from what each row keeps of its item and takes from its
    partner, and the colour of the images it shows)."""
    rows, partner, pixels = draw.rows, draw.partner, context.pixels
    text_mask = batch.attention_mask & ~batch.image_mask
    whole = None if batch.strength.pixels is None else torch.ones_like(batch.strength.pixels, dtype=torch.bool)
    if kind == CORE_MASKED:  # the item's own context only
        kept = batch.attention_mask & ~(context.candidates & ~context.text)
        embeds, mask, image_mask = batch.inputs_embeds[rows], kept[rows], batch.image_mask[rows]
        images = None if pixels is None else keep_only_context(batch.pixel_values, pixels, rows)
        own, taken = (kept & text_mask, whole if pixels is None else pixels), (None, None)
    else:  # its core, the partner's context
        embeds, mask, image_mask = transplant_tokens(
            batch.inputs_embeds, batch.attention_mask, context.text, rows, partner, batch.image_mask
        )
        images = None if pixels is None else swapped_images(statistics, config, batch.pixel_values, pixels, draw)
        own = (text_mask & ~context.text, whole if pixels is None else ~pixels)
        taken = (context.text, pixels)
    evidence = None
    if config.routes_by_evidence:
        shown = images if images is not None else batch.pixel_values[rows]
        evidence = row_bias_evidence(statistics, batch.strength, draw, own, taken, shown)
    return RowEdit(kind=kind, embeds=embeds, mask=mask, image_mask=image_mask, images=images, evidence=evidence)


def row_bias_evidence(
    statistics: ContextStatistics,
    strength: ContextStrength,
    draw: RowDraw,
    own: tuple[torch.Tensor | None, torch.Tensor | None],
    taken: tuple[torch.Tensor | None, torch.Tensor | None],
    images: torch.Tensor,
) -> torch.Tensor:
    """`(n, 3)` the bias evidence of counterfactual rows, from the strongest strength of what each row keeps of its
    item (`own`: a token mask and a pixel mask, each None for nothing) and takes from its partner (`taken`); the
    colour from the row's `images`."""

    def strongest(values: torch.Tensor | None, mask: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        if values is None or mask is None:
            return strength.tokens.new_zeros(len(items))
        return (values * mask).flatten(1).amax(1)[items]

    rows, partner = draw.rows, draw.partner
    text = torch.maximum(strongest(strength.tokens, own[0], rows), strongest(strength.tokens, taken[0], partner))
    if strength.pixels is None:
        return statistics.bias_evidence(text, None, None)
    local = torch.maximum(strongest(strength.pixels, own[1], rows), strongest(strength.pixels, taken[1], partner))
    return statistics.bias_evidence(text, local, mean_colour(images))


def stack_rows(
    edits: list[RowEdit], draw: RowDraw, image_core: tuple[torch.Tensor, torch.Tensor] | None
) -> CounterfactualRows:
    """The edits (their images encoded into `embeds`) as one block of rows, padded to the widest, in their order."""
    width = max(edit.embeds.shape[1] for edit in edits)
    return CounterfactualRows(
        embeds=torch.cat([pad_to(edit.embeds, width) for edit in edits]),
        mask=torch.cat([pad_to(edit.mask, width) for edit in edits]),
        evidence=None if edits[0].evidence is None else torch.cat([edit.evidence for edit in edits]),
        source=draw.rows.repeat(len(edits)),
        kind=torch.cat([torch.full_like(draw.rows, edit.kind) for edit in edits]),
        image_core=image_core,
    )
