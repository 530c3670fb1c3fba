"""CF-MoE: a LLaVA-family base with counterfactual branches and debiasing experts, for classification.

Data flow of one forward (docs/method.md):

    pixel_values -> vision tower -> projector -> visual MoE ----------------> image-only head  Z(t*, v)
                                                    |
    input_ids -> embeddings -- merge image features + counterfactual rows -> language model
                                                    -> pool -> language MoE -> fused head       Z(t, v)
    input_ids without image tokens (short) -------> language model -> pool -> language MoE
                                                                          -> text-only head     Z(t, v*)
    learned prior                                                                               Z(t*, v*)

The vision tower runs once per image. Factual rows and the fine-grained counterfactual rows (core-masked,
context-swapped; training only) share one language-model call; the text-only rows run in a second call on
their own short sequence (no image tokens), so they cost text tokens only.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging, torch_compilable_check

from .configuration_cfmoe import SUPPORTED_BASE_MODEL_TYPES, CFMoEConfig
from .context import (
    SIGNIFICANCE,
    ContextStatistics,
    ContextStrength,
    close_holes,
    core_projection,
    dilate,
    keep_only_context,
    mean_colour,
    region_mask,
    spread,
    strong_context,
    transplant_pixels,
    transplant_tokens,
)
from .counterfactual import (
    CORE_MASKED,
    COUNTERFACTUAL_KINDS,
    BiasBranches,
    CounterfactualRows,
    causal_effects,
    language_rows,
    left_align,
    pad_to,
    pool_by_row,
    pool_tokens,
)
from .moe import AttentionRouter, BiasRouter, DebiasingMoE, ExpertBank, load_balancing_loss
from .pipeline_cfmoe import custom_pipelines_config

logger = logging.get_logger(__name__)
# what `forward(counterfactuals=...)` computes
COUNTERFACTUALS = (None, "effects", "core_readings", "rows", "rows_only")
LOCAL_RADIUS = 1  # a pixel's local descriptor covers its 3x3 neighbourhood
MARK_RADIUS = 3  # pixel context is closed by this much: the surround of the local evidence (7x7)
BIAS_ROUTER_GAIN = 4.0  # initial score per unit of bias evidence (log(1 + spread)) on the expert of that kind
AUTO_MAP = {
    "AutoConfig": "configuration_cfmoe.CFMoEConfig",
    "AutoModel": "modeling_cfmoe.CFMoEForMultimodalClassification",
    "AutoModelForSequenceClassification": "modeling_cfmoe.CFMoEForMultimodalClassification",
}
# Stock llava-hf checkpoints: both the legacy layout (`language_model.model.*`) and the v5 one (`model.*`).
BASE_KEY_MAPPING = {
    r"^language_model\.model\.": "mllm.language_model.",
    r"^model\.": "mllm.",
    r"^(vision_tower|multi_modal_projector|image_newline)": r"mllm.\1",
}


@dataclass
class CFMoEOutput(ModelOutput):
    r"""
    Output of [`CFMoEForMultimodalClassification`].

    loss: cross-entropy of `logits` against `labels` (when labels are given); trainers add their own terms.
    logits: `(batch, num_labels)` the prediction: the fused head (`inference_mode="fused"`) or
        `Z(t*,v*) + TIE` (`inference_mode="tie"`).
    fused_logits: `(batch, num_labels)` the fused head, always.
    text_only_logits / image_only_logits: `(batch, num_labels)` bias branches `Z(t,v*)` and `Z(t*,v)`.
    prior_logits: `(batch, num_labels)` the learned constant `Z(t*,v*)`, broadcast.
    total_effect / direct_effect_text / direct_effect_image / indirect_effect: `(batch, num_labels)`.
    pooled: `(batch, hidden)` the factual representation after the language MoE.
    counterfactual_logits / counterfactual_pooled: `(rows, num_labels)` / `(rows, hidden)` fine-grained
        counterfactual rows; `counterfactual_source` `(rows,)` the item each row comes from and
        `counterfactual_kind` `(rows,)` 0 = context-swapped, 1 = core-masked.
    image_core_features: `(n, hidden)` the projected image features, pooled, of the images of `image_core_source`
        `(n,)` with their own image context swapped out (stop-gradient, float32): what the context statistics read
        the image core from (`update_core_readings`), to tell a token that moves with it from one blind to it.
    visual_gates / visual_router_logits: `(batch, num_visual_experts)` the visual MoE's routing of the factual
        images (None without images).
    text_gates / text_router_logits: `(batch, num_text_experts)` the language MoE's routing of the factual rows
        (None with `counterfactuals="rows_only"`); `counterfactual_text_gates` `(rows, num_text_experts)` that of the
        counterfactual rows.
    aux_loss: the load-balancing loss of every routing above, summed, unweighted (the trainer weighs it with
        `config.router_aux_loss_coef`, as Mixtral).
    hidden_states: (`output_hidden_states=True`) the language model's embeddings and every layer's output for the
        factual rows, each `(batch, length, hidden)`.
    attentions: (`output_attentions=True`) the language model's attention weights for the factual rows, each
        `(batch, heads, length, length)`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    fused_logits: torch.Tensor | None = None
    text_only_logits: torch.Tensor | None = None
    image_only_logits: torch.Tensor | None = None
    prior_logits: torch.Tensor | None = None
    total_effect: torch.Tensor | None = None
    direct_effect_text: torch.Tensor | None = None
    direct_effect_image: torch.Tensor | None = None
    indirect_effect: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    counterfactual_logits: torch.Tensor | None = None
    counterfactual_pooled: torch.Tensor | None = None
    counterfactual_source: torch.Tensor | None = None
    counterfactual_kind: torch.Tensor | None = None
    image_core_features: torch.Tensor | None = None
    image_core_source: torch.Tensor | None = None
    visual_gates: torch.Tensor | None = None
    visual_router_logits: torch.Tensor | None = None
    text_gates: torch.Tensor | None = None
    text_router_logits: torch.Tensor | None = None
    counterfactual_text_gates: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class CFMoEPreTrainedModel(PreTrainedModel):
    config_class = CFMoEConfig
    config: CFMoEConfig
    base_model_prefix = "mllm"  # `model.base_model` is the wrapped LLaVA-family model
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]
    # routing and the context statistics stay float32 when a checkpoint loads in half precision
    _keep_in_fp32_modules_strict = ["router", "context_statistics"]

    @classmethod
    def from_pretrained(cls, *args, use_safetensors: bool | None = True, **kwargs):
        """`PreTrainedModel.from_pretrained` that reads safetensors only: pickle weight files (`*.bin`) can run
        code when loaded, so they are refused unless the caller opts in with `use_safetensors=False`."""
        return super().from_pretrained(*args, use_safetensors=use_safetensors, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Saves the in-memory key layout (v5 would otherwise write the llava-hf legacy layout for the base),
        so that raw state-dict loads (Trainer's best model and resume) see the same keys as the model."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.base_config.text_config, "initializer_range", 0.02)
        if isinstance(module, ExpertBank):
            init.normal_(module.up, mean=0.0, std=std)
            init.zeros_(module.up_bias)
            init.zeros_(module.down)  # every MoE site starts as the identity: the base is untouched at step 0
            init.zeros_(module.down_bias)
        elif isinstance(module, AttentionRouter):
            init.normal_(module.expert_keys, mean=0.0, std=1.0)
        elif isinstance(module, BiasRouter):  # expert 0: weak evidence; expert 1 + f: evidence of kind f
            num_experts, num_evidence = module.weight.shape
            bias = torch.zeros(num_experts, device=module.bias.device)
            bias[0] = BIAS_ROUTER_GAIN * math.log(2.0)  # expert 0 leads while every spread stays below 1
            eye = torch.eye(num_experts - 1, num_evidence, device=module.weight.device)
            init.copy_(module.weight, BIAS_ROUTER_GAIN * nn.functional.pad(eye, (0, 0, 1, 0)))
            init.copy_(module.bias, bias)
        elif isinstance(module, CFMoEForMultimodalClassification):
            init.zeros_(module.prior_logits)
        elif isinstance(module, ContextStatistics):  # nothing counted yet; the fixed image-core projection
            for name, buffer in module.named_buffers(recurse=False):
                if name == "core_projection":
                    init.copy_(buffer, core_projection(*buffer.shape).to(buffer.device))
                else:
                    init.zeros_(buffer)


class CFMoEForMultimodalClassification(CFMoEPreTrainedModel):
    """LLaVA-family base + visual/language debiasing MoE + fused, text-only and image-only heads."""

    def __init__(self, config: CFMoEConfig):
        super().__init__(config)
        if config.base_config is None:
            raise ValueError("CFMoEConfig.base_config is required (the config of the wrapped LLaVA-family model)")
        self.mllm = AutoModel.from_config(config.base_config)
        hidden, num_labels = config.hidden_size, config.num_labels
        self.visual_moe, self.text_moe = (
            DebiasingMoE(
                hidden,
                config.expert_size,
                num_experts,
                config.experts_top_k,
                config.router_jitter,
                config.router_temperature,
                router_input=config.router_input,
                uniform_gates=config.uniform_gates,
            )
            for num_experts in (config.num_visual_experts, config.num_text_experts)
        )
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.fused_head = nn.Linear(hidden, num_labels)
        self.text_head = nn.Linear(hidden, num_labels)
        self.image_head = nn.Linear(hidden, num_labels)
        self.prior_logits = nn.Parameter(torch.zeros(num_labels))
        # label statistics of each token and image patch: they pick each item's *context* (context.py)
        channels = config.base_config.vision_config.num_channels
        self.context_statistics = ContextStatistics(
            config.base_config.text_config.vocab_size,
            channels * (2 * LOCAL_RADIUS + 1) ** 2,
            num_labels,
            channels,
            support=config.context_support,
            feature_dim=hidden,
        )
        self._image_feature_params = set(inspect.signature(self.mllm.get_image_features).parameters)
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        # every save_pretrained carries the pipeline: `pipeline(model=DIR, trust_remote_code=True)`
        self.config.custom_pipelines = {
            **(getattr(self.config, "custom_pipelines", None) or {}),
            **custom_pipelines_config(),
        }
        self.post_init()

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_base_pretrained(
        cls,
        base_model_name_or_path: str,
        num_labels: int = 2,
        id2label: dict[int, str] | None = None,
        config_kwargs: dict | None = None,
        **from_pretrained_kwargs,
    ) -> CFMoEForMultimodalClassification:
        """Wrap an existing LLaVA-family checkpoint: its weights loaded, experts and heads freshly initialised.

        Accepts stock llava-hf layouts (legacy and v5 keys). `config_kwargs` go to [`CFMoEConfig`] (experts,
        counterfactuals); the rest (`dtype`, `device_map`, `quantization_config`, ...) to `from_pretrained`.
        """
        base_config = AutoConfig.from_pretrained(
            base_model_name_or_path, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code")
        )
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config = CFMoEConfig(
            base_config=base_config.to_dict(),
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **(config_kwargs or {}),
        )
        # transformers' load report would list every new module as MISSING and the base's unused lm_head as
        # UNEXPECTED: both are ignored for this load, so that the report shows only what the base really lacks
        saved = cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected
        cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = [r"^(?!mllm\.)"], ["lm_head"]
        try:
            model, info = cls.from_pretrained(
                base_model_name_or_path,
                config=config,
                key_mapping=BASE_KEY_MAPPING,
                output_loading_info=True,
                **from_pretrained_kwargs,
            )
        finally:
            cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = saved
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(
                f"{base_model_name_or_path} does not match its config: missing base weights "
                f"{sorted(info['missing_keys'])[:5]}, unexpected weights {sorted(info['unexpected_keys'])[:5]}"
            )
        new = sorted({key.split(".")[0] for key in model.state_dict() if not key.startswith("mllm.")})
        logger.info("%s: every base weight loaded; initialised %s", base_model_name_or_path, ", ".join(new))
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_input_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resizes the base's token embeddings (and its text config's `vocab_size`) and the token statistics: new
        tokens start unseen."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.context_statistics.resize_vocabulary(self.config.get_text_config().vocab_size)
        return embeddings

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        counterfactuals: str | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CFMoEOutput | tuple:
        r"""
        input_ids / attention_mask: `(batch, length)` with the base's image placeholder tokens.
        pixel_values: the base processor's pixel values (with `image_sizes` / `batch_num_images` for
            LLaVA-NeXT and OneVision).
        labels: `(batch,)` class ids in `[0, num_labels)`.
        counterfactuals: what to compute besides the prediction (`COUNTERFACTUALS`):
            - None: the prediction only (with `inference_mode="tie"` the branches it needs too);
            - "effects": the text-only, image-only and prior branches and the causal effects;
            - "core_readings": those, and the image-core readings of `config.counterfactual_fraction` of the items
              (their images with the image context swapped out, through the vision tower and projector without
              gradient, pooled): a warm-up step that gathers what tells a core token from a shortcut;
            - "rows": the branches, the image-core readings and the fine-grained counterfactual rows of
              `config.counterfactual_fraction` of the items (context-swapped / core-masked; needs `input_ids` and
              images), in the factual rows' call;
            - "rows_only": the branches and the fine-grained rows, the factual rows left out of the language-model
              call (a training step whose loss reads the fused head on those rows only): `logits`, `fused_logits`,
              `pooled`, the effects and the factual text routing are then None.
        inputs_embeds: `(batch, length, hidden)` instead of `input_ids`; image placeholders are the positions
            holding the image token's embedding.
        output_attentions / output_hidden_states: also return the language model's attentions / hidden states
            of the factual rows (default: the config's).
        return_dict: a [`CFMoEOutput`] (default: `config.return_dict`) or the tuple of its non-None fields.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        if counterfactuals not in COUNTERFACTUALS:
            raise ValueError(f"counterfactuals must be one of {COUNTERFACTUALS}, got {counterfactuals!r}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_mask = self._image_mask(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch = inputs_embeds.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = attention_mask.bool()
        if labels is not None:
            self._check_labels(labels, batch)
        image_mask = image_mask & attention_mask
        text_mask = attention_mask & ~image_mask
        build_rows = counterfactuals in ("rows", "rows_only") and pixel_values is not None
        edits_images = (build_rows or counterfactuals == "core_readings") and pixel_values is not None
        if build_rows and input_ids is None:
            raise ValueError(
                "counterfactual rows pick text context by token id: pass input_ids rather than inputs_embeds"
            )

        # 0. how strongly each token and pixel carries a shortcut: it picks the context and routes the experts
        strength = evidence = None
        if edits_images or config.routes_by_evidence:
            token_ids = input_ids if input_ids is not None else self._nearest_token_ids(inputs_embeds)
            strength = self._context_strength(token_ids, pixel_values, batch, warn=edits_images)
            evidence = self._bias_evidence(strength, text_mask, pixel_values) if config.routes_by_evidence else None

        # 1. vision tower (once) -> projector -> visual debiasing MoE
        image_features = image_rows = visual_routing = None
        if pixel_values is not None or image_mask.any():
            image_kwargs = {"image_sizes": image_sizes, "batch_num_images": batch_num_images}
            image_features, image_rows = self._image_features(pixel_values, image_mask, image_kwargs)
            content = pool_tokens(inputs_embeds, text_mask, "mean") + pool_by_row(image_features, image_rows, batch)
            visual_routing = self.visual_moe.route(content, evidence)
            image_features = self.visual_moe(image_features, visual_routing.gates[image_rows])
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1), image_features.to(inputs_embeds.dtype)
            )

        # 2. factual rows and/or counterfactual rows through the language model in one call -> language MoE -> head
        cf = core = None
        if build_rows and image_features is not None:
            cf = self._counterfactual_rows(
                input_ids, inputs_embeds, attention_mask, image_mask, pixel_values, image_kwargs, strength
            )
            core = None if cf is None else cf.image_core
        elif edits_images and image_features is not None and strength.pixels is not None:
            core = self._image_core_readings(pixel_values, image_mask, image_kwargs, strength)
        n_factual = 0 if cf is not None and counterfactuals == "rows_only" else batch
        rows_embeds, rows_mask, position_ids, rows_evidence = language_rows(
            inputs_embeds, attention_mask, evidence, cf, keep_factual=n_factual > 0
        )
        language_out = self.mllm.language_model(
            inputs_embeds=rows_embeds,
            attention_mask=rows_mask.long(),
            position_ids=position_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        pooled, text_routing = self._language_moe(
            pool_tokens(language_out.last_hidden_state, rows_mask, config.pooling), rows_evidence
        )
        rows_logits = self.fused_head(self.dropout(pooled))
        fused_logits = rows_logits[:n_factual] if n_factual else None

        # 3. counterfactual branches: Z(t, v*) on the short text-only rows, Z(t*, v) from the image features
        branches = effects = None
        if counterfactuals is not None or config.inference_mode == "tie":
            branches = self._bias_branches(inputs_embeds, text_mask, evidence, image_features, image_rows, batch)
            if fused_logits is not None:
                effects = causal_effects(fused_logits, branches.text_only, branches.image_only, branches.prior)
        logits = fused_logits
        if config.inference_mode == "tie" and not self.training and effects is not None:
            logits = branches.prior + effects.indirect_effect
        loss = None if labels is None or logits is None else nn.functional.cross_entropy(logits.float(), labels)

        routings = [routing for routing in (visual_routing, text_routing) if routing is not None]
        out = CFMoEOutput(
            loss=loss,
            logits=logits,
            fused_logits=fused_logits,
            **({} if branches is None else _branch_fields(branches)),
            **({} if effects is None else vars(effects)),
            pooled=pooled[:n_factual] if n_factual else None,
            **({} if cf is None else _counterfactual_fields(cf, rows_logits[n_factual:], pooled[n_factual:])),
            image_core_features=None if core is None else core[0],
            image_core_source=None if core is None else core[1],
            visual_gates=None if visual_routing is None else visual_routing.gates,
            visual_router_logits=None if visual_routing is None else visual_routing.router_logits,
            text_gates=text_routing.gates[:n_factual] if n_factual else None,
            text_router_logits=text_routing.router_logits[:n_factual] if n_factual else None,
            counterfactual_text_gates=None if cf is None else text_routing.gates[n_factual:],
            aux_loss=sum(load_balancing_loss(routing.gates, routing.router_logits) for routing in routings),
            hidden_states=_factual_rows(language_out.hidden_states, n_factual, attention_mask.shape[1]),
            attentions=_factual_rows(language_out.attentions, n_factual, attention_mask.shape[1]),
        )
        return out if return_dict else out.to_tuple()

    # ----------------------------------------------------------------------------------------- pieces
    def _check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), one class id per item; got {tuple(labels.shape)}")
        bad = (labels < 0) | (labels >= self.config.num_labels)
        torch_compilable_check(
            ~bad.any(),
            lambda: (
                f"labels {labels[bad].tolist()} are outside id2label {self.config.id2label}: "
                f"use class ids in [0, {self.config.num_labels})"
            ),
        )

    def _image_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(batch, length)` bool: the image placeholders, by token id or by the image token's embedding."""
        image_token_id = self.mllm.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        image_embed = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed).all(-1)

    def _image_features(
        self, pixel_values: torch.Tensor | None, image_mask: torch.Tensor, image_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features of every image token `(n_tokens, hidden)` and the row of each `(n_tokens,)`.

        The checks read no value on the host (`torch_compilable_check`), so that `torch.export` can trace them.
        """
        if pixel_values is None:
            raise ValueError(
                f"input_ids hold {int(image_mask.sum())} image tokens but no pixel_values were given: pass the "
                "images through the processor, or remove the image placeholders from the text"
            )
        torch_compilable_check(
            image_mask.any(),
            "pixel_values were given but input_ids hold no image token "
            f"(id {self.mllm.config.image_token_id}): build the prompt with the processor so that it "
            "inserts the image placeholders",
        )
        kwargs = {k: v for k, v in image_kwargs.items() if k in self._image_feature_params and v is not None}
        features = self.mllm.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs).pooler_output
        features = torch.cat(list(features), dim=0)
        image_rows = image_mask.nonzero()[:, 0]
        torch_compilable_check(
            features.shape[0] == image_rows.shape[0],
            lambda: (
                f"image tokens and image features do not match: input_ids hold {image_rows.shape[0]} image "
                f"tokens, the vision tower produced {features.shape[0]} features; a truncated prompt or images that "
                "do not belong to these texts cause this (never truncate image tokens)"
            ),
        )
        return features, image_rows

    def _language_moe(self, pooled: torch.Tensor, evidence: torch.Tensor | None):
        routing = self.text_moe.route(pooled, evidence)
        return self.text_moe(pooled, routing.gates), routing

    def _bias_branches(
        self, inputs_embeds, text_mask, evidence, image_features, image_rows, batch: int
    ) -> BiasBranches:
        """The text-only, image-only and prior branches.

        The text-only rows are the text positions of `inputs_embeds` `(batch, length, hidden)`, left-aligned
        (`text_mask` `(batch, length)`): no image tokens, no padding; they are routed by the text part of the bias
        `evidence` `(batch, 3)` (None with the content router).
        """
        detach = self.config.detach_bias_branches
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            text_embeds, text_only_mask = left_align(inputs_embeds, text_mask)
            text_hidden = self.mllm.language_model(
                inputs_embeds=text_embeds,
                attention_mask=text_only_mask,
                use_cache=False,
                output_attentions=False,
                output_hidden_states=False,
            ).last_hidden_state
            text_evidence = None if evidence is None else evidence * evidence.new_tensor([1.0, 0.0, 0.0])
            text_pooled, _ = self._language_moe(
                pool_tokens(text_hidden, text_only_mask, self.config.pooling), text_evidence
            )
        text_only = self.text_head(self.dropout(text_pooled))
        prior = self.prior_logits.to(text_only.dtype).expand_as(text_only)
        if image_features is None:
            return BiasBranches(text_only=text_only, image_only=prior, prior=prior)
        image_pooled = pool_by_row(image_features, image_rows, batch)
        image_only = self.image_head(self.dropout(image_pooled.detach() if detach else image_pooled))
        return BiasBranches(text_only=text_only, image_only=image_only, prior=prior)

    def _bias_evidence(self, strength: ContextStrength, text_mask: torch.Tensor, pixel_values) -> torch.Tensor:
        """`(batch, 3)` each item's bias evidence (`ContextStatistics.bias_evidence`) from the batch's strengths."""
        local = colour = None
        if strength.pixels is not None:
            local, colour = strength.pixels.flatten(1).amax(1), mean_colour(pixel_values)
        return self.context_statistics.bias_evidence((strength.tokens * text_mask).amax(1), local, colour)

    def set_vocabulary(self, tokenizer) -> None:
        """Read the tokenizer's vocabulary into the context statistics (`ContextStatistics.set_vocabulary`): which
        pieces continue a word (text context is taken a whole word at a time), and the pieces of
        `config.declared_text_context` (always context) and `config.protected_words` (never context)."""
        config = self.config
        self.context_statistics.set_vocabulary(tokenizer, config.declared_text_context, config.protected_words)

    @torch.no_grad()
    def update_context_statistics(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> None:
        """Count a training batch into the label statistics that pick each item's context and route the experts
        (`ContextStatistics`); the trainer calls it on every training batch."""
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        text_mask = attention_mask.bool() & (input_ids != self.mllm.config.image_token_id)
        one_image_each = pixel_values is not None and pixel_values.shape[0] == input_ids.shape[0]
        self.context_statistics.update(input_ids, text_mask, pixel_values if one_image_each else None, labels)

    @torch.no_grad()
    def update_core_readings(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        image_core_features: torch.Tensor,
        image_core_source: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Count what the images of a forward's items `image_core_source` say without their context
        (`CFMoEOutput.image_core_features`) against the tokens of their texts
        (`ContextStatistics.update_core_readings`); the trainer calls it after a training forward that has them."""
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        text_mask = attention_mask.bool() & (input_ids != self.mllm.config.image_token_id)
        rows = image_core_source
        self.context_statistics.update_core_readings(
            input_ids[rows], text_mask[rows], labels[rows], image_core_features
        )

    def _nearest_token_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` the vocabulary token whose embedding is nearest each of `inputs_embeds` (exact for
        embeddings looked up from the table), so that embeddings are routed as their token ids would be."""
        table = self.get_input_embeddings().weight
        return (inputs_embeds @ table.T - 0.5 * (table * table).sum(-1)).argmax(-1)

    def _context_strength(
        self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None, batch: int, warn: bool
    ) -> ContextStrength:
        """The shortcut strength of each token (`ContextStatistics.token_strength`; only declared context when text
        discovery is off) and pixel (`spread` of its local scores; only with one image per item)."""
        config, statistics = self.config, self.context_statistics
        if config.discover_text_context:
            tokens = statistics.token_strength(token_ids, config.core_dependence_threshold)
        else:
            tokens = statistics.flag("declared_token", token_ids).float()
        pixels = None
        if pixel_values is not None and self._one_image_per_item(pixel_values, batch, warn):
            pixels = spread(statistics.local_scores(pixel_values))
        return ContextStrength(tokens=tokens, pixels=pixels)

    def _text_context(self, input_ids, attention_mask, image_mask, token_strength) -> tuple[torch.Tensor, ...]:
        """(`(batch, length)` bool text context, the candidates it was chosen among): the whole words holding a
        token whose strength reaches `text_context_threshold`. The first attended token is never a candidate (it
        keeps every causal query attended), nor is any token when the rows do not edit the text."""
        config = self.config
        first = (attention_mask.long().cumsum(1) == 1) & attention_mask
        candidates = attention_mask & ~image_mask & ~first & ("text" in config.counterfactual_modalities)
        text = strong_context(token_strength, candidates, config.text_context_threshold)
        return self.context_statistics.whole_words(input_ids, text, candidates), candidates

    @torch.no_grad()
    def find_context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What training treats as each item's context now (for audits): `(batch, length)` bool text context and
        `(batch, ..., height, width)` bool image context (None without one image per item)."""
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        attention_mask = attention_mask.bool()
        image_mask = input_ids == self.mllm.config.image_token_id
        strength = self._context_strength(input_ids, pixel_values, input_ids.shape[0], warn=False)
        text, _ = self._text_context(input_ids, attention_mask, image_mask, strength.tokens)
        edit_image = "image" in self.config.counterfactual_modalities and strength.pixels is not None
        return text, self._pixel_context(strength.pixels) if edit_image else None

    def _pixel_context(self, pixel_strength: torch.Tensor) -> torch.Tensor:
        """`(batch, ..., height, width)` bool, the image context: the pixels whose strength reaches
        `image_context_threshold` of the batch's strongest, grown by a descriptor's reach and closed over the marks
        they outline (with `discover_image_context`), and the declared regions."""
        config = self.config
        pixels = torch.zeros_like(pixel_strength, dtype=torch.bool)
        if config.discover_image_context:
            evidence = self.context_statistics.local_p_value() < SIGNIFICANCE
            found = strong_context(pixel_strength, evidence, config.image_context_threshold * pixel_strength.max())
            pixels = close_holes(dilate(found, LOCAL_RADIUS), MARK_RADIUS)
        if config.declared_image_context:
            height, width = pixels.shape[-2:]
            pixels = pixels | region_mask(config.declared_image_context, height, width, pixels.device)
        return pixels

    def _draw_rows(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A random `counterfactual_fraction` of the items `(n,)` and the partner of each (the next item), or None."""
        n_rows = math.ceil(self.config.counterfactual_fraction * batch)
        if n_rows == 0:
            return None
        rows = torch.randperm(batch, device=device)[:n_rows]
        return rows, (rows + 1) % batch

    def _swapped_images(self, pixel_values, pixels, rows, partner) -> torch.Tensor:
        """The rows' images with their image context swapped for their partners' (`transplant_pixels`); the
        background colour moves with it when image context is discovered and the colour carries evidence."""
        recolour = self.config.discover_image_context and self.context_statistics.colour_p_value() < SIGNIFICANCE
        return transplant_pixels(pixel_values, pixels, rows, partner, recolour=recolour)

    def _image_core_readings(self, pixel_values, image_mask, image_kwargs, strength) -> tuple[torch.Tensor, ...] | None:
        """(`(n, hidden)` image-core features, `(n,)` their items) for a random `counterfactual_fraction` of the
        items: their images with the image context swapped out, through the vision tower and projector without
        gradient, pooled."""
        drawn = self._draw_rows(pixel_values.shape[0], pixel_values.device)
        if drawn is None:
            return None
        rows, partner = drawn
        with torch.no_grad():
            images = self._swapped_images(pixel_values, self._pixel_context(strength.pixels), rows, partner)
            kwargs = {name: value[rows] for name, value in image_kwargs.items() if value is not None}
            features, feature_rows = self._image_features(images, image_mask[rows], kwargs)
            pooled = pool_by_row(features, feature_rows, len(rows))
        return pooled.float(), rows

    def _counterfactual_rows(
        self, input_ids, inputs_embeds, attention_mask, image_mask, pixel_values, image_kwargs, strength
    ):
        """Context-swapped and core-masked rows for a random `counterfactual_fraction` of the items.

        Context (`context.strong_context` on the `ContextStrength` of the batch): the words holding a token whose
        shortcut strength reaches `text_context_threshold` (or declared), and the image's background colour plus the
        pixels of `_pixel_context`. A context-swapped row keeps its core and takes the context of its partner (the
        next item of the batch): its tokens where they stood in the partner, its pixels in pixel space (the vision
        tower runs on the edited images, so a cue the tower spreads over every patch feature leaves with its pixels).
        A core-masked row keeps only its own context. Returns the rows (they may be wider than `inputs_embeds`),
        with the image-core readings of the context-swapped images, or None.
        """
        config = self.config
        drawn = self._draw_rows(inputs_embeds.shape[0], inputs_embeds.device)
        if drawn is None:
            return None
        rows, partner = drawn
        text_mask = attention_mask & ~image_mask
        text, candidates = self._text_context(input_ids, attention_mask, image_mask, strength.tokens)
        edit_image = "image" in config.counterfactual_modalities and strength.pixels is not None
        if edit_image:
            pixels = self._pixel_context(strength.pixels)
        row_kwargs = {name: value[rows] for name, value in image_kwargs.items() if value is not None}

        embeds, masks, evidence, kinds, image_core = [], [], [], [], None
        whole = None if strength.pixels is None else torch.ones_like(strength.pixels, dtype=torch.bool)
        for name in config.counterfactual_types:
            kind = COUNTERFACTUAL_KINDS[name]
            if kind == CORE_MASKED:  # the item's own context only
                kept = attention_mask & ~(candidates & ~text)
                row_embeds, row_mask, row_images = inputs_embeds[rows], kept[rows], image_mask[rows]
                images = keep_only_context(pixel_values, pixels, rows) if edit_image else None
                own, taken = (kept & text_mask, pixels if edit_image else whole), (None, None)
            else:  # its core, the partner's context
                row_embeds, row_mask, row_images = transplant_tokens(
                    inputs_embeds, attention_mask, text, rows, partner, image_mask
                )
                images = self._swapped_images(pixel_values, pixels, rows, partner) if edit_image else None
                own = (text_mask & ~text, ~pixels if edit_image else whole)
                taken = (text, pixels if edit_image else None)
            row_evidence = None
            if config.routes_by_evidence:
                shown = images if images is not None else pixel_values[rows]
                row_evidence = self._row_evidence(strength, rows, partner, own, taken, shown)
            if images is not None:
                row_embeds, image_pooled = self._insert_images(
                    row_embeds, row_mask, row_images, images, row_kwargs, row_evidence
                )
                if kind != CORE_MASKED:
                    image_core = image_pooled.detach().float(), rows
            embeds.append(row_embeds)
            masks.append(row_mask)
            evidence.append(row_evidence)
            kinds.append(torch.full_like(rows, kind))
        width = max(e.shape[1] for e in embeds)
        return CounterfactualRows(
            embeds=torch.cat([pad_to(e, width) for e in embeds]),
            mask=torch.cat([pad_to(m, width) for m in masks]),
            evidence=None if evidence[0] is None else torch.cat(evidence),
            source=rows.repeat(len(kinds)),
            kind=torch.cat(kinds),
            image_core=image_core,
        )

    def _row_evidence(self, strength: ContextStrength, rows, partner, own, taken, images) -> torch.Tensor:
        """`(n, 3)` the bias evidence of counterfactual rows, from the strongest strength of what each row keeps of
        its item (`own`: a token mask and a pixel mask, each None for nothing) and takes from its partner (`taken`);
        the colour from the row's `images`."""

        def strongest(values: torch.Tensor | None, mask: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
            if values is None or mask is None:
                return strength.tokens.new_zeros(len(items))
            return (values * mask).flatten(1).amax(1)[items]

        text = torch.maximum(strongest(strength.tokens, own[0], rows), strongest(strength.tokens, taken[0], partner))
        if strength.pixels is None:
            return self.context_statistics.bias_evidence(text, None, None)
        local = torch.maximum(strongest(strength.pixels, own[1], rows), strongest(strength.pixels, taken[1], partner))
        return self.context_statistics.bias_evidence(text, local, mean_colour(images))

    def _one_image_per_item(self, pixel_values: torch.Tensor, batch: int, warn: bool) -> bool:
        if pixel_values.shape[0] == batch:
            return True
        if warn and not getattr(self, "_warned_images", False):
            warnings.warn("items hold several images: counterfactual rows keep their own images", stacklevel=3)
            self._warned_images = True
        return False

    def _insert_images(self, row_embeds, row_mask, row_images, images, image_kwargs, evidence):
        """(`row_embeds` `(n, width, hidden)` with its image positions (`row_images` `(n, width)`) holding the
        features of `images`: vision tower, projector and visual MoE, routed by the row's own content or bias
        evidence `(n, 3)` (never by the factual item's, whose cue the router may read); the rows' projected image
        features pooled before the MoE `(n, hidden)`)."""
        features, feature_rows = self._image_features(images, row_images, image_kwargs)
        image_pooled = pool_by_row(features, feature_rows, row_embeds.shape[0])
        content = pool_tokens(row_embeds, row_mask & ~row_images, "mean") + image_pooled
        features = self.visual_moe(features, self.visual_moe.route(content, evidence).gates[feature_rows])
        return row_embeds.masked_scatter(row_images.unsqueeze(-1), features.to(row_embeds.dtype)), image_pooled


def _branch_fields(branches: BiasBranches) -> dict[str, torch.Tensor]:
    return {
        "text_only_logits": branches.text_only,
        "image_only_logits": branches.image_only,
        "prior_logits": branches.prior,
    }


def _counterfactual_fields(cf: CounterfactualRows, logits: torch.Tensor, pooled: torch.Tensor) -> dict:
    return {
        "counterfactual_logits": logits,
        "counterfactual_pooled": pooled,
        "counterfactual_source": cf.source,
        "counterfactual_kind": cf.kind,
    }


def _factual_rows(states: tuple[torch.Tensor, ...] | None, batch: int, length: int) -> tuple[torch.Tensor, ...] | None:
    """Language-model hidden states `(rows, width, hidden)` or attentions `(rows, heads, width, width)` of the factual
    rows only, `(batch, length, ...)`; the tensors themselves without counterfactual rows (gradients can be retained).
    None when the call had no factual rows.
    """
    if not states or not batch:
        return None
    if states[0].shape[0] == batch:
        return states
    if states[0].dim() == 3:
        return tuple(state[:batch, :length] for state in states)
    return tuple(state[:batch, :, :length, :length] for state in states)


__all__ = ["CFMoEForMultimodalClassification", "CFMoEOutput", "CFMoEPreTrainedModel", "SUPPORTED_BASE_MODEL_TYPES"]

CFMoEForMultimodalClassification.register_for_auto_class("AutoModel")
