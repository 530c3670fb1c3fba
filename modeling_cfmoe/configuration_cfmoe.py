"""Configuration of the CF-MoE debiasing wrapper around a LLaVA-family base model: [`CFMoEConfig`], with the knobs of
context discovery in its sub-config [`ContextConfig`], and the typed values of its string settings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import ExplicitEnum

from .base_families import base_family


class Choice(ExplicitEnum):
    """A string setting's value: compared as a member, saved and printed as its string."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every value this setting takes, in order."""
        return tuple(member.value for member in cls)


class RouterInput(Choice):
    """What the routers read: each item's bias evidence, or its pooled content."""

    BIAS = "bias"
    CONTENT = "content"


class Pooling(Choice):
    """How a row's hidden states become one vector: the mean over attended tokens, or the last attended token."""

    MEAN = "mean"
    LAST = "last"


class InferenceMode(Choice):
    """The prediction: the fused head (one pass), or the prior plus the total indirect effect."""

    FUSED = "fused"
    TIE = "tie"


class WithoutCoreEvidence(Choice):
    """What decides a token where the image core cannot test it (`ContextConfig.context_without_core_evidence`)."""

    LEAK_FORMS = "leak_forms"
    STRENGTH = "strength"


class CounterfactualType(Choice):
    """A kind of fine-grained counterfactual row; `kind` is its id in the rows' `counterfactual_kind`."""

    CONTEXT_SWAPPED = "context_swapped"
    CORE_MASKED = "core_masked"

    @property
    def kind(self) -> int:
        """The id of this kind in `CFMoEOutput.counterfactual_kind`: 0 context-swapped, 1 core-masked."""
        return list(CounterfactualType).index(self)


class Modality(Choice):
    """A modality the counterfactual rows edit."""

    TEXT = "text"
    IMAGE = "image"


# the values of each string setting of `CFMoEConfig` and `ContextConfig`, by name
CHOICES = {
    "router_input": RouterInput.values(),
    "pooling": Pooling.values(),
    "inference_mode": InferenceMode.values(),
    "context_without_core_evidence": WithoutCoreEvidence.values(),
}
# Named word patterns for `declared_text_context`, matched against each vocabulary piece (its text, word marker
# removed): a word holding a matching piece is context.
DECLARED_CONTEXT_PATTERNS = {
    "hashtag": r"^#",
    "mention": r"^@",
    "url": r"^(https?\b|www\.)",
    "emoji": r"[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]|^emoji_?|^<0xF[0-4]>$",
}


@dataclass
class ContextConfig:
    r"""
    How CF-MoE finds each item's *context* (what a counterfactual row swaps out), a sub-config of [`CFMoEConfig`]
    (`config.context_config`), as PEFT's `LoftQConfig` is of `LoraConfig`. `CFMoEConfig` also takes each field as a
    keyword of its own (`CFMoEConfig(text_context_threshold=0.6)`), as configs saved before this sub-config hold them.

    Args:
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
        context_without_core_evidence (`WithoutCoreEvidence` or `str`): what decides where the image core cannot
            test a token (it does not tell the classes apart: text-only data, one placeholder image, an image the base
            cannot read): "leak_forms" (only tokens used mostly in hashtags, mentions, URLs, emoji, placeholders
            such as `<num>` or whitespace artefacts can be context; plain words are kept as core, since nothing tells
            a word that expresses the label from a collection artefact) or "strength" (every token that points at one
            class is context).
        declared_text_context (`list[str]`): word patterns that are always context, whatever the statistics:
            regular expressions matched against each vocabulary piece, or the names "hashtag", "mention", "url",
            "emoji" (`DECLARED_CONTEXT_PATTERNS`). A word holding a matching piece is context.
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
    """

    text_context_threshold: float = 0.7
    context_support: float = 10.0
    core_dependence_threshold: float | None = 0.15
    context_without_core_evidence: WithoutCoreEvidence = WithoutCoreEvidence.LEAK_FORMS
    declared_text_context: list[str] = field(default_factory=list)
    protected_words: list[str] = field(default_factory=list)
    discover_text_context: bool = True
    discover_image_context: bool = True
    declared_image_context: list[list[float]] = field(default_factory=list)
    image_context_threshold: float = 0.5
    context_covariance_pixels: int | None = 32768

    def __post_init__(self):
        self.context_without_core_evidence = WithoutCoreEvidence(self.context_without_core_evidence)
        self.declared_text_context = list(self.declared_text_context or [])
        self.protected_words = list(self.protected_words or [])
        self.declared_image_context = [list(map(float, box)) for box in self.declared_image_context or []]
        self._validate()

    def _validate(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (settings as their strings)."""
        values = asdict(self)
        values["context_without_core_evidence"] = self.context_without_core_evidence.value
        return values


CONTEXT_FIELDS = tuple(f.name for f in fields(ContextConfig))  # what `CFMoEConfig` also takes as its own keywords


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
        router_input (`RouterInput` or `str`): what the routers read: "bias" (the default: each item's bias
            evidence, how strongly its text, its local pixels and its overall colour carry a shortcut according to the
            context statistics, whichever class it points at) or "content" (the pooled multimodal item state, which
            also carries the cue's value).
        uniform_gates (`bool`): every expert weighted 1/num_experts whatever the router says (an ablation).
        expert_intermediate_size (`int`, *optional*): bottleneck width of each expert; default hidden // 4.
        router_jitter (`float`): multiplicative noise on the router input while training.
        router_temperature (`float`): softmax temperature of the attention router.
        router_aux_loss_coef (`float`): weight of the (unweighted) `aux_loss`, the load balance, in the model's
            `loss` and in the training objective.
        pooling (`Pooling` or `str`): "mean" over attended tokens or "last" attended token.
        classifier_dropout (`float`): dropout before the heads.
        counterfactual_fraction (`float`): fraction of the items that get fine-grained counterfactual rows
            when counterfactuals are asked for in training.
        counterfactual_types (`list[str]`): any of "context_swapped" (the item's context replaced by
            another item's, its core kept) and "core_masked" (its core removed, its context kept).
        counterfactual_modalities (`list[str]`): which modalities the counterfactual rows edit ("text", "image").
        context_config (`ContextConfig` or `dict`, *optional*): how each item's context is found (thresholds, the
            image-core test, declared context and protected words); its fields are also accepted as keywords.
        detach_bias_branches (`bool`): the text-only and image-only heads read stop-gradient states (the
            text-only language-model pass runs without gradient): they measure what one modality alone predicts
            without shaping the shared base, and no backward runs through the text-only pass (docs/method.md).
        inference_mode (`InferenceMode` or `str`): "fused" (one pass, the default) or "tie" (subtract the direct
            effects).
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
        router_input: RouterInput | str = RouterInput.BIAS,
        uniform_gates: bool = False,
        expert_intermediate_size: int | None = None,
        router_jitter: float = 0.01,
        router_temperature: float = 1.0,
        router_aux_loss_coef: float = 0.01,
        pooling: Pooling | str = Pooling.MEAN,
        classifier_dropout: float = 0.0,
        counterfactual_fraction: float = 1.0,
        counterfactual_types: list[str] | None = None,
        counterfactual_modalities: list[str] | None = None,
        context_config: ContextConfig | dict[str, Any] | None = None,
        detach_bias_branches: bool = True,
        inference_mode: InferenceMode | str = InferenceMode.FUSED,
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
        self.router_input = RouterInput(router_input)
        self.uniform_gates = uniform_gates
        self.expert_intermediate_size = expert_intermediate_size
        self.router_jitter = router_jitter
        self.router_temperature = router_temperature
        self.router_aux_loss_coef = router_aux_loss_coef
        self.pooling = Pooling(pooling)
        self.classifier_dropout = classifier_dropout
        self.counterfactual_fraction = counterfactual_fraction
        self.counterfactual_types = [CounterfactualType(name) for name in counterfactual_types or ["context_swapped"]]
        self.counterfactual_modalities = [Modality(name) for name in counterfactual_modalities or ["text", "image"]]
        self.context_config = _context_config(context_config, kwargs)
        self.detach_bias_branches = detach_bias_branches
        self.inference_mode = InferenceMode(inference_mode)
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
        if "{text}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{text}}', got {self.prompt_template!r}")
        if not 0.0 <= self.counterfactual_fraction <= 1.0:
            raise ValueError(f"counterfactual_fraction must be in [0, 1], got {self.counterfactual_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """`PretrainedConfig.to_dict` with the context sub-config as a dict and every setting as its string."""
        output = super().to_dict()
        output["context_config"] = self.context_config.to_dict()
        for name in ("router_input", "pooling", "inference_mode"):
            output[name] = str(output[name])
        for name in ("counterfactual_types", "counterfactual_modalities"):
            output[name] = [str(value) for value in output[name]]
        return output

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
        return self.router_input == RouterInput.BIAS and several and not self.uniform_gates

    @property
    def hidden_size(self) -> int:
        """Width of the language model, shared by projector output, experts and heads."""
        return self.base_config.text_config.hidden_size

    @property
    def expert_size(self) -> int:
        return self.expert_intermediate_size or max(1, self.hidden_size // 4)


def _context_config(given: ContextConfig | dict[str, Any] | None, kwargs: dict[str, Any]) -> ContextConfig:
    """The context sub-config from `given` and the flat context keywords among `kwargs` (removed from it: a config
    saved before the sub-config holds them flat), the flat ones winning."""
    values = given.to_dict() if isinstance(given, ContextConfig) else dict(given or {})
    values.update({name: kwargs.pop(name) for name in CONTEXT_FIELDS if name in kwargs})
    return ContextConfig(**values)


CFMoEConfig.register_for_auto_class()
