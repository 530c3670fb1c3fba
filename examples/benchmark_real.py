"""Real-data benchmark: the tiny CF-MoE model trained on the text of MMSD 1.0 and of MMSD2.0, every method, over
seeds, evaluated on MMSD 1.0 test, MMSD2.0 test and the DMSD-CL OOD set.

    python examples/benchmark_real.py --data_root /data --output_dir out/real                 # 3 seeds, every method
    python examples/benchmark_real.py --data_root /data --output_dir out/real --seeds 1 --methods vanilla,cfmoe
    python examples/benchmark_real.py --data_root /data --output_dir out/real --data_report_only   # sizes, cues

DATA_ROOT holds the three repositories as cloned (docs/real_data.md):
    DATA_ROOT/data-of-multimodal-sarcasm-detection/text/{train,valid2,test2}.txt    MMSD 1.0's text release
    DATA_ROOT/MMSD2.0/data/text_json_final/{train,valid,test}.json                   MMSD2.0
    DATA_ROOT/DMSD-CL/data/clean_data/ood_all.txt                                    the DMSD-CL OOD set
Training sets: `mmsd` (train on MMSD 1.0 train, model selection on MMSD 1.0 valid; evaluated on MMSD 1.0 test, on
MMSD2.0 test, the same tweets with the cues removed and some labels corrected, and on the OOD set) and `mmsd2` (train
and select on MMSD2.0; evaluated on MMSD2.0 test and the OOD set). The images are not public: unless `--image_dir`
gives them, every item gets one neutral grey placeholder image (`DIR/placeholder.jpg`), so the runs read text only.
Each (training set, method, seed) is `examples/run_sarcasm.py` (the tiny model, its tokenizer trained on the
training texts) in a fresh subprocess writing to `DIR/runs/<training set>/<method>/seed<k>/`; a run whose
`all_results.json` exists is not run again, so an interrupted benchmark continues where it stopped.

Writes `DIR/results.json` ({training set: {method: {eval set: {"accuracy" | "macro_f1": {"mean", "std", "n"}}}}}),
`DIR/results.md` (one table per training set, mean ± sample std over seeds; the data report; run times),
`DIR/results.png`, `DIR/data_report.json` (items loaded per split, the label-giving text cues of the released files
per class, tokens per word of the tiny tokenizers) and `DIR/runs.json`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from datasets import DatasetDict

from benchmarks.debiasing import (
    META_FILE,
    RESULTS_FILE,
    MethodTable,
    Run,
    check_argv,
    execute,
    load_json,
    run_cli,
    summarize,
    write_json,
)
from benchmarks.report import fmt, markdown_table, mean_time
from cfmoe.trainer.data import count_text_cues, load_benchmark, released_texts
from cfmoe.trainer.data.synthetic import synthetic_vocabulary
from cfmoe.trainer.data.tiny import tokens_per_word, train_text_tokenizer, train_tiny_tokenizer

# ------------------------------------------------------------------------------------------------ the data
MMSD, MMSD2 = "data-of-multimodal-sarcasm-detection", "MMSD2.0/data/text_json_final"
OOD = "DMSD-CL/data/clean_data/ood_all.txt"
REPOSITORIES = {  # folder under DATA_ROOT -> the repository a user clones there
    "data-of-multimodal-sarcasm-detection": "https://github.com/headacheboy/data-of-multimodal-sarcasm-detection",
    "MMSD2.0": "https://github.com/JoeYing1019/MMSD2.0",
    "DMSD-CL": "https://github.com/xvolcano02/DMSD-CL",
}
EVAL_SETS = {"mmsd_test": "MMSD 1.0 test", "mmsd2_test": "MMSD2.0 test", "dmsd_ood": "DMSD-CL OOD"}


@dataclass(frozen=True)
class TrainSet:
    """A training set: the run script's `--dataset` and `--data_dir` (under DATA_ROOT), the extra test splits
    (`--extra_test` name -> folder under DATA_ROOT), and the eval set each test split of its runs is."""

    dataset: str
    data_dir: str
    extra_test: dict[str, str]
    eval_sets: dict[str, str]  # split of the run -> key of EVAL_SETS

    def argv(self, root: Path, images: Path) -> list[str]:
        argv = ["--dataset", self.dataset, "--data_dir", str(root / self.data_dir), "--ood_file", str(root / OOD)]
        if self.extra_test:
            argv += ["--extra_test", ",".join(f"{name}={root / folder}" for name, folder in self.extra_test.items())]
        return [*argv, "--image_dir", str(images)]

    def load(self, root: Path, images: Path) -> DatasetDict:
        """The splits its runs train and evaluate on."""
        extra = {name: root / folder for name, folder in self.extra_test.items()}
        return load_benchmark(
            self.dataset, root / self.data_dir, image_dir=images, ood_file=root / OOD, extra_test=extra
        )


TRAIN_SETS = {
    "mmsd": TrainSet(
        "mmsd", MMSD, {"mmsd2": MMSD2}, {"test": "mmsd_test", "test_mmsd2": "mmsd2_test", "test_ood": "dmsd_ood"}
    ),
    "mmsd2": TrainSet("mmsd2", MMSD2, {}, {"test": "mmsd2_test", "test_ood": "dmsd_ood"}),
}
METRICS = {"accuracy": "acc", "macro_f1": "macro-F1"}

# ------------------------------------------------------------------------------------------------ the run table
# Extra argv of `examples/run_sarcasm.py` per method, the peers configured as in examples/benchmark_debiasing.py:
# the bias-aware peers train their bias branches jointly with the shared base; cfvqa predicts with the TIE
# (the run script sets --inference_mode tie for it).
JOINT = ["--detach_bias_branches", "False"]
RUNS: dict[str, list[str]] = {
    "vanilla": ["--method", "vanilla"],
    "text_poe": ["--method", "text_poe", *JOINT],
    "image_poe": ["--method", "image_poe", *JOINT],
    "poe": ["--method", "poe", *JOINT],
    "rubi": ["--method", "rubi", *JOINT],
    "cfvqa": ["--method", "cfvqa", *JOINT],
    "cfmoe": ["--method", "cfmoe"],
}
TABLE = MethodTable(RUNS, full_method="cfmoe")
# Budget shared by every run: 3 epochs of the tiny recipe (one seed of both training sets and every method takes
# about an hour on 2 CPU cores, docs/real_data.md); quick: 1 epoch, small batches (a smoke test).
FULL_ARGS = ["--num_train_epochs", "3"]
QUICK_ARGS = ["--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16"]
DEFAULT_SEEDS, QUICK_SEEDS = 3, 1
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))  # one single-threaded run per core


def parse_cli(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; every other flag goes to every run, before the table's argv (whose entries win)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag (e.g. --learning_rate 5e-4) goes to every run, before the table's argv.",
    )
    parser.add_argument("--data_root", type=Path, required=True, help="folder of the three cloned repositories")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS}; quick 1)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(RUNS)} (default all)")
    parser.add_argument("--train_sets", default=None, help=f"comma-separated subset of: {', '.join(TRAIN_SETS)}")
    parser.add_argument("--epochs", type=float, default=None, help="training epochs per run (default 3; quick 1)")
    parser.add_argument("--image_dir", type=Path, default=None, help="the real images (<id>.jpg), if you have them")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, small batches (QUICK_ARGS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / jobs)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="runs at a time (default min(4, cores))")
    parser.add_argument("--dry_run", action="store_true", help="print each run's argv; no runs")
    parser.add_argument("--report_only", action="store_true", help="no runs: report the finished ones")
    parser.add_argument("--data_report_only", action="store_true", help="only the data report: sizes, cues, tokens")
    return parser.parse_known_args(argv)


def names(spec: str | None, known: Sequence[str], what: str) -> list[str]:
    """The comma-separated names of `spec` (all of `known` when empty), each checked against `known`."""
    chosen = [name.strip() for name in (spec or "").split(",") if name.strip()] or list(known)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def check_data_root(root: Path) -> None:
    """Exit naming every missing file of DATA_ROOT and the repository to clone for it."""
    expected = [root / MMSD / "text" / name for name in ("train.txt", "valid2.txt", "test2.txt")]
    expected += [root / MMSD2 / name for name in ("train.json", "valid.json", "test.json")] + [root / OOD]
    missing = [path for path in expected if not path.is_file()]
    if missing:
        clones = "\n  ".join(f"git clone {url} {root / folder}" for folder, url in REPOSITORIES.items())
        listing = "\n  ".join(map(str, missing))
        raise SystemExit(f"--data_root {root}: missing\n  {listing}\nget the three repositories with\n  {clones}")


def placeholder_image(output_dir: Path) -> Path:
    """`DIR/placeholder.jpg`, one neutral mid-grey 224x224 image: every item's image when the images are absent."""
    path = output_dir / "placeholder.jpg"
    if not path.is_file():
        PIL.Image.new("RGB", (224, 224), (128, 128, 128)).save(path, format="JPEG")
    return path


def plan(
    root: Path,
    output_dir: Path,
    images: Path,
    train_sets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    common: Sequence[str],
) -> list[Run]:
    """Every (seed, training set, method), seed-major; argv: shared flags, data, the table's, folder and seed."""
    runs = []
    for seed in seeds:
        for train_set in train_sets:
            data_argv = TRAIN_SETS[train_set].argv(root, images)
            for method in methods:
                run_dir = output_dir / "runs" / train_set / method / f"seed{seed}"
                fixed = ["--output_dir", str(run_dir), "--seed", str(seed), "--disable_tqdm", "True"]
                argv = [*common, *data_argv, *TABLE.argv(method), *fixed]
                runs.append(Run(train_set, method, seed, argv, run_dir))
    return runs


def run_all(runs: Sequence[Run], threads: int, jobs: int) -> None:
    """Run every unfinished run (`benchmarks.debiasing.execute`); finished ones are read back as cached."""
    for run in runs:
        if run.done:
            run.status = "cached"
            if (run.run_dir / META_FILE).is_file():
                meta = load_json(run.run_dir / META_FILE)
                run.wall_s, run.cpu_s = meta.get("wall_s"), meta.get("cpu_s")
    todo = [run for run in runs if not run.done]
    print(f"{len(runs) - len(todo)} of {len(runs)} run(s) finished before: not run again", flush=True)
    if todo:
        execute(todo, threads, jobs, launch=run_cli)


# ------------------------------------------------------------------------------------------------ the data report
def data_report(root: Path, images: Path) -> dict[str, Any]:
    """Items loaded per split of each training set (and per class), the items MMSD2.0 relabelled, the text cues of
    the released files per class (`count_text_cues` on `released_texts`: as released, before the loaders strip the
    texts) and the tiny tokenizers' tokens per whitespace word on MMSD2.0 test and the OOD set."""
    loaded = {name: train_set.load(root, images) for name, train_set in TRAIN_SETS.items()}
    sizes = {
        train_set: {split: np.bincount(data[split]["label"], minlength=2).tolist() for split in data}
        for train_set, data in loaded.items()
    }
    files = {
        "mmsd_train": ("mmsd_release", root / MMSD / "text/train.txt"),
        "mmsd_valid": ("mmsd_release", root / MMSD / "text/valid2.txt"),
        "mmsd_test": ("mmsd_release", root / MMSD / "text/test2.txt"),
        "mmsd2_train": ("mmsd_json", root / MMSD2 / "train.json"),
        "mmsd2_valid": ("mmsd_json", root / MMSD2 / "valid.json"),
        "mmsd2_test": ("mmsd_json", root / MMSD2 / "test.json"),
        "dmsd_ood": ("dmsd_ood", root / OOD),
    }
    cues = {name: count_text_cues(*released_texts(kind, path)) for name, (kind, path) in files.items()}
    relabelled = {}  # MMSD2.0 re-annotated some of MMSD's tweets: items whose label differs, per split
    for split in ("train", "validation", "test"):
        before = dict(zip(loaded["mmsd"][split]["id"], loaded["mmsd"][split]["label"], strict=True))
        after = zip(loaded["mmsd2"][split]["id"], loaded["mmsd2"][split]["label"], strict=True)
        relabelled[split] = sum(item in before and before[item] != label for item, label in after)
    probes = {
        "mmsd2_test": list(loaded["mmsd2"]["test"]["text"]),
        "dmsd_ood": list(loaded["mmsd2"]["test_ood"]["text"]),
    }
    tokenizers = {
        "synthetic vocabulary (real text was read with it before)": train_tiny_tokenizer(
            synthetic_vocabulary("sarcasm")
        )
    }
    for train_set, data in loaded.items():
        tokenizers[f"trained on {train_set} train"] = train_text_tokenizer(list(data["train"]["text"]))
    tokens = {
        name: {
            "vocabulary": len(tokenizer),
            **{probe: tokens_per_word(tokenizer, texts) for probe, texts in probes.items()},
        }
        for name, tokenizer in tokenizers.items()
    }
    return {
        "items_per_class": sizes,
        "labels_changed_mmsd_to_mmsd2": relabelled,
        "text_cues_per_class": cues,
        "tokens_per_word": tokens,
    }


def data_section(report: dict[str, Any]) -> list[str]:
    """The data report as markdown: items per split, cue counts, tokens per word."""
    lines = ["## Data", "", "Items loaded per split (not sarcastic / sarcastic):", ""]
    rows = [
        (train_set, split, f"{sum(counts)} ({counts[0]} / {counts[1]})")
        for train_set, splits in report["items_per_class"].items()
        for split, counts in splits.items()
    ]
    lines += markdown_table(["training set", "split", "items"], rows)
    changed = ", ".join(f"{split} {n}" for split, n in report["labels_changed_mmsd_to_mmsd2"].items())
    lines += ["", f"Items whose MMSD2.0 label differs from MMSD 1.0's (same ids): {changed}."]
    cue_names = [name for name in next(iter(report["text_cues_per_class"].values())) if name != "items"]
    lines += [
        "",
        "Texts carrying each cue as released, not stripped (not sarcastic / sarcastic; `count_text_cues`):",
        "",
    ]
    rows = [
        (file, f"{c['items'][0]} / {c['items'][1]}", *(f"{c[name][0]} / {c[name][1]}" for name in cue_names))
        for file, c in report["text_cues_per_class"].items()
    ]
    lines += markdown_table(["file", "items", *cue_names], rows)
    lines += ["", "Tokens per whitespace word of the tiny tokenizer:", ""]
    probes = [key for key in next(iter(report["tokens_per_word"].values())) if key != "vocabulary"]
    rows = [
        (name, values["vocabulary"], *(f"{values[probe]:.3f}" for probe in probes))
        for name, values in report["tokens_per_word"].items()
    ]
    return lines + markdown_table(["tokenizer", "vocabulary", *probes], rows) + [""]


# ------------------------------------------------------------------------------------------------ the report
Results = dict[str, dict[str, dict[str, dict[str, Any]]]]


def aggregate(runs: Sequence[Run]) -> Results:
    """{training set: {method: {eval set: {metric: mean, std, n over the finished seeds}}}}."""
    results: Results = {}
    for run in runs:
        if run.done:
            evals = load_json(run.run_dir / RESULTS_FILE)["eval"]
            per_set = results.setdefault(run.setting, {}).setdefault(run.method, {})
            for split, eval_set in TRAIN_SETS[run.setting].eval_sets.items():
                for metric in METRICS:
                    per_set.setdefault(eval_set, {}).setdefault(metric, []).append(evals.get(split, {}).get(metric))
    return {
        train_set: {
            method: {s: {m: summarize(v) for m, v in metrics.items()} for s, metrics in per_set.items()}
            for method, per_set in methods.items()
        }
        for train_set, methods in results.items()
    }


def majority_scores(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and macro-F1 of always predicting the larger class of each eval set, per training set: the floor
    (accuracy p, macro-F1 p / (1 + p), p the larger class's share)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for train_set, splits in report["items_per_class"].items():
        for split, eval_set in TRAIN_SETS[train_set].eval_sets.items():
            share = max(splits[split]) / sum(splits[split])
            scores.setdefault(train_set, {})[eval_set] = {"accuracy": share, "macro_f1": share / (1 + share)}
    return scores


def write_markdown(path: Path, results: Results, runs: Sequence[Run], report: dict[str, Any], settings: dict) -> str:
    """results.md: one table per training set (with the majority-class floor), the data report, run times and the
    runs that did not finish."""
    seeds = sorted({run.seed for run in runs})
    lines = [
        "# Real-data benchmark",
        "",
        "**The tiny CF-MoE model (0.5M parameters) on tweet text, with one grey placeholder image per item unless "
        "real images were given: these figures are not comparable to published ones** (docs/real_data.md).",
        "",
        f"Images: {settings['images']}; seeds {seeds}; argv shared by every run: `{' '.join(settings['common'])}`.",
        "",
        "Mean ± sample std over seeds (n = finished seeds). Model selection on the training set's validation split "
        "(the run script's label-free default).",
        "",
    ]
    majority = majority_scores(report)
    for train_set, methods in results.items():
        eval_sets = list(TRAIN_SETS[train_set].eval_sets.values())
        header = ["method"] + [f"{EVAL_SETS[s]} {METRICS[m]}" for s in eval_sets for m in METRICS]
        rows = [
            [method] + [fmt(methods[method].get(s, {}).get(m)) for s in eval_sets for m in METRICS]
            for method in RUNS
            if method in methods
        ]
        rows.append(["majority class"] + [f"{majority[train_set][s][m]:.3f}" for s in eval_sets for m in METRICS])
        lines += [f"## Trained on {train_set} train", "", *markdown_table(header, rows), ""]
    lines += data_section(report)
    lines += run_times(runs, settings)
    problems = [run for run in runs if run.status in ("skipped", "failed", "missing")]
    if problems:
        lines += ["## Runs not finished", ""] + [
            f"* {r.setting} {r.method} seed {r.seed}: {r.status} {r.reason}" for r in problems
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def run_times(runs: Sequence[Run], settings: dict[str, Any]) -> list[str]:
    """Mean wall and CPU seconds per run of each training set and method, and the CPU total of the finished runs."""
    rows, total = [], 0.0
    for train_set in TRAIN_SETS:
        for method in RUNS:
            members = [run for run in runs if run.setting == train_set and run.method == method and run.done]
            if members:
                wall, cpu = mean_time(members, method, "wall_s"), mean_time(members, method, "cpu_s")
                total += sum(run.cpu_s or 0.0 for run in members)
                rows.append((train_set, method, len(members), *(f"{t:.0f}" if t else "n/a" for t in (wall, cpu))))
    elapsed = settings.get("elapsed_s")
    lines = ["## Run times", "", *markdown_table(["training set", "method", "runs", "wall s", "CPU s"], rows), ""]
    lines.append(
        f"CPU time of all finished runs: {total / 60:.1f} min"
        + (f"; this invocation took {elapsed / 60:.1f} min of wall time" if elapsed else "")
        + f" ({settings['jobs']} run(s) at a time x {settings['threads']} thread(s))."
    )
    return [*lines, ""]


def plot(path: Path, results: Results, report: dict[str, Any]) -> Path:
    """One panel per training set: accuracy per method and eval set, std error bars; dashed: the majority class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (train_set, methods) in zip(axes[0], results.items(), strict=True):
        order = [method for method in RUNS if method in methods]
        eval_sets = list(TRAIN_SETS[train_set].eval_sets.values())
        width, x = 0.8 / len(eval_sets), np.arange(len(order))
        for offset, eval_set in enumerate(eval_sets):
            summaries = [methods[m].get(eval_set, {}).get("accuracy") or {} for m in order]
            means = [s.get("mean") or 0.0 for s in summaries]
            stds = [s.get("std") or 0.0 for s in summaries]
            shift = (offset - (len(eval_sets) - 1) / 2) * width
            bars = ax.bar(x + shift, means, width, yerr=stds, capsize=2, label=EVAL_SETS[eval_set])
            majority = majority_scores(report)[train_set][eval_set]["accuracy"]
            ax.axhline(majority, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=0.8)
        ax.set_xticks(x, order, rotation=35, ha="right")
        ax.set(
            ylabel="accuracy (dashed: majority class)",
            ylim=(0, 1),
            title=f"trained on {train_set} (tiny model, text only)",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, passthrough = parse_cli(argv)
    root, output_dir = args.data_root.resolve(), args.output_dir.resolve()  # the runs start in the repository root
    check_data_root(root)
    output_dir.mkdir(parents=True, exist_ok=True)
    images = args.image_dir.resolve() if args.image_dir else placeholder_image(output_dir)
    report = data_report(root, images)
    write_json(output_dir / "data_report.json", report)
    if args.data_report_only:
        text = "\n".join(data_section(report))
        print(text)
        return {"data_report": report, "markdown": text}
    seeds = range(args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))
    budget = list(QUICK_ARGS if args.quick else FULL_ARGS)
    if args.epochs is not None:
        budget[budget.index("--num_train_epochs") + 1] = str(args.epochs)
    common = [*budget, *passthrough]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    train_sets = names(args.train_sets, list(TRAIN_SETS), "training set(s)")
    runs = plan(root, output_dir, images, train_sets, names(args.methods, list(RUNS), "method(s)"), seeds, common)
    settings: dict[str, Any] = {"common": common, "jobs": args.jobs, "threads": threads}
    settings["images"] = "real images" if args.image_dir else "one grey placeholder image for every item"
    if args.dry_run:
        for run in runs:
            print(f"{run.setting} {run.method} seed {run.seed}: {' '.join(run.argv)}")
        return {}
    if not args.report_only:
        reason = check_argv(runs[0].argv) if runs else None
        if reason is not None:  # a flag of the benchmark's command line that no run accepts
            raise SystemExit(f"the run script rejects {common}: {reason}")
        begin = time.perf_counter()
        run_all(runs, threads, args.jobs)
        settings["elapsed_s"] = time.perf_counter() - begin
    for run in runs:
        if run.status == "pending":
            run.status = "cached" if run.done else "missing"
    results = aggregate(runs)
    write_json(output_dir / "results.json", results)
    write_json(output_dir / "runs.json", [run.record() for run in runs])
    text = write_markdown(output_dir / "results.md", results, runs, report, settings)
    figure = plot(output_dir / "results.png", results, report) if results else None
    print(text.split("## Data")[0])
    print(
        f"wrote {output_dir / 'results.json'}, results.md, data_report.json, runs.json"
        + (", results.png" if figure else "")
    )
    return {"results": results, "data_report": report, "markdown": text}


if __name__ == "__main__":
    main()
