"""`CFMoETrainingArguments`: `TrainingArguments` plus the knobs of the debiasing method."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .errors import require
from .losses import ConflictRule
from .methods import METHODS, get_method, method_names
from .nonfinite import NanPolicy


@dataclass
class CFMoETrainingArguments(TrainingArguments):
    """Method and loss weights. A weight of 0 switches its term off (ablations); every term that is on is
    logged by name (`loss_<term>`) at each logging step.

    Methods (`cfmoe.trainer.methods`, any registered one): `vanilla` (plain task loss), `text_poe` / `image_poe` / `poe`
    (product of experts with the text-only / image-only / both bias branches, stop-gradient), `rubi` (RUBi's sigmoid
    mask), `cfvqa` (branches trained jointly, TIE at test time), `group_dro` (uses group labels: a reference, not a
    competitor), `cfmoe` (the full method).
    """

    method: str = field(default="cfmoe", metadata={"help": f"training method, one of {', '.join(METHODS)}"})
    bias_loss_weight: float = field(default=1.0, metadata={"help": "CE of the text-only / image-only / prior branches"})
    factual_task_weight: float = field(
        default=0.0,
        metadata={
            "help": "CE of the fused head on the factual rows (cfmoe); 0: the fused head learns from the "
            "context-swapped counterfactual rows only, where the context no longer follows the label"
        },
    )
    upweight: float = field(
        default=0.0, metadata={"help": "extra task-loss weight of items the bias branches get wrong (cfmoe)"}
    )
    conflict_rule: ConflictRule = field(
        default=ConflictRule.PER_MODALITY,
        metadata={
            "help": "which items are upweighted: per_modality (each branch's errors, weights multiply) or "
            "combined (the summed text+image prediction is wrong)"
        },
    )
    max_weight: float = field(default=100.0, metadata={"help": "cap of a per_modality item weight"})
    debias_warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "fraction of training in which only the bias branches learn and the context statistics count "
            "(cfmoe): the fused head's terms, and the counterfactual rows they read, start after it (default: the "
            "first pass over the training data, at most a quarter of training)"
        },
    )
    fused_warmup: bool = field(
        default=False, metadata={"help": "train the fused head during the warm-up (False: bias branches only)"}
    )
    counterfactual_task_weight: float = field(
        default=1.0, metadata={"help": "CE of the fused head on context-swapped rows, with their item's label"}
    )
    contrast_loss_weight: float = field(default=0.1, metadata={"help": "counterfactual InfoNCE (cfmoe)"})
    contrast_temperature: float = field(default=0.1, metadata={"help": "temperature of the InfoNCE"})
    prior_kl_weight: float = field(default=0.1, metadata={"help": "KL of core-masked predictions to the prior"})
    group_dro_step_size: float = field(default=0.01, metadata={"help": "exponentiated-gradient step of group DRO"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "kept False: the collator turns raw columns into model inputs"}
    )
    nan_policy: NanPolicy = field(
        default=NanPolicy.RAISE,
        metadata={
            "help": "a NaN/inf loss term in training: raise (stop before the update, naming the term), skip (drop "
            "that optimizer step's update, log and count it) or ignore (no check; saves one host sync per step)"
        },
    )

    def __post_init__(self):
        self._check_arguments()  # before the base class sets up devices: a bad value fails at once
        self._check_launch()
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = get_method(self.method).selection_metric
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # torch warns at every DataLoader that there is nothing to pin to
        super().__post_init__()

    def _check_launch(self) -> None:
        """A launcher that started several processes (`WORLD_SIZE`) needs a distributed run: without an accelerator
        that is DDP over gloo, which `use_cpu` asks for. Otherwise every process would train alone as process 0, all
        of them writing one output folder."""
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and not self.use_cpu and not torch.accelerator.is_available():
            raise ValueError(
                f"the launcher started {processes} processes (WORLD_SIZE={processes}), but without a GPU they do not "
                "form one distributed run: pass --use_cpu True (DDP over gloo on the CPUs), or launch one process"
            )

    def _check_arguments(self) -> None:
        """The method's arguments, and the numeric ones that `TrainingArguments` leaves unchecked."""
        require(self.method in method_names(), "method", f"one of {', '.join(method_names())}", self.method)
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must stay False: the collator needs the raw image/text columns")
        for name, kind in (("nan_policy", NanPolicy), ("conflict_rule", ConflictRule)):
            values, value = kind.values(), getattr(self, name)
            require(value in values, name, f"{', '.join(values[:-1])} or {values[-1]}", value)
            setattr(self, name, kind(value))
        for name in ("learning_rate", "contrast_temperature"):
            require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        if self.eval_accumulation_steps is not None:
            require(self.eval_accumulation_steps >= 1, "eval_accumulation_steps", ">= 1", self.eval_accumulation_steps)
        require(self.num_train_epochs >= 0, "num_train_epochs", ">= 0", self.num_train_epochs)
        if self.max_steps <= 0:  # the epochs decide how long training runs
            require(self.num_train_epochs > 0, "num_train_epochs", "> 0 (or give --max_steps)", self.num_train_epochs)
        for name in (
            "bias_loss_weight",
            "factual_task_weight",
            "counterfactual_task_weight",
            "contrast_loss_weight",
            "prior_kl_weight",
            "upweight",
            "group_dro_step_size",
            "weight_decay",
            "max_grad_norm",
            "adam_epsilon",
            "dataloader_num_workers",
        ):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require(self.max_weight >= 1, "max_weight", ">= 1 (item weights start at 1)", self.max_weight)
        for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)", getattr(self, name))
        if self.debias_warmup_ratio is not None:
            require(0 <= self.debias_warmup_ratio <= 1, "debias_warmup_ratio", "in [0, 1]", self.debias_warmup_ratio)
