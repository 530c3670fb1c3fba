"""Counterfactual states and rows as pure tensor operations: text-only sequences, transplants of one item's context
into another, the language-model rows, causal effects.

Notation (docs/method.md): `Z(t, v)` factual logits, `Z(t, v*)` text-only, `Z(t*, v)` image-only,
`Z(t*, v*)` the learned prior. Transplants move the partner's context in and the item's own context out, so a cue
that is present in some items only is decorrelated too. All helpers are vectorised over rows: no Python loop over
items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ExplicitEnum

from .configuration_cfmoe import CounterfactualType, Pooling
from .context import window_sums

CONTEXT_SWAPPED, CORE_MASKED = CounterfactualType.CONTEXT_SWAPPED.kind, CounterfactualType.CORE_MASKED.kind


class CounterfactualMode(ExplicitEnum):
    """What `forward(counterfactuals=...)` computes besides the prediction, the one value the body and the heads read:

    - `PREDICTION` ("prediction", or None): the prediction only (and with `inference_mode="tie"` the branches it
      needs);
    - `EFFECTS` ("effects"): the text-only, image-only and prior branches and the causal effects;
    - `IMAGE_CORE` ("image_core"): those, and the image-core readings of `config.counterfactual_fraction` of the items
      (their images with the image context swapped out, through the vision tower and projector without gradient,
      pooled): a warm-up step that gathers what tells a core token from a shortcut;
    - `FACTUAL_AND_COUNTERFACTUAL_ROWS` ("factual_and_counterfactual_rows"): the branches, the image-core readings
      and the fine-grained counterfactual rows of `config.counterfactual_fraction` of the items (context-swapped /
      core-masked; needs `input_ids` and images), in the factual rows' language-model call;
    - `COUNTERFACTUAL_ROWS_ONLY` ("counterfactual_rows_only"): the branches and the fine-grained rows, the factual
      rows left out of the language-model call (a training step whose loss reads the fused head on those rows
      only): `logits`, `fused_logits`, `pooled`, the effects and the factual text routing are then None.
    """

    PREDICTION = "prediction"
    EFFECTS = "effects"
    IMAGE_CORE = "image_core"
    FACTUAL_AND_COUNTERFACTUAL_ROWS = "factual_and_counterfactual_rows"
    COUNTERFACTUAL_ROWS_ONLY = "counterfactual_rows_only"

    @property
    def computes_branches(self) -> bool:
        """Whether the forward computes the bias branches and the effects."""
        return self is not CounterfactualMode.PREDICTION

    @property
    def edits_images(self) -> bool:
        """Whether the forward edits images: the image-core readings, or the counterfactual rows."""
        return self is CounterfactualMode.IMAGE_CORE or self.builds_rows

    @property
    def builds_rows(self) -> bool:
        """Whether the forward builds the fine-grained counterfactual rows."""
        return self in (CounterfactualMode.FACTUAL_AND_COUNTERFACTUAL_ROWS, CounterfactualMode.COUNTERFACTUAL_ROWS_ONLY)

    @property
    def keeps_factual_rows(self) -> bool:
        """Whether the factual rows run through the language model (beside any counterfactual rows)."""
        return self is not CounterfactualMode.COUNTERFACTUAL_ROWS_ONLY


@dataclass
class BiasBranches:
    """The counterfactual branches, each `(batch, num_labels)`: text-only `Z(t, v*)`, image-only `Z(t*, v)` and the
    learned prior `Z(t*, v*)` (broadcast); None where they were not computed."""

    text_only: torch.Tensor | None = None
    image_only: torch.Tensor | None = None
    prior: torch.Tensor | None = None


@dataclass
class CounterfactualRows:
    """Fine-grained counterfactual rows: `embeds` `(rows, width, hidden)` (images inserted), `mask` `(rows, width)`,
    their bias `evidence` `(rows, 3)` (None unless a router reads it), the item each comes from (`source`
    `(rows,)`) and its `kind` `(rows,)` (`CONTEXT_SWAPPED` / `CORE_MASKED`); `image_core`: the pooled features
    `(n, hidden)` of the context-swapped images (stop-gradient) and their items `(n,)` (None without image edits)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    evidence: torch.Tensor | None
    source: torch.Tensor
    kind: torch.Tensor
    image_core: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class CausalEffects:
    """Effects in logit space, each `(batch, num_labels)`; `TE = NDE_T + NDE_V + TIE` by construction. None where
    they were not computed."""

    total_effect: torch.Tensor | None = None
    direct_effect_text: torch.Tensor | None = None
    direct_effect_image: torch.Tensor | None = None
    indirect_effect: torch.Tensor | None = None


def causal_effects(
    factual: torch.Tensor, text_only: torch.Tensor, image_only: torch.Tensor, prior: torch.Tensor
) -> CausalEffects:
    """TE = Z(t,v) - Z(t*,v*); NDE_T = Z(t,v*) - Z(t*,v*); NDE_V = Z(t*,v) - Z(t*,v*); TIE = TE - NDE_T - NDE_V.

    TE is returned as `NDE_T + NDE_V + TIE`, so the decomposition holds bit for bit (it equals
    `Z(t,v) - Z(t*,v*)` up to one rounding).
    """
    direct_text = text_only - prior
    direct_image = image_only - prior
    indirect = (factual - prior) - direct_text - direct_image
    return CausalEffects(direct_text + direct_image + indirect, direct_text, direct_image, indirect)


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """hidden `(rows, length, dim)`, mask `(rows, length)` bool -> `(rows, dim)`: mean or last attended token.

    Uses `where` rather than a product so that values at unattended positions never leak (even NaN).
    """
    mask = mask.bool()
    if mode == Pooling.LAST:
        last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return summed.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(hidden.dtype)


def pool_by_row(values: torch.Tensor, row_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean of `values` `(n, dim)` grouped by `row_index` `(n,)` -> `(num_rows, dim)`; rows with none get 0."""
    sums = values.new_zeros(num_rows, values.shape[-1]).index_add_(0, row_index, values)
    counts = values.new_zeros(num_rows).index_add_(0, row_index, values.new_ones(row_index.shape[0]))
    return sums / counts.clamp_min(1).unsqueeze(-1)


def left_align(values: torch.Tensor, keep: torch.Tensor, fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept positions of each row moved to its front, in order.

    values `(rows, length, *dims)`, keep `(rows, length)` bool -> `(rows, width, *dims)` (`fill` after each row's
    kept values) and its mask `(rows, width)` long; width = the longest row's count (the full length while
    tracing, which reads no value on the host).
    """
    lengths = keep.sum(1)
    width = keep.shape[1] if torch.compiler.is_compiling() else max(int(lengths.max()), 1)
    target = torch.cumsum(keep.long(), dim=1) - 1
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)
    aligned = values.new_full((keep.shape[0], width, *values.shape[2:]), fill)
    aligned[rows[keep], target[keep]] = values[keep]
    mask = torch.arange(width, device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)
    return aligned, mask.long()


def drop_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text-only sequences `(rows, max_text_len)`: image and padding tokens removed, left-aligned.

    This is the `v*` state on the short sequence: a text-only branch costs text tokens only.
    """
    return left_align(input_ids, attention_mask.bool() & (input_ids != image_token_id), pad_token_id)


def language_rows(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    evidence: torch.Tensor | None,
    cf: CounterfactualRows | None,
    keep_factual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The rows of one language-model call: the factual rows, the counterfactual rows or both (factual first), as
    `(embeds, mask, position_ids, evidence)`. Counterfactual rows count only their attended tokens (a removed
    context leaves no gap); position ids are None for factual rows alone (the model's own)."""
    if cf is None:
        return inputs_embeds, attention_mask, None, evidence
    positions = (cf.mask.long().cumsum(1) - 1).clamp_min(0)
    if not keep_factual:
        return cf.embeds, cf.mask, positions, cf.evidence
    width = max(cf.embeds.shape[1], inputs_embeds.shape[1])
    factual_positions = torch.arange(width, device=attention_mask.device).expand(inputs_embeds.shape[0], -1)
    return (
        torch.cat([pad_to(inputs_embeds, width), pad_to(cf.embeds, width)]),
        torch.cat([pad_to(attention_mask, width), pad_to(cf.mask, width)]),
        torch.cat([factual_positions, pad_to(positions, width)]),
        None if evidence is None or cf.evidence is None else torch.cat([evidence, cf.evidence]),
    )


def pad_to(values: torch.Tensor, width: int) -> torch.Tensor:
    """`values` `(rows, length, ...)` padded with zeros (False) to `(rows, width, ...)` along dim 1."""
    pad = [0, 0] * (values.dim() - 2) + [0, width - values.shape[1]]
    return nn.functional.pad(values, pad)


def strong_context(strength: torch.Tensor, candidates: torch.Tensor, minimum: torch.Tensor | float) -> torch.Tensor:
    """Positions whose strength (`spread` of their scores) reaches `minimum` (and is more than 0).

    strength: `(...)` of each token or pixel; candidates: bool, broadcastable to it. Returns a bool mask `(...)`.
    """
    return candidates & (strength > 0) & (strength >= minimum)


def transplant_tokens(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    rows: torch.Tensor,
    partner: torch.Tensor,
    image_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each drawn row keeps its own tokens but its context, and takes its partner's context tokens at the places
    they held in the partner, each run of consecutive context tokens as one block before the row's token at the
    run's first place (so a cue's position says nothing of the row's own cue, a row that had none is told from no
    other, and a cue of several words arrives whole, never interleaved with the row's own words, which would show
    where the row's own cue was missing).

    embeds `(batch, length, dim)`; mask / context / image_mask `(batch, length)` bool; rows / partner `(n,)` item
    indices. Returns the rows' embeddings `(n, width, dim)`, attention mask and image-token mask `(n, width)`,
    compacted: the removed context leaves no gap.
    """
    length = embeds.shape[1]
    place = torch.arange(length, device=embeds.device, dtype=torch.float).expand(len(rows), -1)
    kept, given = mask[rows] & ~context[rows], context[partner]
    starts = given & ~nn.functional.pad(given[:, :-1], (1, 0))  # the first token of each run of context tokens
    run_start = place.masked_fill(~starts, -1.0).cummax(1).values
    given_keys = run_start - 0.5 + (place - run_start) / (2 * length)  # the run's tokens in order, before run_start
    keys = torch.cat([place.masked_fill(~kept, float("inf")), given_keys.masked_fill(~given, float("inf"))], 1)
    order = keys.argsort(dim=1, stable=True)
    width = int((kept.sum(1) + given.sum(1)).max())
    order = order[:, :width]
    pooled = torch.cat([embeds[rows], embeds[partner]], 1)
    row_embeds = pooled.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    row_mask = torch.cat([kept, given], 1).gather(1, order)
    row_images = torch.cat([image_mask[rows], torch.zeros_like(given)], 1).gather(1, order) & row_mask
    return row_embeds, row_mask, row_images


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A bool mask `(..., height, width)` grown by `radius` pixels (the reach of a local descriptor)."""
    grid = nn.functional.pad(mask.reshape(-1, *mask.shape[-2:]).float(), (radius,) * 4)
    return (window_sums(grid, 2 * radius + 1) > 0.5).view_as(mask)  # counts of marked pixels: exact in float32


def close_holes(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A bool mask `(..., height, width)` closed by `radius` pixels (dilated, then eroded; the border erodes
    nothing, so a gap of less than `radius` between a mark and the border fills too): the inside of a solid mark
    whose rim alone was found (its interior is uniform, so local evidence sees nothing there) joins it."""
    return ~dilate(~dilate(mask, radius), radius)


def region_mask(regions: Sequence[Sequence[float]], height: int, width: int, device=None) -> torch.Tensor:
    """`(height, width)` bool: the union of boxes `(left, top, right, bottom)`, each a fraction of the image side."""
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for left, top, right, bottom in regions:
        rows = slice(math.floor(top * height), math.ceil(bottom * height))
        cols = slice(math.floor(left * width), math.ceil(right * width))
        mask[rows, cols] = True
    return mask


def background_colour(pixel_values: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Mean colour `(..., channels, 1, 1)` of each image's pixels outside its local context (`(..., height, width)`
    bool), so that a local cue's own colour does not leak into the global component."""
    keep = (~context).unsqueeze(-3).to(pixel_values.dtype)
    return (pixel_values * keep).sum((-2, -1), keepdim=True) / keep.sum((-2, -1), keepdim=True).clamp_min(1)


def transplant_pixels(
    pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor, recolour: bool = True
) -> torch.Tensor:
    """The rows' images with the partner's context: its background colour, and its pixels wherever the row's
    context lies (the row's own local cue leaves) or the partner's (the partner's arrives). A row without local
    context of its own leaves the footprint of another item's context instead, so that where pixels were replaced
    never tells whether the row had a cue.

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool;
    rows / partner `(n,)` item indices; `recolour` (a bool or a 0-d bool tensor) False keeps the rows' own
    background colour. Returns `(n, ..., channels, height, width)`.
    """
    own, given = pixel_values[rows], pixel_values[partner]
    colour = background_colour(pixel_values, context)
    recoloured = torch.where(torch.as_tensor(recolour, device=own.device), own - colour[rows] + colour[partner], own)
    has_context = context.flatten(1).any(1)
    footprint = context[rows]
    if bool(has_context.any()):
        donors = has_context.nonzero()[:, 0]
        decoy = context[donors[torch.randint(len(donors), (len(rows),), device=donors.device)]]
        footprint = torch.where(has_context[rows].view(-1, *[1] * (context.dim() - 1)), footprint, decoy)
    local = (footprint | context[partner]).unsqueeze(-3)
    return torch.where(local, given, recoloured)


def keep_only_context(pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows' images reduced to their context: the background colour and the context pixels, the rest flat.

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool.
    """
    own = pixel_values[rows]
    flat = background_colour(pixel_values, context)[rows].expand_as(own)
    return torch.where(context[rows].unsqueeze(-3), own, flat)
