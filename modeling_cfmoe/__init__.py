"""CF-MoE model: counterfactual debiasing experts around a LLaVA-family base (shipped as remote code)."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .base_families import BASE_FAMILIES, SUPPORTED_BASE_MODEL_TYPES, BaseFamily, base_family
from .configuration_cfmoe import CFMoEConfig, ContextConfig, CounterfactualType, InferenceMode, Pooling, RouterInput
from .counterfactual import CausalEffects, CounterfactualMode, causal_effects, drop_image_tokens
from .counterfactual_rows import CounterfactualRowBuilder
from .modeling_body import CFMoEModel, CFMoEModelOutput
from .modeling_cfmoe import CFMoEForMultimodalClassification, CFMoEOutput
from .modeling_pretrained import CFMoEPreTrainedModel
from .moe import AttentionRouter, DebiasingMoE, ExpertBank, load_balancing_loss
from .pipeline_cfmoe import MultimodalDebiasedClassificationPipeline, save_pipeline

AutoConfig.register(CFMoEConfig.model_type, CFMoEConfig, exist_ok=True)
AutoModel.register(CFMoEConfig, CFMoEForMultimodalClassification, exist_ok=True)
AutoModelForSequenceClassification.register(CFMoEConfig, CFMoEForMultimodalClassification, exist_ok=True)

__all__ = [
    "AttentionRouter",
    "BASE_FAMILIES",
    "BaseFamily",
    "CFMoEConfig",
    "CFMoEForMultimodalClassification",
    "CFMoEModel",
    "CFMoEModelOutput",
    "CFMoEOutput",
    "CFMoEPreTrainedModel",
    "CausalEffects",
    "ContextConfig",
    "CounterfactualRowBuilder",
    "CounterfactualType",
    "InferenceMode",
    "Pooling",
    "RouterInput",
    "CounterfactualMode",
    "DebiasingMoE",
    "ExpertBank",
    "SUPPORTED_BASE_MODEL_TYPES",
    "base_family",
    "causal_effects",
    "drop_image_tokens",
    "load_balancing_loss",
    "MultimodalDebiasedClassificationPipeline",
    "save_pipeline",
]
