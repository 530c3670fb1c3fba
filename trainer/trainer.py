"""`CFMoETrainer`: a `Trainer` whose `compute_loss` is the counterfactual debiasing objective.

For the full method (`method="cfmoe"`), one forward gives the factual, text-only, image-only and prior
branches and the fine-grained counterfactual rows, and

    L = L_task(w)                  weighted CE of the fused head; w_i = 1 + upweight if the bias
                                   branches' combined prediction contradicts y_i (after the warm-up)
      + L_cf_task                  CE of context-swapped rows with their item's label (decorrelated cues)
      + L_bias                     CE of the text-only, image-only and prior branches
      + L_contrast                 InfoNCE: factual ~ context-swapped, not ~ core-masked
      + L_prior_kl                 core-masked predictions -> prior
      + L_aux                      router load balancing

each with its weight in [`CFMoETrainingArguments`], logged as `loss_<term>`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from modeling_cfmoe.counterfactual import CONTEXT_SWAPPED, CORE_MASKED
from modeling_cfmoe.moe import DebiasingMoE

from .losses import (
    bias_conflict_weights,
    counterfactual_contrast,
    kl_to_prior,
    product_of_experts,
    rubi_logits,
    weighted_cross_entropy,
)
from .training_args import CFMoETrainingArguments


class CFMoETrainer(Trainer):
    """`Trainer` for [`CFMoEForMultimodalClassification`] with the losses of the chosen `args.method`."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CFMoETrainingArguments):
            raise TypeError("CFMoETrainer needs CFMoETrainingArguments")
        self._configure_model()
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._micro_steps = 0
        self._group_weights: torch.Tensor | None = None

    def _configure_model(self) -> None:
        """Apply the argument overrides (counterfactuals, gates, inference mode) to the model config."""
        args, config = self.args, self.model.config
        if args.counterfactual_fraction is not None:
            config.counterfactual_fraction = args.counterfactual_fraction
        if args.counterfactual_types is not None:
            config.counterfactual_types = [t.strip() for t in args.counterfactual_types.split(",") if t.strip()]
        if args.context_fraction is not None:
            config.context_fraction = args.context_fraction
        if args.method == "cfvqa":
            config.inference_mode = "tie"
        for module in self.model.modules():
            if isinstance(module, DebiasingMoE):
                module.uniform_gates = args.uniform_gates

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, groups = inputs.pop("labels"), inputs.pop("groups", None)
        uses_branches = self.args.method != "vanilla" or not model.training
        outputs = model(**inputs, return_counterfactuals=uses_branches)
        terms = self._loss_terms(outputs, labels, groups) if model.training else self._eval_terms(outputs, labels)
        loss = sum(terms.values())
        if model.training:
            self._accumulate(terms, outputs, labels)
        if return_outputs:
            return loss, {
                "logits": outputs.logits,
                "text_only_logits": outputs.text_only_logits,
                "image_only_logits": outputs.image_only_logits,
            }
        return loss

    def _eval_terms(self, outputs, labels) -> dict[str, torch.Tensor]:
        return {"task": weighted_cross_entropy(outputs.logits, labels)}

    def _loss_terms(self, outputs, labels, groups) -> dict[str, torch.Tensor]:
        method = self.args.method
        fused, text, image = outputs.fused_logits, outputs.text_only_logits, outputs.image_only_logits
        if method == "vanilla":
            return {"task": weighted_cross_entropy(fused, labels)}
        if method == "group_dro":
            return {"task": self._group_dro_loss(fused, labels, groups), **self._aux(outputs)}
        bias_terms = self._bias_terms(outputs, labels)
        if method in ("text_poe", "image_poe", "poe"):
            branches = {"text_poe": (text,), "image_poe": (image,), "poe": (text, image)}[method]
            return {"task": weighted_cross_entropy(product_of_experts(fused, *branches), labels), **bias_terms}
        if method == "rubi":
            return {"task": weighted_cross_entropy(rubi_logits(fused, text, image), labels), **bias_terms}
        if method == "cfvqa":  # SUM fusion trained jointly; the TIE is used at test time
            return {"task": weighted_cross_entropy(fused + text + image, labels), **bias_terms}
        return self._cfmoe_terms(outputs, labels, bias_terms)

    def _cfmoe_terms(self, outputs, labels, bias_terms) -> dict[str, torch.Tensor]:
        args = self.args
        weights = None
        if args.upweight > 0 and self.state.global_step >= args.debias_warmup_ratio * self.state.max_steps:
            weights = bias_conflict_weights(outputs.text_only_logits, outputs.image_only_logits, labels, args.upweight)
        terms = {"task": weighted_cross_entropy(outputs.fused_logits, labels, weights), **bias_terms}
        if outputs.counterfactual_logits is not None:
            kind, source = outputs.counterfactual_kind, outputs.counterfactual_source
            swapped, masked = kind == CONTEXT_SWAPPED, kind == CORE_MASKED
            if args.counterfactual_task_weight > 0 and swapped.any():
                cf_weights = None if weights is None else weights[source[swapped]]
                terms["cf_task"] = args.counterfactual_task_weight * weighted_cross_entropy(
                    outputs.counterfactual_logits[swapped], labels[source[swapped]], cf_weights
                )
            if args.contrast_loss_weight > 0 and swapped.any() and masked.any():
                terms["contrast"] = args.contrast_loss_weight * counterfactual_contrast(
                    outputs.pooled[source[swapped]],
                    outputs.counterfactual_pooled[swapped],
                    outputs.counterfactual_pooled[masked],
                    args.contrast_temperature,
                )
            if args.prior_kl_weight > 0 and masked.any():
                terms["prior_kl"] = args.prior_kl_weight * kl_to_prior(
                    outputs.counterfactual_logits[masked], outputs.prior_logits[source[masked]]
                )
        terms.update(self._aux(outputs))
        if weights is not None:
            self._sums["upweighted_fraction"] += (weights > 1).float().mean().detach()
        return terms

    def _bias_terms(self, outputs, labels) -> dict[str, torch.Tensor]:
        weight = self.args.bias_loss_weight
        if weight == 0:
            return self._aux(outputs)
        return {
            "bias_text": weight * weighted_cross_entropy(outputs.text_only_logits, labels),
            "bias_image": weight * weighted_cross_entropy(outputs.image_only_logits, labels),
            "bias_prior": weight * weighted_cross_entropy(outputs.prior_logits, labels),
            **self._aux(outputs),
        }

    def _aux(self, outputs) -> dict[str, torch.Tensor]:
        if self.args.aux_loss_weight == 0 or outputs.aux_loss is None:
            return {}
        return {"aux": self.args.aux_loss_weight * outputs.aux_loss}

    def _group_dro_loss(self, logits, labels, groups) -> torch.Tensor:
        """Online group DRO (Sagawa et al. 2020): exponentiated-gradient weights over the groups' losses."""
        if groups is None or (groups < 0).any():
            raise ValueError("method group_dro needs a `group` column (the collator's return_groups=True)")
        losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        num_groups = int(groups.max()) + 1
        if self._group_weights is None or self._group_weights.numel() < num_groups:
            self._group_weights = torch.ones(max(num_groups, 1), device=logits.device)
        counts = torch.bincount(groups, minlength=self._group_weights.numel()).float()
        group_losses = torch.zeros_like(counts).index_add_(0, groups, losses) / counts.clamp_min(1)
        present = counts > 0
        with torch.no_grad():
            self._group_weights[present] *= torch.exp(self.args.group_dro_step_size * group_losses[present].detach())
            self._group_weights /= self._group_weights.sum()
        return (self._group_weights[present] * group_losses[present]).sum() / self._group_weights[present].sum()

    # ------------------------------------------------------------------------------------------ logging
    def _accumulate(self, terms: dict[str, torch.Tensor], outputs, labels) -> None:
        """Sum each term (detached, on device: no host sync per step) until the next logging step."""
        for name, value in terms.items():
            self._sums[f"loss_{name}"] += value.detach().float()
        for site, gates in zip(("visual", "text"), outputs.routing_gates or (), strict=False):
            for index, share in enumerate(gates.detach().float().mean(0)):
                self._sums[f"routing_{site}_expert_{index}"] += share
        self._micro_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._micro_steps and "loss" in logs:
            logs.update({name: round(float(total / self._micro_steps), 6) for name, total in self._sums.items()})
            self._sums.clear()
            self._micro_steps = 0
        super().log(logs, start_time)
