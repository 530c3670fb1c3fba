"""`CFMoETrainer`: a `Trainer` whose `compute_loss` is the objective of a debiasing method (`cfmoe.trainer.methods`).

One training step: the batch is counted into the context statistics that pick each item's context (when the method
reads them), the model's forward computes what the method asks for (`DebiasingMethod.forward_mode`), the method
returns its loss terms (`DebiasingMethod.loss_terms`) and their sum is the loss; every term is logged as
`loss_<term>`, with the routing shares of each MoE site. Model knobs (experts, counterfactual rows, inference mode)
live in the model config, set when the model is built; the trainer and the method read them.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from cfmoe.modeling_cfmoe.counterfactual import CONTEXT_SWAPPED

from .audit import ContextAuditCallback
from .checkpointing import StagedCheckpointsMixin
from .losses import weighted_cross_entropy
from .methods import DebiasingMethod, LossTerms, get_method
from .nonfinite import NonFiniteGuardMixin
from .training_args import CFMoETrainingArguments

ROUTING_SITES = ("visual", "text", "counterfactual_text")  # logged as routing_<site>_expert_<i>


class CFMoETrainer(NonFiniteGuardMixin, StagedCheckpointsMixin, Trainer):
    """`Trainer` for [`CFMoEForMultimodalClassification`] with the objective of `args.method` (`self.method`)."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CFMoETrainingArguments):
            raise TypeError("CFMoETrainer needs CFMoETrainingArguments")
        self.method: DebiasingMethod = get_method(self.args.method)(self.args)
        self.method.check_config(self.model.config)
        if self.method.builds_counterfactual_rows(self.model.config):  # what the rows treat as context
            self.add_callback(ContextAuditCallback(self))
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._micro_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the sum of the method's loss terms; evaluation: the task loss of the prediction."""
        inputs = dict(inputs)
        labels, groups = inputs.pop("labels"), inputs.pop("groups", None)
        config = self.model.config
        counting = model.training and self.method.counts_statistics(config, self.state)
        if counting:  # the statistics that pick each item's context and route the experts, before the forward
            self.accelerator.unwrap_model(model).rows.update(
                inputs["input_ids"], labels, inputs.get("attention_mask"), inputs.get("pixel_values")
            )
        outputs = model(**inputs, counterfactuals=self.method.forward_mode(config, model.training, self.state))
        if counting and outputs.image_core_features is not None:
            # what each item's image core says, against its tokens: it tells core tokens from shortcuts
            self.accelerator.unwrap_model(model).rows.update_core_readings(
                inputs["input_ids"],
                labels,
                outputs.image_core_features,
                outputs.image_core_source,
                inputs.get("attention_mask"),
            )
        if model.training:
            objective = self.method.loss_terms(outputs, labels, groups, self.state)
            self._accumulate(objective, outputs)
            self._record_nonfinite(objective.terms)
        else:
            objective = LossTerms({"task": weighted_cross_entropy(outputs.logits, labels)})
        loss = sum(objective.terms.values())
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

    def _determine_best_metric(self, metrics, trial) -> bool:
        if self.method.in_bias_only_warmup(self.state, self.state.global_step - 1):  # every step so far was warm-up
            return False  # the fused head has not been trained: never the best model
        return super()._determine_best_metric(metrics, trial)

    # ------------------------------------------------------------------------------------------ logging
    def _accumulate(self, objective: LossTerms, outputs) -> None:
        """Sum each term and logged value (detached, on device: no host sync per step) until the next logging step."""
        for name, value in objective.logged.items():
            self._sums[name] += value
        for name, value in objective.terms.items():
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
