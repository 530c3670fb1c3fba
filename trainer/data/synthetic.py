"""The synthetic planted-cue benchmark (the offline default, see docs/benchmark.md) and the tasks' labels.

``make_synthetic_benchmark`` builds a ``DatasetDict`` whose items carry a core (text and image polarity) that
decides the clean label, label noise, and spurious cues (one textual, one visual; their forms named by
``SyntheticConfig.cue_setting``) that follow the label with a configurable probability. ``flip_cues`` re-renders
the same items with the cues pointing elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .lexicon import (
    FILLER_WORDS,
    HASHTAGS,
    MARKER_PHRASES,
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POLARITY_WORDS,
    POSITIVE_WORDS,
    PRESENCE_COLOUR,
    PRESENCE_WORDS,
    TINTS,
)

Task = Literal["sarcasm", "sentiment"]
IntArray = int | np.ndarray  # an int, or an integer array (element-wise)

LABEL_NAMES: dict[str, list[str]] = {
    "sarcasm": ["not_sarcastic", "sarcastic"],
    "sentiment": ["negative", "neutral", "positive"],
}


def id2label(task: Task) -> dict[int, str]:
    """Class id -> class name for ``task`` ("sarcasm": 2 classes, "sentiment": 3 classes)."""
    return dict(enumerate(_label_names(task)))


def _label_names(task: str) -> list[str]:
    if task not in LABEL_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(LABEL_NAMES)}")
    return LABEL_NAMES[task]


_FOREGROUND, _BACKGROUND = 200.0, 55.0  # grey levels of the polarity pattern
NO_CUE = -1  # cue column value of an item whose modality carries no cue (the `mixed` setting)

_SPLIT_INDEX = {"train": 0, "validation": 1, "test_iid": 2, "test_ood": 3, "test_neutral": 4}


@dataclass(frozen=True)
class TextCue:
    """A textual cue form. ``kind``: "class" (words from the pointed class's pool) or "presence" (words of
    ``PRESENCE_WORDS`` present iff the cue points at the last class); ``position``: "end", "start" or "random"
    (one place in the sentence); ``pieces``: how many words the cue has (1-3)."""

    kind: Literal["class", "presence"] = "class"
    position: Literal["end", "start", "random"] = "end"
    pieces: int = 1


@dataclass(frozen=True)
class VisualCue:
    """A visual cue form. ``shape``: "tint" (the class colour mixed into every pixel), "mark" (a small filled
    square) or "frame" (a border); ``kind``: "class" (the pointed class's colour) or "presence" (drawn in
    ``PRESENCE_COLOUR`` iff the cue points at the last class); ``place`` (marks): "corner" (top left) or
    "random"."""

    shape: Literal["tint", "mark", "frame"] = "tint"
    kind: Literal["class", "presence"] = "class"
    place: Literal["corner", "random"] = "corner"


@dataclass(frozen=True)
class CueSetting:
    """How cues are planted. Each item draws one form per modality, uniformly from ``text`` and ``image``.
    ``shared_draw``: one draw per item decides whether *both* cues agree with the label (else each is drawn on
    its own). ``mixed``: each item comes from one of two sources, and only that source's modality carries a cue
    (the other modality's cue column is ``NO_CUE``); the ``source`` column says which ("text" or "image").
    ``cue_rate`` (with ``mixed``): the share of items that carry a cue, half of them in each modality; the others
    carry none (source "none"), as most items of a real collection do. ``marker_rate`` (sarcasm only): the
    fraction of items whose text holds a sarcasm marker (``MARKER_PHRASES``) that makes them sarcastic on their
    own, a core that predicts the label alone; the others follow the incongruity rule. The ``marker`` column says
    which items hold one."""

    text: tuple[TextCue, ...]
    image: tuple[VisualCue, ...]
    shared_draw: bool = False
    mixed: bool = False
    cue_rate: float = 1.0
    marker_rate: float = 0.0


_ALL_TEXT = tuple(
    TextCue(k, p, n) for k in ("class", "presence") for p in ("end", "start", "random") for n in (1, 2, 3)
)
_ALL_IMAGE = (
    VisualCue("tint", "class"),
    VisualCue("tint", "presence"),
    *(VisualCue("mark", k, p) for k in ("class", "presence") for p in ("corner", "random")),
    VisualCue("frame", "class"),
    VisualCue("frame", "presence"),
)
CUE_SETTINGS: dict[str, CueSetting] = {
    # a one-word class hashtag at the end, a global class tint (the original benchmark)
    "tint_hashtag": CueSetting(text=(TextCue("class", "end", 1),), image=(VisualCue("tint", "class"),)),
    # a two-word class cue at a random place, a small class-coloured mark at a random place
    "local_mark": CueSetting(text=(TextCue("class", "random", 2),), image=(VisualCue("mark", "class", "random"),)),
    # present/absent cues (three words at the start, a frame) that agree or disagree together
    "presence_shared": CueSetting(
        text=(TextCue("presence", "start", 3),), image=(VisualCue("frame", "presence"),), shared_draw=True
    ),
    # half the items carry a text cue only, half a visual cue only (a corner mark)
    "mixed": CueSetting(text=(TextCue("class", "end", 1),), image=(VisualCue("mark", "class", "corner"),), mixed=True),
    # sparse shortcuts, as in real collections: 30% of the items carry a cue (half a text cue, half a corner mark),
    # the others none
    "sparse": CueSetting(
        text=(TextCue("class", "end", 1),), image=(VisualCue("mark", "class", "corner"),), mixed=True, cue_rate=0.3
    ),
    # the original cues, and a core that predicts alone: a quarter of the items hold a sarcasm marker (sarcasm only)
    "core_markers": CueSetting(
        text=(TextCue("class", "end", 1),), image=(VisualCue("tint", "class"),), marker_rate=0.25
    ),
    # every form of both families, drawn per item (cue-random pretraining of the tiny base)
    "all_forms": CueSetting(text=_ALL_TEXT, image=_ALL_IMAGE),
}
MARK_SIZE, FRAME_WIDTH = 6, 2  # pixels


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic benchmark.

    ``rho_*``: probability that each cue points at the item's label (the noisy label in train/validation, the
    clean one in the test splits); otherwise it points at another class, chosen uniformly. ``cue_setting``
    names the cue forms (``CUE_SETTINGS``). ``label_noise``: probability that the train/validation label
    differs from the clean label. Images are ``image_size`` x ``image_size`` RGB; stripes have period
    ``stripe_period`` pixels.
    """

    task: Task = "sarcasm"
    num_train: int = 4000
    num_validation: int = 1000
    num_test: int = 1000  # per test split
    label_noise: float = 0.2
    rho_train: float = 0.95  # train and validation
    rho_iid: float = 0.95
    rho_ood: float = 0.05
    rho_neutral: float = 0.5
    cue_setting: str = "tint_hashtag"
    marker_rate: float | None = None  # sarcasm markers (``CueSetting.marker_rate``); None: the cue setting's
    image_size: int = 32
    seed: int = 0
    min_filler_words: int = 4
    max_filler_words: int = 9
    stripe_period: int = 4
    tint_strength: float = 0.35  # weight of the cue tint in the pixel mix
    pixel_noise: float = 8.0  # std of Gaussian pixel noise, in 0-255 units

    def __post_init__(self) -> None:
        _label_names(self.task)
        for name in ("label_noise", "rho_train", "rho_iid", "rho_ood", "rho_neutral", "tint_strength"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.min_filler_words <= self.max_filler_words:
            raise ValueError("need 1 <= min_filler_words <= max_filler_words")
        if self.stripe_period < 2 or self.stripe_period % 2:
            raise ValueError(f"stripe_period must be an even number >= 2, got {self.stripe_period}")
        if self.cue_setting not in CUE_SETTINGS:
            raise ValueError(f"unknown cue_setting {self.cue_setting!r}; expected one of {', '.join(CUE_SETTINGS)}")
        if self.marker_rate is not None and not 0.0 <= self.marker_rate <= 0.5:
            raise ValueError(f"marker_rate must lie in [0, 0.5] (markers are sarcastic), got {self.marker_rate}")
        if self.markers and self.task != "sarcasm":
            raise ValueError(f"sarcasm markers (cue_setting {self.cue_setting!r}) need task 'sarcasm'")
        if self.image_size < 2 * MARK_SIZE:
            raise ValueError(f"image_size must be at least {2 * MARK_SIZE} pixels, got {self.image_size}")

    @property
    def cues(self) -> CueSetting:
        return CUE_SETTINGS[self.cue_setting]

    @property
    def markers(self) -> float:
        """The fraction of items holding a sarcasm marker: ``marker_rate``, or the cue setting's."""
        return self.cues.marker_rate if self.marker_rate is None else self.marker_rate


def synthetic_vocabulary(task: Task) -> list[str]:
    """Every word the generator can emit for ``task`` (fillers, lexicons, cue words), sorted."""
    lexicons = POSITIVE_WORDS + NEGATIVE_WORDS + (NEUTRAL_WORDS if task == "sentiment" else [])
    hashtags = [tag for tags in HASHTAGS[task] for tag in tags]
    markers = [word for phrase in MARKER_PHRASES for word in phrase.split()] if task == "sarcasm" else []
    return sorted(set(FILLER_WORDS + lexicons + hashtags + PRESENCE_WORDS + markers))


def group_index(label: IntArray, text_cue: IntArray, image_cue: IntArray, num_classes: int) -> IntArray:
    """Group id of (label, text cue, image cue), cues in ``[NO_CUE, K)``: ``(label * B + t + 1) * B + i + 1``
    with ``B = K + 1``, K classes."""
    base = num_classes + 1
    return (label * base + text_cue + 1) * base + image_cue + 1


def group_parts(group: int, num_classes: int) -> tuple[int, int, int]:
    """(label, text cue, image cue) of a ``group_index`` id; a cue is ``NO_CUE`` where the item has none."""
    base = num_classes + 1
    return group // base**2, (group // base) % base - 1, group % base - 1


def _text_cue_words(config: SyntheticConfig, form: TextCue, cue: int, rng: np.random.Generator) -> list[str]:
    """The cue's words (empty when the item has none, or a presence cue points away from the last class)."""
    last = len(_label_names(config.task)) - 1
    if cue == NO_CUE or (form.kind == "presence" and cue != last):
        return []
    pool = PRESENCE_WORDS if form.kind == "presence" else HASHTAGS[config.task][cue]
    return [pool[i] for i in rng.choice(len(pool), size=form.pieces, replace=False)]


def _cue_colour(config: SyntheticConfig, form: VisualCue, cue: int) -> np.ndarray | None:
    """RGB of the visual cue, or None when the item has none (or a presence cue points away from the last class)."""
    last = len(_label_names(config.task)) - 1
    if cue == NO_CUE or (form.kind == "presence" and cue != last):
        return None
    return np.asarray(PRESENCE_COLOUR if form.kind == "presence" else TINTS[config.task][cue], dtype=float)


def render_item(
    config: SyntheticConfig,
    render_seed: int,
    text_polarity: int,
    image_polarity: int,
    text_cue: int,
    image_cue: int,
    text_form: int = 0,
    image_form: int = 0,
    marker: int = 0,
) -> tuple[str, PIL.Image.Image]:
    """Text and image of one item, deterministic in its arguments.

    The core (filler words, sentiment word and its position, pattern phase, pixel noise) and the cue's
    rendering choices (its words, place) come from two streams of ``render_seed``, so changing only the cue
    values changes only the cue. Polarity: +1 positive (horizontal stripes), -1 negative (vertical stripes),
    0 neutral (checkerboard). ``text_form`` / ``image_form`` index the setting's cue forms; ``marker`` puts a
    sarcasm marker phrase at a random place of the core text. Returns the text and an RGB image of
    ``image_size`` squared.
    """
    rng = np.random.default_rng(render_seed)
    cue_rng = np.random.default_rng([render_seed, 1])
    length = int(rng.integers(config.min_filler_words, config.max_filler_words + 1))
    words = [FILLER_WORDS[i] for i in rng.integers(len(FILLER_WORDS), size=length)]
    lexicon = POLARITY_WORDS[text_polarity]
    words.insert(int(rng.integers(length + 1)), lexicon[int(rng.integers(len(lexicon)))])
    if marker:
        where = int(rng.integers(len(words) + 1))
        words[where:where] = MARKER_PHRASES[int(rng.integers(len(MARKER_PHRASES)))].split()
    text_form_ = config.cues.text[text_form]
    cue_words = _text_cue_words(config, text_form_, text_cue, cue_rng)
    where = {"end": len(words), "start": 0, "random": int(cue_rng.integers(len(words) + 1))}[text_form_.position]
    words[where:where] = cue_words

    size, half = config.image_size, config.stripe_period // 2
    phase_row, phase_col = rng.integers(config.stripe_period, size=2)
    noise = rng.normal(0.0, config.pixel_noise, size=(size, size, 3))
    row, col = np.indices((size, size))
    rows, cols = (row + phase_row) // half, (col + phase_col) // half
    pattern = {1: rows, -1: cols, 0: rows + cols}[image_polarity] % 2
    pixels = np.repeat((_BACKGROUND + (_FOREGROUND - _BACKGROUND) * pattern)[..., None], 3, axis=-1)
    image_form_ = config.cues.image[image_form]
    colour = _cue_colour(config, image_form_, image_cue)
    top, left = cue_rng.integers(size - MARK_SIZE + 1, size=2) if image_form_.place == "random" else (1, 1)
    if colour is not None and image_form_.shape == "tint":
        pixels = (1 - config.tint_strength) * pixels + config.tint_strength * colour
    elif colour is not None and image_form_.shape == "mark":
        pixels[top : top + MARK_SIZE, left : left + MARK_SIZE] = colour
    elif colour is not None:  # frame
        inner = (np.minimum(row, col) >= FRAME_WIDTH) & (np.maximum(row, col) < size - FRAME_WIDTH)
        pixels[~inner] = colour
    pixels = pixels + noise
    image = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return " ".join(words), image


def _synthetic_features(task: Task) -> Features:
    integer = Value("int64")
    return Features(
        {
            "id": Value("string"),
            "image": Image(),
            "text": Value("string"),
            "label": ClassLabel(names=_label_names(task)),
            "group": integer,
            "text_cue": integer,
            "image_cue": integer,
            "text_polarity": integer,
            "image_polarity": integer,
            "clean_label": integer,
            "render_seed": integer,
            "text_form": integer,
            "image_form": integer,
            "source": Value("string"),
            "marker": integer,
        }
    )


def _stratified(n: int, probs: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of indices into ``probs`` in shuffled order, index i exactly ``floor(n * p_i)`` times
    (the few left over drawn at random), so splits are balanced, not only in expectation."""
    counts = np.floor(n * np.asarray(probs)).astype(int)
    rest = rng.choice(len(probs), size=n - counts.sum(), p=probs)
    return rng.permutation(np.concatenate([np.repeat(np.arange(len(probs)), counts), rest]))


def _sample_core(
    task: str, n: int, rng: np.random.Generator, marker_rate: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Text polarity, image polarity, clean label and marker flag of ``n`` items, classes balanced."""
    if task == "sarcasm":
        # (tp, ip) = (+1, -1) is the only incongruous combination; markers make an item sarcastic whatever its
        # polarities. Four kinds: a marker (random polarities), (+1, -1), and the three congruous pairs; the
        # incongruous pair takes what sarcasm needs beyond the markers to reach half the mass.
        pairs = np.array([(1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)])
        kind = _stratified(n, [marker_rate, 1 / 2 - marker_rate] + [1 / 6] * 3, rng)
        tp, ip = pairs[kind].T
        marker = kind == 0
        if marker_rate:  # (no extra draws without markers: the other settings' data stay as they were)
            tp = np.where(marker, rng.choice([-1, 1], size=n), tp)
            ip = np.where(marker, rng.choice([-1, 1], size=n), ip)
        return tp, ip, (marker | ((tp == 1) & (ip == -1))).astype(np.int64), marker.astype(np.int64)
    # The 9 (tp, ip) pairs split 3 / 3 / 3 over sign(tp + ip), so uniform pairs give balanced classes.
    pair = _stratified(n, [1 / 9] * 9, rng)
    tp, ip = pair // 3 - 1, pair % 3 - 1
    return tp, ip, np.sign(tp + ip) + 1, np.zeros(n, dtype=np.int64)


def _other_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A class different from each label, uniform over the others."""
    return (labels + rng.integers(1, num_classes, size=labels.shape)) % num_classes


def _sample_cues(
    setting: CueSetting, label: np.ndarray, rho: float, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text cue, image cue (the class each points at, or ``NO_CUE``) and source of each item."""
    size = len(label)
    agree_text = rng.random(size) < rho
    agree_image = agree_text if setting.shared_draw else rng.random(size) < rho
    text_cue = np.where(agree_text, label, _other_class(label, k, rng))
    image_cue = np.where(agree_image, label, _other_class(label, k, rng))
    source = np.full(size, "both")
    if setting.mixed:
        if setting.cue_rate < 1:  # only then: the other settings' draws stay as they were
            half = setting.cue_rate / 2
            source = np.array(["text", "image", "none"])[_stratified(size, [half, half, 1 - half * 2], rng)]
        else:
            source = np.where(_stratified(size, [0.5, 0.5], rng) == 0, "text", "image")
        text_cue = np.where(source == "text", text_cue, NO_CUE)
        image_cue = np.where(source == "image", image_cue, NO_CUE)
    return text_cue, image_cue, source


def _make_split(config: SyntheticConfig, split: str, size: int, rho: float, noisy: bool) -> Dataset:
    rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split]])
    k = len(_label_names(config.task))
    tp, ip, clean, marker = _sample_core(config.task, size, rng, config.markers)
    flip = rng.random(size) < (config.label_noise if noisy else 0.0)
    label = np.where(flip, _other_class(clean, k, rng), clean)
    text_cue, image_cue, source = _sample_cues(config.cues, label, rho, k, rng)
    seeds = rng.integers(2**31 - 1, size=size)
    form_rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split], 1])  # forms never shift other draws
    columns = {
        "id": [f"{split}-{i:05d}" for i in range(size)],
        "label": label,
        "clean_label": clean,
        "text_cue": text_cue,
        "image_cue": image_cue,
        "text_polarity": tp,
        "image_polarity": ip,
        "render_seed": seeds,
        "group": group_index(label, text_cue, image_cue, k),
        "text_form": form_rng.integers(len(config.cues.text), size=size),
        "image_form": form_rng.integers(len(config.cues.image), size=size),
        "source": source,
        "marker": marker,
    }
    return _render(config, {name: np.asarray(values).tolist() for name, values in columns.items()})


def _render(config: SyntheticConfig, columns: dict[str, list]) -> Dataset:
    """Add ``text`` and ``image`` to attribute columns and build the Dataset."""
    names = (
        "render_seed", "text_polarity", "image_polarity", "text_cue", "image_cue", "text_form", "image_form", "marker"
    )  # fmt: skip
    rendered = [render_item(config, *args) for args in zip(*(columns[name] for name in names), strict=True)]
    columns["text"] = [text for text, _ in rendered]
    columns["image"] = [image for _, image in rendered]
    features = _synthetic_features(config.task)
    return Dataset.from_dict({name: columns[name] for name in features}, features=features)


def make_synthetic_benchmark(config: SyntheticConfig | None = None) -> DatasetDict:
    """The planted-cue benchmark: splits train, validation (rho_train, noisy labels), test_iid, test_ood,
    test_neutral (clean labels). Each split draws from its own seed derived from ``config.seed``; clean
    classes are balanced exactly (up to rounding), noise and cues are Bernoulli draws per item.

    Columns: id, image, text, label (ClassLabel), group (see ``group_index``), text_cue, image_cue (class
    the cue points at, ``NO_CUE`` for none), text_polarity, image_polarity (-1/0/+1), clean_label, render_seed,
    text_form, image_form (index of the cue form in the setting), source (the modality that carries the
    cue in the ``mixed`` setting, else "both") and marker (1: the text holds a sarcasm marker that makes the item
    sarcastic alone). All but id, image, text, label are for evaluation only.
    """
    config = config or SyntheticConfig()
    plan = {
        "train": (config.num_train, config.rho_train, True),
        "validation": (config.num_validation, config.rho_train, True),
        "test_iid": (config.num_test, config.rho_iid, False),
        "test_ood": (config.num_test, config.rho_ood, False),
        "test_neutral": (config.num_test, config.rho_neutral, False),
    }
    return DatasetDict(
        {split: _make_split(config, split, size, rho, noisy) for split, (size, rho, noisy) in plan.items()}
    )


def flip_cues(dataset: Dataset, config: SyntheticConfig) -> Dataset:
    """The same items with every cue moved to the next class ``(c + 1) % K`` (binary: the other class; a
    present/absent cue toggles); a modality without a cue keeps none.

    The core and the cues' rendering choices are unchanged (re-rendered from ``render_seed``): only the cues,
    ``text_cue``, ``image_cue`` and ``group`` change. Ids are kept, so predictions can be paired.
    """
    names = _label_names(config.task)
    if dataset.features["label"].names != names:
        raise ValueError(f"labels {dataset.features['label'].names} are not those of task {config.task!r}")
    k = len(names)
    columns = dataset.remove_columns(["image", "text"]).to_dict()
    for name in ("text_cue", "image_cue"):
        columns[name] = [cue if cue == NO_CUE else (cue + 1) % k for cue in columns[name]]
    columns["group"] = [
        group_index(*cues, k) for cues in zip(columns["label"], columns["text_cue"], columns["image_cue"], strict=True)
    ]
    return _render(config, columns)
