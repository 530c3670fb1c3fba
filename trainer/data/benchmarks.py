"""``load_benchmark``: a benchmark by name as a ``DatasetDict``: the synthetic planted-cue benchmark
(``synthetic.make_synthetic_benchmark``) or a real data set's splits from the loaders of ``real`` (their load
reports logged)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

from .real import (
    MMSD_JSON_FILES,
    LoadReport,
    find_image_dir,
    is_clmlf,
    is_mmsd_release,
    load_dmsd_ood,
    load_mmsd,
    load_mmsd_release,
    load_mvsa,
    load_mvsa_clmlf,
    split_name,
)
from .synthetic import LABEL_NAMES, SyntheticConfig, make_synthetic_benchmark

logger = logging.getLogger(__name__)


def _log(name: str, split: str, report: LoadReport) -> None:
    logger.info(
        "%s/%s: %d items from %s (%d skipped as bad, %d unlabelled, %d discarded by the data set's rule)",
        name,
        split,
        report.num_loaded,
        report.source,
        report.num_skipped,
        report.num_unlabelled,
        report.num_discarded,
    )


MMSD_NAMES = ("mmsd", "mmsd2")
MVSA_NAMES = ("mvsa_single", "mvsa_multiple")
TASK_DATASETS = {"sarcasm": MMSD_NAMES, "sentiment": MVSA_NAMES}  # the real data sets of each task


def dataset_task(name: str) -> str:
    """The task ("sarcasm" or "sentiment") of a real data set's name."""
    tasks = [task for task, names in TASK_DATASETS.items() if name in names]
    if not tasks:
        raise ValueError(f"unknown data set {name!r}; expected one of {list(MMSD_NAMES + MVSA_NAMES)}")
    return tasks[0]


def parse_extra_test(spec: str | None) -> dict[str, str]:
    """``{name: data_dir}`` of an ``--extra_test`` value ``NAME=DIR[,NAME=DIR...]`` (NAME: mmsd, mmsd2, mvsa_single or
    mvsa_multiple); empty for None or ""."""
    extra: dict[str, str] = {}
    for part in (part.strip() for part in (spec or "").split(",")):
        if not part:
            continue
        name, _, folder = part.partition("=")
        if name.strip() not in MMSD_NAMES + MVSA_NAMES or not folder.strip() or name.strip() in extra:
            raise ValueError(
                f"--extra_test {spec!r}: {part!r} is not NAME=DIR with NAME one of {list(MMSD_NAMES + MVSA_NAMES)} "
                "(each once), e.g. --extra_test mmsd2=/data/MMSD2.0/data/text_json_final or "
                "mvsa_multiple=/data/CLMLF/dataset/data/MVSA-multiple/10-flod-1"
            )
        extra[name.strip()] = folder.strip()
    return extra


def _load_mmsd_split(
    name: str, data_dir: str | Path, split: str, image_dir: str | Path | None, discard_rule: bool, **options: bool
) -> tuple[Dataset, LoadReport]:
    """One split of "mmsd" (MMSD 1.0's text release where DATA_DIR holds it, else the JSON layout) or "mmsd2"."""
    if name == "mmsd" and is_mmsd_release(data_dir):
        return load_mmsd_release(data_dir, split, image_dir, discard_rule=discard_rule, **options)
    if name == "mmsd" and not (Path(data_dir) / MMSD_JSON_FILES[split_name(split)]).is_file():
        raise FileNotFoundError(
            f"{data_dir}: no MMSD data found: expected MMSD 1.0's release DATA_DIR/text/{{train,valid2,test2}}.txt "
            "or the JSON layout DATA_DIR/{train,valid,test}.json"
        )
    return load_mmsd(data_dir, split, image_dir, **options)


def _mmsd_benchmark(
    name: str,
    data_dir: str | Path,
    image_dir: str | Path | None = None,
    ood_file: str | Path | None = None,
    extra_test: Mapping[str, str | Path] | None = None,
    discard_rule: bool = True,
    **options: bool,
) -> DatasetDict:
    splits = DatasetDict()
    for split in ("train", "validation", "test"):
        splits[split], report = _load_mmsd_split(name, data_dir, split, image_dir, discard_rule, **options)
        _log(name, split, report)
    for extra_name, extra_dir in (extra_test or {}).items():
        split = f"test_{extra_name}"
        splits[split], report = _load_mmsd_split(extra_name, extra_dir, "test", image_dir, discard_rule, **options)
        _log(name, split, report)
    if ood_file is not None:
        ood_images = find_image_dir(Path(data_dir), image_dir)
        splits["test_ood"], report = load_dmsd_ood(ood_file, ood_images, **options)
        _log(name, "test_ood", report)
    return splits


def _mvsa_splits(
    name: str,
    data_dir: str | Path,
    image_dir: str | Path | None,
    label_file: str | Path | None,
    split_seed: int | None,
    splits: tuple[str, ...] = ("train", "validation", "test"),
    **options: bool,
) -> DatasetDict:
    """``splits`` of "mvsa_single" or "mvsa_multiple": CLMLF's released splits where DATA_DIR holds them, else the
    raw layout split 8:1:1 with ``split_seed`` (default 0; MVSA itself has no official split)."""
    loaded = DatasetDict()
    if is_clmlf(data_dir):
        for split in splits:
            loaded[split], report = load_mvsa_clmlf(data_dir, split, image_dir, **options)
            _log(name, split, report)
        return loaded
    dataset, report = load_mvsa(data_dir, label_file, image_dir, **options)
    _log(name, "all", report)
    order = np.random.default_rng(split_seed or 0).permutation(len(dataset))
    n_train, n_val = round(0.8 * len(dataset)), round(0.1 * len(dataset))
    parts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    for split in splits:
        loaded[split] = dataset.select(np.sort(parts[split]))
    return loaded


def _mvsa_benchmark(
    name: str,
    data_dir: str | Path,
    image_dir: str | Path | None = None,
    label_file: str | Path | None = None,
    split_seed: int | None = None,
    extra_test: Mapping[str, str | Path] | None = None,
    **options: bool,
) -> DatasetDict:
    if is_clmlf(data_dir) and (label_file is not None or split_seed is not None):
        raise ValueError(f"{data_dir}: CLMLF's released splits take no label_file or split_seed (raw MVSA only)")
    splits = _mvsa_splits(name, data_dir, image_dir, label_file, split_seed, **options)
    for extra, folder in (extra_test or {}).items():  # a raw layout's test split: the same seeded split
        splits[f"test_{extra}"] = _mvsa_splits(extra, folder, image_dir, None, split_seed, ("test",), **options)["test"]
    return splits


BENCHMARKS = ("synthetic_sarcasm", "synthetic_sentiment", "mmsd", "mmsd2", "mvsa_single", "mvsa_multiple")


def load_benchmark(name: str, data_dir: str | Path | None = None, **kwargs: object) -> DatasetDict:
    """Load a benchmark by name as a DatasetDict.

    - "synthetic_sarcasm", "synthetic_sentiment": ``make_synthetic_benchmark``; kwargs are
      ``SyntheticConfig`` fields (not ``task``); data_dir is not used.
    - "mmsd": train / validation / test of MMSD 1.0 from ``load_mmsd_release`` where DATA_DIR holds its text
      release (``text/*.txt``; kwarg ``discard_rule``, default True), else from ``load_mmsd`` (the JSON layout);
      "mmsd2": from ``load_mmsd``. Kwargs ``image_dir`` (a folder, or one placeholder image file), ``ood_file`` (a
      DMSD-CL OOD file, images from the same folder) to add ``test_ood``, and ``extra_test`` ({"mmsd" | "mmsd2":
      DATA_DIR}, ``parse_extra_test``) to add the test split of another data set as ``test_<name>``.
    - "mvsa_single", "mvsa_multiple": CLMLF's released splits from ``load_mvsa_clmlf`` where DATA_DIR holds
      ``{train,dev,test}.json``, else the raw layout from ``load_mvsa`` split 8:1:1 with ``split_seed`` (default 0;
      kwarg ``label_file``). Kwargs ``image_dir`` and ``extra_test`` ({"mvsa_single" | "mvsa_multiple": DATA_DIR},
      either layout) as for mmsd.
    Real data sets also take ``skip_bad_examples`` and ``verify_images``; their load reports are logged. An
    ``extra_test`` name of the other task's data sets raises a ValueError.
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
    task = dataset_task(name)
    other = sorted(set(kwargs.get("extra_test") or {}) - set(TASK_DATASETS[task]))  # type: ignore[arg-type]
    if other:
        raise ValueError(
            f"{name}: extra test set(s) {other} are not {task} data sets; a {task} run's --extra_test names are "
            f"{list(TASK_DATASETS[task])}"
        )
    if task == "sarcasm":
        return _mmsd_benchmark(name, data_dir, **kwargs)  # type: ignore[arg-type]
    mmsd_only = sorted(key for key in ("ood_file", "discard_rule") if kwargs.get(key) is not None)
    if mmsd_only:
        raise ValueError(f"{name}: the options {mmsd_only} apply to mmsd and mmsd2 only")
    return _mvsa_benchmark(name, data_dir, **kwargs)  # type: ignore[arg-type]
