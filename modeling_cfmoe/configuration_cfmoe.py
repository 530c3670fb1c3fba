"""Configuration of the CF-MoE debiasing wrapper around a LLaVA-family base model."""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .base_families import base_family
from .context import DECLARED_CONTEXT_PATTERNS

# the values a string setting takes
CHOICES = {
    "router_input": ("bias", "content"),
    "pooling": ("mean", "last"),
    "inference_mode": ("fused", "tie"),
    "context_without_core_evidence": ("leak_forms", "strength"),
}


class CFMoEConfig(PretrainedConfig):
    r"""
    Configuration of [`CFMoEForMultimodalClassification`].

    Args:
        base_config (`dict` or `PretrainedConfig`):
            Config of the wrapped image-text-to-text model (one of `base_families.SUPPORTED_BASE_MODEL_TYPES`).
        num_visual_experts / num_text_experts (`int`):
            Experts of the visual debiasing MoE (after the projector) and of the language debiasing MoE
            (after the language model). 1 (the default) makes each site one residual bottleneck MLP; with more, a
            router picks `experts_top_k` of them per item.
        experts_top_k (`int`): experts kept per item by the router (gates renormalised over them).
        router_input (`str`): what the routers read: "bias" (the default: each item's bias evidence, how strongly
            its text, its local pixels and its overall colour carry a shortcut according to the context statistics,
            whichever class it points at) or "content" (the pooled multimodal item state, which also carries the
            cue's value).
        uniform_gates (`bool`): every expert weighted 1/num_experts whatever the router says (an ablation).
        expert_intermediate_size (`int`, *optional*): bottleneck width of each expert; default hidden // 4.
        router_jitter (`float`): multiplicative noise on the router input while training.
        router_temperature (`float`): softmax temperature of the attention router.
        router_aux_loss_coef (`float`): weight of the (unweighted) `aux_loss`, the load balance, in the model's
            `loss` and in the training objective.
        pooling (`str`): "mean" over attended tokens or "last" attended token.
        classifier_dropout (`float`): dropout before the heads.
        counterfactual_fraction (`float`): fraction of the items that get fine-grained counterfactual rows
            when counterfactuals are asked for in training.
        counterfactual_types (`list[str]`): any of "context_swapped" (the item's context replaced by
            another item's, its core kept) and "core_masked" (its core removed, its context kept).
        counterfactual_modalities (`list[str]`): which modalities the counterfactual rows edit ("text", "image").
        text_context_threshold (`float`): a token is text *context* when its training items lean toward one class at
            least this far of the way from the class prior to certainty (`ContextStatistics.token_determination`,
            in [0, 1]; 0.7: for two balanced classes, 85% of its items in one class; for three, 80%) and it is
            blind to the image core (below); a row without such a token has no text context. Its whole word is
            context.
        context_support (`float`): pseudo-items that pull a token's class distribution toward the prior before it
            is scored, so that a token seen in a few items points at no class (10: a token in 10 items all of one
            class gets half of the way).
        core_dependence_threshold (`float`, *optional*): a token whose items, within their class, differ in what
            their image core says by at least this many within-class standard deviations
            (`ContextStatistics.token_dependence`) moves with the image: it is core, whatever its strength. A
            spurious cue, caused by the label, is blind to the image given the label. None: no such test (every
            token that points at one class is context). Needs images, one per item.
        context_without_core_evidence (`str`): what decides where the image core cannot test a token (it does not
            tell the classes apart: text-only data, one placeholder image, an image the base cannot read): "leak_forms"
            (only tokens used mostly in hashtags, mentions, URLs, emoji, placeholders such as `<num>` or whitespace
            artefacts can be context; plain words are kept as core, since nothing tells a word that expresses the
            label from a collection artefact) or "strength" (every token that points at one class is context).
        declared_text_context (`list[str]`): word patterns that are always context, whatever the statistics:
            regular expressions matched against each vocabulary piece, or the names "hashtag", "mention", "url",
            "emoji" (`context.DECLARED_CONTEXT_PATTERNS`). A word holding a matching piece is context.
        protected_words (`list[str]`): words and phrases that are never context (their vocabulary pieces).
        discover_text_context / discover_image_context (`bool`): find context from the statistics (True) or take
            only what is declared (False).
        declared_image_context (`list[list[float]]`): image regions that are always context, boxes
            `[left, top, right, bottom]` as fractions of the image side (e.g. `[[0, 0, 0.25, 0.25]]` for a
            watermark in the top-left corner).
        image_context_threshold (`float`): image *context* is the image's mean colour plus the pixels whose
            local linear discriminant scores (label statistics of 3x3 pixel neighbourhoods) reach this fraction of
            the batch's strongest pixel, closed over the marks they outline.
        context_covariance_pixels (`int`, *optional*): the covariance of single pixel descriptors (what whitens the
            pixel scores) is counted from the first images of each training batch whose pixels reach this many (at
            least one image; the class means still count every image): its cost stays bounded at large images
            (a LLaVA-1.5 image has 113k pixels: one per batch; the tiny recipe's 32 images of 32 x 32: all).
            None: every image.
        detach_bias_branches (`bool`): the text-only and image-only heads read stop-gradient states (the
            text-only language-model pass runs without gradient): they measure what one modality alone predicts
            without shaping the shared base, and no backward runs through the text-only pass (docs/method.md).
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
        "weighted_aux_loss",
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
        text_context_threshold: float = 0.7,
        context_support: float = 10.0,
        core_dependence_threshold: float | None = 0.15,
        context_without_core_evidence: str = "leak_forms",
        declared_text_context: list[str] | None = None,
        protected_words: list[str] | None = None,
        discover_text_context: bool = True,
        discover_image_context: bool = True,
        declared_image_context: list[list[float]] | None = None,
        image_context_threshold: float = 0.5,
        context_covariance_pixels: int | None = 32768,
        detach_bias_branches: bool = True,
        inference_mode: str = "fused",
        prompt_template: str = "{image}\n{text}",
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_family(base_config.get("model_type"))  # a type without an entry raises
            base_config = AutoConfig.for_model(**base_config)
        elif base_config is not None:
            base_family(base_config.model_type)
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
        self.context_support = context_support
        self.core_dependence_threshold = core_dependence_threshold
        self.context_without_core_evidence = context_without_core_evidence
        self.declared_text_context = list(declared_text_context or [])
        self.protected_words = list(protected_words or [])
        self.discover_text_context = discover_text_context
        self.discover_image_context = discover_image_context
        self.declared_image_context = [list(map(float, box)) for box in declared_image_context or []]
        self.image_context_threshold = image_context_threshold
        self.context_covariance_pixels = context_covariance_pixels
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
        for name, values in CHOICES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be {' or '.join(map(repr, values))}, got {getattr(self, name)!r}")
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
        if not (0.0 < self.text_context_threshold <= 1.0 and 0.0 < self.image_context_threshold <= 1.0):
            raise ValueError(
                "text_context_threshold and image_context_threshold must lie in (0, 1], got "
                f"{self.text_context_threshold} and {self.image_context_threshold}"
            )
        if self.context_covariance_pixels is not None and self.context_covariance_pixels < 1:
            raise ValueError(
                f"context_covariance_pixels must be >= 1 (or None: every image), got {self.context_covariance_pixels}"
            )
        if self.context_support < 0:
            raise ValueError(f"context_support must be >= 0, got {self.context_support}")
        if self.core_dependence_threshold is not None and self.core_dependence_threshold <= 0:
            raise ValueError(
                f"core_dependence_threshold must be > 0 (or None: no test), got {self.core_dependence_threshold}"
            )
        for pattern in self.declared_text_context:
            try:
                re.compile(DECLARED_CONTEXT_PATTERNS.get(pattern, pattern))
            except re.error as error:
                raise ValueError(
                    f"declared_text_context pattern {pattern!r} is no regular expression: {error}"
                ) from None
        for box in self.declared_image_context:
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise ValueError(
                    f"declared_image_context box {box} must be [left, top, right, bottom] fractions with "
                    "0 <= left < right <= 1 and 0 <= top < bottom <= 1"
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


CFMoEConfig.register_for_auto_class()
