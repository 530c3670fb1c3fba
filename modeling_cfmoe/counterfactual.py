"""Counterfactual states and rows: text-only sequences, core/context splits, causal effects.

Notation (DESIGN.md): `Z(t, v)` factual logits, `Z(t, v*)` text-only, `Z(t*, v)` image-only,
`Z(t*, v*)` the learned prior. All helpers are vectorised over rows: no Python loop over items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTEXT_SWAPPED, CORE_MASKED = 0, 1
COUNTERFACTUAL_KINDS = {"context_swapped": CONTEXT_SWAPPED, "core_masked": CORE_MASKED}


@dataclass
class CausalEffects:
    """Effects in logit space, each `(batch, num_labels)`; `TE = NDE_T + NDE_V + TIE` by construction."""

    total: torch.Tensor
    direct_text: torch.Tensor
    direct_image: torch.Tensor
    indirect: torch.Tensor


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


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden `(rows, length, dim)`, mask `(rows, length)` bool -> `(rows, dim)`: mean or last attended token.

    Uses `where` rather than a product so that values at unattended positions never leak (even NaN).
    """
    mask = mask.bool()
    if mode == "last":
        last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = torch.where(mask.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return summed.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(hidden.dtype)


def pool_by_row(values: torch.Tensor, row_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean of `values` `(n, dim)` grouped by `row_index` `(n,)` -> `(num_rows, dim)`; rows with none get 0."""
    sums = values.new_zeros(num_rows, values.shape[-1]).index_add_(0, row_index, values)
    counts = torch.bincount(row_index, minlength=num_rows).clamp_min(1).to(values.dtype)
    return sums / counts.unsqueeze(-1)


def drop_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text-only sequences `(rows, max_text_len)`: image and padding tokens removed, left-aligned.

    This is the `v*` state on the short sequence: a text-only branch costs text tokens only.
    """
    keep = attention_mask.bool() & (input_ids != image_token_id)
    lengths = keep.sum(1)
    width = max(int(lengths.max()), 1)
    target = torch.cumsum(keep.long(), dim=1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    text_ids = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    text_ids[rows[keep], target[keep]] = input_ids[keep]
    text_mask = torch.arange(width, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    return text_ids, text_mask.long()


def top_fraction(scores: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the `ceil(fraction * n)` candidates with the largest score (at least one when n > 0).

    scores, candidates: `(rows, length)`; returns a bool mask `(rows, length)`, a subset of candidates.
    """
    counts = candidates.sum(1)
    k = torch.where(counts > 0, torch.ceil(counts * fraction).clamp_min(1), torch.zeros_like(counts)).long()
    masked = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float))
    rank = masked.argsort(dim=1, descending=True).argsort(dim=1)
    return candidates & (rank < k.unsqueeze(1))


def swap_context_tokens(
    embeds: torch.Tensor, context: torch.Tensor, rows: torch.Tensor, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context transplant in text: the k-th context token of each drawn row takes the embedding of the k-th
    context token of its partner item.

    embeds `(batch, length, dim)`, context `(batch, length)` bool, rows / partner `(n,)` item indices.
    Returns the rows' embeddings `(n, length, dim)` and `(n, length)` bool: context positions left without a
    partner token (the partner has fewer), to be masked out.
    """
    rank = (context.long().cumsum(1) - 1).clamp_min(0)
    table = torch.zeros_like(embeds)  # (batch, length, dim): item i's k-th context token at position k
    items, positions = context.nonzero(as_tuple=True)
    table[items, rank[items, positions]] = embeds[items, positions]
    row_context, row_rank = context[rows], rank[rows]
    donated = table[partner].gather(1, row_rank.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    available = row_rank < context.sum(1)[partner].unsqueeze(1)
    swapped = torch.where((row_context & available).unsqueeze(-1), donated, embeds[rows])
    return swapped, row_context & ~available
