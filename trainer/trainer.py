"""`CFMoETrainer`: a `Trainer` whose `compute_loss` is the counterfactual debiasing objective.

For the full method (`method="cfmoe"`), one forward gives the factual, text-only, image-only and prior
branches and the fine-grained counterfactual rows, and

    L = L_cf_task                  CE of the fused head on context-swapped rows (an item's core, another item's
                                   context) with the item's label: the context no longer follows the label
      + L_task(w)                  CE of the fused head on the factual rows (factual_task_weight, 0 by default),
                                   optionally weighted w_i = prod_m (1 + upweight * [bias branch m wrong on i])
                                   (`conflict_rule="combined"`: 1 + upweight where their summed prediction is wrong)
      + L_bias                     CE of the text-only, image-only and prior branches
      + L_contrast                 InfoNCE: factual ~ context-swapped, not ~ core-masked (with core-masked rows)
      + L_prior_kl                 core-masked predictions -> prior
      + L_aux                      router load balancing (the model's raw `aux_loss` x `config.router_aux_loss_coef`)

During the first `debias_warmup_ratio` of training only L_bias and L_aux are on, while the context statistics
(`model.update_context_statistics`, every training step) gather the counts that pick each item's context. Every
other term has its weight in [`CFMoETrainingArguments`]; each is logged as `loss_<term>`. Model knobs (experts,
counterfactual rows, inference mode) live in the model config, set when the model is built; the trainer reads them.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from modeling_cfmoe.counterfactual import CONTEXT_SWAPPED, CORE_MASKED, CounterfactualMode

from .audit import ContextAuditCallback
from .checkpointing import StagedCheckpointsMixin
from .losses import (
    bias_conflict_weights,
    counterfactual_contrast,
    kl_to_prior,
    modality_conflict_weights,
    product_of_experts,
    rubi_logits,
    weighted_cross_entropy,
)
from .nonfinite import NonFiniteGuardMixin
from .training_args import CFMoETrainingArguments

ROUTING_SITES = ("visual", "text", "counterfactual_text")  # logged as routing_<site>_expert_<i>


class CFMoETrainer(NonFiniteGuardMixin, StagedCheckpointsMixin, Trainer):
    """`Trainer` for [`CFMoEForMultimodalClassification`] with the losses of the chosen `args.method`."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CFMoETrainingArguments):
            raise TypeError("CFMoETrainer needs CFMoETrainingArguments")
        self._check_model_config()
        if self._builds_rows():  # what the rows treat as context: after the warm-up and at the end
            self.add_callback(ContextAuditCallback(self))
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._micro_steps = 0
        self._group_weights: torch.Tensor | None = None

    def _check_model_config(self) -> None:
        """The method's needs against the model config (model knobs live there, set when the model is built)."""
        args, config = self.args, self.model.config
        cf_rows = config.counterfactual_fraction > 0 and "context_swapped" in config.counterfactual_types
        if args.method == "cfmoe" and not (args.factual_task_weight or (cf_rows and args.counterfactual_task_weight)):
            raise ValueError(
                "method cfmoe with factual_task_weight 0 trains the fused head on context-swapped rows only, but "
                "there are none (counterfactual_fraction 0, no context_swapped type or counterfactual_task_weight "
                "0): set --factual_task_weight 1 or --counterfactual_fraction > 0"
            )
        if args.method == "cfvqa" and config.inference_mode != "tie":
            raise ValueError(
                "method cfvqa predicts with the total indirect effect: build the model with inference_mode='tie'"
            )

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, groups = inputs.pop("labels"), inputs.pop("groups", None)
        counting = model.training and self._counts_statistics()
        if counting:
            # the statistics that pick each item's context and route the experts: an explicit step before the forward
            self.accelerator.unwrap_model(model).update_context_statistics(
                inputs["input_ids"], labels, inputs.get("attention_mask"), inputs.get("pixel_values")
            )
        outputs = model(**inputs, counterfactuals=self._counterfactuals(model.training))
        if counting and outputs.image_core_features is not None:
            # what each item's image core says, against its tokens: it tells core tokens from shortcuts
            self.accelerator.unwrap_model(model).update_core_readings(
                inputs["input_ids"],
                labels,
                outputs.image_core_features,
                outputs.image_core_source,
                inputs.get("attention_mask"),
            )
        terms = self._loss_terms(outputs, labels, groups) if model.training else self._eval_terms(outputs, labels)
        loss = sum(terms.values())
        if model.training:
            self._accumulate(terms, outputs, labels)
            self._record_nonfinite(terms)
        if return_outputs:
            predictions = {
                "logits": outputs.logits,
                "text_only_logits": outputs.text_only_logits,
                "image_only_logits": outputs.image_only_logits,
            }
            if not model.training and outputs.counterfactual_logits is not None:
                predictions["counterfactual_logits"] = _swapped_by_item(outputs)
            return loss, predictions
        return loss

    def _builds_rows(self) -> bool:
        return self.args.method == "cfmoe" and self.model.config.counterfactual_fraction > 0

    def _counts_statistics(self) -> bool:
        """Whether this training step counts its batch into the context statistics: when something reads them
        (cfmoe's rows, routers reading bias evidence), over the first pass through the training data only, so that
        every item is counted once (later epochs would count the same items again as if they were new)."""
        reads = self._builds_rows() or self.model.config.routes_by_evidence
        return reads and (self.state.epoch is None or self.state.epoch < 1)

    def _counterfactuals(self, training: bool) -> CounterfactualMode | None:
        """What the forward computes (`CFMoEForMultimodalClassification.forward`): only what this step's loss reads.

        Evaluation: the effects (the bias-branch metrics read them), and for cfmoe the context-swapped rows
        (`counterfactual_accuracy`, its model-selection metric). Training: nothing extra for vanilla; the
        branches for the bias-aware peers; for cfmoe's bias-only warm-up the branches and the image-core readings
        (when the model tests tokens against the image core); then cfmoe's counterfactual rows, beside the factual
        rows only when the loss reads both (the factual task term, or the contrast of factual with counterfactual
        representations).
        """
        args, config = self.args, self.model.config
        if not training:  # cfmoe: the context-swapped rows too, for the counterfactual accuracy
            return (
                CounterfactualMode.FACTUAL_AND_COUNTERFACTUAL_ROWS
                if self._builds_rows()
                else CounterfactualMode.EFFECTS
            )
        if args.method == "vanilla":
            return None
        if args.method != "cfmoe":
            return CounterfactualMode.EFFECTS
        if self._bias_only_warmup():
            reads_core = self._builds_rows() and config.core_dependence_threshold is not None
            return (
                CounterfactualMode.IMAGE_CORE
                if reads_core and self._counts_statistics()
                else CounterfactualMode.EFFECTS
            )
        contrast = args.contrast_loss_weight > 0 and "core_masked" in self.model.config.counterfactual_types
        if args.factual_task_weight > 0 or contrast:
            return CounterfactualMode.FACTUAL_AND_COUNTERFACTUAL_ROWS
        return CounterfactualMode.COUNTERFACTUAL_ROWS_ONLY

    def _eval_terms(self, outputs, labels) -> dict[str, torch.Tensor]:
        return {"task": weighted_cross_entropy(outputs.logits, labels)}

    def _loss_terms(self, outputs, labels, groups) -> dict[str, torch.Tensor]:
        method = self.args.method
        fused, text, image = outputs.fused_logits, outputs.text_only_logits, outputs.image_only_logits
        if method == "vanilla":
            return {"task": weighted_cross_entropy(fused, labels)}
        if method == "group_dro":
            return {"task": self._group_dro_loss(fused, labels, groups), **self._aux(outputs)}
        terms = {**self._bias_terms(outputs, labels), **self._aux(outputs)}
        if method in ("text_poe", "image_poe", "poe"):
            branches = {"text_poe": (text,), "image_poe": (image,), "poe": (text, image)}[method]
            return {"task": weighted_cross_entropy(product_of_experts(fused, *branches), labels), **terms}
        if method == "rubi":
            return {"task": weighted_cross_entropy(rubi_logits(fused, text, image), labels), **terms}
        if method == "cfvqa":  # SUM fusion trained jointly; the TIE is used at test time
            return {"task": weighted_cross_entropy(fused + text + image, labels), **terms}
        return self._cfmoe_terms(outputs, labels, terms)

    def _bias_only_warmup(self, step: int | None = None) -> bool:
        """Whether optimizer step `step` (default: the current one) lies in cfmoe's bias-only warm-up, when only the
        bias branches learn (and the context statistics gather counts), not the fused head: the first
        `debias_warmup_ratio` of training, by default the first pass over the training data or a quarter of
        training, whichever is shorter."""
        args, state, step = self.args, self.state, self.state.global_step if step is None else step
        if args.debias_warmup_ratio is not None:
            warmup_steps = args.debias_warmup_ratio * state.max_steps
        else:
            warmup_steps = min(state.max_steps / max(state.num_train_epochs, 1), 0.25 * state.max_steps)
        return args.method == "cfmoe" and not args.fused_warmup and step < warmup_steps

    def _determine_best_metric(self, metrics, trial) -> bool:
        if self._bias_only_warmup(self.state.global_step - 1):  # every step so far was warm-up
            return False  # the fused head has not been trained: never the best model
        return super()._determine_best_metric(metrics, trial)

    def _cfmoe_terms(self, outputs, labels, shared_terms) -> dict[str, torch.Tensor]:
        args = self.args
        terms = dict(shared_terms)
        if self._bias_only_warmup():
            return terms
        weights = None
        if args.upweight > 0:
            text, image = outputs.text_only_logits, outputs.image_only_logits
            if args.conflict_rule == "combined":
                weights = bias_conflict_weights(text, image, labels, args.upweight)
            else:
                weights = modality_conflict_weights(text, image, labels, args.upweight, args.max_weight)
            self._sums["upweighted_fraction"] += (weights > 1).float().mean().detach()
        if args.factual_task_weight > 0:
            terms["task"] = args.factual_task_weight * weighted_cross_entropy(outputs.fused_logits, labels, weights)
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
        return terms

    def _bias_terms(self, outputs, labels) -> dict[str, torch.Tensor]:
        weight = self.args.bias_loss_weight
        if weight == 0:
            return {}
        return {
            "bias_text": weight * weighted_cross_entropy(outputs.text_only_logits, labels),
            "bias_image": weight * weighted_cross_entropy(outputs.image_only_logits, labels),
            "bias_prior": weight * weighted_cross_entropy(outputs.prior_logits, labels),
        }

    def _aux(self, outputs) -> dict[str, torch.Tensor]:
        return {} if outputs.weighted_aux_loss is None else {"aux": outputs.weighted_aux_loss}

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
        for site in ROUTING_SITES:
            gates = getattr(outputs, f"{site}_gates")
            if gates is not None:
                for index, share in enumerate(gates.detach().float().mean(0)):
                    self._sums[f"routing_{site}_expert_{index}"] += share
        self._micro_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._micro_steps and "loss" in logs:
            logs.update({name: round(float(total / self._micro_steps), 6) for name, total in self._sums.items()})
            self._sums.clear()
            self._micro_steps = 0
            if self._nonfinite_skipped:
                logs["nonfinite_skipped_steps"] = self._nonfinite_skipped
        super().log(logs, start_time)


def _swapped_by_item(outputs) -> torch.Tensor:
    """`(batch, num_labels)` the fused head's logits on each item's context-swapped row (NaN for items without one)."""
    swapped = outputs.counterfactual_kind == CONTEXT_SWAPPED
    logits = outputs.logits.new_full(outputs.logits.shape, float("nan"))
    logits[outputs.counterfactual_source[swapped]] = outputs.counterfactual_logits[swapped].to(logits.dtype)
    return logits
