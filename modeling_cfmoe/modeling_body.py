"""CF-MoE's body, [`CFMoEModel`]: a LLaVA-family base with debiasing experts after its projector and after its language
model, which computes the representations of the factual rows and of the fine-grained counterfactual rows
(`counterfactual_rows.py`):

    pixel_values -> vision tower -> projector -> visual MoE --- merged into the embeddings
    factual rows + counterfactual rows -> language model -> pool -> language MoE -> pooled rows

The vision tower runs once per image (and once per edited image). Factual rows and counterfactual rows share one
language-model call; the text-only rows of the bias branch run in a second call on their own short sequence
(`CFMoEModel.encode_text_only`). The heads are in `modeling_cfmoe.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput, torch_compilable_check

from .base_families import BaseFamily, base_family
from .configuration_cfmoe import CFMoEConfig
from .context import ContextStatistics
from .counterfactual import (
    CORE_MASKED,
    COUNTERFACTUAL_KINDS,
    CounterfactualMode,
    CounterfactualRows,
    language_rows,
    left_align,
    pool_by_row,
    pool_tokens,
)
from .counterfactual_rows import (
    LOCAL_RADIUS,
    RowBatch,
    RowEdit,
    batch_context,
    context_strength,
    draw_rows,
    edit_rows,
    item_bias_evidence,
    pixel_context,
    stack_rows,
    swapped_images,
)
from .modeling_pretrained import CFMoEPreTrainedModel
from .moe import DebiasingMoE, RoutingResult, load_balancing_loss


@dataclass
class CFMoEModelOutput(ModelOutput):
    r"""
    Output of the body [`CFMoEModel`]: the representations the heads read.

    pooled: `(batch, hidden)` the factual rows after the language MoE (None with `counterfactual_rows_only`).
    counterfactual_pooled: `(rows, hidden)` the fine-grained counterfactual rows after the language MoE;
        `counterfactual_source` `(rows,)` the item each row comes from, `counterfactual_kind` `(rows,)`
        0 = context-swapped, 1 = core-masked.
    image_core_features / image_core_source: see [`CFMoEOutput`].
    visual_gates / visual_router_logits / text_gates / text_router_logits / counterfactual_text_gates / aux_loss:
        see [`CFMoEOutput`].
    inputs_embeds: `(batch, length, hidden)` the factual rows' embeddings, image features inserted; `text_mask`
        `(batch, length)` bool their attended text tokens; `bias_evidence` `(batch, 3)` each item's bias evidence
        (None unless a router reads it); `image_features` `(n_tokens, hidden)` the image tokens' features after the
        visual MoE and `image_rows` `(n_tokens,)` the item of each (None without images): what the bias branches
        read.
    hidden_states / attentions: the language model's, for the factual rows (see [`CFMoEOutput`]).
    """

    pooled: torch.Tensor | None = None
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
    inputs_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    bias_evidence: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class CFMoEModel(CFMoEPreTrainedModel):
    """The body: a LLaVA-family base with a visual debiasing MoE after its projector and a language debiasing MoE after
    its language model, and the label statistics that pick each item's context. Computes the pooled representations
    of the factual and the counterfactual rows ([`CFMoEModelOutput`]); [`CFMoEForMultimodalClassification`] adds the
    heads."""

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
        # label statistics of each token and image patch: they pick each item's *context* (context.py)
        channels = config.base_config.vision_config.num_channels
        self.context_statistics = ContextStatistics(
            config.base_config.text_config.vocab_size,
            channels * (2 * LOCAL_RADIUS + 1) ** 2,
            config.num_labels,
            channels,
            support=config.context_support,
            feature_dim=config.hidden_size,
            covariance_pixels=config.context_covariance_pixels,
        )
        if type(self) is CFMoEModel:  # a model with heads initialises once they are built
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
        counterfactuals: CounterfactualMode | str | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> CFMoEModelOutput:
        r"""The representations of the factual rows and, when `counterfactuals` builds them, of the counterfactual
        rows (the arguments of [`CFMoEForMultimodalClassification.forward`])."""
        config = self.config
        mode = None if counterfactuals is None else CounterfactualMode(counterfactuals)
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        inputs_embeds, attention_mask, image_mask = self._embed(input_ids, attention_mask, inputs_embeds)
        text_mask = attention_mask & ~image_mask
        build_rows = mode is not None and mode.builds_rows and pixel_values is not None
        edits_images = (build_rows or mode == CounterfactualMode.IMAGE_CORE) and pixel_values is not None
        if build_rows and input_ids is None:
            raise ValueError("counterfactual rows pick text context by token id: pass input_ids, not inputs_embeds")

        # 0. how strongly each token and pixel carries a shortcut: it picks the context and routes the experts
        strength, evidence = self._strength_and_evidence(
            input_ids, inputs_embeds, text_mask, pixel_values, edits_images
        )

        # 1. vision tower (once) -> projector -> visual debiasing MoE, merged into the embeddings
        image_inputs = self._image_inputs(image_sizes, batch_num_images)
        image_features = image_rows = visual_routing = None
        if pixel_values is not None or image_mask.any():
            inputs_embeds, image_features, image_rows, visual_routing = self._encode_images(
                inputs_embeds, text_mask, image_mask, pixel_values, image_inputs, evidence
            )

        # 2. the counterfactual rows (or only the image-core readings) of a `counterfactual_fraction` of the items
        cf = core = None
        if build_rows and image_features is not None:
            batch = RowBatch(input_ids, inputs_embeds, attention_mask, image_mask, pixel_values, strength)
            cf = self._counterfactual_rows(batch, image_inputs)
            core = None if cf is None else cf.image_core
        elif edits_images and image_features is not None and strength.pixels is not None:
            core = self._image_core_readings(pixel_values, image_mask, image_inputs, strength)

        # 3. factual and/or counterfactual rows through the language model in one call -> pool -> language MoE
        keep_factual = cf is None or mode != CounterfactualMode.COUNTERFACTUAL_ROWS_ONLY
        n_factual = inputs_embeds.shape[0] if keep_factual else 0
        pooled, text_routing, language_out = self._encode_rows(
            inputs_embeds, attention_mask, evidence, cf, keep_factual, output_attentions, output_hidden_states
        )
        routings = [routing for routing in (visual_routing, text_routing) if routing is not None]
        length = attention_mask.shape[1]
        return CFMoEModelOutput(
            pooled=pooled[:n_factual] if n_factual else None,
            counterfactual_pooled=None if cf is None else pooled[n_factual:],
            counterfactual_source=None if cf is None else cf.source,
            counterfactual_kind=None if cf is None else cf.kind,
            image_core_features=None if core is None else core[0],
            image_core_source=None if core is None else core[1],
            visual_gates=None if visual_routing is None else visual_routing.gates,
            visual_router_logits=None if visual_routing is None else visual_routing.router_logits,
            text_gates=text_routing.gates[:n_factual] if n_factual else None,
            text_router_logits=text_routing.router_logits[:n_factual] if n_factual else None,
            counterfactual_text_gates=None if cf is None else text_routing.gates[n_factual:],
            aux_loss=sum(load_balancing_loss(routing.gates, routing.router_logits) for routing in routings),
            inputs_embeds=inputs_embeds,
            text_mask=text_mask,
            bias_evidence=evidence,
            image_features=image_features,
            image_rows=image_rows,
            hidden_states=_factual_rows(language_out.hidden_states, n_factual, length),
            attentions=_factual_rows(language_out.attentions, n_factual, length),
        )

    def _strength_and_evidence(self, input_ids, inputs_embeds, text_mask, pixel_values, edits_images: bool):
        """(`ContextStrength` of the batch, `(batch, 3)` each item's bias evidence), each None where nothing reads it:
        the counterfactual edits of images read the strength, routers reading bias evidence both."""
        if not (edits_images or self.config.routes_by_evidence):
            return None, None
        token_ids = input_ids if input_ids is not None else self._nearest_token_ids(inputs_embeds)
        strength = self._context_strength(token_ids, pixel_values, warn=edits_images)
        if not self.config.routes_by_evidence:
            return strength, None
        return strength, item_bias_evidence(self.context_statistics, strength, text_mask, pixel_values)

    def _embed(self, input_ids, attention_mask, inputs_embeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(`(batch, length, hidden)` embeddings, `(batch, length)` bool attention mask, `(batch, length)` bool image
        placeholders among the attended tokens) of `input_ids` or `inputs_embeds`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_mask = self._image_mask(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = attention_mask.bool()
        return inputs_embeds, attention_mask, image_mask & attention_mask

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

    def _encode_images(self, inputs_embeds, text_mask, image_mask, pixel_values, image_inputs, evidence):
        """(`inputs_embeds` with the image placeholders holding the images' features, those features
        `(n_tokens, hidden)` and their items `(n_tokens,)`, the visual MoE's routing): vision tower, projector and
        visual MoE, routed by each item's content or bias evidence `(batch, 3)`."""
        image_features, image_rows = self._image_features(pixel_values, image_mask, image_inputs)
        batch = inputs_embeds.shape[0]
        content = pool_tokens(inputs_embeds, text_mask, "mean") + pool_by_row(image_features, image_rows, batch)
        routing = self.visual_moe.route(content, evidence)
        image_features = self.visual_moe(image_features, routing.gates[image_rows])
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(inputs_embeds.dtype))
        return inputs_embeds, image_features, image_rows, routing

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

    def _encode_rows(self, inputs_embeds, attention_mask, evidence, cf, keep_factual, output_attentions, output_hidden):
        """(pooled rows after the language MoE `(rows, hidden)`, their routing, the language model's output) of one
        language-model call over the factual rows (when `keep_factual`) and the counterfactual rows `cf` (if any)."""
        rows_embeds, rows_mask, position_ids, rows_evidence = language_rows(
            inputs_embeds, attention_mask, evidence, cf, keep_factual=keep_factual
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

    def encode_text_only(self, states: CFMoEModelOutput) -> torch.Tensor:
        """`(batch, hidden)` the text-only rows `v*` after the language MoE: the text positions of the factual rows,
        left-aligned (no image tokens, no padding), through the language model on their own, routed by the text part
        of the bias evidence."""
        text_embeds, text_only_mask = left_align(states.inputs_embeds, states.text_mask)
        text_hidden = self.language_model(
            inputs_embeds=text_embeds,
            attention_mask=text_only_mask,
            use_cache=False,
            output_attentions=False,
            output_hidden_states=False,
        ).last_hidden_state
        evidence = states.bias_evidence
        text_evidence = None if evidence is None else evidence * evidence.new_tensor([1.0, 0.0, 0.0])
        pooled, _ = self._language_moe(pool_tokens(text_hidden, text_only_mask, self.config.pooling), text_evidence)
        return pooled

    # ----------------------------------------------------------------------------------------- counterfactual rows
    def _nearest_token_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, length)` the vocabulary token whose embedding is nearest each of `inputs_embeds` (exact for
        embeddings looked up from the table), so that embeddings are routed as their token ids would be."""
        table = self.get_input_embeddings().weight
        return (inputs_embeds @ table.T - 0.5 * (table * table).sum(-1)).argmax(-1)

    def _context_strength(self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None, warn: bool):
        """`counterfactual_rows.context_strength`, its pixels only with one image per item (else a warning)."""
        if pixel_values is not None and pixel_values.shape[0] != token_ids.shape[0]:
            if warn and not getattr(self, "_warned_images", False):
                warnings.warn("items hold several images: counterfactual rows keep their own images", stacklevel=3)
                self._warned_images = True
            pixel_values = None
        return context_strength(self.context_statistics, self.config, token_ids, pixel_values)

    def _counterfactual_rows(self, batch: RowBatch, image_inputs: dict[str, torch.Tensor]) -> CounterfactualRows | None:
        """The rows of every `counterfactual_types` entry for a random `counterfactual_fraction` of the items
        (`counterfactual_rows.edit_rows`), their edited images through the vision tower, projector and visual MoE
        (so a cue the tower spreads over every patch feature leaves with its pixels); with the image-core readings
        of the context-swapped images. None when the fraction draws no item."""
        config, statistics = self.config, self.context_statistics
        draw = draw_rows(config.counterfactual_fraction, batch.inputs_embeds.shape[0], batch.inputs_embeds.device)
        if draw is None:
            return None
        context = batch_context(
            statistics, config, batch.input_ids, batch.attention_mask, batch.image_mask, batch.strength
        )
        row_inputs = {name: value[draw.rows] for name, value in image_inputs.items()}
        edits, image_core = [], None
        for name in config.counterfactual_types:
            edit = edit_rows(COUNTERFACTUAL_KINDS[name], batch, context, draw, statistics, config)
            if edit.images is not None:
                edit.embeds, image_pooled = self._insert_images(edit, row_inputs)
                if edit.kind != CORE_MASKED:
                    image_core = image_pooled.detach().float(), draw.rows
            edits.append(edit)
        return stack_rows(edits, draw, image_core)

    def _insert_images(self, edit: RowEdit, image_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(the edit's embeddings `(n, width, hidden)` with its image positions holding the features of its images:
        vision tower, projector and visual MoE, routed by the row's own content or bias evidence (never by the factual
        item's, whose cue the router may read); the rows' projected image features pooled before the MoE
        `(n, hidden)`)."""
        features, feature_rows = self._image_features(edit.images, edit.image_mask, image_inputs)
        image_pooled = pool_by_row(features, feature_rows, edit.embeds.shape[0])
        content = pool_tokens(edit.embeds, edit.mask & ~edit.image_mask, "mean") + image_pooled
        features = self.visual_moe(features, self.visual_moe.route(content, edit.evidence).gates[feature_rows])
        embeds = edit.embeds.masked_scatter(edit.image_mask.unsqueeze(-1), features.to(edit.embeds.dtype))
        return embeds, image_pooled

    def _image_core_readings(self, pixel_values, image_mask, image_inputs, strength) -> tuple[torch.Tensor, ...] | None:
        """(`(n, hidden)` image-core features, `(n,)` their items) for a random `counterfactual_fraction` of the
        items: their images with the image context swapped out, through the vision tower and projector without
        gradient, pooled."""
        config, statistics = self.config, self.context_statistics
        draw = draw_rows(config.counterfactual_fraction, pixel_values.shape[0], pixel_values.device)
        if draw is None:
            return None
        with torch.no_grad():
            pixels = pixel_context(statistics, config, strength.pixels)
            images = swapped_images(statistics, config, pixel_values, pixels, draw)
            kwargs = {name: value[draw.rows] for name, value in image_inputs.items()}
            features, feature_rows = self._image_features(images, image_mask[draw.rows], kwargs)
            pooled = pool_by_row(features, feature_rows, len(draw.rows))
        return pooled.float(), draw.rows

    # ----------------------------------------------------------------------------------------- context statistics
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
        text_mask = attention_mask.bool() & (input_ids != self.image_token_id)
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
        text_mask = attention_mask.bool() & (input_ids != self.image_token_id)
        rows = image_core_source
        self.context_statistics.update_core_readings(
            input_ids[rows], text_mask[rows], labels[rows], image_core_features
        )

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
        image_mask = input_ids == self.image_token_id
        strength = self._context_strength(input_ids, pixel_values, warn=False)
        context = batch_context(
            self.context_statistics, self.config, input_ids, attention_mask.bool(), image_mask, strength
        )
        return context.text, context.pixels


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
