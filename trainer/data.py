"""Loaders for the real data layouts (users bring the data) and ``load_benchmark``, which dispatches by name.

``load_mmsd`` (MMSD, MMSD2.0), ``load_dmsd_ood`` (DMSD-CL OOD lines) and ``load_mvsa`` (MVSA-Single,
MVSA-Multiple) each return ``(Dataset, LoadReport)``; ``load_benchmark`` returns a ``DatasetDict`` (it logs the
reports) for these and for the synthetic benchmark (``trainer.synthetic``). Bad input raises early with a message
naming the item, the file and the fix; ``skip_bad_examples=True`` skips and counts such items instead.
"""

from __future__ import annotations

import ast
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .synthetic import LABEL_NAMES, SyntheticConfig, make_synthetic_benchmark

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Loaders for the real data layouts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a loader read from ``source``: items kept, items skipped as bad input, items without a label.

    ``skipped`` holds one reason per bad item left out (only with ``skip_bad_examples=True``; otherwise the
    first bad item raises). ``num_unlabelled`` counts MVSA items whose annotations give no label under the
    standard rule (not an error: the usual MVSA preprocessing drops them).
    """

    source: str
    num_loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    num_unlabelled: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


_SKIP_HINT = "or pass skip_bad_examples=True (--skip_bad_examples True to a run script) to skip such items"


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
        """Class id of ``value``: an int or digit string in range, or a class name (any case)."""
        if isinstance(value, str) and value.strip().lower() in self.names:
            return self.names.index(value.strip().lower())
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        allowed = list(range(len(self.names))) if len(self.names) == 2 else self.names
        raise ValueError(f"{where}: label {value!r} is not one of {allowed}; fix the label {_SKIP_HINT}")

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


def _mmsd_split_file(data_dir: Path, split: str) -> Path:
    stems = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
    if split not in stems:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(stems)}")
    path = data_dir / f"{stems[split]}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected MMSD layout DATA_DIR/{{train,valid,test}}.json")
    return path


def _mmsd_image_dir(data_dir: Path, image_dir: str | Path | None) -> Path:
    candidates = [data_dir / "images", data_dir / "dataset_image"] if image_dir is None else [Path(image_dir)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no image folder found (looked for {', '.join(map(str, candidates))}); "
        "pass image_dir=<folder holding <image_id>.jpg>"
    )


def load_mmsd(
    data_dir: str | Path,
    split: str,
    image_dir: str | Path | None = None,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load one split of MMSD or MMSD2.0.

    Layout: ``DATA_DIR/{train,valid,test}.json`` (split "train", "validation" or "valid", "test"), each a JSON
    list of ``{"image_id": int | str, "text": str, "label": 0 | 1}``; images ``<image_dir>/<image_id>.jpg``,
    image_dir defaulting to ``DATA_DIR/images`` or else ``DATA_DIR/dataset_image``.
    Returns the Dataset (id, image path decoded lazily, text, label) and its ``LoadReport``.
    """
    data_dir = Path(data_dir)
    path = _mmsd_split_file(data_dir, split)
    images = _mmsd_image_dir(data_dir, image_dir)
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        message = f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        raise ValueError(message) from error
    if not isinstance(entries, list):
        raise TypeError(f"{path}: expected a JSON list of items, got {type(entries).__name__}")
    items = _Items(path, LABEL_NAMES["sarcasm"], skip_bad_examples, verify_images)
    for index, entry in enumerate(entries):
        where = f"{path} item {index}"
        with items.item():
            if not isinstance(entry, dict) or not {"image_id", "text", "label"} <= entry.keys():
                raise ValueError(f"{where}: expected an object with keys image_id, text, label: {entry!r}")
            item_id = str(entry["image_id"])
            where = f"{where} (id {item_id!r})"
            label = items.label(entry["label"], where)
            items.add(item_id, entry["text"], label, images / f"{item_id}.jpg", where)
    return items.finish()


def _parse_line(line: str) -> object:
    """A line as JSON, or else as a Python literal (DMSD-CL files use both quotings)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return ast.literal_eval(line)


def load_dmsd_ood(
    path: str | Path,
    image_dir: str | Path,
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load the DMSD-CL OOD set: one ``[id, text, label]`` per line (JSON or Python quoting; blank lines
    skipped), ids prefixed "o" (e.g. "o682716854564"); the image is that of the original id,
    ``<image_dir>/<id without the "o">.jpg``. The Dataset keeps the prefixed id.
    Returns ``(Dataset, LoadReport)``.
    """
    path, images = Path(path), Path(image_dir).resolve()
    items = _Items(path, LABEL_NAMES["sarcasm"], skip_bad_examples, verify_images)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        with items.item():
            try:
                entry = _parse_line(line)
            except (ValueError, SyntaxError) as error:
                message = f"{where}: malformed line, expected [id, text, label]: {line[:80]!r}"
                raise ValueError(message) from error
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"{where}: expected [id, text, label], got {entry!r}"[:300])
            item_id = str(entry[0])
            where = f"{where} (id {item_id!r})"
            image = images / f"{item_id.removeprefix('o')}.jpg"
            items.add(item_id, entry[1], items.label(entry[2], where), image, where)
    return items.finish()


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
    *,
    skip_bad_examples: bool = False,
    verify_images: bool = False,
) -> tuple[Dataset, LoadReport]:
    """Load MVSA-Single or MVSA-Multiple (labels 0 negative, 1 neutral, 2 positive).

    Layout: ``DATA_DIR/data/<id>.txt`` and ``<id>.jpg`` (or both directly in DATA_DIR); label file
    ``DATA_DIR/labelResultAll.txt`` (or ``label_file``), tab separated, optional ``ID ...`` header, then
    ``<id>\\t<text>,<image>`` with one (Single) or three (Multiple) annotation columns. Labels follow
    ``mvsa_label``; items it leaves unlabelled are dropped and counted in ``LoadReport.num_unlabelled``.
    Text files are read as UTF-8 with undecodable bytes replaced.
    """
    data_dir = Path(data_dir).resolve()
    label_path = Path(label_file) if label_file is not None else data_dir / "labelResultAll.txt"
    if not label_path.is_file():
        raise FileNotFoundError(f"MVSA label file {label_path} not found; pass label_file=<path>")
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
            items.add(item_id, text, label, _mvsa_file(data_dir, item_id, ".jpg"), where)
    dataset, report = items.finish()
    logger.info(
        "%s: %d items loaded, %d dropped by the MVSA label rule (inconsistent or no majority)",
        report.source,
        report.num_loaded,
        report.num_unlabelled,
    )
    return dataset, report


def _log(name: str, split: str, report: LoadReport) -> None:
    logger.info(
        "%s/%s: %d items from %s (%d skipped as bad, %d unlabelled)",
        name,
        split,
        report.num_loaded,
        report.source,
        report.num_skipped,
        report.num_unlabelled,
    )


def _mmsd_benchmark(
    name: str,
    data_dir: str | Path,
    image_dir: str | Path | None = None,
    ood_file: str | Path | None = None,
    **options: bool,
) -> DatasetDict:
    splits = DatasetDict()
    for split in ("train", "validation", "test"):
        splits[split], report = load_mmsd(data_dir, split, image_dir, **options)
        _log(name, split, report)
    if ood_file is not None:
        ood_images = _mmsd_image_dir(Path(data_dir), image_dir)
        splits["test_ood"], report = load_dmsd_ood(ood_file, ood_images, **options)
        _log(name, "test_ood", report)
    return splits


def _mvsa_benchmark(
    name: str,
    data_dir: str | Path,
    label_file: str | Path | None = None,
    split_seed: int = 0,
    **options: bool,
) -> DatasetDict:
    """MVSA has no official split: a seeded 8:1:1 train/validation/test split."""
    dataset, report = load_mvsa(data_dir, label_file, **options)
    _log(name, "all", report)
    order = np.random.default_rng(split_seed).permutation(len(dataset))
    n_train, n_val = round(0.8 * len(dataset)), round(0.1 * len(dataset))
    parts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return DatasetDict({split: dataset.select(np.sort(indices)) for split, indices in parts.items()})


BENCHMARKS = ("synthetic_sarcasm", "synthetic_sentiment", "mmsd", "mmsd2", "mvsa_single", "mvsa_multiple")


def load_benchmark(name: str, data_dir: str | Path | None = None, **kwargs: object) -> DatasetDict:
    """Load a benchmark by name as a DatasetDict.

    - "synthetic_sarcasm", "synthetic_sentiment": ``make_synthetic_benchmark``; kwargs are
      ``SyntheticConfig`` fields (not ``task``); data_dir is not used.
    - "mmsd", "mmsd2": train / validation / test from ``load_mmsd``; kwargs ``image_dir``, and ``ood_file``
      (a DMSD-CL file, images from the same folder) to add ``test_ood``.
    - "mvsa_single", "mvsa_multiple": ``load_mvsa`` split 8:1:1 with ``split_seed`` (default 0); kwarg
      ``label_file``.
    Real data sets also take ``skip_bad_examples`` and ``verify_images``; their load reports are logged.
    """
    if name.startswith("synthetic_"):
        task = name.removeprefix("synthetic_")
        unknown = set(kwargs) - {f.name for f in fields(SyntheticConfig)} - {"task"}
        if task not in LABEL_NAMES or unknown:
            raise ValueError(f"cannot load {name!r} with options {sorted(unknown)}")
        return make_synthetic_benchmark(SyntheticConfig(task=task, **kwargs))  # type: ignore[arg-type]
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    if data_dir is None:
        raise ValueError(f"benchmark {name!r} needs data_dir (the folder holding the data set)")
    if name in ("mmsd", "mmsd2"):
        return _mmsd_benchmark(name, data_dir, **kwargs)  # type: ignore[arg-type]
    return _mvsa_benchmark(name, data_dir, **kwargs)  # type: ignore[arg-type]
