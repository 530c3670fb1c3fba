"""Turning (image, text) pairs into model inputs: the same code for training, evaluation and Hub inference.

The prompt is `config.prompt_template` with `{image}` (the processor's image token) and `{text}`.
Truncation shortens the *text* only, so the image placeholders (which the processor expands to one token
per image feature) are never cut.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_PROMPT_TEMPLATE = "{image}\n{text}"


class BadExampleError(ValueError):
    """An input item that cannot be used; the message names the item and what to fix."""


def load_rgb_image(image: Any, item: str) -> Image.Image:
    """An RGB `PIL.Image` from a PIL image, a path, or a datasets image dict (`{"path", "bytes"}`).

    Grayscale, palette and RGBA images are converted; a missing, truncated or corrupt file raises
    [`BadExampleError`] naming `item` and the file.
    """
    source = image
    try:
        if isinstance(image, dict):
            source = image.get("path") or "<bytes>"
            if image.get("bytes") is not None:
                from io import BytesIO

                image = Image.open(BytesIO(image["bytes"]))
            else:
                image = image["path"]
        if isinstance(image, (str, os.PathLike)):
            if not os.path.exists(image):
                raise BadExampleError(f"item {item}: image file {image} does not exist; fix the path or drop the item")
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise BadExampleError(f"item {item}: expected a PIL image, a path or an image dict, got {type(image)}")
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise BadExampleError(
            f"item {item}: image {source} cannot be decoded ({error}); replace the file or drop the item"
        ) from error
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def check_text(text: Any, item: str) -> str:
    """The stripped text, or [`BadExampleError`] when it is not a string or empty."""
    if not isinstance(text, str):
        raise BadExampleError(f"item {item}: text must be a string, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise BadExampleError(f"item {item}: text is empty or whitespace only; give the item a text or drop it")
    return text


def encode_examples(
    processor: Any,
    images: list[Image.Image | None],
    texts: list[str],
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_length: int | None = None,
):
    """Processor inputs for a batch: `input_ids`, `attention_mask` `(batch, length)`, `pixel_values`, ...

    `max_length` bounds the whole sequence; texts are shortened to fit beside the image tokens.
    Items with `image=None` get a text-only prompt (no image placeholder); all or none must have images.
    """
    tokenizer = processor.tokenizer
    has_image = [image is not None for image in images]
    if any(has_image) and not all(has_image):
        raise BadExampleError("a batch must have an image for every item or for none")
    image_token = getattr(processor, "image_token", "<image>") if all(has_image) else ""
    if max_length is not None:
        texts = _truncate_texts(processor, images, texts, prompt_template, image_token, max_length)
    prompts = [prompt_template.format(image=image_token, text=text) for text in texts]
    if all(has_image):
        return processor(images=images, text=prompts, return_tensors="pt", padding=True)
    return tokenizer(prompts, return_tensors="pt", padding=True)


def _truncate_texts(processor, images, texts, prompt_template, image_token, max_length) -> list[str]:
    """Cut each text's tokens so that prompt + expanded image tokens fit in `max_length`."""
    tokenizer = processor.tokenizer
    empty = [prompt_template.format(image=image_token, text="") for _ in texts]
    if image_token:
        overhead = processor(images=images, text=empty, padding=False)["input_ids"]
    else:
        overhead = tokenizer(empty, padding=False)["input_ids"]
    shortened = []
    for text, fixed in zip(texts, overhead, strict=False):
        budget = max_length - len(fixed)
        if budget < 1:
            raise BadExampleError(
                f"max_length={max_length} leaves no room for text beside {len(fixed)} prompt and image tokens; "
                "raise max_length"
            )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        shortened.append(text if len(ids) <= budget else tokenizer.decode(ids[:budget]).strip())
    return shortened
