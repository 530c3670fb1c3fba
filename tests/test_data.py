"""Tests for trainer/data/synthetic.py (the planted-cue benchmark) and trainer/data/real.py (the real-data loaders)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import Image
from hypothesis import given
from hypothesis import strategies as st

from cfmoe.trainer.arguments import DataArguments
from cfmoe.trainer.data import (
    count_hashtags,
    count_text_cues,
    load_benchmark,
    load_dmsd_ood,
    load_mmsd,
    load_mmsd_release,
    load_mvsa,
    load_mvsa_clmlf,
    mvsa_label,
    parse_extra_test,
    released_texts,
)
from cfmoe.trainer.data.real import SOCIAL_CUES
from cfmoe.trainer.data.synthetic import (
    CUE_SETTINGS,
    HASHTAGS,
    MARK_SIZE,
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    NO_CUE,
    POSITIVE_WORDS,
    PRESENCE_COLOUR,
    PRESENCE_WORDS,
    SyntheticConfig,
    flip_cues,
    group_index,
    group_parts,
    id2label,
    make_synthetic_benchmark,
    synthetic_vocabulary,
)
from cfmoe.trainer.errors import UserValueError
from cfmoe.trainer.loading import load_data

SPLITS = ["train", "validation", "test_iid", "test_ood", "test_neutral"]
RHO = {"train": 0.95, "validation": 0.95, "test_iid": 0.95, "test_ood": 0.05, "test_neutral": 0.5}


def col(dataset, name: str) -> np.ndarray:
    return np.array(list(dataset[name]))


def pixels(dataset) -> np.ndarray:
    """All images of a split as an int array (N, H, W, 3)."""
    return np.stack([np.asarray(image, dtype=np.int64) for image in dataset["image"]])


@pytest.fixture(scope="module")
def sarcasm():
    return make_synthetic_benchmark(SyntheticConfig())  # the defaults: a few seconds


@pytest.fixture(scope="module")
def sentiment():
    return make_synthetic_benchmark(SyntheticConfig(task="sentiment", num_train=3000, num_test=900))


# ---------------------------------------------------------------------------------------------- synthetic


def test_sizes_columns_and_ids(sarcasm):
    assert {split: len(sarcasm[split]) for split in SPLITS} == {
        "train": 4000,
        "validation": 1000,
        "test_iid": 1000,
        "test_ood": 1000,
        "test_neutral": 1000,
    }
    for split in SPLITS:
        features = sarcasm[split].features
        assert {
            "id",
            "image",
            "text",
            "label",
            "group",
            "text_cue",
            "image_cue",
            "text_polarity",
            "image_polarity",
            "clean_label",
        } <= set(features)
        assert features["label"].names == ["not_sarcastic", "sarcastic"]
        assert isinstance(features["image"], Image)
    ids = [i for split in SPLITS for i in sarcasm[split]["id"]]
    assert len(set(ids)) == len(ids)
    assert id2label("sentiment") == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.parametrize("split", SPLITS)
def test_sarcasm_balance_noise_and_cue_rates(sarcasm, split):
    data = sarcasm[split]
    label, clean = col(data, "label"), col(data, "clean_label")
    assert abs(clean.mean() - 0.5) <= 0.005  # balanced by construction
    noise = np.mean(label != clean)
    if split in ("train", "validation"):
        assert abs(noise - 0.2) < 0.035
    else:
        assert noise == 0
    for cue in ("text_cue", "image_cue"):
        assert abs(np.mean(col(data, cue) == label) - RHO[split]) < 0.05


def test_cues_are_independent_across_modalities(sarcasm):
    data = sarcasm["test_neutral"]
    assert abs(np.mean(col(data, "text_cue") == col(data, "image_cue")) - 0.5) < 0.06


def test_sarcasm_and_rule(sarcasm):
    data = sarcasm["train"]
    tp, ip, clean = col(data, "text_polarity"), col(data, "image_polarity"), col(data, "clean_label")
    assert set(tp) == set(ip) == {-1, 1}
    np.testing.assert_array_equal(clean, (tp == 1) & (ip == -1))
    for combo in [(1, 1), (-1, 1), (-1, -1)]:
        assert abs(np.mean((tp == combo[0]) & (ip == combo[1])) - 1 / 6) < 0.002


def test_group_index_column(sarcasm, sentiment):
    for data, k in [(sarcasm["train"], 2), (sentiment["test_neutral"], 3)]:
        expected = group_index(col(data, "label"), col(data, "text_cue"), col(data, "image_cue"), k)
        np.testing.assert_array_equal(col(data, "group"), expected)
        assert len(set(col(data, "group"))) == k**3


def test_sentiment_rule_balance_noise_and_cues(sentiment):
    for split in SPLITS:
        data = sentiment[split]
        tp, ip = col(data, "text_polarity"), col(data, "image_polarity")
        label, clean = col(data, "label"), col(data, "clean_label")
        np.testing.assert_array_equal(clean, np.sign(tp + ip) + 1)
        assert np.all(np.abs(np.bincount(clean, minlength=3) / len(data) - 1 / 3) < 0.005)
        expected_noise = 0.2 if split in ("train", "validation") else 0.0
        assert abs(np.mean(label != clean) - expected_noise) < 0.04
        for cue in ("text_cue", "image_cue"):
            values = col(data, cue)
            assert abs(np.mean(values == label) - RHO[split]) < 0.05
            assert set(values) == {0, 1, 2}


def test_text_holds_one_sentiment_word_and_trailing_cue(sarcasm, sentiment):
    lexicon = {1: set(POSITIVE_WORDS), -1: set(NEGATIVE_WORDS), 0: set(NEUTRAL_WORDS)}
    for task, splits in [("sarcasm", sarcasm), ("sentiment", sentiment)]:
        data = splits["train"].select(range(300))
        vocabulary = set(synthetic_vocabulary(task))
        for row in data.remove_columns("image"):
            words = row["text"].split()
            assert words[-1] in HASHTAGS[task][row["text_cue"]]
            assert 5 <= len(words) - 1 <= 10
            sentiment_words = [w for w in words if w in set().union(*lexicon.values())]
            assert len(sentiment_words) == 1 and sentiment_words[0] in lexicon[row["text_polarity"]]
            assert set(words) <= vocabulary


def test_reproducible_from_seed():
    small = {"num_train": 20, "num_validation": 5, "num_test": 5}
    first = make_synthetic_benchmark(SyntheticConfig(**small))
    again = make_synthetic_benchmark(SyntheticConfig(**small))
    other = make_synthetic_benchmark(SyntheticConfig(seed=1, **small))
    for split in SPLITS:
        assert first[split]["text"] == again[split]["text"]
        np.testing.assert_array_equal(pixels(first[split]), pixels(again[split]))
        assert first[split]["text"] != other[split]["text"]
    assert first["train"]["text"][:5] != first["validation"]["text"]


def gradients(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean absolute difference between neighbouring rows (vertical) and columns (horizontal) per image."""
    grey = images.mean(axis=-1)
    return np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)), np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))


def test_images_show_polarity_as_pattern_and_cue_as_tint(sarcasm, sentiment):
    data = sentiment["test_neutral"]
    images = pixels(data)
    assert images.shape == (900, 32, 32, 3)
    assert all(image.mode == "RGB" for image in data.select(range(5))["image"])
    vertical, horizontal = gradients(images)
    polarity = col(data, "image_polarity")
    assert np.all(vertical[polarity == 1] > 3 * horizontal[polarity == 1])  # horizontal stripes
    assert np.all(horizontal[polarity == -1] > 3 * vertical[polarity == -1])  # vertical stripes
    assert np.all(np.minimum(vertical, horizontal)[polarity == 0] > 30)  # checkerboard
    # tint: the channel with the highest mean names the cue class (red, green, blue for 0, 1, 2)
    np.testing.assert_array_equal(images.mean(axis=(1, 2)).argmax(axis=1), col(data, "image_cue"))
    red_minus_blue = pixels(sarcasm["test_iid"]).mean(axis=(1, 2)) @ np.array([1, 0, -1])
    np.testing.assert_array_equal(red_minus_blue > 0, col(sarcasm["test_iid"], "image_cue") == 1)


@pytest.mark.parametrize("task", ["sarcasm", "sentiment"])
def test_flip_cues_changes_only_the_cues(task):
    config = SyntheticConfig(task=task, num_train=10, num_validation=10, num_test=60)
    data = make_synthetic_benchmark(config)["test_iid"]
    flipped = flip_cues(data, config)
    k = 2 if task == "sarcasm" else 3
    for before, after in zip(data.remove_columns("image"), flipped.remove_columns("image"), strict=True):
        assert after["text_cue"] == (before["text_cue"] + 1) % k
        assert after["image_cue"] == (before["image_cue"] + 1) % k
        assert after["group"] == group_index(after["label"], after["text_cue"], after["image_cue"], k)
        for name in ("id", "label", "clean_label", "text_polarity", "image_polarity", "render_seed"):
            assert after[name] == before[name]
        assert after["text"].split()[:-1] == before["text"].split()[:-1]
        assert after["text"].split()[-1] in HASHTAGS[task][after["text_cue"]]
    difference = pixels(flipped) - pixels(data)
    # the tint shifts every pixel by one offset per channel (up to rounding): the pattern is untouched
    assert np.all(difference.std(axis=(1, 2)) < 1.0)
    assert np.all(np.abs(difference.mean(axis=(1, 2))).max(axis=1) > 20)
    back = flipped
    for _ in range(k - 1):
        back = flip_cues(back, config)
    np.testing.assert_array_equal(pixels(back), pixels(data))
    assert back["text"] == data["text"]


def small_setting(name: str, num_test: int = 200):
    config = SyntheticConfig(cue_setting=name, num_train=400, num_validation=20, num_test=num_test)
    return config, make_synthetic_benchmark(config)


@pytest.mark.parametrize("name", [n for n in CUE_SETTINGS if n != "all_forms"])
def test_every_cue_setting_plants_cues_at_its_rate_and_flips_them(name):
    config, data = small_setting(name, num_test=600 if name == "sparse" else 200)  # sparse: 30% carry cues
    for split in ("train", "test_ood", "test_neutral"):
        label = col(data[split], "label")
        for cue in ("text_cue", "image_cue"):
            values = col(data[split], cue)
            carried = values != NO_CUE
            assert abs(np.mean(values[carried] == label[carried]) - RHO[split]) < 0.08
    flipped = flip_cues(data["test_iid"], config)
    for cue in ("text_cue", "image_cue"):
        before, after = col(data["test_iid"], cue), col(flipped, cue)
        np.testing.assert_array_equal(after == NO_CUE, before == NO_CUE)
        assert np.all(after[before != NO_CUE] == 1 - before[before != NO_CUE])
    parts = np.stack([col(flipped, name) for name in ("label", "text_cue", "image_cue")], axis=1)
    assert [group_parts(int(group), 2) for group in col(flipped, "group")] == [tuple(map(int, p)) for p in parts]


def cue_words(text: str) -> list[str]:
    cues = set(PRESENCE_WORDS).union(*HASHTAGS["sarcasm"])
    return [word for word in text.split() if word in cues]


def test_local_mark_is_a_two_word_cue_anywhere_and_a_small_square():
    config, data = small_setting("local_mark", num_test=100)
    test, flipped = data["test_iid"], flip_cues(data["test_iid"], config)
    positions = set()
    for row, other in zip(test.remove_columns("image"), flipped.remove_columns("image"), strict=True):
        words = cue_words(row["text"])
        assert len(words) == 2 and set(words) <= set(HASHTAGS["sarcasm"][row["text_cue"]])
        positions.add(row["text"].split().index(words[0]))
        assert [w for w in row["text"].split() if w not in words] == [
            w for w in other["text"].split() if w not in cue_words(other["text"])
        ]
    assert len(positions) > 3  # not always at the same place
    changed = np.abs(pixels(flipped) - pixels(test)).max(axis=-1) > 0
    assert np.all(changed.sum(axis=(1, 2)) == MARK_SIZE**2)  # only the mark's pixels differ
    corners = {tuple(np.argwhere(mask)[0]) for mask in changed}
    assert len(corners) > 10


def test_presence_shared_cues_appear_and_vanish_together():
    _, data = small_setting("presence_shared")
    test = data["test_neutral"]
    text_cue, image_cue = col(test, "text_cue"), col(test, "image_cue")
    np.testing.assert_array_equal(text_cue, image_cue)  # one shared draw
    has_words = np.array([len(cue_words(t)) == 3 and t.split()[0] in PRESENCE_WORDS for t in test["text"]])
    np.testing.assert_array_equal(has_words, text_cue == 1)
    border = pixels(test)[:, 0, :, :].mean(axis=1)  # the top row
    framed = np.abs(border - np.asarray(PRESENCE_COLOUR)).max(axis=1) < 30
    np.testing.assert_array_equal(framed, image_cue == 1)


def test_mixed_items_carry_one_cue_decided_by_their_source():
    _, data = small_setting("mixed")
    train = data["train"]
    source = col(train, "source")
    assert abs(np.mean(source == "text") - 0.5) < 0.01
    np.testing.assert_array_equal(col(train, "text_cue") == NO_CUE, source == "image")
    np.testing.assert_array_equal(col(train, "image_cue") == NO_CUE, source == "text")
    assert all(not cue_words(t) for t in train.select(np.flatnonzero(source == "image"))["text"])


def test_sparse_items_mostly_carry_no_cue():
    """`sparse`: 30% of the items carry a cue (half in the text, half in the image), the rest none; the no-cue items
    are what `clean_accuracy` scores."""
    _, data = small_setting("sparse")
    source = col(data["train"], "source")
    assert abs(np.mean(source == "none") - 0.7) < 0.01 and abs(np.mean(source == "text") - 0.15) < 0.01
    none = source == "none"
    assert (col(data["train"], "text_cue")[none] == NO_CUE).all() and (
        col(data["train"], "image_cue")[none] == NO_CUE
    ).all()
    assert all(not cue_words(t) for t in data["train"].select(np.flatnonzero(none))["text"])


def test_all_forms_draws_every_form_and_reports_it():
    config, data = small_setting("all_forms")
    train = data["train"]
    assert set(col(train, "text_form")) == set(range(len(config.cues.text)))
    assert set(col(train, "image_form")) == set(range(len(config.cues.image)))
    with pytest.raises(ValueError, match="cue_setting"):
        SyntheticConfig(cue_setting="watermark")


def test_flip_cues_rejects_other_task():
    config = SyntheticConfig(num_train=4, num_validation=4, num_test=4)
    with pytest.raises(ValueError, match="task"):
        flip_cues(make_synthetic_benchmark(config)["train"], SyntheticConfig(task="sentiment"))


def test_config_and_dispatcher_validate():
    with pytest.raises(ValueError, match="rho_ood"):
        SyntheticConfig(rho_ood=1.5)
    with pytest.raises(ValueError, match="task"):
        SyntheticConfig(task="irony")  # type: ignore[arg-type]
    small = load_benchmark("synthetic_sentiment", None, num_train=12, num_validation=3, num_test=3, seed=4)
    assert len(small["train"]) == 12 and small["train"].features["label"].num_classes == 3
    with pytest.raises(ValueError, match="num_epochs"):
        load_benchmark("synthetic_sarcasm", None, num_epochs=3)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("imdb", "/tmp")
    with pytest.raises(ValueError, match="data_dir"):
        load_benchmark("mmsd2", None)


# ---------------------------------------------------------------------------------------------- loaders


def jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), colour).save(path, format="JPEG")


def write_mmsd(root: Path, image_folder: str = "images") -> Path:
    splits = {
        "train": [
            {"image_id": 101, "text": "what a lovely monday", "label": 1},
            {"image_id": 102, "text": "nice view", "label": 0},
            {"image_id": "103", "text": "  so fun  ", "label": 1},
        ],
        "valid": [{"image_id": 201, "text": "ok then", "label": 0}],
        "test": [
            {"image_id": 301, "text": "great, rain again", "label": 1},
            {"image_id": 302, "text": "sunny", "label": 0},
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        (root / f"{name}.json").write_text(json.dumps(items))
        for item in items:
            jpeg(root / image_folder / f"{item['image_id']}.jpg")
    return root


def image_paths(dataset) -> list[str]:
    return [image["path"] for image in dataset.cast_column("image", Image(decode=False))["image"]]


def test_mmsd2_layout(tmp_path):
    root = write_mmsd(tmp_path)
    splits = load_benchmark("mmsd2", root)
    assert list(splits) == ["train", "validation", "test"]
    train = splits["train"]
    assert train["id"] == ["101", "102", "103"]
    assert train["text"] == ["what a lovely monday", "nice view", "so fun"]
    assert train["label"] == [1, 0, 1]
    assert train.features["label"].names == ["not_sarcastic", "sarcastic"]
    assert image_paths(train)[0] == str((root / "images" / "101.jpg").resolve())
    assert train[0]["image"].size == (8, 8)
    dataset, report = load_mmsd(root, "valid")
    assert dataset["id"] == ["201"] and report.num_loaded == 1 and report.num_skipped == 0


def test_mmsd_image_folder_names(tmp_path):
    write_mmsd(tmp_path / "a", image_folder="dataset_image")
    assert len(load_mmsd(tmp_path / "a", "test")[0]) == 2
    write_mmsd(tmp_path / "b", image_folder="elsewhere")
    assert len(load_mmsd(tmp_path / "b", "test", image_dir=tmp_path / "b" / "elsewhere")[0]) == 2
    with pytest.raises(FileNotFoundError, match="image_dir"):
        load_mmsd(tmp_path / "b", "test")
    with pytest.raises(ValueError, match="split"):
        load_mmsd(tmp_path / "a", "training")


def write_ood(path: Path) -> Path:
    path.write_text(
        '["o101", "what a terrible monday", 1]\n'
        "\n"
        "['o102', 'nice view, isn\\'t it', 0]\n"
        "  \n"
        '["o301", "great, rain again", "1"]\n'
    )
    return path


def test_dmsd_ood_lines(tmp_path):
    root = write_mmsd(tmp_path)
    dataset, report = load_dmsd_ood(write_ood(tmp_path / "ood.txt"), root / "images")
    assert dataset["id"] == ["o101", "o102", "o301"]
    assert dataset["text"] == ["what a terrible monday", "nice view, isn't it", "great, rain again"]
    assert dataset["label"] == [1, 0, 1]
    assert [Path(p).name for p in image_paths(dataset)] == ["101.jpg", "102.jpg", "301.jpg"]
    assert report.num_loaded == 3
    splits = load_benchmark("mmsd", root, ood_file=tmp_path / "ood.txt")
    assert list(splits) == ["train", "validation", "test", "test_ood"] and len(splits["test_ood"]) == 3


# Lines in the exact formats of the released files (typed here, not copied from the data): MMSD 1.0's
# text/{train,valid2,test2}.txt, one Python list per line, the label last (valid/test: hashtag label, then the
# annotators'); DMSD-CL's ood_all.txt, [id,text,label] unquoted, commas in the text, some texts in quotes.
RELEASE_TRAIN = [
    "['910308516510011393', 'most # funny quotes : 21 snarky and # funny quotes  # # funnyquotes # humor # lol', 1]",
    "['725333760762363905', ' spurs # creativethinking ! <url>', 1]",
    "['840006160660983809', '<user> thanks for showing up for our appointment today . ', 1]",
    "['840006160660983810', \"it 's a lovely <num> degrees , the sun is out\", 0]",
    "['840006160660983811', 'great view from the top', 0]",
]
RELEASE_VALID = [
    "['915657464401580032', 'whew ... that extra <num> miles today .  so why ? # mymostepsup emoji_92', 1, 1]",
    "['854678856724340736', '\" oh , good . now no one will know we \\'re here . \" # remingtonsteele', 1, 0]",
]
RELEASE_TEST = [
    "['862902619928506372', 'i am guessing # netflix no longer lets you grab screens of movies . ', 1, 1]",
    "['892551658487631873', \"it 's the insensitive strikeouts at suntrust park .  # braves # chopchop\", 0, 1]",
    "['853143461360480256', 'following the path of the river calder , so ... grim ... up .... north ', 1, 0]",
]
OOD_LINES = [
    "[862902619928506372,what's so delightful about fridaythe13th, anyway?,1]",
    "[892551658487631873,miserable saturday!!!,1]",
    "",
    "[853143461360480256,'we have a potato shortage in rotherham <user>   valueformoney ',0]",
    '["o840006160660983811", "a JSON line, still read", 0]',
]


def write_release(root: Path, images: bool = True) -> Path:
    """MMSD 1.0's text release under ROOT/text, images ROOT/images/<id>.jpg."""
    (root / "text").mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", RELEASE_TRAIN), ("valid2", RELEASE_VALID), ("test2", RELEASE_TEST)):
        (root / "text" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for line in lines if images else ():
            jpeg(root / "images" / f"{line[2:20]}.jpg")
    return root


def test_mmsd_release_lines_labels_and_discard_rule(tmp_path):
    root = write_release(tmp_path)
    train, report = load_mmsd_release(root, "train")
    # "# humor" and "<url>" are discard words of the release's loadData.py: those posts are dropped and counted
    assert train["id"] == ["840006160660983809", "840006160660983810", "840006160660983811"]
    assert train["label"] == [1, 0, 0]
    assert train["text"][0] == "<user> thanks for showing up for our appointment today ."  # stripped
    assert report.num_discarded == 2 and report.num_loaded == 3 and report.num_skipped == 0
    assert len(load_mmsd_release(root, "train", discard_rule=False)[0]) == 5
    valid, _ = load_mmsd_release(root, "valid")
    assert valid["label"] == [1, 0]  # the last label: the annotators', not the hashtag's
    assert valid["text"][1].startswith("\" oh , good . now no one will know we 're here")
    splits = load_benchmark("mmsd", root)
    assert {split: len(data) for split, data in splits.items()} == {"train": 3, "validation": 2, "test": 3}
    assert splits["test"]["label"] == [1, 1, 0]
    assert image_paths(splits["test"])[0] == str((root / "images" / "862902619928506372.jpg").resolve())


def test_mmsd_layout_detection(tmp_path):
    json_root = write_mmsd(tmp_path / "json")
    assert load_benchmark("mmsd", json_root)["train"]["id"] == ["101", "102", "103"]  # the JSON layout
    write_release(tmp_path / "release")
    with pytest.raises(FileNotFoundError, match=r"train\.json not found"):
        load_benchmark("mmsd2", tmp_path / "release")  # mmsd2 is MMSD2.0's JSON layout only
    with pytest.raises(FileNotFoundError, match=r"text/\{train,valid2,test2\}\.txt or the JSON layout"):
        load_benchmark("mmsd", tmp_path / "nothing")


def test_dmsd_ood_released_line_format(tmp_path):
    ood = tmp_path / "ood_all.txt"
    ood.write_text("\n".join(OOD_LINES) + "\n", encoding="utf-8")
    placeholder = tmp_path / "placeholder.jpg"
    jpeg(placeholder)
    dataset, report = load_dmsd_ood(ood, placeholder)  # one image file: every item's image
    assert dataset["id"] == ["862902619928506372", "892551658487631873", "853143461360480256", "o840006160660983811"]
    assert dataset["text"] == [
        "what's so delightful about fridaythe13th, anyway?",
        "miserable saturday!!!",
        "'we have a potato shortage in rotherham <user>   valueformoney '",  # verbatim, as DMSD-CL reads it
        "a JSON line, still read",
    ]
    assert dataset["label"] == [1, 1, 0, 0] and report.num_loaded == 4
    assert set(image_paths(dataset)) == {str(placeholder.resolve())}
    root = write_release(tmp_path / "release")
    jpeg(root / "images" / "840006160660983811.jpg")
    paths = image_paths(load_dmsd_ood(ood, root / "images")[0])
    assert [Path(path).name for path in paths][-2:] == ["853143461360480256.jpg", "840006160660983811.jpg"]


def test_extra_test_splits_and_placeholder_image(tmp_path):
    release = write_release(tmp_path / "release", images=False)
    mmsd2 = tmp_path / "MMSD2.0" / "data" / "text_json_final"
    write_mmsd(mmsd2, image_folder="../dataset_image")  # as in MMSD2.0's repository: data/dataset_image
    ood = tmp_path / "ood_all.txt"
    ood.write_text("\n".join(OOD_LINES[:2]) + "\n")
    placeholder = tmp_path / "grey.jpg"
    jpeg(placeholder, (128, 128, 128))
    splits = load_benchmark(
        "mmsd", release, image_dir=placeholder, ood_file=ood, extra_test=parse_extra_test(f"mmsd2={mmsd2}")
    )
    assert list(splits) == ["train", "validation", "test", "test_mmsd2", "test_ood"]
    assert splits["test_mmsd2"]["id"] == ["301", "302"] and len(splits["test_ood"]) == 2
    assert all(set(image_paths(data)) == {str(placeholder.resolve())} for data in splits.values())
    found = image_paths(load_mmsd(mmsd2, "test")[0])[0]  # no image_dir: DATA_DIR/../dataset_image
    assert found == str((mmsd2.parent / "dataset_image" / "301.jpg").resolve())
    assert parse_extra_test(None) == {} and parse_extra_test(" mmsd=a , mmsd2=b ") == {"mmsd": "a", "mmsd2": "b"}
    for bad in ("mvsa=dir", "mmsd2", "mmsd2=", "mmsd=a,mmsd=b"):
        with pytest.raises(ValueError, match="NAME=DIR"):
            parse_extra_test(bad)
    with pytest.raises(
        ValueError, match=r"\['mmsd2'\] are not sentiment data sets.*\['mvsa_single', 'mvsa_multiple'\]"
    ):
        load_benchmark("mvsa_single", tmp_path, extra_test={"mmsd2": mmsd2})
    with pytest.raises(ValueError, match="apply to mmsd and mmsd2 only"):
        load_benchmark("mvsa_single", tmp_path, ood_file=ood)


def test_release_bad_lines_name_file_and_line(tmp_path):
    root = write_release(tmp_path)
    train = root / "text" / "train.txt"
    lines = [RELEASE_TRAIN[2], "['1', 'unterminated, 0]", "", "['2', 'two fields']", "['3', 'bad label', 7]"]
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.txt line 2: malformed line, expected a Python list"):
        load_mmsd_release(root, "train")
    dataset, report = load_mmsd_release(root, "train", skip_bad_examples=True)
    assert dataset["id"] == ["840006160660983809"] and report.num_skipped == 3
    assert "line 4: expected" in report.skipped[1] and "line 5 (id '3'): label 7" in report.skipped[2]
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join([OOD_LINES[0], "820054558953050112,no brackets,1", "[8200545589,one field]"]) + "\n")
    with pytest.raises(ValueError, match=r"ood\.txt line 2: malformed line, expected \[id,text,label\] \(DMSD-CL"):
        load_dmsd_ood(ood, root / "images")
    dataset, report = load_dmsd_ood(ood, root / "images", skip_bad_examples=True)
    assert dataset["id"] == ["862902619928506372"] and report.num_skipped == 2
    assert "line 3: malformed line" in report.skipped[1]


def test_released_texts_and_cue_counts(tmp_path):
    root = write_release(tmp_path)
    texts, labels = released_texts("mmsd_release", root / "text" / "train.txt")
    assert labels == [1, 0, 0] and texts[0].endswith("today . ")  # as released: not stripped
    counts = count_text_cues(texts, labels)
    assert counts == {
        "items": [2, 1],
        "<num> token": [1, 0],
        "double space": [0, 0],
        "ends in a space": [0, 1],
        "starts with '": [0, 0],
    }
    texts, labels = released_texts("mmsd_release", root / "text" / "test2.txt")
    assert count_text_cues(texts, labels)["double space"] == [0, 1] and labels == [1, 1, 0]
    mmsd2 = write_mmsd(tmp_path / "json")
    assert released_texts("mmsd_json", mmsd2 / "train.json") == (
        ["what a lovely monday", "nice view", "  so fun  "],
        [1, 0, 1],
    )
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join(OOD_LINES) + "\n")
    texts, labels = released_texts("dmsd_ood", ood)
    assert labels == [1, 1, 0, 0] and count_text_cues(texts, labels)["starts with '"] == [1, 0]


def write_mvsa(root: Path, rows: list[str], flat: bool = False, header: str = "ID\ttext,image") -> Path:
    folder = root if flat else root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for row in rows:
        item_id = row.split("\t")[0]
        (folder / f"{item_id}.txt").write_bytes(f"text of {item_id} caf\xe9 ".encode("latin-1"))
        jpeg(folder / f"{item_id}.jpg")
        lines.append(row)
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("flat", [False, True])
def test_mvsa_single_label_rule(tmp_path, flat):
    rows = [
        "1\tpositive,positive",
        "2\tneutral,negative",
        "3\tpositive,negative",
        "4\tNeutral,Neutral",
        "5\tpositive,neutral",
    ]
    dataset, report = load_mvsa(write_mvsa(tmp_path, rows, flat=flat))
    assert dataset["id"] == ["1", "2", "4", "5"]
    assert dataset["label"] == [2, 0, 1, 2]
    assert dataset.features["label"].names == ["negative", "neutral", "positive"]
    assert dataset["text"][0] == "text of 1 caf\ufffd"  # latin-1 byte replaced, whitespace stripped
    assert report.num_unlabelled == 1 and report.num_loaded == 4 and report.num_skipped == 0


def test_mvsa_multiple_majority(tmp_path):
    rows = [
        "1\tpositive,positive\tpositive,neutral\tnegative,negative",  # 2 of 3 positive
        "2\tpositive,negative\tneutral,neutral\tnegative,neutral",  # neutral vs negative: no majority
        "3\tpositive,negative\tpositive,negative\tneutral,positive",  # one consistent annotation
        "4\tnegative,neutral\tnegative,negative\tpositive,negative",  # 2 of 2 negative
        "5\tpositive,negative\tnegative,positive\tpositive,negative",  # all inconsistent
    ]
    header = "ID\ttext,image\ttext,image\ttext,image"
    dataset, report = load_mvsa(write_mvsa(tmp_path, rows, header=header))
    assert dataset["id"] == ["1", "3", "4"]
    assert dataset["label"] == [2, 2, 0]
    assert report.num_unlabelled == 2


polarities = st.sampled_from(["negative", "neutral", "positive"])


@given(st.lists(st.tuples(polarities, polarities), min_size=1, max_size=5))
def test_mvsa_label_properties(annotations):
    label = mvsa_label(annotations)
    assert mvsa_label(list(reversed(annotations))) == label
    if label is not None:
        name = ["negative", "neutral", "positive"][label]
        assert name in {pair[0] for pair in annotations} | {pair[1] for pair in annotations}
    if all(pair == annotations[0] and pair[0] == pair[1] for pair in annotations):
        assert label == ["negative", "neutral", "positive"].index(annotations[0][0])


def test_mvsa_benchmark_split(tmp_path):
    rows = [f"{i}\tpositive,neutral" if i % 2 else f"{i}\tnegative,negative" for i in range(1, 41)]
    root = write_mvsa(tmp_path, rows)
    splits = load_benchmark("mvsa_single", root)
    assert {split: len(data) for split, data in splits.items()} == {"train": 32, "validation": 4, "test": 4}
    ids = [set(data["id"]) for data in splits.values()]
    assert set.union(*ids) == {str(i) for i in range(1, 41)} and sum(map(len, ids)) == 40
    assert load_benchmark("mvsa_multiple", root)["test"]["id"] == splits["test"]["id"]
    assert load_benchmark("mvsa_single", root, split_seed=1)["test"]["id"] != splits["test"]["id"]


# CLMLF's release of MVSA (github:Link-Li/CLMLF): dataset/data/MVSA-<single|multiple>/10-flod-1/{train,dev,test}.json,
# JSON lists of {"id", "text", "emotion_label"} with 0 positive, 1 neutral, 2 negative; images in
# MVSA-<single|multiple>/dataset_image. Items typed here in that format, not copied from the data.
CLMLF_TRAIN = [
    {"id": "5", "text": "RT @friend: Went to the lake today, lovely people! #happy", "emotion_label": 0},
    {"id": "9", "text": "Stuck in traffic again #fail http://t.co/abc", "emotion_label": 2},
    {"id": "12", "text": " Game day at the stadium ", "emotion_label": 1},
    {"id": "13", "text": "Best day ever #happy #love", "emotion_label": 0},
]
CLMLF_DEV = [{"id": "16", "text": "Sunset over the #harbour tonight #calm", "emotion_label": 0}]
CLMLF_TEST = [
    {"id": "17", "text": "Fresh bread from the corner shop.", "emotion_label": 0},
    {"id": "21", "text": "@someone this is awful", "emotion_label": 2},
]


def write_clmlf(root: Path, collection: str = "MVSA-single", images: bool = True) -> Path:
    """CLMLF's layout under ROOT: the split folder ``dataset/data/<collection>/10-flod-1`` (returned), with a
    ``train-copy.json`` as MVSA-multiple has, and ``dataset_image/<id>.jpg`` beside it."""
    folder = root / "dataset" / "data" / collection / "10-flod-1"
    folder.mkdir(parents=True)
    for name, items in (("train", CLMLF_TRAIN), ("dev", CLMLF_DEV), ("test", CLMLF_TEST)):
        (folder / f"{name}.json").write_text(json.dumps(items))
        for item in items if images else ():
            jpeg(folder.parent / "dataset_image" / f"{item['id']}.jpg")
    (folder / "train-copy.json").write_text("not read")
    return folder


def test_mvsa_clmlf_layout_labels_and_image_folder(tmp_path):
    folder = write_clmlf(tmp_path)
    splits = load_benchmark("mvsa_single", folder)
    assert {split: len(data) for split, data in splits.items()} == {"train": 4, "validation": 1, "test": 2}
    train = splits["train"]
    assert train.features["label"].names == ["negative", "neutral", "positive"]
    # CLMLF's 0 positive, 1 neutral, 2 negative -> ours 2, 1, 0
    assert train["label"] == [2, 0, 1, 2] and train.features["label"].int2str(train["label"][0]) == "positive"
    assert train["id"] == ["5", "9", "12", "13"] and train["text"][2] == "Game day at the stadium"
    images = folder.parent / "dataset_image"  # found at DATA_DIR/../dataset_image, as in CLMLF's repository
    assert image_paths(train)[0] == str((images / "5.jpg").resolve()) and train[0]["image"].size == (8, 8)
    dev, report = load_mvsa_clmlf(folder, "dev")
    assert dev["id"] == ["16"] and dev["label"] == [2] and report.num_loaded == 1 and report.source.endswith("dev.json")
    assert load_mvsa_clmlf(folder, "validation")[0]["id"] == load_mvsa_clmlf(folder, "valid")[0]["id"] == ["16"]
    assert load_benchmark("mvsa_multiple", folder)["test"]["label"] == [2, 0]


def test_mvsa_image_dir_file_for_clmlf_and_raw_layouts(tmp_path):
    clmlf = write_clmlf(tmp_path / "CLMLF", images=False)
    raw = write_mvsa(tmp_path / "raw", [f"{i}\tpositive,positive" for i in range(1, 11)])
    placeholder = tmp_path / "grey.jpg"
    jpeg(placeholder, (128, 128, 128))
    with pytest.raises(FileNotFoundError, match="pass --image_dir"):
        load_mvsa_clmlf(clmlf, "test")
    for name, folder in (("mvsa_single", clmlf), ("mvsa_multiple", raw)):
        splits = load_benchmark(name, folder, image_dir=placeholder)
        assert all(set(image_paths(data)) == {str(placeholder.resolve())} for data in splits.values())
    dataset, _ = load_mvsa(raw, image_dir=raw / "data")  # a folder of <id>.jpg
    assert [Path(path).name for path in image_paths(dataset)][:2] == ["1.jpg", "2.jpg"]
    with pytest.raises(FileNotFoundError, match="pass --image_dir"):
        load_mvsa(raw, image_dir=tmp_path / "nowhere")


def test_mvsa_extra_test_and_task_families(tmp_path):
    single, multiple = write_clmlf(tmp_path), write_clmlf(tmp_path, "MVSA-multiple")
    rows = [f"{i}\tpositive,neutral" if i % 2 else f"{i}\tnegative,negative" for i in range(1, 21)]
    raw = write_mvsa(tmp_path / "raw", rows)
    extra = parse_extra_test(f"mvsa_multiple={multiple}, mvsa_single={raw}")
    assert extra == {"mvsa_multiple": str(multiple), "mvsa_single": str(raw)}
    splits = load_benchmark("mvsa_single", single, extra_test=extra)
    assert list(splits) == ["train", "validation", "test", "test_mvsa_multiple", "test_mvsa_single"]
    assert splits["test_mvsa_multiple"]["id"] == ["17", "21"]
    assert splits["test_mvsa_single"]["id"] == load_benchmark("mvsa_single", raw)["test"]["id"]  # the seeded split
    with pytest.raises(ValueError, match=r"\['mvsa_multiple'\] are not sarcasm data sets.*\['mmsd', 'mmsd2'\]"):
        load_benchmark("mmsd2", write_mmsd(tmp_path / "mmsd"), extra_test={"mvsa_multiple": multiple})
    with pytest.raises(ValueError, match="no label_file or split_seed"):
        load_benchmark("mvsa_single", single, split_seed=1)
    with pytest.raises(ValueError, match=r"NAME one of \['mmsd', 'mmsd2', 'mvsa_single', 'mvsa_multiple'\]"):
        parse_extra_test("mvsa=dir")
    arguments = DataArguments(dataset="mvsa_single", data_dir=str(single), extra_test=f"mvsa_multiple={multiple}")
    assert list(load_data("sentiment", arguments, seed=0)[0])[-1] == "test_mvsa_multiple"
    with pytest.raises(UserValueError, match="mvsa_single is a sentiment data set: run examples/run_sentiment.py"):
        load_data("sarcasm", arguments, seed=0)


def test_mvsa_clmlf_bad_items_name_file_and_item(tmp_path):
    folder = write_clmlf(tmp_path)
    test = folder / "test.json"
    bad = [
        (
            {"id": "17", "text": "fine", "emotion_label": 3},
            ValueError,
            r"item 1 \(id '17'\): label 3 is not one of \{0: 'positive'",
        ),
        ({"id": "17", "text": "no label"}, ValueError, r"item 1: expected an object with keys id, text, emotion_label"),
        (
            {"id": "21", "text": "duplicate", "emotion_label": 0},
            ValueError,
            r"duplicate id '21' \(first seen at .*item 0",
        ),
        ({"id": "17", "text": "  ", "emotion_label": 1}, ValueError, r"item 1 \(id '17'\): item '17' has empty"),
        ({"id": "99", "text": "no image", "emotion_label": 1}, FileNotFoundError, r"99\.jpg of item '99' not found"),
    ]
    for item, error, message in bad:
        test.write_text(json.dumps([CLMLF_TEST[1], item]))
        with pytest.raises(error, match=message) as caught:
            load_mvsa_clmlf(folder, "test")
        assert str(test) in str(caught.value) and "skip_bad_examples" in str(caught.value)
    test.write_text(json.dumps([CLMLF_TEST[1], *(item for item, _, _ in bad)]))
    dataset, report = load_mvsa_clmlf(folder, "test", skip_bad_examples=True)
    assert dataset["id"] == ["21"] and report.num_skipped == 5
    test.write_text('[\n{"id": "17", "text": "x", "emotion_label": 0},\n{"id": "21",\n')
    with pytest.raises(ValueError, match=r"test\.json: malformed JSON at line 4"):
        load_mvsa_clmlf(folder, "test")
    with pytest.raises(FileNotFoundError, match=r"expected CLMLF's layout DATA_DIR/\{train,dev,test\}\.json"):
        load_mvsa_clmlf(tmp_path, "train")


def test_social_cues_and_hashtags():
    texts = [item["text"] for item in CLMLF_TRAIN]
    labels = [2, 0, 1, 2]
    assert count_text_cues(texts, labels, 3, SOCIAL_CUES) == {
        "items": [1, 1, 2],
        "hashtag": [1, 0, 2],
        "mention": [0, 0, 1],
        "URL": [1, 0, 0],
        "RT @": [0, 0, 1],
    }
    assert count_hashtags([*texts, "#HAPPY #happy"], [*labels, 0]) == {
        "happy": [1, 0, 2],
        "fail": [1, 0, 0],
        "love": [0, 0, 1],
    }


# ---------------------------------------------------------------------------------------------- bad input


def write_bad_mmsd(root: Path) -> Path:
    items = [
        {"image_id": 1, "text": "fine", "label": 1},
        {"image_id": 2, "text": "no image", "label": 0},
        {"image_id": 3, "text": "bad label", "label": 2},
        {"image_id": 4, "text": "   ", "label": 0},
        {"image_id": 1, "text": "duplicate", "label": 0},
        {"image_id": 5, "text": "also fine", "label": 0},
    ]
    (root / "test.json").write_text(json.dumps(items))
    for image_id in (1, 3, 4, 5):
        jpeg(root / "images" / f"{image_id}.jpg")
    return root


def test_each_bad_item_fails_with_a_clear_message(tmp_path):
    root = write_bad_mmsd(tmp_path)
    source = json.loads((root / "test.json").read_text())
    expectations = [
        (1, FileNotFoundError, ["'2'", str((root / "images" / "2.jpg").resolve()), "not found"]),
        (2, ValueError, ["item 1 (id '3')", "label 2"]),
        (3, ValueError, ["'4'", "empty"]),
        (4, ValueError, ["duplicate id '1'", "item 0"]),
    ]
    for index, error, fragments in expectations:
        (root / "test.json").write_text(json.dumps([source[0], source[index]]))
        with pytest.raises(error) as caught:
            load_mmsd(root, "test")
        message = str(caught.value)
        assert all(fragment in message for fragment in fragments), message
        assert "skip_bad_examples" in message


def test_skip_bad_examples_skips_and_counts(tmp_path, caplog):
    root = write_bad_mmsd(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cfmoe.trainer.data"):
        dataset, report = load_mmsd(root, "test", skip_bad_examples=True)
    assert dataset["id"] == ["1", "5"]
    assert report.num_skipped == 4 and report.num_loaded == 2
    assert "2.jpg" in report.skipped[0] and "duplicate" in report.skipped[3]
    assert "skipped 4 bad item(s)" in caplog.text


def test_malformed_files_name_the_line(tmp_path):
    root = write_mmsd(tmp_path)
    (root / "valid.json").write_text('[\n{"image_id": 201, "text": "x", "label": 0},\n{"image_id": 202,\n')
    with pytest.raises(ValueError, match=r"valid\.json: malformed JSON at line 4"):
        load_mmsd(root, "validation")
    ood = tmp_path / "ood.txt"
    ood.write_text('["o101", "fine", 1]\n\n["o102", "unterminated, 0\n["o301", "two"]\n["o999", "x", 1]\n')
    with pytest.raises(ValueError, match=r"ood\.txt line 3: malformed line"):
        load_dmsd_ood(ood, root / "images")
    dataset, report = load_dmsd_ood(ood, root / "images", skip_bad_examples=True)
    assert dataset["id"] == ["o101"] and report.num_skipped == 3
    assert "line 4" in report.skipped[1] and "999.jpg" in report.skipped[2]


def test_mvsa_bad_input(tmp_path):
    rows = ["1\tpositive,happy", "2\tpositive,positive", "3\tpositive", "4\tneutral,neutral"]
    root = write_mvsa(tmp_path, rows)
    (root / "data" / "4.txt").write_text(" \n")
    (root / "data" / "2.jpg").unlink()
    with pytest.raises(ValueError, match=r"line 2 \(id '1'\): label 'happy' is not one of"):
        load_mvsa(root)
    dataset, report = load_mvsa(root, skip_bad_examples=True)
    assert len(dataset) == 0 and report.num_skipped == 4
    assert "2.jpg" in report.skipped[1] and "line 4" in report.skipped[2] and "empty" in report.skipped[3]
    with pytest.raises(FileNotFoundError, match="label_file"):
        load_mvsa(tmp_path / "nowhere")


def test_verify_images_catches_corrupt_files(tmp_path):
    root = write_mmsd(tmp_path)
    (root / "images" / "302.jpg").write_bytes(b"not a jpeg at all")
    assert len(load_mmsd(root, "test")[0]) == 2  # without verification corrupt files pass (checked lazily)
    with pytest.raises(ValueError, match=r"302\.jpg of item '302' cannot be read"):
        load_mmsd(root, "test", verify_images=True)
    dataset, report = load_mmsd(root, "test", verify_images=True, skip_bad_examples=True)
    assert dataset["id"] == ["301"] and report.num_skipped == 1
