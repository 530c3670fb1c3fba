"""Configuration of the CF-MoE debiasing wrapper around a LLaVA-family base model."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_BASE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


class CFMoEConfig(PretrainedConfig):
    r"""
    Configuration of [`CFMoEForMultimodalClassification`].

    Args:
        base_config (`dict` or `PretrainedConfig`):
            Config of the wrapped image-text-to-text model (one of `SUPPORTED_BASE_MODEL_TYPES`).
        num_visual_experts / num_text_experts (`int`):
            Experts of the visual debiasing MoE (after the projector) and of the language debiasing MoE
            (after the language model). 1 (the default) makes each site one residual bottleneck MLP: on the
            planted-cue benchmark, several routed experts did no better (docs/results.md, routing).
        experts_top_k (`int`): experts kept per item by the router (gates renormalised over them).
        router_input (`str`): what the routers read: "bias" (the default: each item's bias evidence, how strongly
            its text, its local pixels and its overall colour carry a shortcut according to the context statistics,
            whichever class it points at) or "content" (the pooled multimodal item state, which also carries the
            cue's value).
        uniform_gates (`bool`): every expert weighted 1/num_experts whatever the router says (an ablation).
        expert_intermediate_size (`int`, *optional*): bottleneck width of each expert; default hidden // 4.
        router_jitter (`float`): multiplicative noise on the router input while training.
        router_temperature (`float`): softmax temperature of the attention router.
        router_aux_loss_coef (`float`): weight of the model's (unweighted) `aux_loss`, the load balance, in the
            training loss.
        pooling (`str`): "mean" over attended tokens or "last" attended token.
        classifier_dropout (`float`): dropout before the heads.
        counterfactual_fraction (`float`): fraction of the items that get fine-grained counterfactual rows
            when counterfactuals are asked for in training.
        counterfactual_types (`list[str]`): any of "context_swapped" (the item's context replaced by
            another item's, its core kept) and "core_masked" (its core removed, its context kept).
        counterfactual_modalities (`list[str]`): which modalities the counterfactual rows edit ("text", "image").
        text_context_threshold (`float`): a token is text *context* when, alone, it moves the log-odds between two
            classes by at least this much (label statistics of the training items that hold it, against the class
            prior); a row without such a token has no text context. 2.0: the token alone multiplies the odds by 7.4.
        image_context_threshold (`float`): image *context* is the image's mean colour plus the pixels whose
            local linear discriminant scores (label statistics of 3x3 pixel neighbourhoods) reach this fraction of
            the batch's strongest pixel.
        detach_bias_branches (`bool`): the text-only and image-only heads read stop-gradient states (the
            text-only language-model pass runs without gradient): they measure what one modality alone predicts
            without shaping the shared base. True by default: on the planted-cue benchmark (pretrained, 3 seeds) it
            raised robust accuracy by 0.05-0.09 in every cue setting and saves the text-only backward.
        inference_mode (`str`): "fused" (one pass, the default) or "tie" (subtract the direct effects).
        prompt_template (`str`): how an item becomes a prompt, with `{image}` (the processor's image token)
            and `{text}`; stored so that Hub inference builds the prompts training saw.
    """

    model_type = "cfmoe"
    sub_configs = {"base_config": AutoConfig}
    keys_to_ignore_at_inference = [
        "visual_gates",
        "visual_router_logits",
        "text_gates",
        "text_router_logits",
        "counterfactual_text_gates",
        "aux_loss",
        "pooled",
        "counterfactual_pooled",
    ]

    def __init__(
        self,
        base_config: dict[str, Any] | PretrainedConfig | None = None,
        num_visual_experts: int = 1,
        num_text_experts: int = 1,
        experts_top_k: int = 1,
        router_input: str = "bias",
        uniform_gates: bool = False,
        expert_intermediate_size: int | None = None,
        router_jitter: float = 0.01,
        router_temperature: float = 1.0,
        router_aux_loss_coef: float = 0.01,
        pooling: str = "mean",
        classifier_dropout: float = 0.0,
        counterfactual_fraction: float = 1.0,
        counterfactual_types: list[str] | None = None,
        counterfactual_modalities: list[str] | None = None,
        text_context_threshold: float = 2.0,
        image_context_threshold: float = 0.5,
        detach_bias_branches: bool = True,
        inference_mode: str = "fused",
        prompt_template: str = "{image}\n{text}",
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_type = base_config.get("model_type")
            if base_type not in SUPPORTED_BASE_MODEL_TYPES:
                raise ValueError(_unsupported(base_type))
            base_config = AutoConfig.for_model(**base_config)
        elif base_config is not None and base_config.model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(_unsupported(base_config.model_type))
        self.base_config = base_config
        self.num_visual_experts = num_visual_experts
        self.num_text_experts = num_text_experts
        self.experts_top_k = experts_top_k
        self.router_input = router_input
        self.uniform_gates = uniform_gates
        self.expert_intermediate_size = expert_intermediate_size
        self.router_jitter = router_jitter
        self.router_temperature = router_temperature
        self.router_aux_loss_coef = router_aux_loss_coef
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.counterfactual_fraction = counterfactual_fraction
        self.counterfactual_types = list(counterfactual_types or ["context_swapped"])
        self.counterfactual_modalities = list(counterfactual_modalities or ["text", "image"])
        self.text_context_threshold = text_context_threshold
        self.image_context_threshold = image_context_threshold
        self.detach_bias_branches = detach_bias_branches
        self.inference_mode = inference_mode
        self.prompt_template = prompt_template
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in ("num_visual_experts", "num_text_experts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.experts_top_k <= min(self.num_visual_experts, self.num_text_experts):
            raise ValueError(
                f"experts_top_k={self.experts_top_k} must lie in [1, min(num_visual_experts, num_text_experts)]"
            )
        if self.router_input not in ("bias", "content"):
            raise ValueError(f"router_input must be 'bias' or 'content', got {self.router_input!r}")
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        if self.inference_mode not in ("fused", "tie"):
            raise ValueError(f"inference_mode must be 'fused' or 'tie', got {self.inference_mode!r}")
        unknown = set(self.counterfactual_types) - {"context_swapped", "core_masked"}
        if unknown:
            raise ValueError(f"unknown counterfactual_types {sorted(unknown)}; use context_swapped, core_masked")
        if "{text}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{text}}', got {self.prompt_template!r}")
        if not set(self.counterfactual_modalities) <= {"text", "image"}:
            raise ValueError(
                f"counterfactual_modalities must be a subset of text, image: {self.counterfactual_modalities}"
            )
        if not 0.0 <= self.counterfactual_fraction <= 1.0:
            raise ValueError(f"counterfactual_fraction must be in [0, 1], got {self.counterfactual_fraction}")
        if not (self.text_context_threshold > 0 and 0.0 < self.image_context_threshold <= 1.0):
            raise ValueError(
                "text_context_threshold must be > 0 and image_context_threshold in (0, 1], got "
                f"{self.text_context_threshold} and {self.image_context_threshold}"
            )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The base's text config: what `resize_token_embeddings` and generic code update and read (vocab size)."""
        if self.base_config is None:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def routes_by_evidence(self) -> bool:
        """Whether a router reads the bias evidence: the bias router, several experts at a site, gates not
        uniform."""
        several = max(self.num_visual_experts, self.num_text_experts) > 1
        return self.router_input == "bias" and several and not self.uniform_gates

    @property
    def hidden_size(self) -> int:
        """Width of the language model, shared by projector output, experts and heads."""
        return self.base_config.text_config.hidden_size

    @property
    def expert_size(self) -> int:
        return self.expert_intermediate_size or max(1, self.hidden_size // 4)


def _unsupported(model_type: str | None) -> str:
    return (
        f"base model type {model_type!r} is not supported; supported base model types are "
        f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
    )


CFMoEConfig.register_for_auto_class()
