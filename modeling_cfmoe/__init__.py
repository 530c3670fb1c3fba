"""CF-MoE model: counterfactual debiasing experts around a LLaVA-family base (shipped as remote code)."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_cfmoe import SUPPORTED_BASE_MODEL_TYPES, CFMoEConfig
from .counterfactual import CausalEffects, causal_effects, drop_image_tokens
from .modeling_cfmoe import CFMoEForMultimodalClassification, CFMoEOutput, CFMoEPreTrainedModel
from .moe import AttentionRouter, DebiasingMoE, ExpertBank, load_balancing_loss
from .pipeline_cfmoe import MultimodalDebiasedClassificationPipeline, save_pipeline

AutoConfig.register(CFMoEConfig.model_type, CFMoEConfig, exist_ok=True)
AutoModel.register(CFMoEConfig, CFMoEForMultimodalClassification, exist_ok=True)
AutoModelForSequenceClassification.register(CFMoEConfig, CFMoEForMultimodalClassification, exist_ok=True)

__all__ = [
    "AttentionRouter",
    "CFMoEConfig",
    "CFMoEForMultimodalClassification",
    "CFMoEOutput",
    "CFMoEPreTrainedModel",
    "CausalEffects",
    "DebiasingMoE",
    "ExpertBank",
    "SUPPORTED_BASE_MODEL_TYPES",
    "causal_effects",
    "drop_image_tokens",
    "load_balancing_loss",
    "MultimodalDebiasedClassificationPipeline",
    "save_pipeline",
]
