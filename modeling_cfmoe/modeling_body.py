"""CF-MoE's body, [`CFMoEModel`]: a LLaVA-family base with debiasing experts after its projector and after its language
model, which computes the representations of the factual rows, of the fine-grained counterfactual rows (built by its
[`CounterfactualRowBuilder`], `counterfactual_rows.py`) and of the bias branches:

    pixel_values -> vision tower -> projector -> visual MoE --- merged into the embeddings
    factual rows + counterfactual rows -> language model -> pool -> language MoE -> pooled rows
    text positions alone -> language model -> pool -> language MoE -> text-only rows   (the bias branches)

The vision tower runs once per image (and once per edited image). Factual rows and counterfactual rows share one
language-model call; the text-only rows of the bias branch run in a second call on their own short sequence. The
heads are in `modeling_cfmoe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput, torch_compilable_check

from .base_families import BaseFamily, base_family
from .configuration_cfmoe import CFMoEConfig, InferenceMode, Pooling
from .counterfactual import (
    CounterfactualMode,
    CounterfactualRows,
    language_rows,
    left_align,
    pool_by_row,
    pool_tokens,
)
from .counterfactual_rows import CounterfactualRowBuilder, RowBatch, RowEdit
from .modeling_pretrained import CFMoEPreTrainedModel
from .moe import DebiasingMoE, RoutingResult, load_balancing_loss


@dataclass
class CFMoEModelOutput(ModelOutput):
    r"""
    Output of the body [`CFMoEModel`]: the representations the heads read, with the routing.

    pooled: `(batch, hidden)` the factual rows after the language MoE (None with `counterfactual_rows_only`).
    text_only_pooled: `(batch, hidden)` the text-only rows `v*` after the language MoE (the text-only branch reads
        them); image_only_pooled: `(batch, hidden)` each item's image features after the visual MoE, pooled (the
        image-only branch; None without images). Both stop-gradient with `detach_bias_branches`, both None unless
        the branches are asked for.
    counterfactual_pooled: `(rows, hidden)` the fine-grained counterfactual rows after the language MoE;
        `counterfactual_source` `(rows,)` the item each row comes from, `counterfactual_kind` `(rows,)`
        0 = context-swapped, 1 = core-masked.
    image_core_features: `(n, hidden)` the projected image features, pooled, of the images of `image_core_source`
        `(n,)` with their own image context swapped out (stop-gradient, float32): what the context statistics read
        the image core from (`CounterfactualRowBuilder.update_core_readings`), to tell a token that moves with it
        from one blind to it.
    visual_gates / visual_router_logits: `(batch, num_visual_experts)` the visual MoE's routing of the factual
        images (None without images).
    text_gates / text_router_logits: `(batch, num_text_experts)` the language MoE's routing of the factual rows
        (None with `counterfactual_rows_only`); `counterfactual_text_gates` `(rows, num_text_experts)` that of the
        counterfactual rows.
    aux_loss: the load-balancing loss of every routing above, summed, unweighted (as Mixtral's `aux_loss`).
    hidden_states: (`output_hidden_states=True`) the language model's embeddings and every layer's output for the
        factual rows, each `(batch, length, hidden)`.
    attentions: (`output_attentions=True`) the language model's attention weights for the factual rows, each
        `(batch, heads, length, length)`.
    """

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


@dataclass
class EncodedImages:
    """Rows' images after the visual MoE: `embeds` `(rows, width, hidden)` with the image placeholders holding their
    `features` `(n_tokens, hidden)`, the row of each feature `rows` `(n_tokens,)`, the MoE's `routing`, and the
    projected features pooled per row before the MoE `pooled` `(rows, hidden)`."""

    embeds: torch.Tensor
    features: torch.Tensor
    rows: torch.Tensor
    routing: RoutingResult
    pooled: torch.Tensor


@dataclass
class FactualBatch:
    """The factual rows once embedded: `inputs_embeds` `(batch, length, hidden)` (image features inserted after
    `encode_images`), `attention_mask`, `image_mask` and `text_mask` `(batch, length)` bool."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    text_mask: torch.Tensor


class CFMoEModel(CFMoEPreTrainedModel):
    """The body: a LLaVA-family base (`mllm`) with a visual debiasing MoE after its projector and a language debiasing
    MoE after its language model, and the owner of context discovery and the counterfactual rows (`rows`). Computes
    the pooled representations of the factual rows, the counterfactual rows and the bias branches
    ([`CFMoEModelOutput`]); [`CFMoEForMultimodalClassification`] holds it as `model` and adds the heads."""

    def __init__(self, config: CFMoEConfig):
        super().__init__(config)
        if config.base_config is None:
            raise ValueError("CFMoEConfig.base_config is required (the config of the wrapped LLaVA-family model)")
        self.mllm = AutoModel.from_config(config.base_config)
        self.visual_moe, self.text_moe = (
            DebiasingMoE(
                config.hidden_size,
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
        self.rows = CounterfactualRowBuilder(config)  # the label statistics that pick each item's context
        self.post_init()

    @property
    def base_family(self) -> BaseFamily:
        return base_family(self.config.base_config.model_type)

    @property
    def vision_tower(self) -> nn.Module:
        return self.mllm.get_submodule(self.base_family.vision_tower)

    @property
    def language_model(self) -> nn.Module:
        return self.mllm.get_submodule(self.base_family.language_model)

    @property
    def image_token_id(self) -> int:
        return self.mllm.config.image_token_id

    def get_input_embeddings(self) -> nn.Module:
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.mllm.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        counterfactuals: CounterfactualMode | str | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CFMoEModelOutput:
        r"""The representations of the factual rows and, as `counterfactuals` asks, of the bias branches and the
        counterfactual rows (the arguments of [`CFMoEForMultimodalClassification.forward`])."""
        config, mode = self.config, CounterfactualMode(counterfactuals or CounterfactualMode.PREDICTION)
        factual = self._embed(input_ids, attention_mask, inputs_embeds)
        edits_images = mode.edits_images and pixel_values is not None

        # 0. how strongly each token and pixel carries a shortcut: it picks the context and routes the experts
        strength, evidence = self._strength_and_evidence(input_ids, factual, pixel_values, edits_images)

        # 1. vision tower (once) -> projector -> visual debiasing MoE, merged into the embeddings
        image_inputs = self._image_inputs(image_sizes, batch_num_images)
        images = None
        if pixel_values is not None or factual.image_mask.any():
            images = self._encode_images(
                factual.inputs_embeds, factual.text_mask, factual.image_mask, pixel_values, image_inputs, evidence
            )
            factual.inputs_embeds = images.embeds

        # 2. the counterfactual rows (or only the image-core readings) of a `counterfactual_fraction` of the items
        cf = core = None
        if edits_images and images is not None:
            cf, core = self._counterfactual_rows(mode, input_ids, factual, pixel_values, image_inputs, strength)

        # 3. factual and/or counterfactual rows through the language model in one call -> pool -> language MoE
        keep_factual = cf is None or mode.keeps_factual_rows
        pooled, text_routing, language_out = self._encode_rows(
            factual, evidence, cf, keep_factual, output_attentions, output_hidden_states
        )

        # 4. the bias branches' representations: the text alone through the language model, the images pooled
        text_only = image_only = None
        if mode.computes_branches or config.inference_mode == InferenceMode.TIE:
            text_only, image_only = self._bias_branch_rows(factual, evidence, images)
        visual_routing = None if images is None else images.routing
        routings = [routing for routing in (visual_routing, text_routing) if routing is not None]
        n_factual, length = factual.inputs_embeds.shape[0] if keep_factual else 0, factual.attention_mask.shape[1]
        return CFMoEModelOutput(
            **_split_rows(pooled, text_routing, cf, n_factual),
            text_only_pooled=text_only,
            image_only_pooled=image_only,
            image_core_features=None if core is None else core[0],
            image_core_source=None if core is None else core[1],
            visual_gates=None if visual_routing is None else visual_routing.gates,
            visual_router_logits=None if visual_routing is None else visual_routing.router_logits,
            aux_loss=sum(load_balancing_loss(routing.gates, routing.router_logits) for routing in routings),
            hidden_states=_factual_rows(language_out.hidden_states, n_factual, length),
            attentions=_factual_rows(language_out.attentions, n_factual, length),
        )

    def _strength_and_evidence(self, input_ids, factual: FactualBatch, pixel_values, edits_images: bool):
        """(`ContextStrength` of the batch, `(batch, 3)` each item's bias evidence), each None where nothing reads it:
        the counterfactual edits of images read the strength, routers reading bias evidence both."""
        if not (edits_images or self.config.routes_by_evidence):
            return None, None
        token_ids = input_ids if input_ids is not None else self._nearest_token_ids(factual.inputs_embeds)
        strength = self.rows.strength(token_ids, pixel_values, warn=edits_images)
        if not self.config.routes_by_evidence:
            return strength, None
        return strength, self.rows.evidence(strength, factual.text_mask, pixel_values)

    def _embed(self, input_ids, attention_mask, inputs_embeds) -> FactualBatch:
        """The factual rows of `input_ids` or `inputs_embeds`: embeddings, attention mask, image placeholders among
        the attended tokens and the attended text tokens."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_mask = self._image_mask(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = attention_mask.bool()
        image_mask = image_mask & attention_mask
        return FactualBatch(inputs_embeds, attention_mask, image_mask, attention_mask & ~image_mask)

    def _image_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(batch, length)` bool: the image placeholders, by token id or by the image token's embedding."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        image_embed = self.get_input_embeddings()(torch.tensor(self.image_token_id, device=inputs_embeds.device))
        return (inputs_embeds == image_embed).all(-1)

    def _image_inputs(self, image_sizes, batch_num_images) -> dict[str, torch.Tensor]:
        """The processor outputs besides the pixels that the base family's image encoder reads."""
        given = {"image_sizes": image_sizes, "batch_num_images": batch_num_images}
        return {name: given[name] for name in self.base_family.image_inputs if given[name] is not None}

    def _encode_images(self, embeds, text_mask, image_mask, pixel_values, image_inputs, evidence) -> EncodedImages:
        """Rows' images (`embeds` `(rows, width, hidden)`, `text_mask` / `image_mask` `(rows, width)` bool) through the
        vision tower, projector and visual MoE, routed by each row's own content (its text and image, pooled) or bias
        evidence `(rows, 3)`, their features inserted at the image placeholders."""
        features, feature_rows = self._image_features(pixel_values, image_mask, image_inputs)
        pooled = pool_by_row(features, feature_rows, embeds.shape[0])
        routing = self.visual_moe.route(pool_tokens(embeds, text_mask, Pooling.MEAN) + pooled, evidence)
        features = self.visual_moe(features, routing.gates[feature_rows])
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return EncodedImages(embeds=embeds, features=features, rows=feature_rows, routing=routing, pooled=pooled)

    def _image_features(
        self, pixel_values: torch.Tensor | None, image_mask: torch.Tensor, image_inputs: dict[str, torch.Tensor]
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
            f"(id {self.image_token_id}): build the prompt with the processor so that it "
            "inserts the image placeholders",
        )
        features = self.mllm.get_image_features(pixel_values=pixel_values, return_dict=True, **image_inputs)
        features = torch.cat(list(features.pooler_output), dim=0)
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

    def _encode_rows(self, factual: FactualBatch, evidence, cf, keep_factual, output_attentions, output_hidden):
        """(pooled rows after the language MoE `(rows, hidden)`, their routing, the language model's output) of one
        language-model call over the factual rows (when `keep_factual`) and the counterfactual rows `cf` (if any)."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden = self.config.output_hidden_states if output_hidden is None else output_hidden
        rows_embeds, rows_mask, position_ids, rows_evidence = language_rows(
            factual.inputs_embeds, factual.attention_mask, evidence, cf, keep_factual=keep_factual
        )
        language_out = self.language_model(
            inputs_embeds=rows_embeds,
            attention_mask=rows_mask.long(),
            position_ids=position_ids,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden,
        )
        pooled, routing = self._language_moe(
            pool_tokens(language_out.last_hidden_state, rows_mask, self.config.pooling), rows_evidence
        )
        return pooled, routing, language_out

    def _language_moe(self, pooled: torch.Tensor, evidence: torch.Tensor | None) -> tuple[torch.Tensor, RoutingResult]:
        routing = self.text_moe.route(pooled, evidence)
        return self.text_moe(pooled, routing.gates), routing

    def _bias_branch_rows(
        self, factual: FactualBatch, evidence, images: EncodedImages | None
    ) -> tuple[torch.Tensor, ...]:
        """(`(batch, hidden)` the text-only rows `v*` after the language MoE: the text positions of the factual rows,
        left-aligned (no image tokens, no padding), through the language model on their own, routed by the text part
        of the bias evidence; `(batch, hidden)` each item's image features after the visual MoE, pooled, or None
        without images). Stop-gradient with `detach_bias_branches` (the text-only pass then runs without gradient)."""
        detach = self.config.detach_bias_branches
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            text_embeds, text_only_mask = left_align(factual.inputs_embeds, factual.text_mask)
            text_hidden = self.language_model(
                inputs_embeds=text_embeds,
                attention_mask=text_only_mask,
                use_cache=False,
                output_attentions=False,
                output_hidden_states=False,
            ).last_hidden_state
            text_evidence = None if evidence is None else evidence * evidence.new_tensor([1.0, 0.0, 0.0])
            pooled = pool_tokens(text_hidden, text_only_mask, self.config.pooling)
            text_only, _ = self._language_moe(pooled, text_evidence)
        if images is None:
            return text_only, None
        image_only = pool_by_row(images.features, images.rows, text_only.shape[0])
        return text_only, image_only.detach() if detach else image_only

    # ----------------------------------------------------------------------------------------- counterfactual rows
    def _nearest_token_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` the vocabulary token whose embedding is nearest each of `inputs_embeds` (exact for
        embeddings looked up from the table), so that embeddings are routed as their token ids would be."""
        table = self.get_input_embeddings().weight
        return (inputs_embeds @ table.T - 0.5 * (table * table).sum(-1)).argmax(-1)

    def _counterfactual_rows(self, mode, input_ids, factual: FactualBatch, pixel_values, image_inputs, strength):
        """(the counterfactual rows, or None; the image-core readings `((n, hidden), (n,))`, or None): the rows when
        `mode` builds them (their context-swapped images give the readings), else the readings alone (with pixel
        strength, one image per item)."""
        if mode.builds_rows:
            if input_ids is None:
                raise ValueError("counterfactual rows pick text context by token id: pass input_ids, not inputs_embeds")
            batch = RowBatch(
                input_ids, factual.inputs_embeds, factual.attention_mask, factual.image_mask, pixel_values, strength
            )
            cf = self.rows.build(batch, lambda edit, rows: self._insert_images(edit, _rows_of(image_inputs, rows)))
            return cf, None if cf is None else cf.image_core
        if strength.pixels is None:
            return None, None
        return None, self._image_core_readings(pixel_values, factual.image_mask, image_inputs, strength)

    def _insert_images(self, edit: RowEdit, image_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(the edit's embeddings `(n, width, hidden)` with its image positions holding the features of its edited
        images, routed by the row's own content or bias evidence, never by the factual item's, whose cue the router
        may read; the rows' projected image features pooled before the MoE `(n, hidden)`)."""
        text_mask = edit.mask & ~edit.image_mask
        images = self._encode_images(edit.embeds, text_mask, edit.image_mask, edit.images, image_inputs, edit.evidence)
        return images.embeds, images.pooled

    @torch.no_grad()
    def _image_core_readings(self, pixel_values, image_mask, image_inputs, strength) -> tuple[torch.Tensor, ...] | None:
        """(`(n, hidden)` image-core features, `(n,)` their items) for a random `counterfactual_fraction` of the
        items: their images with the image context swapped out (`CounterfactualRowBuilder.image_core_readings`),
        through the vision tower and projector without gradient, pooled."""
        readings = self.rows.image_core_readings(pixel_values, strength)
        if readings is None:
            return None
        images, draw = readings
        features, feature_rows = self._image_features(images, image_mask[draw.rows], _rows_of(image_inputs, draw.rows))
        return pool_by_row(features, feature_rows, len(draw.rows)).float(), draw.rows


def _split_rows(pooled, routing: RoutingResult, cf: CounterfactualRows | None, n_factual: int) -> dict:
    """The output fields of one language-model call's rows `(n_factual + rows, ...)`: the factual rows' pooled states
    and text routing (None without factual rows) and the counterfactual rows' (None without them)."""
    factual = n_factual > 0
    return {
        "pooled": pooled[:n_factual] if factual else None,
        "text_gates": routing.gates[:n_factual] if factual else None,
        "text_router_logits": routing.router_logits[:n_factual] if factual else None,
        "counterfactual_pooled": None if cf is None else pooled[n_factual:],
        "counterfactual_text_gates": None if cf is None else routing.gates[n_factual:],
        "counterfactual_source": None if cf is None else cf.source,
        "counterfactual_kind": None if cf is None else cf.kind,
    }


def _rows_of(image_inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image inputs of the items `rows` `(n,)`."""
    return {name: value[rows] for name, value in image_inputs.items()}


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
