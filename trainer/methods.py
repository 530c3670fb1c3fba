"""Debiasing methods, each one class registered by name (as PEFT registers its tuners): what the model's forward
builds in training and in evaluation, the model config it needs, its loss terms and its default selection metric.
[`CFMoETrainer`] reads nothing else of a method, so adding one is a class and its test:

    @register_method
    class MyMethod(DebiasingMethod):
        name = "my_method"

        def loss_terms(self, outputs, labels, groups, state):
            return LossTerms({"task": weighted_cross_entropy(outputs.fused_logits, labels)})

after which `--method my_method` (and `CFMoETrainingArguments(method="my_method")`) trains it. Notation of
docs/method.md: `Z(t, v)` the fused head, `Z(t, v*)` text-only, `Z(t*, v)` image-only, `Z(t*, v*)` the prior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cfmoe.modeling_cfmoe import CFMoEConfig, CounterfactualMode, CounterfactualType, InferenceMode
from cfmoe.modeling_cfmoe.counterfactual import CONTEXT_SWAPPED, CORE_MASKED

from .losses import (
    ConflictRule,
    bias_conflict_weights,
    counterfactual_contrast,
    group_dro_loss,
    kl_to_prior,
    modality_conflict_weights,
    product_of_experts,
    rubi_logits,
    weighted_cross_entropy,
)

if TYPE_CHECKING:
    from transformers import TrainerState

    from .training_args import CFMoETrainingArguments

# Label-free model selection (`metric_for_best_model` when it is not given): the worst of the validation groups that
# the bias branches infer
SELECTION_METRIC = "inferred_worst_group_accuracy"
METHOD_REGISTRY: dict[str, type[DebiasingMethod]] = {}


@dataclass
class LossTerms:
    """A method's objective on one training batch: `terms`, scalars summed into the loss in their order and logged
    as `loss_<name>`, and `logged`, scalars only logged (their means over each logging window)."""

    terms: dict[str, torch.Tensor]
    logged: dict[str, torch.Tensor] = field(default_factory=dict)


class DebiasingMethod:
    """A training objective of [`CFMoETrainer`], built once per trainer from its arguments (`self.args`).

    Class attributes: `name` (what `--method` takes), `selection_metric` (the default `metric_for_best_model`),
    `uses_group_labels` (the collator passes each item's `groups`), `model_config` (config values the method needs;
    the run scripts set them when they build the model, unless given on the command line).
    """

    name: ClassVar[str]
    selection_metric: ClassVar[str] = SELECTION_METRIC
    uses_group_labels: ClassVar[bool] = False
    model_config: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def __init__(self, args: CFMoETrainingArguments):
        self.args = args

    def check_config(self, config: CFMoEConfig) -> None:
        """Raise `ValueError` where the model config cannot serve this method."""

    def builds_counterfactual_rows(self, config: CFMoEConfig) -> bool:
        """Whether training builds fine-grained counterfactual rows (and so audits the context they remove)."""
        return False

    def counts_statistics(self, config: CFMoEConfig, state: TrainerState) -> bool:
        """Whether a training step counts its batch into the context statistics: when something reads them (the
        counterfactual rows, routers reading bias evidence), over the first pass through the training data only, so
        that every item is counted once (later epochs would count the same items again as if they were new)."""
        reads = self.builds_counterfactual_rows(config) or config.routes_by_evidence
        return reads and (state.epoch is None or state.epoch < 1)

    def bias_only_warmup_steps(self, state: TrainerState) -> int:
        """How many optimizer steps, from the first, train the bias branches only (`state.max_steps` known)."""
        return 0

    def in_bias_only_warmup(self, state: TrainerState, step: int | None = None) -> bool:
        """Whether optimizer step `step` (default: the current one) trains the bias branches only."""
        return (state.global_step if step is None else step) < self.bias_only_warmup_steps(state)

    def forward_mode(self, config: CFMoEConfig, training: bool, state: TrainerState) -> CounterfactualMode:
        """What the forward computes for this step, only what its loss or metrics read: by default the branches and
        effects (the bias-branch metrics of evaluation read them)."""
        return CounterfactualMode.EFFECTS

    def loss_terms(self, outputs, labels: torch.Tensor, groups: torch.Tensor | None, state: TrainerState) -> LossTerms:
        """The objective on a training batch from the model's `outputs` (`CFMoEOutput`), `labels` `(batch,)` and the
        items' `groups` `(batch,)` (None unless `uses_group_labels`)."""
        raise NotImplementedError

    def bias_terms(self, outputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`L_bias`: cross-entropy of the text-only, image-only and prior branches, each weighted `bias_loss_weight`."""
        weight = self.args.bias_loss_weight
        if weight == 0:
            return {}
        return {
            "bias_text": weight * weighted_cross_entropy(outputs.text_only_logits, labels),
            "bias_image": weight * weighted_cross_entropy(outputs.image_only_logits, labels),
            "bias_prior": weight * weighted_cross_entropy(outputs.prior_logits, labels),
        }

    @staticmethod
    def aux_term(outputs) -> dict[str, torch.Tensor]:
        """`L_aux`: the routers' load balancing, as the model weights it (`weighted_aux_loss`)."""
        return {} if outputs.weighted_aux_loss is None else {"aux": outputs.weighted_aux_loss}


def register_method(method: type[DebiasingMethod]) -> type[DebiasingMethod]:
    """Class decorator: `method` becomes the method of `--method <method.name>`. Raises `ValueError` when another
    class holds the name."""
    registered = METHOD_REGISTRY.get(method.name)
    if registered is not None and registered is not method:
        raise ValueError(f"method {method.name!r} is already registered ({registered.__qualname__})")
    METHOD_REGISTRY[method.name] = method
    return method


def get_method(name: str) -> type[DebiasingMethod]:
    """The method class registered as `name`."""
    if name not in METHOD_REGISTRY:
        raise ValueError(f"method must be one of {', '.join(METHOD_REGISTRY)}, got {name!r}")
    return METHOD_REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in the order of registration."""
    return tuple(METHOD_REGISTRY)


@register_method
class Vanilla(DebiasingMethod):
    """The plain task loss `CE(Z(t, v), y)`: the baseline; the forward computes the prediction only."""

    name = "vanilla"

    def forward_mode(self, config, training, state):
        return CounterfactualMode.PREDICTION if training else CounterfactualMode.EFFECTS

    def loss_terms(self, outputs, labels, groups, state):
        return LossTerms({"task": weighted_cross_entropy(outputs.fused_logits, labels)})


class BiasBranchMethod(DebiasingMethod):
    """A peer that trains the bias branches beside the fused head and combines them in its task loss:
    `CE(combine(Z(t, v), Z(t, v*), Z(t*, v)), y) + L_bias + L_aux`."""

    def combine(self, fused: torch.Tensor, text_only: torch.Tensor, image_only: torch.Tensor) -> torch.Tensor:
        """The logits `(batch, num_labels)` the task loss reads."""
        raise NotImplementedError

    def loss_terms(self, outputs, labels, groups, state):
        shared = {**self.bias_terms(outputs, labels), **self.aux_term(outputs)}
        combined = self.combine(outputs.fused_logits, outputs.text_only_logits, outputs.image_only_logits)
        return LossTerms({"task": weighted_cross_entropy(combined, labels), **shared})


@register_method
class TextPoE(BiasBranchMethod):
    """Product of experts with the text-only branch (stop-gradient)."""

    name = "text_poe"

    def combine(self, fused, text_only, image_only):
        return product_of_experts(fused, text_only)


@register_method
class ImagePoE(BiasBranchMethod):
    """Product of experts with the image-only branch (stop-gradient)."""

    name = "image_poe"

    def combine(self, fused, text_only, image_only):
        return product_of_experts(fused, image_only)


@register_method
class PoE(BiasBranchMethod):
    """Product of experts with both bias branches (stop-gradient)."""

    name = "poe"

    def combine(self, fused, text_only, image_only):
        return product_of_experts(fused, text_only, image_only)


@register_method
class RUBi(BiasBranchMethod):
    """RUBi: the fused logits masked by the sigmoid of the (stop-gradient) bias branches."""

    name = "rubi"

    def combine(self, fused, text_only, image_only):
        return rubi_logits(fused, text_only, image_only)


@register_method
class CFVQA(BiasBranchMethod):
    """CF-VQA: SUM fusion of the three branches trained jointly; it predicts with the total indirect effect
    (`inference_mode="tie"`)."""

    name = "cfvqa"
    model_config = MappingProxyType({"inference_mode": "tie"})

    def check_config(self, config):
        if config.inference_mode != InferenceMode.TIE:
            raise ValueError(
                "method cfvqa predicts with the total indirect effect: build the model with inference_mode='tie'"
            )

    def combine(self, fused, text_only, image_only):
        return fused + text_only + image_only


@register_method
class GroupDRO(DebiasingMethod):
    """Online group DRO (Sagawa et al. 2020) over the items' group labels: a reference, not a competitor. Holds the
    groups' exponentiated-gradient weights."""

    name = "group_dro"
    uses_group_labels = True

    def __init__(self, args):
        super().__init__(args)
        self.group_weights: torch.Tensor | None = None

    def loss_terms(self, outputs, labels, groups, state):
        if groups is None or (groups < 0).any():
            raise ValueError("method group_dro needs a `group` column (the collator's return_groups=True)")
        num_groups = int(groups.max()) + 1
        if self.group_weights is None or self.group_weights.numel() < num_groups:
            self.group_weights = torch.ones(max(num_groups, 1), device=outputs.fused_logits.device)
        task = group_dro_loss(outputs.fused_logits, labels, groups, self.group_weights, self.args.group_dro_step_size)
        return LossTerms({"task": task, **self.aux_term(outputs)})


@register_method
class CFMoE(DebiasingMethod):
    """The full method (docs/method.md, section 5). One forward gives the factual, text-only, image-only and prior
    branches and the fine-grained counterfactual rows, and

        L = L_cf_task     CE of the fused head on context-swapped rows (an item's core, another item's context) with
                          the item's label: the context no longer follows the label
          + L_task(w)     CE of the fused head on the factual rows (factual_task_weight, 0 by default), optionally
                          weighted w_i = prod_m (1 + upweight * [bias branch m wrong on i])
                          (`conflict_rule="combined"`: 1 + upweight where their summed prediction is wrong)
          + L_bias        CE of the text-only, image-only and prior branches
          + L_contrast    InfoNCE: factual ~ context-swapped, not ~ core-masked (with core-masked rows)
          + L_prior_kl    core-masked predictions -> prior
          + L_aux         router load balancing

    During the bias-only warm-up only L_bias and L_aux are on, while the context statistics gather the counts that
    pick each item's context. Selected on the validation macro-F1 of context-swapped rows, since that is what its
    fused head learns from (macro-F1: a checkpoint that predicts the majority class only cannot win).
    """

    name = "cfmoe"
    # macro-F1, not accuracy: on imbalanced labels (MVSA: 60-66% positive) accuracy selected the checkpoints that
    # predict the majority class only (macro-F1 0.266 on MVSA-Multiple, 2 of 3 seeds)
    selection_metric = "counterfactual_macro_f1"

    def check_config(self, config):
        args = self.args
        swapped = CounterfactualType.CONTEXT_SWAPPED in config.counterfactual_types
        cf_rows = config.counterfactual_fraction > 0 and swapped
        if not (args.factual_task_weight or (cf_rows and args.counterfactual_task_weight)):
            raise ValueError(
                "method cfmoe with factual_task_weight 0 trains the fused head on context-swapped rows only, but "
                "there are none (counterfactual_fraction 0, no context_swapped type or counterfactual_task_weight "
                "0): set --factual_task_weight 1 or --counterfactual_fraction > 0"
            )

    def builds_counterfactual_rows(self, config):
        return config.counterfactual_fraction > 0

    def bias_only_warmup_steps(self, state):
        """The first `debias_warmup_ratio` of training, by default the first pass over the training data or a quarter
        of training, whichever is shorter (none with `fused_warmup`)."""
        args = self.args
        if args.fused_warmup:
            return 0
        if args.debias_warmup_ratio is not None:
            warmup_steps = args.debias_warmup_ratio * state.max_steps
        else:
            warmup_steps = min(state.max_steps / max(state.num_train_epochs, 1), 0.25 * state.max_steps)
        return math.ceil(warmup_steps)  # step s is in the warm-up while s < warmup_steps

    def forward_mode(self, config, training, state):
        """Evaluation: the effects and the context-swapped rows (`counterfactual_accuracy`). Training: the bias-only
        warm-up's branches, with the image-core readings while the statistics count and test tokens against the
        image core; then the counterfactual rows, beside the factual rows only when the loss reads both (the factual
        task term, or the contrast of factual with counterfactual representations)."""
        builds_rows = self.builds_counterfactual_rows(config)
        if not training:
            return CounterfactualMode.FACTUAL_AND_COUNTERFACTUAL_ROWS if builds_rows else CounterfactualMode.EFFECTS
        if self.in_bias_only_warmup(state):
            reads_core = builds_rows and config.context_config.core_dependence_threshold is not None
            counting = self.counts_statistics(config, state)
            return CounterfactualMode.IMAGE_CORE if reads_core and counting else CounterfactualMode.EFFECTS
        contrast = self.args.contrast_loss_weight > 0 and CounterfactualType.CORE_MASKED in config.counterfactual_types
        if self.args.factual_task_weight > 0 or contrast:
            return CounterfactualMode.FACTUAL_AND_COUNTERFACTUAL_ROWS
        return CounterfactualMode.COUNTERFACTUAL_ROWS_ONLY

    def loss_terms(self, outputs, labels, groups, state):
        args = self.args
        objective = LossTerms({**self.bias_terms(outputs, labels), **self.aux_term(outputs)})
        if self.in_bias_only_warmup(state):
            return objective
        weights = None
        if args.upweight > 0:
            text, image = outputs.text_only_logits, outputs.image_only_logits
            if args.conflict_rule == ConflictRule.COMBINED:
                weights = bias_conflict_weights(text, image, labels, args.upweight)
            else:
                weights = modality_conflict_weights(text, image, labels, args.upweight, args.max_weight)
            objective.logged["upweighted_fraction"] = (weights > 1).float().mean().detach()
        if args.factual_task_weight > 0:
            task = weighted_cross_entropy(outputs.fused_logits, labels, weights)
            objective.terms["task"] = args.factual_task_weight * task
        if outputs.counterfactual_logits is not None:
            objective.terms.update(self._counterfactual_terms(outputs, labels, weights))
        return objective

    def _counterfactual_terms(self, outputs, labels, weights) -> dict[str, torch.Tensor]:
        """`L_cf_task`, `L_contrast` and `L_prior_kl` from the counterfactual rows."""
        args, terms = self.args, {}
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


METHODS = method_names()  # the built-in methods
