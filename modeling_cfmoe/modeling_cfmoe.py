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
language model -> pooled -> language MoE) of the factual rows and of the fine-grained counterfactual rows
(`counterfactual_rows.py`). [`CFMoEForMultimodalClassification`] adds the heads, the causal effects and the loss.
The vision tower runs once per image. Factual rows and counterfactual rows (core-masked, context-swapped; training
only) share one language-model call; the text-only rows run in a second call on their own short sequence (no image
tokens), so they cost text tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput, torch_compilable_check

from .configuration_cfmoe import CFMoEConfig
from .counterfactual import BiasBranches, CausalEffects, CounterfactualMode, causal_effects, pool_by_row
from .modeling_body import CFMoEModel, CFMoEModelOutput

AUTO_MAP = {
    "AutoConfig": "configuration_cfmoe.CFMoEConfig",
    "AutoModel": "modeling_cfmoe.CFMoEForMultimodalClassification",
    "AutoModelForSequenceClassification": "modeling_cfmoe.CFMoEForMultimodalClassification",
}


@dataclass
class CFMoEOutput(ModelOutput):
    r"""
    Output of [`CFMoEForMultimodalClassification`].

    loss: cross-entropy of `logits` against `labels` plus `config.router_aux_loss_coef * aux_loss`, as Mixtral's
        (when labels are given); trainers compute their own terms.
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
        (None with `counterfactual_rows_only`); `counterfactual_text_gates` `(rows, num_text_experts)` that of the
        counterfactual rows.
    aux_loss: the load-balancing loss of every routing above, summed, unweighted (as Mixtral's `aux_loss`).
    weighted_aux_loss: `config.router_aux_loss_coef * aux_loss`, the term `loss` adds (None with a coefficient 0).
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
    weighted_aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class CFMoEForMultimodalClassification(CFMoEModel):
    """The body [`CFMoEModel`] with a fused head `Z(t, v)`, text-only and image-only bias heads `Z(t, v*)`,
    `Z(t*, v)`, a learned prior `Z(t*, v*)`, the causal effects and the loss."""

    def __init__(self, config: CFMoEConfig):
        super().__init__(config)
        hidden, num_labels = config.hidden_size, config.num_labels
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.fused_head = nn.Linear(hidden, num_labels)
        self.text_head = nn.Linear(hidden, num_labels)
        self.image_head = nn.Linear(hidden, num_labels)
        self.prior_logits = nn.Parameter(torch.zeros(num_labels))
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CFMoEForMultimodalClassification):
            init.zeros_(module.prior_logits)

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
        return_dict: bool | None = None,
    ) -> CFMoEOutput | tuple:
        r"""
        input_ids / attention_mask: `(batch, length)` with the base's image placeholder tokens.
        pixel_values: the base processor's pixel values (with `image_sizes` / `batch_num_images` for
            LLaVA-NeXT and OneVision).
        labels: `(batch,)` class ids in `[0, num_labels)`.
        counterfactuals: what to compute besides the prediction, a [`CounterfactualMode`] or its value: None (the
            prediction), "effects", "image_core", "factual_and_counterfactual_rows" or "counterfactual_rows_only".
        inputs_embeds: `(batch, length, hidden)` instead of `input_ids`; image placeholders are the positions
            holding the image token's embedding.
        output_attentions / output_hidden_states: also return the language model's attentions / hidden states
            of the factual rows (default: the config's).
        return_dict: a [`CFMoEOutput`] (default: `config.return_dict`) or the tuple of its non-None fields.
        """
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        states = super().forward(
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
        branches, effects = BiasBranches(), CausalEffects()
        if counterfactuals is not None or config.inference_mode == "tie":
            branches = self._bias_branches(states)
            if fused_logits is not None:
                effects = causal_effects(fused_logits, branches.text_only, branches.image_only, branches.prior)
        logits = fused_logits
        if config.inference_mode == "tie" and not self.training and effects.indirect_effect is not None:
            logits = branches.prior + effects.indirect_effect
        coefficient = config.router_aux_loss_coef
        weighted_aux_loss = coefficient * states.aux_loss if coefficient else None
        out = CFMoEOutput(
            loss=self._loss(logits, labels, weighted_aux_loss, states.inputs_embeds.shape[0]),
            logits=logits,
            fused_logits=fused_logits,
            text_only_logits=branches.text_only,
            image_only_logits=branches.image_only,
            prior_logits=branches.prior,
            total_effect=effects.total_effect,
            direct_effect_text=effects.direct_effect_text,
            direct_effect_image=effects.direct_effect_image,
            indirect_effect=effects.indirect_effect,
            pooled=states.pooled,
            counterfactual_logits=counterfactual_logits,
            counterfactual_pooled=states.counterfactual_pooled,
            counterfactual_source=states.counterfactual_source,
            counterfactual_kind=states.counterfactual_kind,
            image_core_features=states.image_core_features,
            image_core_source=states.image_core_source,
            visual_gates=states.visual_gates,
            visual_router_logits=states.visual_router_logits,
            text_gates=states.text_gates,
            text_router_logits=states.text_router_logits,
            counterfactual_text_gates=states.counterfactual_text_gates,
            aux_loss=states.aux_loss,
            weighted_aux_loss=weighted_aux_loss,
            hidden_states=states.hidden_states,
            attentions=states.attentions,
        )
        return out if return_dict else out.to_tuple()

    def _fused_logits(self, states: CFMoEModelOutput) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fused head `Z(t, v)` on every row of the language-model call, factual rows `(batch, num_labels)` and
        counterfactual rows `(rows, num_labels)` (each None without such rows), in one call."""
        rows = [pooled for pooled in (states.pooled, states.counterfactual_pooled) if pooled is not None]
        rows_logits = self.fused_head(self.dropout(torch.cat(rows) if len(rows) > 1 else rows[0]))
        n_factual = 0 if states.pooled is None else states.pooled.shape[0]
        fused = rows_logits[:n_factual] if n_factual else None
        return fused, None if states.counterfactual_pooled is None else rows_logits[n_factual:]

    def _bias_branches(self, states: CFMoEModelOutput) -> BiasBranches:
        """The text-only branch (the short text-only rows, `CFMoEModel.encode_text_only`), the image-only branch (the
        items' image features after the visual MoE, pooled) and the prior; stop-gradient states with
        `detach_bias_branches`."""
        detach = self.config.detach_bias_branches
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            text_pooled = self.encode_text_only(states)
        text_only = self.text_head(self.dropout(text_pooled))
        prior = self.prior_logits.to(text_only.dtype).expand_as(text_only)
        if states.image_features is None:
            return BiasBranches(text_only=text_only, image_only=prior, prior=prior)
        image_pooled = pool_by_row(states.image_features, states.image_rows, text_only.shape[0])
        image_only = self.image_head(self.dropout(image_pooled.detach() if detach else image_pooled))
        return BiasBranches(text_only=text_only, image_only=image_only, prior=prior)

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
