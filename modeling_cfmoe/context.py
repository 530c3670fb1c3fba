"""Context discovery and transplant: which parts of an item carry a modality's direct effect, and how a
counterfactual row takes another item's context while keeping its own core.

Nothing here assumes a cue's form. Text context is every token whose direct effect in the text-only branch
(the running per-vocabulary table) is strong against the table's strongest token: a row without such a
token has no context, and a cue of several tokens is caught whole. Image context is the image's global colour
component plus every pixel whose attribution to the image-only branch (gradient x deviation from the image's
mean colour) stands out of its own image: a local mark, a frame or nothing. Transplants move the partner's
context in and the item's own context out, so a cue that is present in some items only is decorrelated too.
All functions are vectorised over rows.
"""

from __future__ import annotations

import torch
from torch import nn


def text_context(token_scores: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tokens whose direct effect is at least `threshold` times the strongest one of the table.

    token_scores: `(batch, length, num_labels)` the table's centred logit contributions of each token;
    candidates: `(batch, length)` bool, tokens that may be context. Returns `(batch, length)` bool.
    """
    spread = token_scores.amax(-1) - token_scores.amin(-1)
    strongest = spread.new_tensor(0.0) if spread.numel() == 0 else spread.max()
    return candidates & (spread > 0) & (spread >= threshold * strongest)


def transplant_tokens(
    embeds: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each drawn row keeps its core tokens and takes its partner's context tokens.

    The partner's k-th context token fills the row's k-th context slot; the row's slots left over are masked,
    the partner's tokens left over are appended after the row's last position (extra columns).
    embeds `(batch, length, dim)`, mask / context `(batch, length)` bool, rows / partner `(n,)` item indices.
    Returns embeddings `(n, length + extra, dim)` and the attention mask `(n, length + extra)` bool.
    """
    rank = context.long().cumsum(1) - 1
    counts = context.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    table = embeds.new_zeros(embeds.shape[0], max(width, 1), embeds.shape[-1])  # item i's k-th context token
    items, positions = context.nonzero(as_tuple=True)
    table[items, rank[items, positions]] = embeds[items, positions]
    own, given = counts[rows], counts[partner]

    row_context, row_rank = context[rows], rank[rows].clamp_min(0)
    donated = table[partner].gather(1, row_rank.clamp_max(table.shape[1] - 1).unsqueeze(-1).expand_as(embeds[rows]))
    filled = row_context & (row_rank < given.unsqueeze(1))
    row_embeds = torch.where(filled.unsqueeze(-1), donated, embeds[rows])
    row_mask = mask[rows] & ~(row_context & ~filled)

    extra = int((given - own).clamp_min(0).max()) if rows.numel() else 0
    if extra == 0:
        return row_embeds, row_mask
    slot = own.unsqueeze(1) + torch.arange(extra, device=embeds.device)  # the partner's leftover ranks
    appended_mask = slot < given.unsqueeze(1)
    appended = table[partner].gather(
        1, slot.clamp_max(table.shape[1] - 1).unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    )
    return torch.cat([row_embeds, appended * appended_mask.unsqueeze(-1)], 1), torch.cat([row_mask, appended_mask], 1)


def pixel_saliency(pixel_values: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """`|sum_c grad * (x - mean colour)|` per pixel, smoothed over 3x3 neighbourhoods.

    pixel_values / gradient: `(..., channels, height, width)` (one image or several tiles per item). Returns
    `(..., height, width)`.
    """
    deviation = pixel_values - pixel_values.mean((-2, -1), keepdim=True)
    saliency = (gradient * deviation).sum(-3).abs().float()
    smooth = nn.functional.avg_pool2d(saliency.flatten(0, -3).unsqueeze(1), 3, 1, 1, count_include_pad=False)
    return smooth.view_as(saliency)


def image_context(saliency: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose saliency stands out of their own image: above `median + threshold * MAD`.

    saliency: `(..., height, width)`. Returns a bool mask of the same shape (empty where an image's saliency
    is flat).
    """
    flat = saliency.flatten(-2)
    median = flat.median(dim=-1, keepdim=True).values
    spread = (flat - median).abs().median(dim=-1, keepdim=True).values
    return ((flat > median + threshold * spread) & (spread > 0)).view_as(saliency)


def transplant_pixels(
    pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor
) -> torch.Tensor:
    """The rows' images with the partner's context: its global colour, and its pixels wherever either image
    has context pixels (the row's own local cue leaves, the partner's arrives).

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool;
    rows / partner `(n,)` item indices. Returns `(n, ..., channels, height, width)`.
    """
    own, given = pixel_values[rows], pixel_values[partner]
    recoloured = own - own.mean((-2, -1), keepdim=True) + given.mean((-2, -1), keepdim=True)
    local = (context[rows] | context[partner]).unsqueeze(-3)
    return torch.where(local, given, recoloured)


def keep_only_context(pixel_values: torch.Tensor, context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows' images reduced to their context: global colour and context pixels, the rest flat.

    pixel_values: `(items, ..., channels, height, width)`; context: `(items, ..., height, width)` bool.
    """
    own = pixel_values[rows]
    flat = own.mean((-2, -1), keepdim=True).expand_as(own)
    return torch.where(context[rows].unsqueeze(-3), own, flat)
