"""CF-MoE: a LLaVA-family base with counterfactual branches and debiasing experts, for classification.

Data flow of one forward (DESIGN.md):

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
from transformers.utils import ModelOutput

from .configuration_cfmoe import SUPPORTED_BASE_MODEL_TYPES, CFMoEConfig
from .counterfactual import (
    CORE_MASKED,
    COUNTERFACTUAL_KINDS,
    causal_effects,
    drop_image_tokens,
    pool_by_row,
    pool_tokens,
    swap_context_tokens,
    top_fraction,
)
from .moe import AttentionRouter, DebiasingMoE, ExpertBank, load_balancing_loss

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
    router_logits / routing_gates: `(visual, text)`, each `(batch, num_experts)` for the factual rows.
    aux_loss: weighted load-balancing loss of both MoE sites (scalar).
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
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing_gates: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


class CFMoEPreTrainedModel(PreTrainedModel):
    config_class = CFMoEConfig
    config: CFMoEConfig
    base_model_prefix = "cfmoe"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

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
        elif isinstance(module, CFMoEForMultimodalClassification):
            init.zeros_(module.prior_logits)
            init.zeros_(module.token_direct_effect)


class CFMoEForMultimodalClassification(CFMoEPreTrainedModel):
    """LLaVA-family base + visual/language debiasing MoE + fused, text-only and image-only heads."""

    def __init__(self, config: CFMoEConfig):
        super().__init__(config)
        if config.base_config is None:
            raise ValueError("CFMoEConfig.base_config is required (the config of the wrapped LLaVA-family model)")
        self.mllm = AutoModel.from_config(config.base_config)
        hidden, num_labels = config.hidden_size, config.num_labels
        moe_args = (config.expert_size,)
        self.visual_moe = DebiasingMoE(
            hidden,
            *moe_args,
            config.num_visual_experts,
            config.experts_top_k,
            config.router_jitter,
            config.router_temperature,
        )
        self.text_moe = DebiasingMoE(
            hidden,
            *moe_args,
            config.num_text_experts,
            config.experts_top_k,
            config.router_jitter,
            config.router_temperature,
        )
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.fused_head = nn.Linear(hidden, num_labels)
        self.text_head = nn.Linear(hidden, num_labels)
        self.image_head = nn.Linear(hidden, num_labels)
        self.prior_logits = nn.Parameter(torch.zeros(num_labels))
        # running direct effect of each vocabulary token in the text-only branch: picks text *context*
        self.register_buffer("token_direct_effect", torch.zeros(config.base_config.text_config.vocab_size, num_labels))
        self._image_feature_params = set(inspect.signature(self.mllm.get_image_features).parameters)
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
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
        model, info = cls.from_pretrained(
            base_model_name_or_path,
            config=config,
            key_mapping=BASE_KEY_MAPPING,
            output_loading_info=True,
            **from_pretrained_kwargs,
        )
        base_missing = [k for k in info["missing_keys"] if k.startswith("mllm.")]
        base_unexpected = [k for k in info["unexpected_keys"] if "lm_head" not in k]
        if base_missing or base_unexpected:
            raise ValueError(
                f"{base_model_name_or_path} does not match its config: missing base weights {base_missing[:5]}, "
                f"unexpected weights {base_unexpected[:5]}"
            )
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_counterfactuals: bool = False,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        counterfactual_rows: bool = True,
    ) -> CFMoEOutput:
        r"""
        input_ids / attention_mask: `(batch, length)` with the base's image placeholder tokens.
        pixel_values: the base processor's pixel values (with `image_sizes` / `batch_num_images` for
            LLaVA-NeXT and OneVision).
        labels: `(batch,)` class ids in `[0, num_labels)`.
        return_counterfactuals: also compute the text-only, image-only and prior branches, the effects and,
            in training, the fine-grained counterfactual rows (`config.counterfactual_fraction`).
        counterfactual_rows: False skips the fine-grained rows (the branches stay), for a training step whose
            loss does not read them.
        """
        config = self.config
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if labels is not None:
            self._check_labels(labels, batch)
        image_mask = (input_ids == self.mllm.config.image_token_id) & attention_mask
        inputs_embeds = self.get_input_embeddings()(input_ids)
        text_mask = attention_mask & ~image_mask

        # 1. vision tower (once) -> projector -> visual debiasing MoE, routed by the pooled item state
        image_features = image_rows = visual_routing = None
        if pixel_values is not None or image_mask.any():
            image_kwargs = {"image_sizes": image_sizes, "batch_num_images": batch_num_images}
            image_features, image_rows = self._image_features(pixel_values, image_mask, image_kwargs)
            query = pool_tokens(inputs_embeds, text_mask, "mean") + pool_by_row(image_features, image_rows, batch)
            visual_routing = self.visual_moe.route(query)
            image_features = self.visual_moe(image_features, visual_routing.gates[image_rows])
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1), image_features.to(inputs_embeds.dtype)
            )

        # 2. factual rows (+ counterfactual rows in training) through the language model in one call
        rows_embeds, rows_mask = inputs_embeds, attention_mask
        cf_source = cf_kind = None
        if return_counterfactuals and counterfactual_rows and self.training and image_features is not None:
            cf = self._counterfactual_rows(
                input_ids, inputs_embeds, attention_mask, image_mask, image_features, image_rows
            )
            if cf is not None:
                cf_embeds, cf_mask, cf_source, cf_kind = cf
                rows_embeds = torch.cat([inputs_embeds, cf_embeds])
                rows_mask = torch.cat([attention_mask, cf_mask])
        hidden = self.mllm.language_model(inputs_embeds=rows_embeds, attention_mask=rows_mask.long()).last_hidden_state
        pooled, text_routing = self._language_moe(pool_tokens(hidden, rows_mask, config.pooling))
        all_logits = self.fused_head(self.dropout(pooled))
        fused_logits = all_logits[:batch]

        out = CFMoEOutput(
            fused_logits=fused_logits,
            logits=fused_logits,
            pooled=pooled[:batch],
            router_logits=tuple(r.router_logits[:batch] for r in (visual_routing, text_routing) if r is not None),
            routing_gates=tuple(r.gates[:batch] for r in (visual_routing, text_routing) if r is not None),
        )
        out.aux_loss = config.router_aux_loss_coef * sum(
            load_balancing_loss(r.gates, r.router_logits) for r in (visual_routing, text_routing) if r is not None
        )
        if cf_source is not None:
            out.counterfactual_logits, out.counterfactual_pooled = all_logits[batch:], pooled[batch:]
            out.counterfactual_source, out.counterfactual_kind = cf_source, cf_kind

        # 3. counterfactual branches: Z(t, v*) on the short text-only rows, Z(t*, v) from the image features
        if return_counterfactuals or config.inference_mode == "tie":
            self._branches(out, input_ids, attention_mask, image_features, image_rows, batch)
            if config.inference_mode == "tie" and not self.training:
                out.logits = out.prior_logits + out.indirect_effect
        if labels is not None:
            out.loss = nn.functional.cross_entropy(out.logits.float(), labels)
        return out

    # ----------------------------------------------------------------------------------------- pieces
    def _check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), one class id per item; got {tuple(labels.shape)}")
        bad = (labels < 0) | (labels >= self.config.num_labels)
        if bad.any():
            raise ValueError(
                f"labels {labels[bad].tolist()} are outside id2label {self.config.id2label}: "
                f"use class ids in [0, {self.config.num_labels})"
            )

    def _image_features(
        self, pixel_values: torch.Tensor | None, image_mask: torch.Tensor, image_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected features of every image token `(n_tokens, hidden)` and the row of each `(n_tokens,)`."""
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but no pixel_values were given: pass the images "
                "through the processor, or remove the image placeholders from the text"
            )
        if n_tokens == 0:
            raise ValueError(
                "pixel_values were given but input_ids hold no image token "
                f"(id {self.mllm.config.image_token_id}): build the prompt with the processor so that it "
                "inserts the image placeholders"
            )
        kwargs = {k: v for k, v in image_kwargs.items() if k in self._image_feature_params and v is not None}
        features = self.mllm.get_image_features(pixel_values=pixel_values, return_dict=True, **kwargs).pooler_output
        features = torch.cat(list(features), dim=0)
        if features.shape[0] != n_tokens:
            raise ValueError(
                f"image tokens and image features do not match: input_ids hold {n_tokens} image tokens, the "
                f"vision tower produced {features.shape[0]} features; a truncated prompt or images that do not "
                "belong to these texts cause this (never truncate image tokens)"
            )
        return features, image_mask.nonzero()[:, 0]

    def _language_moe(self, pooled: torch.Tensor):
        routing = self.text_moe.route(pooled)
        return self.text_moe(pooled, routing.gates), routing

    def _branches(self, out: CFMoEOutput, input_ids, attention_mask, image_features, image_rows, batch) -> None:
        """Fill the text-only, image-only, prior branches and the causal effects into `out`."""
        pad_id = self.mllm.config.text_config.pad_token_id
        text_ids, text_mask = drop_image_tokens(
            input_ids, attention_mask, self.mllm.config.image_token_id, 0 if pad_id is None else pad_id
        )
        detach = self.config.detach_bias_branches
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            text_hidden = self.mllm.language_model(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
            text_pooled, _ = self._language_moe(pool_tokens(text_hidden, text_mask, self.config.pooling))
        out.text_only_logits = self.text_head(self.dropout(text_pooled))
        prior = self.prior_logits.to(out.fused_logits.dtype).expand_as(out.fused_logits)
        if image_features is None:
            out.image_only_logits = prior
        else:
            image_pooled = pool_by_row(image_features, image_rows, batch)
            out.image_only_logits = self.image_head(self.dropout(image_pooled.detach() if detach else image_pooled))
        out.prior_logits = prior
        effects = causal_effects(out.fused_logits, out.text_only_logits, out.image_only_logits, prior)
        out.total_effect, out.direct_effect_text = effects.total, effects.direct_text
        out.direct_effect_image, out.indirect_effect = effects.direct_image, effects.indirect
        if self.training and self.config.counterfactual_fraction > 0:  # only counterfactual rows read the table
            self._update_token_direct_effect(text_ids, text_mask, text_hidden)

    @torch.no_grad()
    def _update_token_direct_effect(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, text_hidden: torch.Tensor
    ) -> None:
        """EMA of each vocabulary token's logit contribution `W_text h_j` (centred over classes)."""
        keep = text_mask.bool()
        contrib = self.text_head(text_hidden[keep]).float() - self.text_head.bias.float()
        contrib = contrib - contrib.mean(-1, keepdim=True)
        ids = text_ids[keep]
        sums = torch.zeros_like(self.token_direct_effect).index_add_(0, ids, contrib)
        counts = torch.bincount(ids, minlength=sums.shape[0]).unsqueeze(-1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's tokens
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        seen = counts.squeeze(-1) > 0
        momentum = self.config.token_score_momentum
        means = sums[seen] / counts[seen]
        self.token_direct_effect[seen] = momentum * self.token_direct_effect[seen] + (1 - momentum) * means

    def _counterfactual_rows(self, input_ids, inputs_embeds, attention_mask, image_mask, image_features, image_rows):
        """Context-swapped and core-masked rows for a random `counterfactual_fraction` of the items.

        Text context = the `context_fraction` tokens with the largest direct effect in the text-only branch
        (the running per-token table); core = the other text tokens. Image context (`config.image_context`):
        "global", the image's mean projected feature (what the image-only head reads), core = each patch's
        deviation from it; or "patches", the patches contributing most to the image-only head. A
        context-swapped row takes the context of its partner (the next item of the batch) and keeps its
        own core; a core-masked row keeps only its context. Returns `(embeds, mask, source, kind)` or None.
        """
        config, batch = self.config, input_ids.shape[0]
        n_rows = int(math.ceil(config.counterfactual_fraction * batch)) if config.counterfactual_fraction else 0
        if n_rows == 0:
            return None
        rows = torch.randperm(batch, device=input_ids.device)[:n_rows]
        partner = (rows + 1) % batch
        edit_text = "text" in config.counterfactual_modalities
        edit_image = "image" in config.counterfactual_modalities
        # text split: never touch the first attended token (keeps every causal query attended)
        first = (attention_mask.long().cumsum(1) == 1) & attention_mask
        text_candidates = attention_mask & ~image_mask & ~first & edit_text
        token_scores = self.token_direct_effect[input_ids]
        text_context = top_fraction(
            token_scores.amax(-1) - token_scores.amin(-1), text_candidates, config.context_fraction
        )
        patches = config.image_context == "patches"
        if patches:
            image_context = self._image_context_patches(image_mask, image_features) & edit_image
        else:
            means = pool_by_row(image_features, image_rows, batch).to(inputs_embeds.dtype)
            row_images = image_mask[rows]
            token_row = row_images.nonzero()[:, 0]  # the drawn row of each of the rows' image tokens
            image_item, image_partner = rows[token_row], partner[token_row]

        embeds, masks, sources, kinds = [], [], [], []
        for name in config.counterfactual_types:
            kind = COUNTERFACTUAL_KINDS[name]
            row_embeds, row_mask = inputs_embeds[rows], attention_mask[rows]
            if kind == CORE_MASKED:
                row_mask = row_mask & ~(text_candidates & ~text_context)[rows]
                if patches:
                    row_mask = row_mask & ~(image_mask & ~image_context & edit_image)[rows]
                elif edit_image:  # every patch reduced to the image's mean: its deviation (core) removed
                    row_embeds = row_embeds.masked_scatter(row_images.unsqueeze(-1), means[image_item])
            else:
                row_embeds, missing = swap_context_tokens(inputs_embeds, text_context, rows, partner)
                row_mask = row_mask & ~missing
                if patches:
                    row_embeds = self._swap_image_patches(
                        row_embeds, inputs_embeds, image_mask, image_context, rows, partner
                    )
                elif edit_image:  # the partner's image-level component under this item's patch deviations
                    shifted = row_embeds[row_images] - means[image_item] + means[image_partner]
                    row_embeds = row_embeds.masked_scatter(row_images.unsqueeze(-1), shifted)
            embeds.append(row_embeds)
            masks.append(row_mask)
            sources.append(rows)
            kinds.append(torch.full_like(rows, kind))
        return torch.cat(embeds), torch.cat(masks), torch.cat(sources), torch.cat(kinds)

    def _image_context_patches(self, image_mask: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` bool: the `context_fraction` image patches contributing most to the image head."""
        patch_scores = (self.image_head(image_features.detach()) - self.image_head.bias).float()
        patch_scores = patch_scores.amax(-1) - patch_scores.amin(-1)
        dense_scores = torch.zeros(image_mask.shape, device=image_mask.device).masked_scatter(image_mask, patch_scores)
        return top_fraction(dense_scores, image_mask, self.config.context_fraction)

    def _swap_image_patches(self, row_embeds, inputs_embeds, image_mask, image_context, rows, partner):
        """Replace each drawn row's image-context patches by the same patches of its partner (needs equal
        image-token counts; otherwise the rows keep their own image, with a warning)."""
        per_item = image_mask.sum(1)
        if not bool((per_item == per_item[0]).all()):
            if not getattr(self, "_warned_swap", False):
                warnings.warn("items differ in image token counts: context swaps keep their own image", stacklevel=2)
                self._warned_swap = True
            return row_embeds
        # with equal image-token counts, the k-th image token of two items is the same patch
        grid = inputs_embeds[image_mask].view(inputs_embeds.shape[0], -1, inputs_embeds.shape[-1])
        context = image_context[image_mask].view(inputs_embeds.shape[0], -1)[rows]
        swapped = torch.where(context.unsqueeze(-1), grid[partner], grid[rows])
        return row_embeds.masked_scatter(image_mask[rows].unsqueeze(-1), swapped)


__all__ = ["CFMoEForMultimodalClassification", "CFMoEOutput", "CFMoEPreTrainedModel", "SUPPORTED_BASE_MODEL_TYPES"]

CFMoEForMultimodalClassification.register_for_auto_class("AutoModel")
