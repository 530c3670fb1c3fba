"""`pipeline("multimodal-debiased-classification")`: (image, text) items -> sorted label scores (+ causal effects).

Shipped next to the model as remote code: every `save_pretrained` of the model names this pipeline in config.json
(`add_pipeline_entry`, its save hook) and copies this file and `preprocessing.py`, so that
`pipeline(model=DIR, trust_remote_code=True)` works where neither `modeling_cfmoe` nor `trainer` can be imported.

Batching: every item is preprocessed alone (no padding). With `batch_size > 1` items are collated here rather than
by the base class, whose collate concatenates `pixel_values` as they are: LLaVA-NeXT / OneVision images of other
aspect ratios have other numbers of tiles, which must be zero-padded (as their processors do for a batch).
"""

from __future__ import annotations

import os
from collections.abc import Sized
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .preprocessing import BadExampleError, check_text, encode_examples, load_rgb_image

TASK = "multimodal-debiased-classification"
EFFECTS = {
    "TE": "total_effect",
    "NDE_T": "direct_effect_text",
    "NDE_V": "direct_effect_image",
    "TIE": "indirect_effect",
}


class MultimodalDebiasedClassificationPipeline(Pipeline):
    """Scores `{"image": PIL image | path | None, "text": str}` items (one, or a list) with a CF-MoE classifier.

    Parameters (at construction or per call): `top_k` (labels returned, default all, best first),
    `return_effects` (add TE / NDE_T / NDE_V / TIE per label, in logit space) and `max_length` (tokens; only the
    text is truncated). Each item gives `[{"label": str, "score": float, ("effects": {...})}, ...]`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"the {TASK} pipeline needs the model's processor: pass processor=...")

    def _sanitize_parameters(
        self, top_k: int | None = None, return_effects: bool | None = None, max_length: int | None = None
    ):
        preprocess, forward, postprocess = {}, {}, {}
        if max_length is not None:
            preprocess["max_length"] = max_length
        if return_effects is not None:
            forward["return_effects"] = postprocess["return_effects"] = bool(return_effects)
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            postprocess["top_k"] = top_k
        return preprocess, forward, postprocess

    def preprocess(self, inputs: dict[str, Any], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(inputs, dict) or "text" not in inputs:
            raise BadExampleError(
                f'each input must be a dict {{"image": ..., "text": str}}, got {type(inputs).__name__}'
            )
        text = check_text(inputs["text"], repr(str(inputs["text"])[:40]))
        image = inputs.get("image")
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            raise BadExampleError(f"image {image}: URLs are not fetched; download the image and pass it or its path")
        if image is not None:
            image = load_rgb_image(image, repr(text[:40]))
        encoded = encode_examples(self.processor, [image], [text], self.model.config.prompt_template, max_length)
        return dict(encoded)

    def _forward(self, model_inputs: dict[str, torch.Tensor], return_effects: bool = False) -> dict[str, torch.Tensor]:
        outputs = self.model(**model_inputs, counterfactuals="effects" if return_effects else None)
        result = {"logits": outputs.logits}
        if return_effects:
            result.update({name: getattr(outputs, name) for name in EFFECTS.values()})
        return result

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], top_k: int | None = None, return_effects: bool = False
    ) -> list[dict[str, Any]]:
        scores = model_outputs["logits"][0].float().softmax(-1)
        id2label = self.model.config.id2label
        ranked = []
        for index in scores.argsort(descending=True)[:top_k].tolist():
            entry = {"label": id2label[index], "score": scores[index].item()}
            if return_effects:
                entry["effects"] = {key: model_outputs[name][0, index].item() for key, name in EFFECTS.items()}
            ranked.append(entry)
        return ranked

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """The base iterator with [`_collate`] instead of the base class's collate."""
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pads token rows (positions stay those of the item alone) and zero-pads image tiles (anyres)."""
        keys = set(items[0])
        if any(set(item) != keys for item in items):
            raise BadExampleError("a batch must have an image for every item or for none; use batch_size=1")
        batch = {}
        for key in keys:
            values = [item[key] for item in items]
            if key in ("input_ids", "attention_mask"):
                fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
                width = max(value.shape[1] for value in values)
                values = [F.pad(value, (0, width - value.shape[1]), value=fill) for value in values]
            elif values[0].dim() > 2 and len({value.shape[1] for value in values}) > 1:
                tiles = max(value.shape[1] for value in values)
                values = [torch.cat([v, v.new_zeros(1, tiles - v.shape[1], *v.shape[2:])], dim=1) for v in values]
            batch[key] = torch.cat(values)
        return batch


# registered once per process: the package and each loaded model's remote code hold a copy of this module
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=MultimodalDebiasedClassificationPipeline, pt_model=AutoModel, type="multimodal"
    )


def custom_pipelines_config() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of config.json, as `Pipeline.save_pretrained` writes it for this pipeline."""
    impl = f"{__name__.rpartition('.')[2]}.{MultimodalDebiasedClassificationPipeline.__name__}"
    return {TASK: {"impl": impl, "pt": ["AutoModel"], "type": "multimodal"}}


def add_pipeline_entry(custom_pipelines: dict[str, Any] | None) -> dict[str, Any]:
    """A config's `custom_pipelines` (None: none yet) with this pipeline's entry: what the model's `save_pretrained`
    (and `cfmoe.trainer.hub` for a folder saved without it) writes to config.json."""
    return {**(custom_pipelines or {}), **custom_pipelines_config()}


def save_pipeline(model, processor, save_directory: str | os.PathLike) -> None:
    """Writes model, processor and this pipeline so that `pipeline(model=save_directory, trust_remote_code=True)`
    works offline without our packages (the tokenizer and image processor files too, beside `processor_config.json`).
    """
    device = None if getattr(model, "hf_device_map", None) else model.device  # never move the caller's model
    pipe = MultimodalDebiasedClassificationPipeline(model=model, processor=processor, device=device)
    pipe.save_pretrained(save_directory)  # model, tokenizer, image processor, custom_pipelines, pipeline code
    processor.save_pretrained(save_directory)  # processor_config.json: what AutoProcessor reads back
