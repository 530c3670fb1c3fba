"""Each loss term's behaviour on tiny hand-made cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfmoe.trainer.losses import (
    bias_conflict_weights,
    counterfactual_contrast,
    kl_to_prior,
    product_of_experts,
    rubi_logits,
    weighted_cross_entropy,
)


def test_weighted_cross_entropy_scales_items():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    plain = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(weighted_cross_entropy(logits, labels), plain.mean())
    weighted = weighted_cross_entropy(logits, labels, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted, (plain[0] + 3 * plain[1]) / 2)


def test_product_of_experts_adds_log_probs_and_stops_bias_gradient():
    fused = torch.randn(3, 2, requires_grad=True)
    bias = torch.randn(3, 2, requires_grad=True)
    combined = product_of_experts(fused, bias)
    torch.testing.assert_close(combined, F.log_softmax(fused, -1) + F.log_softmax(bias, -1))
    F.cross_entropy(combined, torch.tensor([0, 1, 0])).backward()
    assert bias.grad is None and fused.grad.abs().sum() > 0


def test_poe_lowers_the_fused_loss_need_on_items_the_bias_explains():
    """Where the bias branch already predicts the label, the combined loss is small even for a neutral fused head."""
    fused = torch.zeros(1, 2)
    labels = torch.tensor([0])
    confident_bias = torch.tensor([[5.0, -5.0]])
    assert weighted_cross_entropy(product_of_experts(fused, confident_bias), labels) < weighted_cross_entropy(
        fused, labels
    )


def test_rubi_masks_fused_logits_with_bias_sigmoid():
    fused, bias = torch.tensor([[4.0, -4.0]]), torch.tensor([[0.0, 100.0]])
    torch.testing.assert_close(rubi_logits(fused, bias), torch.tensor([[2.0, -4.0]]))


def test_bias_conflict_weights_mark_items_the_branches_get_wrong():
    text = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    image = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    # item 0: both right; item 1: text outweighs image -> predicts 0, wrong; item 2: both wrong
    torch.testing.assert_close(
        bias_conflict_weights(text, image, labels, upweight=20.0), torch.tensor([1.0, 21.0, 21.0])
    )


def test_contrast_falls_when_factual_equals_context_swapped():
    torch.manual_seed(0)
    factual, swapped, masked = torch.randn(3, 4, 16).unbind(0)
    before = counterfactual_contrast(factual, swapped, masked, temperature=0.1)
    after = counterfactual_contrast(factual, factual.clone(), masked, temperature=0.1)
    assert after < before
    worst = counterfactual_contrast(factual, masked, factual.clone(), temperature=0.1)
    assert worst > before


def test_kl_to_prior_is_zero_at_the_prior_and_positive_elsewhere():
    prior = torch.tensor([[0.3, -0.2]]).expand(4, 2)
    assert kl_to_prior(prior.clone(), prior).abs() < 1e-6
    assert kl_to_prior(torch.tensor([[5.0, -5.0]]).expand(4, 2), prior) > 0.5
