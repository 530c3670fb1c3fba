"""Loaders for the real data sets as released (users bring the data).

``load_mmsd`` (MMSD2.0's JSON layout, also used for MMSD), ``load_mmsd_release`` (MMSD 1.0's own text release),
``load_dmsd_ood`` (the DMSD-CL OOD lines), ``load_mvsa_clmlf`` (MVSA-Single, MVSA-Multiple as CLMLF released their
splits) and ``load_mvsa`` (MVSA's raw layout) each return ``(Dataset, LoadReport)``; ``benchmarks.load_benchmark``
assembles them into a ``DatasetDict`` by name. Bad input raises early with a message naming the file, the line or
item and the fix; ``skip_bad_examples=True`` skips and counts such items instead. ``released_texts`` and
``count_text_cues`` count the spurious cues the released texts carry (docs/real_data.md).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import PIL.Image
from datasets import ClassLabel, Dataset, Features, Image, Value

from .synthetic import LABEL_NAMES

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a loader read from ``source``: items kept, items skipped as bad input, items without a label, items
    the data set's own rule drops.

    ``skipped`` holds one reason per bad item left out (only with ``skip_bad_examples=True``; otherwise the
    first bad item raises). ``num_unlabelled`` counts MVSA items whose annotations give no label under the
    standard rule (not an error: the usual MVSA preprocessing drops them). ``num_discarded`` counts MMSD 1.0
    posts dropped by the release's discard words (``MMSD_DISCARD_WORDS``).
    """

    source: str
    num_loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    num_unlabelled: int = 0
    num_discarded: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


_SKIP_HINT = "or pass skip_bad_examples=True (--skip_bad_examples True to a run script) to skip such items"


def label_id(value: object, names: Sequence[str], where: str) -> int:
    """Class id of ``value``: an int or digit string in range, or a class name (any case); ValueError naming
    ``where`` otherwise."""
    if isinstance(value, str) and value.strip().lower() in names:
        return list(names).index(value.strip().lower())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    allowed = list(range(len(names))) if len(names) == 2 else dict(enumerate(names))
    raise ValueError(f"{where}: label {value!r} is not one of {allowed}; fix the label {_SKIP_HINT}")


class _Items:
    """Validated items of one loader call (id, text, label, image path) and its ``LoadReport``."""

    def __init__(self, source: Path, names: list[str], skip_bad_examples: bool, verify_images: bool) -> None:
        self.names, self.skip, self.verify = names, skip_bad_examples, verify_images
        self.report = LoadReport(source=str(source))
        self.columns: dict[str, list] = {"id": [], "image": [], "text": [], "label": []}
        self.where: dict[str, str] = {}

    @contextmanager
    def item(self) -> Iterator[None]:
        """Raise a bad item's error, or with ``skip_bad_examples`` record it and go on."""
        try:
            yield
        except (ValueError, FileNotFoundError) as error:
            if not self.skip:
                raise
            self.report.skipped.append(str(error))

    def label(self, value: object, where: str) -> int:
        """Class id of ``value`` (``label_id``)."""
        return label_id(value, self.names, where)

    def add(self, item_id: str, text: object, label: int, image: Path, where: str) -> None:
        """Check one item (unique id, non-empty text, readable image) and keep it."""
        if item_id in self.where:
            raise ValueError(
                f"{where}: duplicate id {item_id!r} (first seen at {self.where[item_id]}); make ids unique {_SKIP_HINT}"
            )
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{where}: item {item_id!r} has empty or non-string text {text!r}; fix the text {_SKIP_HINT}"
            )
        if not image.is_file():
            raise FileNotFoundError(
                f"{where}: image file {image} of item {item_id!r} not found; put the "
                f"image there or point the loader at its folder, {_SKIP_HINT}"
            )
        if self.verify:
            try:
                with PIL.Image.open(image) as opened:
                    opened.verify()
            except Exception as error:  # PIL raises many types for corrupt files
                raise ValueError(
                    f"{where}: image file {image} of item {item_id!r} cannot be read ({error}); "
                    f"replace the file {_SKIP_HINT}"
                ) from error
        self.where[item_id] = where
        for name, value in zip(self.columns, (item_id, str(image), text.strip(), label), strict=True):
            self.columns[name].append(value)

    def finish(self) -> tuple[Dataset, LoadReport]:
        report = self.report
        report.num_loaded = len(self.columns["id"])
        if report.skipped:
            reasons = "\n  ".join(report.skipped[:5])
            logger.warning(
                "%s: skipped %d bad item(s); first reasons:\n  %s", report.source, report.num_skipped, reasons
            )
        features = Features(
            {"id": Value("string"), "image": Image(), "text": Value("string"), "label": ClassLabel(names=self.names)}
        )
        return Dataset.from_dict(self.columns, features=features), report


SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
MMSD_JSON_FILES = {"train": "train.json", "validation": "valid.json", "test": "test.json"}
# CLMLF's release of MVSA (github:Link-Li/CLMLF, dataset/data/MVSA-{single,multiple}/10-flod-1): the split files, and
# the class of each of its emotion_label ids (0 positive, 1 neutral, 2 negative; ours: LABEL_NAMES["sentiment"])
CLMLF_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}
CLMLF_LABELS = ("positive", "neutral", "negative")
# MMSD 1.0's text release (github:headacheboy/data-of-multimodal-sarcasm-detection): text/<file> per split, and
# the words whose posts its README and codes/loadData.py discard (a post is dropped when one of its
# whitespace-separated words is one of these)
MMSD_RELEASE_FILES = {"train": "train.txt", "validation": "valid2.txt", "test": "test2.txt"}
MMSD_DISCARD_WORDS = frozenset(
    {"exgag", "sarcasm", "sarcastic", "reposting", "<url>", "joke", "humour", "humor", "jokes", "irony", "ironic"}
)
# DMSD-CL's own OOD line form: [id,text,label], unquoted, the text holding commas
_DMSD_LINE = re.compile(r"\[\s*([^,\]]+?)\s*,(.*),\s*([^,\]]+?)\s*\]")


def split_name(split: str) -> str:
    """train, validation or test for a split name ("valid" and "dev" are validation)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_NAMES)}")
    return SPLIT_NAMES[split]


def _mmsd_split_file(data_dir: Path, split: str) -> Path:
    path = data_dir / MMSD_JSON_FILES[split_name(split)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected MMSD2.0's layout DATA_DIR/{{train,valid,test}}.json")
    return path


def find_image_dir(data_dir: Path, image_dir: str | Path | None) -> Path:
    """The image folder (or one placeholder image file) of a data set in DATA_DIR: ``image_dir``, else the first
    folder of ``DATA_DIR/images``, ``DATA_DIR/dataset_image``, ``DATA_DIR/../dataset_image`` (MMSD2.0's repository:
    ``data/text_json_final`` beside ``data/dataset_image``; CLMLF's: ``MVSA-single/10-flod-1`` beside
    ``MVSA-single/dataset_image``) and ``DATA_DIR/../../dataset_image``."""
    if image_dir is None:
        candidates = [data_dir / "images"]
        candidates += [folder / "dataset_image" for folder in (data_dir, data_dir.parent, data_dir.parent.parent)]
    else:
        candidates = [Path(image_dir)]
    for candidate in candidates:
        if candidate.is_dir() or (image_dir is not None and candidate.is_file()):
            return candidate.resolve()
    raise FileNotFoundError(
        f"no image folder found (looked for {', '.join(map(str, candidates))}); "
        "pass --image_dir <folder holding <id>.jpg, or one image file used for every item>"
    )


def _image_file(images: Path, item_id: str) -> Path:
    """``<images>/<item_id>.jpg``, or ``images`` itself when it is a file: one placeholder image for every item."""
    return images if images.is_file() else images / f"{item_id}.jpg"


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(where, line)`` of every non-blank line of a UTF-8 text file, ``where`` = ``"<path> line <number>"``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            yield f"{path} line {number}", line


def _json_entries(path: Path) -> list:
    """The JSON list of ``path``; ValueError naming the line and column of malformed JSON."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        message = f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        raise ValueError(message) from error
    if not isinstance(entries, list):
        raise TypeError(f"{path}: expected a JSON list of items, got {type(entries).__name__}")
    return entries


def _json_entry(
    entry: object, where: str, keys: tuple[str, str, str] = ("image_id", "text", "label")
) -> tuple[str, object, object]:
    """``(id, text, label)`` of one item of a JSON list, read from its ``keys`` (MMSD2.0's by default)."""
    if not isinstance(entry, dict) or not set(keys) <= entry.keys():
        expected = f"expected an object with keys {', '.join(keys)}: {repr(entry)[:200]}"
        raise ValueError(f"{where}: {expected}; fix the item {_SKIP_HINT}")
    return str(entry[keys[0]]), entry[keys[1]], entry[keys[2]]


def _release_entry(line: str, where: str) -> tuple[str, object, object]:
    """``(id, text, label)`` of one line of MMSD 1.0's release: a Python list ``[id, text, label]`` (train) or
    ``[id, text, hashtag label, annotator label]`` (valid2, test2); the label is the last element."""
    expected = "a Python list [id, text, label] or [id, text, hashtag label, annotator label]"
    try:
        entry = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"{where}: malformed line, expected {expected}: {line[:80]!r}") from error
    if not isinstance(entry, list | tuple) or len(entry) not in (3, 4):
        raise ValueError(f"{where}: expected {expected}, got {entry!r}"[:300])
    return str(entry[0]), entry[1], entry[-1]


def _ood_entry(line: str, where: str) -> tuple[str, object, object]:
    """``(id, text, label)`` of one DMSD-CL OOD line: a JSON list ``[id, text, label]``; a Python list whose id is
    quoted (``['o682716854564', 'text', 0]``); or else DMSD-CL's own form ``[id,text,label]``, unquoted: the id up
    to the first comma, the label after the last, the text between them verbatim (as DMSD-CL's code reads it)."""
    stripped = line.strip()
    try:
        entry = json.loads(stripped)
    except json.JSONDecodeError:
        entry = None
    if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], str):
        return str(entry[0]), entry[1], entry[2]
    if re.match(r"\[\s*['\"]", stripped):  # a quoted id: a JSON or Python list
        try:
            entry = ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as error:
            message = f"{where}: malformed line, expected a JSON or Python list [id, text, label]: {line[:80]!r}"
            raise ValueError(message) from error
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise ValueError(f"{where}: expected [id, text, label], got {entry!r}"[:300])
        return str(entry[0]), entry[1], entry[2]
    match = _DMSD_LINE.fullmatch(stripped)
    if match is None:
        message = f"{where}: malformed line, expected [id,text,label] (DMSD-CL's form) or a JSON list: {line[:80]!r}"
        raise ValueError(message)
    return match.group(1), match.group(2), match.group(3)


def _discarded(text: object) -> bool:
    """Whether MMSD 1.0's release drops this post: one of its whitespace-separated words is a discard word."""
    return isinstance(text, str) and not MMSD_DISCARD_WORDS.isdisjoint(text.split())


def load_mmsd(
    data_dir: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load one split in MMSD2.0's JSON layout (MMSD2.0's ``data/text_json_final``, or MMSD in that layout:
    ``data/text_json_clean``).

    Layout: ``DATA_DIR/{train,valid,test}.json`` (split "train", "validation" or "valid", "test"), each a JSON
    list of ``{"image_id": int | str, "text": str, "label": 0 | 1}``; images ``<image_dir>/<image_id>.jpg``,
    image_dir defaulting to ``DATA_DIR/images``, ``DATA_DIR/dataset_image`` or ``DATA_DIR/../dataset_image``; an
    image_dir that is a file is every item's image (a placeholder).
    Returns the Dataset (id, image path decoded lazily, text, label) and its ``LoadReport``.
    """
    data_dir = Path(data_dir)
    path = _mmsd_split_file(data_dir, split)
    images = find_image_dir(data_dir, image_dir)
    items = _Items(path, LABEL_NAMES["sarcasm"], skip_bad_examples, verify_images)
    for index, entry in enumerate(_json_entries(path)):
        where = f"{path} item {index}"
        with items.item():
            item_id, text, label = _json_entry(entry, where)
            where = f"{where} (id {item_id!r})"
            items.add(item_id, text, items.label(label, where), _image_file(images, item_id), where)
    return items.finish()


def load_mmsd_release(
    data_dir: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    *,
    discard_rule: bool = True,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load one split of MMSD 1.0 as released (github:headacheboy/data-of-multimodal-sarcasm-detection).

    Layout: ``DATA_DIR/text/{train,valid2,test2}.txt`` (split "train", "validation" or "valid", "test"), one
    Python list per line: ``[id, text, label]`` in train, ``[id, text, hashtag label, annotator label]`` in
    valid2 and test2, where the label kept is the last (the annotator's), as the release's ``codes/loadData.py``
    reads them. With ``discard_rule`` (the default) a post one of whose whitespace-separated words is in
    ``MMSD_DISCARD_WORDS`` is dropped, as the release does, and counted in ``LoadReport.num_discarded``: the
    published sizes remain (19,816 / 2,410 / 2,409). Images as in ``load_mmsd``.
    """
    data_dir = Path(data_dir)
    path = data_dir / "text" / MMSD_RELEASE_FILES[split_name(split)]
    images = find_image_dir(data_dir, image_dir)
    items = _Items(path, LABEL_NAMES["sarcasm"], skip_bad_examples, verify_images)
    for where, line in _lines(path):
        with items.item():
            item_id, text, label = _release_entry(line, where)
            if discard_rule and _discarded(text):
                items.report.num_discarded += 1
                continue
            where = f"{where} (id {item_id!r})"
            items.add(item_id, text, items.label(label, where), _image_file(images, item_id), where)
    dataset, report = items.finish()
    logger.info("%s: %d items loaded, %d dropped by the discard words", path, report.num_loaded, report.num_discarded)
    return dataset, report


def is_mmsd_release(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds MMSD 1.0's text release (``text/{train,valid2,test2}.txt``, any of them)."""
    return any((Path(data_dir) / "text" / name).is_file() for name in MMSD_RELEASE_FILES.values())


def load_dmsd_ood(
    path: str | Path,
    image_dir: str | Path,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load the DMSD-CL OOD set (github:xvolcano02/DMSD-CL, ``data/clean_data/ood_all.txt``): one
    ``[id, text, label]`` per line, blank lines skipped, in DMSD-CL's own unquoted form
    (``[820054558953050112,what's so delightful about fridaythe13th, anyway?,1]``: the id up to the first comma,
    the label after the last, the text verbatim), as JSON, or as a Python list with a quoted id (``_ood_entry``). The
    image is that of the original tweet, ``<image_dir>/<id>.jpg`` (a leading "o", as in DMSD-CL's id lists, is
    dropped for the image; the Dataset keeps the id as written); an image_dir that is a file is every item's image.
    Returns ``(Dataset, LoadReport)``.
    """
    path, images = Path(path), Path(image_dir).resolve()
    items = _Items(path, LABEL_NAMES["sarcasm"], skip_bad_examples, verify_images)
    for where, line in _lines(path):
        with items.item():
            item_id, text, label = _ood_entry(line, where)
            where = f"{where} (id {item_id!r})"
            image = _image_file(images, item_id.removeprefix("o"))
            items.add(item_id, text, items.label(label, where), image, where)
    return items.finish()


ReleasedFormat = Literal["mmsd_release", "mmsd_json", "dmsd_ood"]


def released_texts(fmt: ReleasedFormat, path: str | Path, discard_rule: bool = True) -> tuple[list[str], list[int]]:
    """(texts exactly as released, label ids) of one file: ``mmsd_release`` (a ``text/*.txt`` file of MMSD 1.0, its
    discard rule applied unless ``discard_rule=False``), ``mmsd_json`` (a JSON split of MMSD2.0) or ``dmsd_ood``.
    The loaders strip the texts; these are not stripped, so that whitespace cues can be counted. Raises on the
    first bad line or item."""
    path = Path(path)
    if fmt == "mmsd_json":
        numbered = [(f"{path} item {index}", entry) for index, entry in enumerate(_json_entries(path))]
        records = [(where, *_json_entry(entry, where)) for where, entry in numbered]
    else:
        parse = _release_entry if fmt == "mmsd_release" else _ood_entry
        records = [(where, *parse(line, where)) for where, line in _lines(path)]
    texts, labels = [], []
    for where, _, text, label in records:
        if fmt == "mmsd_release" and discard_rule and _discarded(text):
            continue
        if not isinstance(text, str):
            raise ValueError(f"{where}: non-string text {text!r}")
        texts.append(text)
        labels.append(label_id(label, LABEL_NAMES["sarcasm"], where))
    return texts, labels


# Text cues that give the label away in the released data (docs/real_data.md): name -> test on one raw text
TEXT_CUES = {
    "<num> token": lambda text: "<num>" in text.split(),
    "double space": lambda text: "  " in text,
    "ends in a space": lambda text: text.endswith(" "),
    "starts with '": lambda text: text.lstrip().startswith("'"),
}
# The tweet forms of MVSA's texts (docs/real_data.md): name -> test on one raw text
SOCIAL_CUES = {
    "hashtag": lambda text: re.search(r"#\w", text) is not None,
    "mention": lambda text: re.search(r"@\w", text) is not None,
    "URL": lambda text: re.search(r"https?://", text) is not None,
    "RT @": lambda text: re.search(r"\bRT @", text) is not None,
}


def count_text_cues(
    texts: Sequence[str],
    labels: Sequence[int],
    num_labels: int = 2,
    cues: Mapping[str, Callable[[str], bool]] = TEXT_CUES,
) -> dict[str, list[int]]:
    """Per cue of ``cues`` (``TEXT_CUES``, or e.g. ``SOCIAL_CUES``), how many texts of each class (label id
    0 .. num_labels - 1) carry it; "items": the class sizes."""
    counts = {"items": [0] * num_labels} | {name: [0] * num_labels for name in cues}
    for text, label in zip(texts, labels, strict=True):
        counts["items"][label] += 1
        for name, test in cues.items():
            counts[name][label] += int(test(text))
    return counts


HASHTAG = re.compile(r"#(\w+)")


def count_hashtags(texts: Sequence[str], labels: Sequence[int], num_labels: int = 3) -> dict[str, list[int]]:
    """Per hashtag (lower-cased, without ``#``), how many texts of each class (label id 0 .. num_labels - 1) hold
    it, most frequent first."""
    counts: dict[str, list[int]] = {}
    for text, label in zip(texts, labels, strict=True):
        for tag in {tag.lower() for tag in HASHTAG.findall(text)}:
            counts.setdefault(tag, [0] * num_labels)[label] += 1
    return dict(sorted(counts.items(), key=lambda item: (-sum(item[1]), item[0])))


def mvsa_label(annotations: Sequence[tuple[str, str]]) -> int | None:
    """Label id (0 negative, 1 neutral, 2 positive) from MVSA (text, image) annotations, or None.

    Per annotation: equal labels give that label; neutral and X give X; positive against negative is
    inconsistent and ignored. The item's label is the one held by more than half of the consistent
    annotations (MVSA-Single has one annotation); None when there is no such label.
    """
    names = LABEL_NAMES["sentiment"]
    votes = []
    for text, image in annotations:
        if text == image or image == "neutral":
            votes.append(text)
        elif text == "neutral":
            votes.append(image)
    if not votes:
        return None
    label, count = Counter(votes).most_common(1)[0]
    return names.index(label) if 2 * count > len(votes) else None


def _mvsa_file(data_dir: Path, item_id: str, suffix: str) -> Path:
    """``DATA_DIR/data/<id><suffix>``, or ``DATA_DIR/<id><suffix>`` when only that one exists."""
    nested, flat = data_dir / "data" / f"{item_id}{suffix}", data_dir / f"{item_id}{suffix}"
    return flat if flat.is_file() and not nested.is_file() else nested


def load_mvsa(
    data_dir: str | Path,
    label_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load MVSA-Single or MVSA-Multiple (labels 0 negative, 1 neutral, 2 positive).

    Layout: ``DATA_DIR/data/<id>.txt`` and ``<id>.jpg`` (or both directly in DATA_DIR); label file
    ``DATA_DIR/labelResultAll.txt`` (or ``label_file``), tab separated, optional ``ID ...`` header, then
    ``<id>\\t<text>,<image>`` with one (Single) or three (Multiple) annotation columns. Labels follow
    ``mvsa_label``; items it leaves unlabelled are dropped and counted in ``LoadReport.num_unlabelled``.
    Text files are read as UTF-8 with undecodable bytes replaced. Images ``<image_dir>/<id>.jpg`` when ``image_dir``
    is given (a file: every item's image, a placeholder), else beside the texts.
    """
    data_dir = Path(data_dir).resolve()
    label_path = Path(label_file) if label_file is not None else data_dir / "labelResultAll.txt"
    if not label_path.is_file():
        raise FileNotFoundError(f"MVSA label file {label_path} not found; pass label_file=<path>")
    images = find_image_dir(data_dir, image_dir) if image_dir is not None else None
    names = LABEL_NAMES["sentiment"]
    items = _Items(label_path, names, skip_bad_examples, verify_images)
    lines = label_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        item_id, *annotations = line.strip().split("\t")
        if not line.strip() or (number == 1 and item_id.lower() == "id"):
            continue
        where = f"{label_path} line {number} (id {item_id!r})"
        with items.item():
            pairs = [column.split(",") for column in annotations]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"{where}: malformed line, expected <id>\\t<text>,<image>...: {line[:80]!r}")
            label = mvsa_label([tuple(names[items.label(value, where)] for value in pair) for pair in pairs])
            if label is None:
                items.report.num_unlabelled += 1
                continue
            text_path = _mvsa_file(data_dir, item_id, ".txt")
            if not text_path.is_file():
                raise FileNotFoundError(f"{where}: text file {text_path} not found; add it {_SKIP_HINT}")
            text = text_path.read_text(encoding="utf-8", errors="replace")
            image = _mvsa_file(data_dir, item_id, ".jpg") if images is None else _image_file(images, item_id)
            items.add(item_id, text, label, image, where)
    dataset, report = items.finish()
    logger.info(
        "%s: %d items loaded, %d dropped by the MVSA label rule (inconsistent or no majority)",
        report.source,
        report.num_loaded,
        report.num_unlabelled,
    )
    return dataset, report


def is_clmlf(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds CLMLF's release of MVSA (``{train,dev,test}.json``, any of them)."""
    return any((Path(data_dir) / name).is_file() for name in CLMLF_FILES.values())


def clmlf_label(value: object, where: str) -> int:
    """Our sentiment label id (0 negative, 1 neutral, 2 positive) of a CLMLF ``emotion_label`` (0 positive,
    1 neutral, 2 negative; ``CLMLF_LABELS``); ValueError naming ``where`` for any other value."""
    return LABEL_NAMES["sentiment"].index(CLMLF_LABELS[label_id(value, CLMLF_LABELS, where)])


def load_mvsa_clmlf(
    data_dir: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load one split of MVSA-Single or MVSA-Multiple as CLMLF released it (github:Link-Li/CLMLF,
    ``dataset/data/MVSA-{single,multiple}/10-flod-1``: 3,611 / 450 / 450 and 13,624 / 1,700 / 1,700 items).

    Layout: ``DATA_DIR/{train,dev,test}.json`` (split "train", "validation", "valid" or "dev", "test"), each a JSON
    list of ``{"id": str, "text": str, "emotion_label": 0 | 1 | 2}`` in CLMLF's coding, 0 positive, 1 neutral,
    2 negative, mapped to ours (``clmlf_label``: 0 negative, 1 neutral, 2 positive). Images
    ``<image_dir>/<id>.jpg``, image_dir defaulting as in ``find_image_dir`` (CLMLF's ``MVSA-single/dataset_image``
    is ``DATA_DIR/../dataset_image``); an image_dir that is a file is every item's image (a placeholder).
    Returns the Dataset (id, image path decoded lazily, text, label) and its ``LoadReport``.
    """
    data_dir = Path(data_dir)
    path = data_dir / CLMLF_FILES[split_name(split)]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected CLMLF's layout DATA_DIR/{{train,dev,test}}.json")
    images = find_image_dir(data_dir, image_dir)
    items = _Items(path, LABEL_NAMES["sentiment"], skip_bad_examples, verify_images)
    for index, entry in enumerate(_json_entries(path)):
        where = f"{path} item {index}"
        with items.item():
            item_id, text, label = _json_entry(entry, where, ("id", "text", "emotion_label"))
            where = f"{where} (id {item_id!r})"
            items.add(item_id, text, clmlf_label(label, where), _image_file(images, item_id), where)
    return items.finish()
