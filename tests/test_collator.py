"""The collator and the shared preprocessing on bad and unusual input: every bad item is named (or skipped and
counted), every unusual image is converted, truncation never cuts image tokens (property-based over texts and
image sizes/modes)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cfmoe.modeling_cfmoe.preprocessing import MAX_ASPECT_RATIO, BadExampleError, encode_examples, load_rgb_image
from cfmoe.trainer.collator import CFMoECollator

IMAGE_TOKENS = 16  # the tiny processor: 32x32 images, patch 8


def jpeg_bytes(size=(40, 30), color=(200, 30, 30), exif_orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def item(index: int, **overrides) -> dict:
    base = {"id": f"item-{index}", "image": Image.new("RGB", (32, 32), (index * 40, 80, 120)), "text": "a text"}
    return {**base, "label": index % 2, **overrides}


def image_token_counts(processor, batch) -> list[int]:
    token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return (batch["input_ids"] == token).sum(1).tolist()


@pytest.fixture
def collator(processor):
    return CFMoECollator(processor, num_labels=2)


# ------------------------------------------------------------------------------------------------ bad items


def bad_items(tmp_path) -> list[tuple[dict, list[str]]]:
    """(bad field values, fragments the error must contain): each bad input the collator is expected to name."""
    data = jpeg_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image")
    return [
        ({"image": str(tmp_path / "missing.jpg")}, ["missing.jpg", "does not exist", "fix the path"]),
        ({"image": str(truncated)}, ["truncated.jpg", "cannot be decoded", "truncated"]),
        ({"image": str(corrupt)}, ["corrupt.jpg", "cannot be decoded", "replace the file"]),
        ({"image": {"bytes": data[:200], "path": None}}, ["<bytes>", "cannot be decoded"]),
        ({"image": {"bytes": None, "path": None}}, ["no bytes and no path"]),
        ({"image": 42}, ["expected a PIL image"]),
        ({"image": Image.new("RGB", (0, 5))}, ["is empty (0x5)"]),
        ({"image": Image.new("RGB", (2 * MAX_ASPECT_RATIO + 2, 2))}, ["aspect ratio", "crop or pad"]),
        ({"text": ""}, ["text is empty or whitespace only"]),
        ({"text": " \n\t "}, ["text is empty or whitespace only"]),
        ({"text": None}, ["text must be a string, got NoneType"]),
        ({"text": 3.5}, ["text must be a string, got float"]),
        ({"text": "look <image> here"}, ["image placeholder '<image>'", "remove it"]),
        ({"label": 2}, ["label 2 is not a class id in [0, 2)", "id2label"]),
        ({"label": -1}, ["label -1"]),
        ({"label": None}, ["label None"]),
        ({"label": 1.0}, ["label 1.0"]),
        ({"label": True}, ["label True"]),
        ({"label": "sarcastic"}, ["label 'sarcastic'"]),
        ({"group": "g1"}, ["group 'g1' is not an integer"]),
        ({"image": None}, ["no image (the other items have one)"]),
    ]


def test_each_bad_item_is_named_with_what_to_fix(collator, tmp_path):
    for fields, fragments in bad_items(tmp_path):
        batch = [item(0), item(1, id="the-bad-one", **fields), item(2)]
        with pytest.raises(BadExampleError) as caught:
            collator(batch)
        message = str(caught.value)
        assert "the-bad-one" in message and all(fragment in message for fragment in fragments), (fields, message)


def test_skip_bad_examples_drops_counts_and_logs_each_bad_item(processor, tmp_path, caplog):
    collator = CFMoECollator(processor, num_labels=2, skip_bad_examples=True)
    cases = bad_items(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cfmoe.trainer.collator"):
        for number, (fields, _) in enumerate(cases, start=1):
            batch = collator([item(0), item(1, id=f"bad-{number}", **fields), item(2)])
            assert batch["labels"].tolist() == [0, 0] and image_token_counts(processor, batch) == [IMAGE_TOKENS] * 2
            assert collator.num_skipped == number
    assert all(f"bad-{number}" in caplog.text for number in range(1, len(cases) + 1))
    assert f"({len(cases)} skipped so far)" in caplog.text
    with pytest.raises(BadExampleError, match="every item of this batch of 2 was bad"):
        collator([item(0, text=""), item(1, label=7)])


def test_items_without_id_are_named_by_position(collator):
    with pytest.raises(BadExampleError, match="item #1 of the batch: text is empty"):
        collator([{"image": None, "text": "fine", "label": 0}, {"image": None, "text": "", "label": 0}])
    with pytest.raises(BadExampleError, match="item #0: expected a dict"):
        collator([("image", "text", 0)])


def test_integer_labels_of_any_kind_are_accepted(collator):
    labels = [np.int64(1), torch.tensor(0), 1]
    batch = collator([item(i, label=label) for i, label in enumerate(labels)])
    assert batch["labels"].tolist() == [1, 0, 1]


def test_skip_count_is_shared_with_dataloader_workers(processor):
    collator = CFMoECollator(processor, num_labels=2, skip_bad_examples=True)
    items = [item(i, text="" if i % 3 == 0 else "fine", image=None) for i in range(12)]
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=collator, num_workers=2)
    assert sum(len(batch["labels"]) for batch in loader) == 8
    assert collator.num_skipped == 4  # counted in the workers, seen by the main process


# ------------------------------------------------------------------------------------------------ conversions


def test_image_modes_are_converted_to_rgb():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.putpixel((0, 0), (0, 0, 255, 255))
    palette = Image.new("P", (4, 4), 1)
    palette.info["transparency"] = 1
    deep = Image.fromarray(np.array([[0, 32896, 65535, 257]], dtype=np.uint16))  # I;16
    dark = Image.fromarray(np.array([[0, 514]], dtype=np.uint16))  # I;16 too: a dark 16-bit image stays dark
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # I
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))  # F in [0, 1]
    cases = {
        "L": (Image.new("L", (4, 4), 77), (77, 77, 77)),
        "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
        "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        "RGBA": (transparent, (255, 255, 255)),  # transparent pixels become white, not black or red
        "LA": (Image.new("LA", (4, 4), (10, 0)), (255, 255, 255)),
        "P": (palette, (255, 255, 255)),
    }
    for mode, (image, corner) in cases.items():
        converted = load_rgb_image(image, mode)
        assert converted.mode == "RGB" and converted.size == image.size, mode
        assert converted.getpixel((3, 3)) == corner, mode
    assert load_rgb_image(transparent, "rgba").getpixel((0, 0)) == (0, 0, 255)
    assert [load_rgb_image(deep, "i16").getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 1]
    assert [load_rgb_image(dark, "dark").getpixel((x, 0))[0] for x in range(2)] == [0, 2]
    assert [load_rgb_image(wide, "i32").getpixel((x, 0))[0] for x in range(2)] == [0, 255]
    assert [load_rgb_image(unit, "f").getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_file_sources_exif_rotation_and_huge_images(tmp_path, processor, monkeypatch):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(size=(40, 30), exif_orientation=6))  # stored landscape, shown portrait
    assert load_rgb_image(str(path), "path").size == (30, 40)
    assert load_rgb_image(path, "pathlib").size == (30, 40)
    assert load_rgb_image({"bytes": path.read_bytes(), "path": None}, "bytes").size == (30, 40)
    assert load_rgb_image({"bytes": None, "path": str(path)}, "dict path").size == (30, 40)
    big = Image.new("RGB", (3000, 2000), (5, 6, 7))
    batch = encode_examples(processor, [load_rgb_image(big, "big")], ["large"])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40x30: a decompression bomb, over twice the limit
    with pytest.raises(BadExampleError, match="item bomb: .* too large to decode safely"):
        load_rgb_image(str(path), "bomb")


def test_long_texts_keep_every_image_token(processor):
    long_text = "we love the rainy monday " * 400
    for max_length in (24, 40):
        batch = encode_examples(
            processor, [Image.new("RGB", (32, 32))] * 2, [long_text, "short"], max_length=max_length
        )
        assert batch["input_ids"].shape[1] <= max_length
        assert image_token_counts(processor, batch) == [IMAGE_TOKENS] * 2
        assert batch["attention_mask"][0].sum() >= max_length - 2  # the long text fills (nearly) all its budget
    default = encode_examples(processor, [Image.new("RGB", (32, 32))], [long_text])  # tokenizer's model_max_length
    assert default["input_ids"].shape[1] == processor.tokenizer.model_max_length == 128
    text_only = encode_examples(processor, [None], [long_text], max_length=10)
    assert text_only["input_ids"].shape[1] == 10
    with pytest.raises(BadExampleError, match="max_length=12 leaves no room for text beside"):
        encode_examples(processor, [Image.new("RGB", (32, 32))], [long_text], max_length=12)


# ------------------------------------------------------------------------------------------------ properties

FRAGMENTS = [
    "we",
    "love",
    "rainy",
    "monday",
    "#blessed",
    "üñï©ødé",
    "表情",
    "🙂",
    "\u200b",
    "▁",
    "<pad>",
    "{text}",
    "  ",
    "\n",
]
MODES = ["RGB", "L", "RGBA", "P", "LA", "CMYK", "1", "I;16", "F"]


@st.composite
def texts(draw) -> str:
    kind = draw(st.sampled_from(["fragments", "unicode", "long", "blank"]))
    if kind == "fragments":
        return " ".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=12)))
    if kind == "unicode":
        return draw(st.text(max_size=60))
    if kind == "long":
        return " ".join(draw(st.lists(st.sampled_from(FRAGMENTS[:6]), min_size=1, max_size=6))) * 200
    return draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))


@st.composite
def images(draw) -> Image.Image:
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    mode = draw(st.sampled_from(MODES))
    if mode == "I;16":
        return Image.fromarray(np.full((height, width), draw(st.integers(0, 65535)), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(np.full((height, width), draw(st.floats(0, 1)), dtype=np.float32))
    return Image.new(mode, (width, height))


@st.composite
def batches(draw) -> list[dict]:
    size = draw(st.integers(1, 4))
    return [
        {"id": f"h{index}", "image": draw(images()), "text": draw(texts()), "label": draw(st.integers(-1, 2))}
        for index in range(size)
    ]


def is_bad(feature: dict) -> bool:
    text = feature["text"]
    return not " ".join(text.split()) or "<image>" in text or not 0 <= feature["label"] < 2


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(features=batches(), max_length=st.sampled_from([None, 24, 48]), skip=st.booleans())
def test_collator_properties(processor, features, max_length, skip):
    collator = CFMoECollator(processor, num_labels=2, max_length=max_length, skip_bad_examples=skip)
    bad = [feature["id"] for feature in features if is_bad(feature)]
    good = [feature for feature in features if not is_bad(feature)]
    if bad and (not skip or not good):
        with pytest.raises(BadExampleError) as caught:
            collator(features)
        assert skip or bad[0] in str(caught.value)  # the first bad item is named
        return
    batch = collator(features)
    assert collator.num_skipped == len(bad)
    assert batch["labels"].tolist() == [feature["label"] for feature in good]
    assert batch["input_ids"].shape[1] <= (max_length or processor.tokenizer.model_max_length)
    assert image_token_counts(processor, batch) == [IMAGE_TOKENS] * len(good)
    assert batch["pixel_values"].shape == (len(good), 3, 32, 32)
    assert torch.isfinite(batch["pixel_values"]).all()
