"""Inference Endpoints handler: `handler.py` at the root of the Hub repo (copied there by `cfmoe.trainer.hub`).

Request: `{"inputs": {"image": <base64 string | PIL image>, "text": str} or a list of them, "parameters": {...}}`
with the parameters of the `multimodal-debiased-classification` pipeline (`top_k`, `return_effects`,
`max_length`, `batch_size`). Response: the pipeline's output (a list of `{"label", "score"}` per item).
Imports only transformers and PIL: the endpoint loads this file on its own, outside any package.
"""

from __future__ import annotations

import base64
import binascii
from io import BytesIO
from typing import Any

from PIL import Image
from transformers import pipeline


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.pipeline = pipeline(model=path, trust_remote_code=True)

    def __call__(self, data: dict[str, Any]) -> list:
        if "inputs" not in data:
            raise ValueError('the request needs "inputs": {"image": <base64>, "text": str} or a list of them')
        inputs = data["inputs"]
        items = inputs if isinstance(inputs, list) else [inputs]
        decoded = [_decode_item(item, index) for index, item in enumerate(items)]
        outputs = self.pipeline(decoded, **(data.get("parameters") or {}))
        return outputs if isinstance(inputs, list) else outputs[0]


def _decode_item(item: Any, index: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f'input {index}: expected {{"image": <base64>, "text": str}}, got {type(item).__name__}')
    image = item.get("image")
    if isinstance(image, str):
        image = _decode_image(image, index)
    return {**item, "image": image}


def _decode_image(encoded: str, index: int) -> Image.Image:
    """A PIL image from base64 (a `data:image/...;base64,` prefix is allowed)."""
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        return Image.open(BytesIO(base64.b64decode(encoded, validate=True)))
    except (binascii.Error, OSError) as error:
        raise ValueError(f"input {index}: image is not a base64-encoded image file ({error})") from error
