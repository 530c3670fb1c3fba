"""CF-MoE training: the counterfactual Trainer, data, collator, metrics and the tiny offline default."""

from .quiet import drop_dependency_noise

drop_dependency_noise()  # before the imports below pull in transformers' Trainer, peft and bitsandbytes

from .cfmoe_trainer import CFMoETrainer  # noqa: E402
from .collator import CFMoECollator  # noqa: E402
from .training_args import METHODS, CFMoETrainingArguments  # noqa: E402

__all__ = ["CFMoECollator", "CFMoETrainer", "CFMoETrainingArguments", "METHODS"]
