"""`CFMoETrainingArguments`: `TrainingArguments` plus the knobs of the debiasing method."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

METHODS = ("vanilla", "text_poe", "image_poe", "poe", "rubi", "cfvqa", "group_dro", "cfmoe")


@dataclass
class CFMoETrainingArguments(TrainingArguments):
    """Method and loss weights. A weight of 0 switches its term off (ablations); every term that is on is
    logged by name (`loss_<term>`) at each logging step.

    Methods: `vanilla` (plain task loss), `text_poe` / `image_poe` / `poe` (product of experts with the
    text-only / image-only / both bias branches, stop-gradient), `rubi` (RUBi's sigmoid mask), `cfvqa`
    (branches trained jointly, TIE at test time), `group_dro` (uses group labels: a reference, not a
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
    conflict_rule: str = field(
        default="per_modality",
        metadata={
            "help": "which items are upweighted: per_modality (each branch's errors, weights multiply) or "
            "combined (the summed text+image prediction is wrong)"
        },
    )
    max_weight: float = field(default=100.0, metadata={"help": "cap of a per_modality item weight"})
    debias_warmup_ratio: float = field(
        default=0.25,
        metadata={
            "help": "fraction of training in which only the bias branches learn (cfmoe): the fused head's terms, "
            "and the counterfactual rows they read, start after it"
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
    nan_policy: str = field(
        default="raise",
        metadata={
            "help": "a NaN/inf loss term in training: raise (stop before the update, naming the term), skip (drop "
            "that optimizer step's update, log and count it) or ignore (no check; saves one host sync per step)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must stay False: the collator needs the raw image/text columns")
        if self.nan_policy not in ("raise", "skip", "ignore"):
            raise ValueError(f"nan_policy must be raise, skip or ignore, got {self.nan_policy!r}")
        if self.conflict_rule not in ("per_modality", "combined"):
            raise ValueError(f"conflict_rule must be per_modality or combined, got {self.conflict_rule!r}")
        if not 0.0 <= self.debias_warmup_ratio <= 1.0:
            raise ValueError(f"debias_warmup_ratio must be in [0, 1], got {self.debias_warmup_ratio}")
