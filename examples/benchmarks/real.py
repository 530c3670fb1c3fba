"""The data of the real-data benchmark (`examples/benchmark_real.py`, which holds the command line and the methods):
per task (`TASKS`) the repositories under DATA_ROOT, the training sets with the eval set each of their test splits
is, the runs (one `Run` per seed, training set and method), and the data report (items per class, the texts' cues
of each task's data, tokens per word of the tiny tokenizers). The results' report is in `real_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from datasets import Dataset, DatasetDict

from cfmoe.trainer.data import count_hashtags, count_text_cues, load_benchmark, released_texts
from cfmoe.trainer.data.real import HASHTAG, SOCIAL_CUES
from cfmoe.trainer.data.synthetic import synthetic_vocabulary
from cfmoe.trainer.data.tiny import tokens_per_word, train_text_tokenizer, train_tiny_tokenizer
from cfmoe.trainer.loading import PREDICTIONS_FILE
from cfmoe.trainer.metrics import accuracy, macro_f1

from .debiasing import MethodTable, Run, load_json
from .report import markdown_table


@dataclass(frozen=True)
class TrainSet:
    """A training set: the run script's `--dataset` and `--data_dir` (under DATA_ROOT), the extra test splits
    (`--extra_test` name -> folder under DATA_ROOT), the OOD file (under DATA_ROOT) if any, and the eval set (a key
    of the task's `eval_sets`) each test split of its runs is."""

    dataset: str
    data_dir: str
    eval_sets: dict[str, str]  # split of the run -> eval set
    extra_test: dict[str, str] = field(default_factory=dict)
    ood_file: str | None = None

    def argv(self, root: Path, images: Path) -> list[str]:
        argv = ["--dataset", self.dataset, "--data_dir", str(root / self.data_dir)]
        if self.ood_file is not None:
            argv += ["--ood_file", str(root / self.ood_file)]
        if self.extra_test:
            argv += ["--extra_test", ",".join(f"{name}={root / folder}" for name, folder in self.extra_test.items())]
        return [*argv, "--image_dir", str(images)]

    def load(self, root: Path, images: Path) -> DatasetDict:
        """The splits its runs train and evaluate on."""
        options: dict[str, Any] = {"extra_test": {name: root / folder for name, folder in self.extra_test.items()}}
        if self.ood_file is not None:
            options["ood_file"] = root / self.ood_file
        return load_benchmark(self.dataset, root / self.data_dir, image_dir=images, **options)


Loaded = dict[str, DatasetDict]  # training set -> its splits


@dataclass(frozen=True)
class Task:
    """A task's real data: the repositories to clone under DATA_ROOT (folder -> URL), the files read (under
    DATA_ROOT), the eval sets (key -> title), the training sets, the texts whose tokens per word are measured (probe
    -> (training set, split)), the task's own part of the data report (`report`) with its markdown (`section`), and
    subsets of eval sets scored apart (a key of `eval_sets` -> (the eval set it is part of, which texts it keeps);
    scored from each run's `test_predictions.json`, `subset_scores`)."""

    repositories: dict[str, str]
    files: tuple[str, ...]
    eval_sets: dict[str, str]
    train_sets: dict[str, TrainSet]
    probes: dict[str, tuple[str, str]]
    report: Callable[[Path, Loaded], dict[str, Any]]
    section: Callable[[dict[str, Any]], list[str]]
    subsets: dict[str, tuple[str, Callable[[str], bool]]] = field(default_factory=dict)


def check_data_root(task: Task, root: Path) -> None:
    """Exit naming every missing file of DATA_ROOT and the repositories to clone for them."""
    missing = [root / name for name in task.files if not (root / name).is_file()]
    if missing:
        clones = "\n  ".join(f"git clone {url} {root / folder}" for folder, url in task.repositories.items())
        listing = "\n  ".join(map(str, missing))
        raise SystemExit(f"--data_root {root}: missing\n  {listing}\nget the repositories with\n  {clones}")


def placeholder_image(output_dir: Path) -> Path:
    """`DIR/placeholder.jpg`, one neutral mid-grey 224x224 image: every item's image when the images are absent."""
    path = output_dir / "placeholder.jpg"
    if not path.is_file():
        PIL.Image.new("RGB", (224, 224), (128, 128, 128)).save(path, format="JPEG")
    return path


def plan(
    task: str,
    root: Path,
    output_dir: Path,
    images: Path,
    train_sets: Sequence[str],
    table: MethodTable,
    methods: Sequence[str],
    seeds: Sequence[int],
    common: Sequence[str],
) -> list[Run]:
    """Every (seed, training set, method), seed-major; argv: shared flags, data, the table's, folder and seed."""
    runs = []
    for seed in seeds:
        for train_set in train_sets:
            data_argv = TASKS[task].train_sets[train_set].argv(root, images)
            for method in methods:
                run_dir = output_dir / "runs" / train_set / method / f"seed{seed}"
                fixed = ["--output_dir", str(run_dir), "--seed", str(seed), "--disable_tqdm", "True"]
                argv = [*common, *data_argv, *table.argv(method), *fixed]
                runs.append(Run(train_set, method, seed, argv, run_dir, task))
    return runs


# ------------------------------------------------------------------------------------------------ the data report
def load_all(task: str, root: Path, images: Path) -> Loaded:
    """The splits of each of the task's training sets."""
    return {name: train_set.load(root, images) for name, train_set in TASKS[task].train_sets.items()}


def subset_items(task: str, train_set: str, loaded: Loaded) -> list[tuple[str, str, np.ndarray]]:
    """(split, subset, `(items,)` bool mask of the items it keeps) of each `Task.subsets` entry whose eval set a
    training set's runs test."""
    found = []
    for split, eval_set in TASKS[task].train_sets[train_set].eval_sets.items():
        for subset, (source, keeps) in TASKS[task].subsets.items():
            if source == eval_set:
                found.append((split, subset, np.array([keeps(text) for text in loaded[train_set][split]["text"]])))
    return found


def subset_scores(task: str, train_set: str, run_dir: Path, loaded: Loaded) -> dict[str, dict[str, float]]:
    """{subset: {accuracy, macro_f1}} of a finished run from its `test_predictions.json` (`subset_items`)."""
    path, scores = run_dir / PREDICTIONS_FILE, {}
    if not path.is_file():
        return scores
    predictions = load_json(path)
    for split, subset, kept in subset_items(task, train_set, loaded):
        if split in predictions:
            labels = np.array(loaded[train_set][split]["label"])[kept]
            predicted = np.array(predictions[split]["prediction"])[kept]
            scores[subset] = {"accuracy": accuracy(predicted, labels), "macro_f1": macro_f1(predicted, labels)}
    return scores


def eval_columns(task: str, train_set: str) -> list[str]:
    """The eval sets a training set's runs are scored on: those of its test splits, then the task's subsets of
    them."""
    tested = list(TASKS[task].train_sets[train_set].eval_sets.values())
    return tested + [subset for subset, (source, _) in TASKS[task].subsets.items() if source in tested]


def subset_classes(task: str, loaded: Loaded) -> dict[str, dict[str, list[int]]]:
    """{training set: {subset: items per class}} of the task's subsets (`subset_items`)."""
    counts: dict[str, dict[str, list[int]]] = {}
    for train_set, data in loaded.items():
        for split, subset, kept in subset_items(task, train_set, loaded):
            classes = data[split].features["label"].num_classes
            labels = np.array(data[split]["label"])[kept]
            counts.setdefault(train_set, {})[subset] = np.bincount(labels, minlength=classes).tolist()
    return counts


def data_report(task: str, root: Path, loaded: Loaded) -> dict[str, Any]:
    """The class names, items loaded per split and class of each training set, the task's own report
    (`Task.report`) and the tiny tokenizers' tokens per whitespace word on the task's probes: the synthetic
    vocabulary's and one trained on each training set's train split."""
    spec = TASKS[task]
    classes = next(iter(loaded.values()))["train"].features["label"].names
    sizes = {
        name: {split: np.bincount(data[split]["label"], minlength=len(classes)).tolist() for split in data}
        for name, data in loaded.items()
    }
    synthetic = train_tiny_tokenizer(synthetic_vocabulary(task))
    tokenizers = {"synthetic vocabulary (real text was read with it before)": synthetic}
    for name, data in loaded.items():
        tokenizers[f"trained on {name} train"] = train_text_tokenizer(list(data["train"]["text"]))
    probes = {probe: list(loaded[name][split]["text"]) for probe, (name, split) in spec.probes.items()}
    tokens = {
        name: {"vocabulary": len(tokenizer), **{probe: tokens_per_word(tokenizer, t) for probe, t in probes.items()}}
        for name, tokenizer in tokenizers.items()
    }
    return {
        "classes": classes,
        "items_per_class": sizes,
        "subset_items_per_class": subset_classes(task, loaded),
        **spec.report(root, loaded),
        "tokens_per_word": tokens,
    }


def per_class(counts: Sequence[int]) -> str:
    return " / ".join(map(str, counts))


def data_section(task: str, report: dict[str, Any]) -> list[str]:
    """The data report as markdown: items per split, the task's section, tokens per word."""
    lines = ["## Data", "", f"Items loaded per split ({' / '.join(report['classes'])}):", ""]
    rows = [
        (train_set, split, f"{sum(counts)} ({per_class(counts)})")
        for train_set, splits in report["items_per_class"].items()
        for split, counts in splits.items()
    ]
    lines += markdown_table(["training set", "split", "items"], rows) + [""]
    lines += TASKS[task].section(report)
    lines += ["", "Tokens per whitespace word of the tiny tokenizer:", ""]
    probes = [key for key in next(iter(report["tokens_per_word"].values())) if key != "vocabulary"]
    rows = [
        (name, values["vocabulary"], *(f"{values[probe]:.3f}" for probe in probes))
        for name, values in report["tokens_per_word"].items()
    ]
    return lines + markdown_table(["tokenizer", "vocabulary", *probes], rows) + [""]


# ------------------------------------------------------------------------------------------------ sarcasm
MMSD, MMSD2 = "data-of-multimodal-sarcasm-detection", "MMSD2.0/data/text_json_final"
OOD = "DMSD-CL/data/clean_data/ood_all.txt"
SARCASM_FILES = {
    "mmsd_train": ("mmsd_release", f"{MMSD}/text/train.txt"),
    "mmsd_valid": ("mmsd_release", f"{MMSD}/text/valid2.txt"),
    "mmsd_test": ("mmsd_release", f"{MMSD}/text/test2.txt"),
    "mmsd2_train": ("mmsd_json", f"{MMSD2}/train.json"),
    "mmsd2_valid": ("mmsd_json", f"{MMSD2}/valid.json"),
    "mmsd2_test": ("mmsd_json", f"{MMSD2}/test.json"),
    "dmsd_ood": ("dmsd_ood", OOD),
}


def sarcasm_report(root: Path, loaded: Loaded) -> dict[str, Any]:
    """The items MMSD2.0 relabelled per split, and the text cues of the released files per class
    (`count_text_cues` on `released_texts`: as released, before the loaders strip the texts)."""
    relabelled = {}  # MMSD2.0 re-annotated some of MMSD's tweets: items whose label differs, per split
    for split in ("train", "validation", "test"):
        before = dict(zip(loaded["mmsd"][split]["id"], loaded["mmsd"][split]["label"], strict=True))
        after = zip(loaded["mmsd2"][split]["id"], loaded["mmsd2"][split]["label"], strict=True)
        relabelled[split] = sum(item in before and before[item] != label for item, label in after)
    cues = {name: count_text_cues(*released_texts(kind, root / path)) for name, (kind, path) in SARCASM_FILES.items()}
    return {"labels_changed_mmsd_to_mmsd2": relabelled, "text_cues_per_class": cues}


def sarcasm_section(report: dict[str, Any]) -> list[str]:
    changed = ", ".join(f"{split} {n}" for split, n in report["labels_changed_mmsd_to_mmsd2"].items())
    lines = [f"Items whose MMSD2.0 label differs from MMSD 1.0's (same ids): {changed}.", ""]
    lines += ["Texts carrying each cue as released, not stripped (not sarcastic / sarcastic; `count_text_cues`):", ""]
    cue_names = [name for name in next(iter(report["text_cues_per_class"].values())) if name != "items"]
    rows = [
        (file, *(per_class(counts[name]) for name in ["items", *cue_names]))
        for file, counts in report["text_cues_per_class"].items()
    ]
    return lines + markdown_table(["file", "items", *cue_names], rows)


# ------------------------------------------------------------------------------------------------ sentiment
CLMLF = "CLMLF/dataset/data/MVSA-{}/10-flod-1"
MVSA = {"mvsa_single": CLMLF.format("single"), "mvsa_multiple": CLMLF.format("multiple")}
# a hashtag gives the label away when at least MIN_ITEMS training items hold it, at least MIN_SHARE of them one class
MIN_ITEMS, MIN_SHARE = 10, 0.9


def label_giving_hashtags(train: Dataset, test: Dataset) -> dict[str, Any]:
    """The label-giving hashtags of `train` (`MIN_ITEMS`, `MIN_SHARE`), most frequent first, with their items per
    class in train and in test; and on test the rule "a text holding one is of that hashtag's class (its most
    frequent one's, if several)": items it covers, of which it gets right, of which are of train's majority class."""
    in_train = count_hashtags(train["text"], train["label"])
    in_test = count_hashtags(test["text"], test["label"])
    giving = {t: c for t, c in in_train.items() if sum(c) >= MIN_ITEMS and max(c) >= MIN_SHARE * sum(c)}
    majority = int(np.argmax(np.bincount(train["label"])))
    covered = right = of_majority = 0
    for text, label in zip(test["text"], test["label"], strict=True):
        tags = {tag.lower() for tag in HASHTAG.findall(text)}
        first = next((tag for tag in giving if tag in tags), None)
        if first is not None:
            covered, right = covered + 1, right + int(np.argmax(giving[first]) == label)
            of_majority += int(label == majority)
    hashtags = [{"hashtag": t, "train": c, "test": in_test.get(t, [0] * len(c))} for t, c in giving.items()]
    return {"hashtags": hashtags, "test_covered": covered, "test_rule_right": right, "test_majority": of_majority}


def sentiment_report(root: Path, loaded: Loaded) -> dict[str, Any]:
    """Per split file, the items of each class holding a hashtag, a mention, a URL, `RT @` (`SOCIAL_CUES`); per
    collection, its training split's label-giving hashtags (`label_giving_hashtags`)."""
    files = {"train": "train", "validation": "dev", "test": "test"}
    forms = {
        f"{name}_{file}": count_text_cues(data[split]["text"], data[split]["label"], 3, SOCIAL_CUES)
        for name, data in loaded.items()
        for split, file in files.items()
    }
    hashtags = {name: label_giving_hashtags(data["train"], data["test"]) for name, data in loaded.items()}
    return {"tweet_forms_per_class": forms, "label_giving_hashtags": hashtags}


def share(count: int, total: int) -> str:
    return f"{100 * count / total:.0f}%" if total else "n/a"


def sentiment_section(report: dict[str, Any]) -> list[str]:
    classes = " / ".join(report["classes"])
    forms = report["tweet_forms_per_class"]
    names = [name for name in next(iter(forms.values())) if name != "items"]
    lines = [f"Share of the texts of each class ({classes}) holding each form (`SOCIAL_CUES`):", ""]
    rows = [
        (file, per_class(c["items"]), *(" / ".join(map(share, c[name], c["items"])) for name in names))
        for file, c in forms.items()
    ]
    lines += markdown_table(["file", "items", *names], rows)
    for name, found in report["label_giving_hashtags"].items():
        covered, right, of_majority = found["test_covered"], found["test_rule_right"], found["test_majority"]
        rows = [(f"#{h['hashtag']}", per_class(h["train"]), per_class(h["test"])) for h in found["hashtags"]]
        lines += [
            "",
            f"{name}: hashtags of at least {MIN_ITEMS} training texts, at least {MIN_SHARE:.0%} of them one class "
            f"({len(found['hashtags'])}); texts per class ({classes}):",
            "",
            *markdown_table(["hashtag", "train", "test"], rows),
            "",
            f"On test, the rule 'a text holding one is of its class' covers {covered} texts and is right on {right} "
            f"({share(right, covered)}); {of_majority} of them ({share(of_majority, covered)}) are of the majority "
            "class of train.",
        ]
    return lines


TASKS = {
    "sarcasm": Task(
        repositories={
            "data-of-multimodal-sarcasm-detection": "https://github.com/headacheboy/data-of-multimodal-sarcasm-detection",
            "MMSD2.0": "https://github.com/JoeYing1019/MMSD2.0",
            "DMSD-CL": "https://github.com/xvolcano02/DMSD-CL",
        },
        files=tuple(path for _, path in SARCASM_FILES.values()),
        eval_sets={
            "mmsd_test": "MMSD 1.0 test",
            "mmsd2_test": "MMSD2.0 test",
            "mmsd2_test_no_num": "MMSD2.0 test without <num>",
            "dmsd_ood": "DMSD-CL OOD",
        },
        train_sets={
            "mmsd": TrainSet(
                "mmsd",
                MMSD,
                {"test": "mmsd_test", "test_mmsd2": "mmsd2_test", "test_ood": "dmsd_ood"},
                {"mmsd2": MMSD2},
                OOD,
            ),
            "mmsd2": TrainSet("mmsd2", MMSD2, {"test": "mmsd2_test", "test_ood": "dmsd_ood"}, ood_file=OOD),
        },
        probes={"mmsd2_test": ("mmsd2", "test"), "dmsd_ood": ("mmsd2", "test_ood")},
        report=sarcasm_report,
        section=sarcasm_section,
        # `<num>` occurs in sarcastic tweets only, in MMSD2.0 too (docs/real_data.md): a leak MMSD2.0 kept
        subsets={"mmsd2_test_no_num": ("mmsd2_test", lambda text: "<num>" not in text.split())},
    ),
    "sentiment": Task(
        repositories={"CLMLF": "https://github.com/Link-Li/CLMLF"},
        files=tuple(f"{folder}/{file}.json" for folder in MVSA.values() for file in ("train", "dev", "test")),
        eval_sets={"single_test": "MVSA-Single test", "multiple_test": "MVSA-Multiple test"},
        train_sets={
            "mvsa_single": TrainSet(
                "mvsa_single",
                MVSA["mvsa_single"],
                {"test": "single_test", "test_mvsa_multiple": "multiple_test"},
                {"mvsa_multiple": MVSA["mvsa_multiple"]},
            ),
            "mvsa_multiple": TrainSet(
                "mvsa_multiple",
                MVSA["mvsa_multiple"],
                {"test": "multiple_test", "test_mvsa_single": "single_test"},
                {"mvsa_single": MVSA["mvsa_single"]},
            ),
        },
        probes={"single_test": ("mvsa_single", "test"), "multiple_test": ("mvsa_multiple", "test")},
        report=sentiment_report,
        section=sentiment_section,
    ),
}
