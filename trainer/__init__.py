"""CF-MoE training: the counterfactual Trainer, data, collator, metrics and the tiny offline default."""

from .collator import CFMoECollator
from .trainer import CFMoETrainer
from .training_args import METHODS, CFMoETrainingArguments

__all__ = ["CFMoECollator", "CFMoETrainer", "CFMoETrainingArguments", "METHODS"]
