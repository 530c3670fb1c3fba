"""CF-MoE: a LLaVA-family base with counterfactual branches and debiasing experts, for classification.

Data flow of one forward (docs/method.md):

    pixel_values -> vision tower -> projector -> visual MoE ----------------> image-only head  Z(t*, v)
                                                    |
    input_ids -> embeddings -- merge image features + counterfactual rows -> language model
                                                    -> pool -> language MoE -> fused head       Z(t, v)
    input_ids without image tokens (short) -------> language model -> pool -> language MoE
                                                                          -> text-only head     Z(t, v*)
    learned prior                                                                               Z(t*, v*)

[`CFMoEModel`] is the body: it computes the representations (vision tower -> projector -> visual MoE -> merge ->
language model -> pooled -> language MoE) of the factual rows, of the fine-grained counterfactual rows
(`counterfactual_rows.py`) and of the bias branches. [`CFMoEForMultimodalClassification`] holds it as `model`, as
LLaVA's head holds `LlavaModel`, and adds the heads, the causal effects and the loss.
The vision tower runs once per image. Factual rows and counterfactual rows (core-masked, context-swapped; training
only) share one language-model call; the text-only rows run in a second call on their own short sequence (no image
tokens), so they cost text tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple, torch_compilable_check

from .configuration_cfmoe import CFMoEConfig, InferenceMode
from .counterfactual import BiasBranches, CausalEffects, CounterfactualMode, causal_effects
from .counterfactual_rows import CounterfactualRowBuilder
from .modeling_body import CFMoEModel, CFMoEModelOutput
from .modeling_pretrained import CFMoEPreTrainedModel

AUTO_MAP = {
    "AutoConfig": "configuration_cfmoe.CFMoEConfig",
    "AutoModel": "modeling_cfmoe.CFMoEForMultimodalClassification",
    "AutoModelForSequenceClassification": "modeling_cfmoe.CFMoEForMultimodalClassification",
}


@dataclass
class CFMoEOutput(ModelOutput):
    r"""
    Output of [`CFMoEForMultimodalClassification`]: the heads' logits and effects, then every field of the body's
    [`CFMoEModelOutput`] (representations and routing).

    loss: cross-entropy of `logits` against `labels` plus `config.router_aux_loss_coef * aux_loss`, as Mixtral's
        (when labels are given); trainers compute their own terms.
    logits: `(batch, num_labels)` the prediction: the fused head (`inference_mode="fused"`) or
        `Z(t*,v*) + TIE` (`inference_mode="tie"`).
    fused_logits: `(batch, num_labels)` the fused head, always.
    text_only_logits / image_only_logits: `(batch, num_labels)` bias branches `Z(t,v*)` and `Z(t*,v)`.
    prior_logits: `(batch, num_labels)` the learned constant `Z(t*,v*)`, broadcast.
    total_effect / direct_effect_text / direct_effect_image / indirect_effect: `(batch, num_labels)`.
    counterfactual_logits: `(rows, num_labels)` the fused head on the fine-grained counterfactual rows.
    weighted_aux_loss: `config.router_aux_loss_coef * aux_loss`, the term `loss` adds (None with a coefficient 0).
    The other fields: see [`CFMoEModelOutput`].
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
    counterfactual_logits: torch.Tensor | None = None
    weighted_aux_loss: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    text_only_pooled: torch.Tensor | None = None
    image_only_pooled: torch.Tensor | None = None
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


class CFMoEForMultimodalClassification(CFMoEPreTrainedModel):
    """The body [`CFMoEModel`] (`model`) with a fused head `Z(t, v)`, text-only and image-only bias heads `Z(t, v*)`,
    `Z(t*, v)`, a learned prior `Z(t*, v*)`, the causal effects and the loss."""

    def __init__(self, config: CFMoEConfig):
        super().__init__(config)
        self.model = CFMoEModel(config)
        hidden, num_labels = config.hidden_size, config.num_labels
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.fused_head = nn.Linear(hidden, num_labels)
        self.text_head = nn.Linear(hidden, num_labels)
        self.image_head = nn.Linear(hidden, num_labels)
        self.prior_logits = nn.Parameter(torch.zeros(num_labels))
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        self.post_init()

    @property
    def mllm(self) -> nn.Module:
        """The wrapped LLaVA-family base."""
        return self.model.mllm

    @property
    def rows(self) -> CounterfactualRowBuilder:
        """Context discovery and the counterfactual rows, with the label statistics the trainer counts into."""
        return self.model.rows

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CFMoEForMultimodalClassification):
            init.zeros_(module.prior_logits)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        counterfactuals: CounterfactualMode | str | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CFMoEOutput:
        r"""
        input_ids / attention_mask: `(batch, length)` with the base's image placeholder tokens; or `inputs_embeds`
            `(batch, length, hidden)` (image placeholders: the positions holding the image token's embedding).
        pixel_values: the base processor's pixel values (with `image_sizes` / `batch_num_images` for LLaVA-NeXT and
            OneVision). labels: `(batch,)` class ids in `[0, num_labels)`.
        counterfactuals: what to compute besides the prediction, a [`CounterfactualMode`] or its value.
        output_attentions / output_hidden_states: also return the language model's attentions / hidden states
            of the factual rows (default: the config's). return_dict: a [`CFMoEOutput`] (default:
            `config.return_dict`) or the tuple of its non-None fields.
        """
        states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            counterfactuals=counterfactuals,
            image_sizes=image_sizes,
            batch_num_images=batch_num_images,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        fused_logits, counterfactual_logits = self._fused_logits(states)
        branches, effects = self._bias_branches(states), CausalEffects()
        if fused_logits is not None and branches.text_only is not None:
            effects = causal_effects(fused_logits, branches.text_only, branches.image_only, branches.prior)
        logits = fused_logits
        if (
            self.config.inference_mode == InferenceMode.TIE
            and not self.training
            and effects.indirect_effect is not None
        ):
            logits = branches.prior + effects.indirect_effect
        coefficient = self.config.router_aux_loss_coef
        weighted_aux_loss = coefficient * states.aux_loss if coefficient else None
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        return CFMoEOutput(
            loss=self._loss(logits, labels, weighted_aux_loss, batch),
            logits=logits,
            fused_logits=fused_logits,
            text_only_logits=branches.text_only,
            image_only_logits=branches.image_only,
            prior_logits=branches.prior,
            **vars(effects),
            counterfactual_logits=counterfactual_logits,
            weighted_aux_loss=weighted_aux_loss,
            **states,
        )

    def _fused_logits(self, states: CFMoEModelOutput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fused head `Z(t, v)` on every row of the language-model call, factual rows `(batch, num_labels)` and
        counterfactual rows `(rows, num_labels)` (each None without such rows), in one call."""
        rows = [pooled for pooled in (states.pooled, states.counterfactual_pooled) if pooled is not None]
        rows_logits = self.fused_head(self.dropout(torch.cat(rows) if len(rows) > 1 else rows[0]))
        n_factual = 0 if states.pooled is None else states.pooled.shape[0]
        fused = rows_logits[:n_factual] if n_factual else None
        return fused, None if states.counterfactual_pooled is None else rows_logits[n_factual:]

    def _bias_branches(self, states: CFMoEModelOutput) -> BiasBranches:
        """The text-only head on the text-only rows, the image-only head on the pooled image features (the prior
        without images) and the prior; empty when the body computed no branch rows."""
        if states.text_only_pooled is None:
            return BiasBranches()
        text_only = self.text_head(self.dropout(states.text_only_pooled))
        prior = self.prior_logits.to(text_only.dtype).expand_as(text_only)
        if states.image_only_pooled is None:
            return BiasBranches(text_only=text_only, image_only=prior, prior=prior)
        return BiasBranches(
            text_only=text_only, image_only=self.image_head(self.dropout(states.image_only_pooled)), prior=prior
        )

    def _loss(self, logits, labels, weighted_aux_loss, batch: int) -> torch.Tensor | None:
        """Cross-entropy of `logits` against `labels` plus the weighted load-balancing loss (None without either)."""
        if labels is None:
            return None
        self._check_labels(labels, batch)
        if logits is None:
            return None
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return loss if weighted_aux_loss is None else loss + weighted_aux_loss

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


__all__ = ["CFMoEForMultimodalClassification", "CFMoEOutput"]

CFMoEForMultimodalClassification.register_for_auto_class("AutoModel")
