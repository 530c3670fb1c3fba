"""The report of the real-data benchmark (`examples/benchmark_real.py`): accuracy and macro-F1 per training set,
method and eval set (mean ± sample std over seeds), the majority class's floor, run times; `results.md` and
`results.png`. The data and the runs are in `real`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .debiasing import RESULTS_FILE, Run, load_json, summarize
from .real import TASKS, Loaded, data_section, eval_columns, subset_scores
from .report import fmt, markdown_table, mean_time

METRICS = {"accuracy": "acc", "macro_f1": "macro-F1"}
Results = dict[str, dict[str, dict[str, dict[str, Any]]]]  # {training set: {method: {eval set: {metric: summary}}}}


def aggregate(task: str, runs: Sequence[Run], loaded: Loaded) -> Results:
    """{training set: {method: {eval set: {metric: mean, std, n over the finished seeds}}}}, the task's subsets
    (`subset_scores`) among the eval sets."""
    results: dict[str, dict[str, dict[str, dict[str, list]]]] = {}
    for run in runs:
        if run.done:
            evals = load_json(run.run_dir / RESULTS_FILE)["eval"]
            scores = {
                eval_set: evals.get(split, {})
                for split, eval_set in TASKS[task].train_sets[run.setting].eval_sets.items()
            }
            scores |= subset_scores(task, run.setting, run.run_dir, loaded)
            per_set = results.setdefault(run.setting, {}).setdefault(run.method, {})
            for eval_set, values in scores.items():
                for metric in METRICS:
                    per_set.setdefault(eval_set, {}).setdefault(metric, []).append(values.get(metric))
    return {
        train_set: {
            method: {s: {m: summarize(v) for m, v in metrics.items()} for s, metrics in per_set.items()}
            for method, per_set in methods.items()
        }
        for train_set, methods in results.items()
    }


def majority_scores(task: str, report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy and macro-F1 of always predicting the largest class of each eval set, per training set: the floor
    (accuracy p, macro-F1 2p / (1 + p) / K: p the largest class's share, K the classes)."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for train_set, splits in report["items_per_class"].items():
        sets = {eval_set: splits[split] for split, eval_set in TASKS[task].train_sets[train_set].eval_sets.items()}
        for eval_set, counts in (sets | report.get("subset_items_per_class", {}).get(train_set, {})).items():
            p, k = max(counts) / sum(counts), len(counts)
            scores.setdefault(train_set, {})[eval_set] = {"accuracy": p, "macro_f1": 2 * p / (1 + p) / k}
    return scores


def write_markdown(
    task: str,
    path: Path,
    methods: Sequence[str],
    results: Results,
    runs: Sequence[Run],
    report: dict[str, Any],
    settings: dict,
) -> str:
    """results.md: one table per training set (with the majority-class floor), the data report, run times and the
    runs that did not finish."""
    seeds = sorted({run.seed for run in runs})
    lines = [
        f"# Real-data benchmark ({task})",
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
    majority, titles = majority_scores(task, report), TASKS[task].eval_sets
    for train_set, by_method in results.items():
        eval_sets = eval_columns(task, train_set)
        header = ["method"] + [f"{titles[s]} {METRICS[m]}" for s in eval_sets for m in METRICS]
        rows = [
            [method] + [fmt(by_method[method].get(s, {}).get(m)) for s in eval_sets for m in METRICS]
            for method in methods
            if method in by_method
        ]
        rows.append(["majority class"] + [f"{majority[train_set][s][m]:.3f}" for s in eval_sets for m in METRICS])
        lines += [f"## Trained on {train_set} train", "", *markdown_table(header, rows), ""]
    lines += data_section(task, report)
    lines += run_times(task, methods, runs, settings)
    problems = [run for run in runs if run.status in ("skipped", "failed", "missing")]
    if problems:
        lines += ["## Runs not finished", ""] + [
            f"* {r.setting} {r.method} seed {r.seed}: {r.status} {r.reason}" for r in problems
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def run_times(task: str, methods: Sequence[str], runs: Sequence[Run], settings: dict[str, Any]) -> list[str]:
    """Mean wall and CPU seconds per run of each training set and method, and the CPU total of the finished runs."""
    rows, total = [], 0.0
    for train_set in TASKS[task].train_sets:
        for method in methods:
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


def plot(task: str, path: Path, methods: Sequence[str], results: Results, report: dict[str, Any]) -> Path:
    """One panel per training set: accuracy per method and eval set, std error bars; dashed: the majority class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    majority = majority_scores(task, report)
    for ax, (train_set, by_method) in zip(axes[0], results.items(), strict=True):
        order = [method for method in methods if method in by_method]
        eval_sets = eval_columns(task, train_set)
        width, x = 0.8 / len(eval_sets), np.arange(len(order))
        for offset, eval_set in enumerate(eval_sets):
            summaries = [by_method[m].get(eval_set, {}).get("accuracy") or {} for m in order]
            means = [s.get("mean") or 0.0 for s in summaries]
            stds = [s.get("std") or 0.0 for s in summaries]
            shift = (offset - (len(eval_sets) - 1) / 2) * width
            bars = ax.bar(x + shift, means, width, yerr=stds, capsize=2, label=TASKS[task].eval_sets[eval_set])
            floor = majority[train_set][eval_set]["accuracy"]
            ax.axhline(floor, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=0.8)
        ax.set_xticks(x, order, rotation=35, ha="right")
        title = f"trained on {train_set} (tiny model, text only)"
        ax.set(ylabel="accuracy (dashed: majority class)", ylim=(0, 1), title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
