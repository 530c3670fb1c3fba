"""Turning (image, text) pairs into model inputs: the same code for training, evaluation and Hub inference.

The prompt is `config.prompt_template` with `{image}` (the processor's image token) and `{text}`.
Truncation shortens the *text* only, so the image placeholders (which the processor expands to one token
per image feature) are never cut. Without an explicit `max_length`, sequences are bounded by the tokenizer's
`model_max_length` (the language model's context) when it declares a real one.

Bad input raises [`BadExampleError`] with a message that names the item and what to fix; images in any PIL mode
are converted to RGB (alpha composited on white, 16-bit and float images rescaled, EXIF rotation applied).
Pillow is imported where images are decoded, so that loading a model needs torch and transformers only.
"""

from __future__ import annotations

import logging
import os
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "{image}\n{text}"
# Aspect ratios beyond this are refused: shortest-edge resizing (CLIP-style processors) would blow the long side
# up to gigabytes (a 1 x 100000 image at 336 pixels is 34 gigapixels before the crop).
MAX_ASPECT_RATIO = 200
# tokenizers without a declared context report a huge sentinel (1e30) as `model_max_length`: not a bound
_NO_DECLARED_LIMIT = 1_000_000
_EXIF_ORIENTATION = 0x0112
_warned_truncation = False


class BadExampleError(ValueError):
    """An input item that cannot be used; the message names the item and what to fix."""


def load_rgb_image(image: Any, item: str) -> Image.Image:
    """An RGB `PIL.Image` from a PIL image, a path, or a datasets image dict (`{"path", "bytes"}`).

    Grayscale, palette, CMYK, 16-bit, float and alpha images are converted (transparency composited on white);
    EXIF orientation is applied. A missing, truncated or corrupt file, a decompression bomb (more than twice
    `PIL.Image.MAX_IMAGE_PIXELS`), an empty image or an aspect ratio beyond [`MAX_ASPECT_RATIO`] raises
    [`BadExampleError`] naming `item` and the file.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    source = (getattr(image, "filename", None) or "(in memory)") if isinstance(image, Image.Image) else image
    try:
        if isinstance(image, dict):
            source = image.get("path") or "<bytes>"
            if image.get("bytes") is not None:
                image = Image.open(BytesIO(image["bytes"]))
            elif image.get("path"):
                image = image["path"]
            else:
                raise BadExampleError(f"item {item}: the image dict has no bytes and no path; give the item an image")
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise BadExampleError(f"item {item}: image file {image} does not exist; fix the path or drop the item")
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise BadExampleError(f"item {item}: expected a PIL image, a path or an image dict, got {type(image)}")
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    except Image.DecompressionBombError as error:
        raise BadExampleError(
            f"item {item}: image {source} is too large to decode safely ({error}); downscale the file, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        if isinstance(error, BadExampleError):
            raise
        raise BadExampleError(
            f"item {item}: image {source} cannot be decoded ({error}); replace the file or drop the item"
        ) from error
    width, height = image.size
    if min(width, height) < 1:
        raise BadExampleError(f"item {item}: image {source} is empty ({width}x{height}); replace it or drop the item")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadExampleError(
            f"item {item}: image {source} is {width}x{height}, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 that "
            "the processor cannot resize within memory; crop or pad it, or drop the item"
        )
    try:
        return _to_rgb(_apply_exif_orientation(image))
    except (OSError, ValueError) as error:
        raise BadExampleError(
            f"item {item}: image {source} in mode {image.mode} cannot be converted to RGB ({error}); "
            "save it as an RGB JPEG or PNG"
        ) from error


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated / flipped by its EXIF orientation tag (phone photos)."""
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode: high bit depths rescaled to 0..255, transparency composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image), image.mode))  # mode "L"
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey levels of a 16-bit, 32-bit integer or float image (PIL's own conversion clips at 255, or
    truncates floats in [0, 1] to 0). 16-bit modes scale by 1/257; 32-bit integers by their apparent range (8-bit,
    16-bit, else min-max); floats in [0, 1] by 255, in [0, 255] as they are, else min-max."""
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16"):
        scaled = values / 257
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    elif mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257
    else:
        scaled = (values - low) * (255 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_text(text: Any, item: str, image_token: str | None = None) -> str:
    """The text with its whitespace normalised, or [`BadExampleError`] when it is not a string, empty, or holds
    the processor's `image_token` (the placeholder would be expanded into image features that do not exist)."""
    if not isinstance(text, str):
        raise BadExampleError(
            f"item {item}: text must be a string, got {type(text).__name__}; give the item a text or drop it"
        )
    text = " ".join(text.split())
    if not text:
        raise BadExampleError(f"item {item}: text is empty or whitespace only; give the item a text or drop it")
    if image_token and image_token in text:
        raise BadExampleError(
            f"item {item}: text contains the image placeholder {image_token!r}; remove it from the text (the "
            "prompt template inserts the image itself)"
        )
    return text


def encode_examples(
    processor: Any,
    images: list[Image.Image | None],
    texts: list[str],
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_length: int | None = None,
):
    """Processor inputs for a batch: `input_ids`, `attention_mask` `(batch, length)`, `pixel_values`, ...

    `max_length` bounds every sequence (default: the tokenizer's `model_max_length` when it declares one);
    over-long texts are shortened to fit beside the image tokens, which are never cut. Items with `image=None`
    get a text-only prompt (no image placeholder); all or none must have images.
    """
    has_image = [image is not None for image in images]
    if any(has_image) and not all(has_image):
        missing = [index for index, present in enumerate(has_image) if not present]
        raise BadExampleError(
            f"items {missing} of the batch have no image while the others have one: give every item an image "
            "(or batch text-only items separately)"
        )
    image_token = getattr(processor, "image_token", "<image>")
    for text in texts:
        if image_token in text:  # callers check per item with check_text; this guards direct calls
            check_text(text, repr(text[:40]), image_token)
    if not all(has_image):
        image_token = ""
    max_length = _resolve_max_length(processor, max_length)
    if max_length is not None:  # no text can keep more than max_length tokens: cut huge texts before the processor
        texts = [_first_tokens(processor.tokenizer, text, max_length) for text in texts]
    encoded = _encode(processor, images, texts, prompt_template, image_token, verbose=max_length is None)
    if max_length is None:
        return encoded
    lengths = encoded["attention_mask"].sum(1).tolist()
    too_long = [index for index, length in enumerate(lengths) if length > max_length]
    if not too_long:
        return encoded
    texts = list(texts)
    for index in too_long:
        texts[index] = _shorten(processor, images[index], texts[index], prompt_template, image_token, max_length)
    return _encode(processor, images, texts, prompt_template, image_token, verbose=False)


def _resolve_max_length(processor: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        if max_length < 1:
            raise BadExampleError(f"max_length must be a positive number of tokens, got {max_length}")
        return max_length
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_DECLARED_LIMIT else None


def _first_tokens(tokenizer: Any, text: str, count: int) -> str:
    """`text` if it has at most `count` tokens, else the decoded first `count` tokens."""
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=count + 1)["input_ids"]
    return text if len(ids) <= count else tokenizer.decode(ids[:count]).strip()


def _encode(processor: Any, images: list, texts: list[str], prompt_template: str, image_token: str, verbose: bool):
    """`verbose=False` when over-long prompts are shortened here (no "longer than model_max_length" warning)."""
    prompts = [prompt_template.format(image=image_token, text=text) for text in texts]
    if image_token:
        return processor(images=images, text=prompts, return_tensors="pt", padding=True, verbose=verbose)
    return processor.tokenizer(prompts, return_tensors="pt", padding=True, verbose=verbose)


def _length(processor: Any, image: Image.Image | None, text: str, prompt_template: str, image_token: str) -> int:
    """Tokens of one prompt, image placeholders expanded."""
    prompt = prompt_template.format(image=image_token, text=text)
    if image_token:
        return len(processor(images=[image], text=[prompt], verbose=False)["input_ids"][0])
    return len(processor.tokenizer(prompt, verbose=False)["input_ids"])


def _shorten(
    processor: Any, image: Image.Image | None, text: str, prompt_template: str, image_token: str, max_length: int
) -> str:
    """The longest token prefix of `text` whose full prompt fits in `max_length` (checked after re-tokenising:
    a decoded prefix can tokenise differently)."""
    tokenizer = processor.tokenizer
    overhead = _length(processor, image, "", prompt_template, image_token)
    if overhead >= max_length:
        raise BadExampleError(
            f"max_length={max_length} leaves no room for text beside {overhead} prompt and image tokens; "
            "raise max_length"
        )
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    budget = min(len(ids), max_length - overhead)
    _warn_truncation_once(max_length)
    while budget > 0:
        shortened = tokenizer.decode(ids[:budget]).strip()
        excess = _length(processor, image, shortened, prompt_template, image_token) - max_length
        if excess <= 0:
            return shortened
        budget -= excess
    return ""


def _warn_truncation_once(max_length: int) -> None:
    global _warned_truncation
    if not _warned_truncation:
        logger.warning("texts too long for max_length=%d are shortened (image tokens are kept)", max_length)
        _warned_truncation = True
