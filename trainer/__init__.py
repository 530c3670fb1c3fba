"""CF-MoE training: the counterfactual Trainer, data, collator, metrics and the tiny offline default."""

from .cfmoe_trainer import CFMoETrainer
from .collator import CFMoECollator
from .training_args import METHODS, CFMoETrainingArguments

__all__ = ["CFMoECollator", "CFMoETrainer", "CFMoETrainingArguments", "METHODS"]
