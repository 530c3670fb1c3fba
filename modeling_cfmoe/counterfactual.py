"""Counterfactual states and rows: text-only sequences, core/context splits, causal effects.

Notation (docs/method.md): `Z(t, v)` factual logits, `Z(t, v*)` text-only, `Z(t*, v)` image-only,
`Z(t*, v*)` the learned prior. All helpers are vectorised over rows: no Python loop over items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONTEXT_SWAPPED, CORE_MASKED = 0, 1
COUNTERFACTUAL_KINDS = {"context_swapped": CONTEXT_SWAPPED, "core_masked": CORE_MASKED}


@dataclass
class BiasBranches:
    """The counterfactual branches, each `(batch, num_labels)`: text-only `Z(t, v*)`, image-only `Z(t*, v)` and the
    learned prior `Z(t*, v*)` (broadcast)."""

    text_only: torch.Tensor
    image_only: torch.Tensor
    prior: torch.Tensor


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
    """Effects in logit space, each `(batch, num_labels)`; `TE = NDE_T + NDE_V + TIE` by construction."""

    total_effect: torch.Tensor
    direct_effect_text: torch.Tensor
    direct_effect_image: torch.Tensor
    indirect_effect: torch.Tensor


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
