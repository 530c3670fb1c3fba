"""The loss terms of docs/method.md (section 5) and of the peer methods, each a small function of the model's outputs.

Shapes: logits `(batch, num_labels)`, labels `(batch,)`, representations `(rows, hidden)`.
Every term is a mean over the items of the micro-batch, so gradient accumulation over equal micro-batches
gives the same value as one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfmoe.modeling_cfmoe.configuration_cfmoe import Choice


class ConflictRule(Choice):
    """Which items `upweight` weights up: each bias branch's errors (weights multiply), or the summed prediction's."""

    PER_MODALITY = "per_modality"
    COMBINED = "combined"


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
    """`mean_i w_i * CE(logits_i, y_i)` (plain mean CE when `weights` is None)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    return losses.mean() if weights is None else (weights * losses).mean()


def product_of_experts(fused: torch.Tensor, *bias_logits: torch.Tensor) -> torch.Tensor:
    """Combined log-probabilities `log p_fused + sum_b log p_b` with the bias branches stop-gradient."""
    combined = F.log_softmax(fused.float(), dim=-1)
    for logits in bias_logits:
        combined = combined + F.log_softmax(logits.detach().float(), dim=-1)
    return combined


def rubi_logits(fused: torch.Tensor, *bias_logits: torch.Tensor) -> torch.Tensor:
    """RUBi: the fused logits masked by the sigmoid of the (stop-gradient) bias branches' logits."""
    mask = torch.sigmoid(sum(b.detach().float() for b in bias_logits))
    return fused.float() * mask


def bias_conflict_weights(
    text_logits: torch.Tensor, image_logits: torch.Tensor, labels: torch.Tensor, upweight: float
) -> torch.Tensor:
    """`1 + upweight` for items whose combined unimodal prediction (sum of the two log-softmaxes) contradicts
    the label, 1 otherwise: the items the direct effects cannot explain (JTT-style, no group labels)."""
    combined = F.log_softmax(text_logits.detach().float(), -1) + F.log_softmax(image_logits.detach().float(), -1)
    wrong = combined.argmax(-1) != labels
    return 1.0 + upweight * wrong.float()


def modality_conflict_weights(
    text_logits: torch.Tensor, image_logits: torch.Tensor, labels: torch.Tensor, upweight: float, max_weight: float
) -> torch.Tensor:
    """`prod_m (1 + upweight * [branch m wrong])`, capped at `max_weight`: each modality's direct effect is
    decorrelated from the label on its own (with a cue that agrees with the label a fraction `r` of the time,
    `upweight = r / (1 - r) - 1` makes it uninformative under the weights)."""
    weights = torch.ones_like(labels, dtype=torch.float)
    for logits in (text_logits, image_logits):
        weights = weights * (1.0 + upweight * (logits.detach().argmax(-1) != labels).float())
    return weights.clamp_max(max_weight)


def counterfactual_contrast(
    factual: torch.Tensor, context_swapped: torch.Tensor, core_masked: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE per item: the factual representation should be closer (cosine) to its context-swapped
    counterfactual (positive) than to its core-masked one (negative). All inputs `(rows, hidden)`, aligned."""
    factual, positive, negative = (F.normalize(x.float(), dim=-1) for x in (factual, context_swapped, core_masked))
    scores = torch.stack([(factual * positive).sum(-1), (factual * negative).sum(-1)], dim=-1) / temperature
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def kl_to_prior(core_masked_logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """`KL(p_prior || p_core_masked)`: with its core removed, an item should carry no more than the prior."""
    target = F.log_softmax(prior_logits.detach().float(), dim=-1)
    return F.kl_div(F.log_softmax(core_masked_logits.float(), dim=-1), target, log_target=True, reduction="batchmean")


def group_dro_loss(
    logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, group_weights: torch.Tensor, step_size: float
) -> torch.Tensor:
    """Online group DRO (Sagawa et al. 2020): the mean losses of the groups present in the batch (`groups` `(batch,)`
    ids below `group_weights.numel()`), weighted by exponentiated-gradient weights `group_weights` `(num_groups,)`,
    which are updated in place (each present group's times `exp(step_size * its loss)`, renormalised)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    counts = torch.bincount(groups, minlength=group_weights.numel()).float()
    group_losses = torch.zeros_like(counts).index_add_(0, groups, losses) / counts.clamp_min(1)
    present = counts > 0
    with torch.no_grad():
        group_weights[present] *= torch.exp(step_size * group_losses[present].detach())
        group_weights /= group_weights.sum()
    return (group_weights[present] * group_losses[present]).sum() / group_weights[present].sum()
