"""The debiasing benchmark's report: runs aggregated per setting and method (mean ± std over seeds), ranked on
`robust_acc`, ablation costs, and `results.json`, `results.md`, one plot per setting, `routing.json`, `runs.json`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfmoe.trainer.data.synthetic import NO_CUE

from .debiasing import (
    ABLATION_COST_THRESHOLD,
    HEADLINE,
    META_FILE,
    METRIC_DEFINITIONS,
    METRICS,
    RESULTS_FILE,
    MethodTable,
    Run,
    load_json,
    read_bases,
    run_metrics,
    summarize,
    write_json,
)
from .routing import ROUTING_SUMMARIES, routing_report

# ------------------------------------------------------------------------------------------------ aggregation
Results = dict[str, dict[str, dict[str, dict[str, Any]]]]  # {setting: {method: {metric: {"mean", "std", "n"}}}}


def by_setting(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs of each setting, settings and runs in plan order."""
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.setting, []).append(run)
    return grouped


def aggregate(runs: Sequence[Run]) -> Results:
    """`results.json`: per setting and method, each metric's mean, sample std (0 for one seed) and count over the
    finished seeds (read back from each run's `all_results.json`)."""
    results: Results = {}
    for setting, members in by_setting(runs).items():
        per_method: dict[str, list[dict[str, float]]] = {}
        for run in members:
            if run.done:
                run.metrics = run_metrics(load_json(run.run_dir / RESULTS_FILE)["eval"])
                per_method.setdefault(run.method, []).append(run.metrics)
        if per_method:
            results[setting] = {
                method: {metric: summarize([seed[metric] for seed in seeds]) for metric in METRICS}
                for method, seeds in per_method.items()
            }
    return results


def ranked(methods: dict[str, dict[str, dict[str, Any]]], table: MethodTable) -> list[str]:
    """Peers, then references, then ablations; within each, by mean robust_acc, best first (missing last)."""
    kinds = ("peer", "reference", "ablation")

    def key(method: str) -> tuple[int, float]:
        score = methods[method][HEADLINE]["mean"]
        return kinds.index(table.kind(method)), -score if score is not None else math.inf

    return sorted(methods, key=key)


def ablation_costs(methods: dict[str, dict[str, dict[str, Any]]], table: MethodTable) -> dict[str, dict[str, Any]]:
    """Per ablation of one setting: cost = the full method's mean robust_acc - the ablation's; `cheap` when under
    the threshold (the removed component does not earn its place)."""
    full = methods.get(table.full_method, {}).get(HEADLINE, {}).get("mean")
    costs = {}
    for method, metrics in methods.items():
        ablated = metrics[HEADLINE]["mean"]
        if table.kind(method) == "ablation" and full is not None and ablated is not None:
            cost = full - ablated
            costs[method] = {HEADLINE: ablated, "cost": cost, "cheap": cost < ABLATION_COST_THRESHOLD}
    return costs


# ------------------------------------------------------------------------------------------------ report
def fmt(summary: dict[str, Any] | None, digits: int = 3) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def shares_text(shares: Sequence[float] | None) -> str:
    return " / ".join(f"{share:.2f}" for share in shares) if shares else "n/a"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def mean_time(runs: Sequence[Run], method: str, attribute: str) -> float | None:
    values = [getattr(r, attribute) for r in runs if r.method == method and r.done and getattr(r, attribute)]
    return float(np.mean(values)) if values else None


def overview_table(results: Results, table: MethodTable) -> list[str]:
    """Mean ± std robust_acc of every method (rows, first setting's ranking) in every setting (columns)."""
    settings = list(results)
    methods = list(dict.fromkeys(m for s in settings for m in ranked(results[s], table)))
    rows = [[m, table.kind(m), *(fmt(results[s].get(m, {}).get(HEADLINE)) for s in settings)] for m in methods]
    return markdown_table(["method", "kind", *settings], rows)


def setting_table(methods: dict[str, dict[str, dict[str, Any]]], runs: Sequence[Run], table: MethodTable) -> list[str]:
    """One setting's methods, ranked (`ranked`), every metric as mean ± std."""
    rows = []
    for method in ranked(methods, table):
        metrics, wall = methods[method], mean_time(runs, method, "wall_s")
        n = max(summary["n"] for summary in metrics.values())
        row = [method, table.kind(method), n, *(fmt(metrics[m]) for m in METRICS)]
        rows.append([*row, f"{wall:.0f}" if wall is not None else "n/a"])
    return markdown_table(["method", "kind", "n", *METRICS, "wall s / run"], rows)


def ablation_section(methods: dict[str, dict[str, dict[str, Any]]], table: MethodTable) -> list[str]:
    costs = ablation_costs(methods, table)
    if not costs:
        return []
    full = methods[table.full_method][HEADLINE]
    lines = [f"Ablations: cost = `{table.full_method}` mean {HEADLINE} ({fmt(full)}) - the ablation's, in points.", ""]
    cheap_text = f"cheap (< {100 * ABLATION_COST_THRESHOLD:.0f} points)"
    rows = [
        [method, fmt(methods[method][HEADLINE]), f"{100 * cost['cost']:+.1f}", "**yes**" if cost["cheap"] else "no"]
        for method, cost in costs.items()
    ]
    lines += markdown_table(["ablation", HEADLINE, "cost (points)", cheap_text], rows)
    cheap = [method for method, cost in costs.items() if cost["cheap"]]
    return [*lines, "", f"Cheap ablations: {', '.join(cheap) if cheap else 'none'}."]


def group_table(method: str, seeds: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown table per method: rows overall + each group, per seed the visual and the text shares."""
    studied = {seed: entry["test"] for seed, entry in sorted(seeds.items(), key=lambda i: int(i[0])) if "test" in entry}
    if not studied:
        return []

    def cue(value: int) -> str:
        return "none" if value == NO_CUE else str(value)

    names = {"overall": "overall"}
    for test in studied.values():
        for group_id, group in test["groups"].items():
            cues = f"y={group['label']} text={cue(group['text_cue'])} image={cue(group['image_cue'])}"
            names[group_id] = f"{cues} ({group['category']})"
    order = ["overall", *sorted((g for g in names if g != "overall"), key=int)]
    header = ["items", "n"] + [f"seed {seed} {site}" for seed in studied for site in ("visual", "text")]
    rows = []
    for key in order:
        entries = [test["overall"] if key == "overall" else test["groups"].get(key) for test in studied.values()]
        row = [names[key], "/".join(str(e["n"]) if e else "0" for e in entries)]
        for entry in entries:
            row += [shares_text(entry.get("visual")), shares_text(entry.get("text"))] if entry else ["-", "-"]
        rows.append(row)
    return ["", f"#### {method}: test shares per group", "", *markdown_table(header, rows)]


ROUTING_INTRO = (
    "Shares are mean gates (top-k, renormalised) per expert: `visual` is the MoE after the projector, `text` the "
    "MoE after the language model. *Train* shares are the last logged training step's; *test* shares are the saved "
    "(selected) model's on `test_iid` + `test_ood`. Expert indices are not comparable across seeds, so the "
    "seed-level summaries are order-free: *balance* (normalised entropy of the test shares, 1 = even), "
    "*separation* (within each label, the total-variation distance between the mean gates of the cue-aligned and "
    "of the cue-conflicting groups, averaged over labels; 0 = the cues do not change the routing) and the "
    "sensitivity to each cue's value (*text cue value*, *image cue value*: the total-variation distance between "
    "groups that differ only in the class that cue points at; 0 = the router ignores which class a cue points at) "
    "and *source* (`mixed` only: the total-variation distance between the mean gates of items whose cue is in the "
    "text and of items whose cue is in the image; high = routing follows the bias type). Groups: label y x the "
    "class each cue points at (`none`: the modality has no cue); `aligned` when every cue points at the label, "
    "`text_conflicting` / `image_conflicting` when that modality's cue points elsewhere, `both_conflicting`. Per "
    "split and per cue category (labels pooled): "
    "`routing.json`."
)


def routing_section(setting: str, routing: dict[str, Any], table: MethodTable) -> list[str]:
    rows = []
    for method, summary in routing.items():
        first = summary["seeds"][min(summary["seeds"], key=int)]
        train = first.get("final_training_shares", {})
        row = [method]
        for site in ("visual", "text"):
            row += [fmt(summary[key].get(site), 2) for key in ROUTING_SUMMARIES]
        rows.append([*row, shares_text(train.get("visual")), shares_text(train.get("text"))])
    names = ("balance", "separation", "text cue value", "image cue value", "source", "text AUROC", "image AUROC")
    header = [f"{site}: {name}" for site in ("visual", "text") for name in names]
    lines = ["", f"### {setting}", ""]
    lines += markdown_table(["method", *header, "train shares visual (first seed)", "train shares text"], rows)
    for method, summary in routing.items():
        if table.is_full_or_ablation(method):
            lines += group_table(method, summary["seeds"])
    return lines


def bases_section(bases: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """The pretrained bases: perception validation accuracy per target, budget and time, per task and seed."""
    if not bases:
        return []
    targets = list(dict.fromkeys(t for summary in bases.values() for t in summary["validation_accuracy"]))
    rows = []
    for (task, seed), summary in sorted(bases.items()):
        config, accuracy = summary["config"], summary["validation_accuracy"]
        budget = f"{config['num_train']} items x {config['num_epochs']} epochs ({config['cue_setting']})"
        cells = (f"{accuracy[t]:.3f}" if t in accuracy else "-" for t in targets)
        rows.append([task, seed, *cells, budget, f"{summary['seconds']:.0f}"])
    return [
        "## Pretrained bases",
        "",
        "Regime `pretrained`: each task and seed fine-tunes its own perception-pretrained tiny LLaVA base "
        "(cue-random, clean data from another data seed; `trainer.pretrain`) with the vision tower frozen. "
        "Validation accuracy of the perception heads:",
        "",
        *markdown_table(["task", "seed", *targets, "budget", "seconds"], rows),
        "",
    ]


def runs_section(runs: Sequence[Run], settings: dict[str, Any]) -> list[str]:
    """The skipped, failed and flagged runs, and the run times per method."""
    lines = []
    unfinished = [run for run in runs if run.status in ("skipped", "failed", "missing") or run.reason]
    if unfinished:
        lines += ["## Skipped, failed and flagged runs", ""]
        rows = [
            [r.setting, r.method, r.seed, r.status, r.reason.splitlines()[0] if r.reason else ""] for r in unfinished
        ]
        lines += [*markdown_table(["setting", "method", "seed", "status", "reason"], rows), ""]
    rows = []
    for method in dict.fromkeys(run.method for run in runs):
        wall, cpu = mean_time(runs, method, "wall_s"), mean_time(runs, method, "cpu_s")
        rows.append([method, f"{wall:.0f}" if wall else "n/a", f"{cpu:.0f}" if cpu else "n/a"])
    total = sum(run.wall_s for run in runs if run.wall_s is not None)
    elapsed = settings.get("elapsed_s")
    elapsed = f"this invocation took {elapsed / 60:.1f} min" if elapsed is not None else "no run in this invocation"
    return lines + [
        "## Run times (mean over settings and seeds)",
        "",
        *markdown_table(["method", "wall s / run", "CPU s / run"], rows),
        "",
        f"Sum of run wall times: {total / 60:.1f} min ({elapsed}); {settings['jobs']} run(s) at a time, "
        f"{settings['threads']} torch thread(s) each. Wall times include the subprocess start, data generation, "
        "evaluation and the routing study; CPU time counts every thread of the run's process.",
        "",
    ]


def write_markdown(
    path: Path,
    results: Results,
    runs: Sequence[Run],
    routing: dict[str, Any],
    bases: dict[int, dict[str, Any]],
    table: MethodTable,
    settings: dict[str, Any],
) -> str:
    """results.md: the overview, one ranked table and the ablations per setting, the definitions, the bases,
    skipped/failed runs, run times and the routing study."""
    seeds = sorted({run.seed for run in runs})
    grouped = by_setting(runs)
    lines = [
        "# Debiasing benchmark",
        "",
        "**Synthetic planted-cue data, not MMSD2.0 figures.** Tasks: sarcasm (the AND-incongruity core) and "
        "sentiment (the polarity text and image express together), with training label noise and one spurious cue "
        "per modality, in the form the cue setting names (docs/benchmark.md). Every method trains the same tiny "
        "CF-MoE model on the same data with the same budget; model selection on validation by the run script's "
        "label-free default. Settings are `<task>/<regime>/<cue_setting>/noise<eta>`: `scratch` trains the whole "
        "model from a random initialisation, `pretrained` fine-tunes a perception-pretrained base, vision tower "
        "frozen; `eta` is the training label noise.",
        "",
        f"Mode: {settings['mode']}; seeds {seeds}; argv shared by every run: `{' '.join(settings['common']) or '-'}`.",
        "",
        f"Mean ± sample std over seeds (n = finished seeds); methods ranked on `{HEADLINE}` (peers, then references, "
        "then ablations).",
        "",
        f"## Overview: {HEADLINE}",
        "",
        *overview_table(results, table),
    ]
    for setting, methods in results.items():
        lines += ["", f"## {setting}", "", *setting_table(methods, grouped[setting], table)]
        if ablations := ablation_section(methods, table):
            lines += ["", *ablations]
    lines += [
        "",
        "## Metrics",
        "",
        *(f"- `{name}`: {text}" for name, text in METRIC_DEFINITIONS.items()),
        "",
        "Kinds: *peer* methods compete on equal terms; *reference* runs may use what the others may not "
        "(`oracle_unbiased`: training data with cues independent of the label, rho 0.5; `group_dro`: group "
        f"labels); *ablation* runs are `{table.full_method}` with one component removed.",
        "",
        *bases_section(bases),
    ]
    lines += [*runs_section(runs, settings), "## Routing study", "", ROUTING_INTRO]
    for setting, per_method in routing.items():
        lines += routing_section(setting, per_method, table)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_path(output_dir: Path, setting: str) -> Path:
    """`DIR/<task>_<regime>_<cue_setting>_noise<eta>.png`."""
    return output_dir / f"{setting.replace('/', '_')}.png"


def plot_setting(path: Path, setting: str, methods: dict[str, dict[str, dict[str, Any]]], table: MethodTable) -> Path:
    """Grouped bars of robust / iid / ood / neutral accuracy per method (ranked), std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ranked(methods, table)
    metrics = (HEADLINE, "iid_acc", "ood_acc", "neutral_acc")
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2), 4.5))
    x = np.arange(len(order))
    for offset, metric in enumerate(metrics):
        means = [methods[m][metric]["mean"] or 0.0 for m in order]
        stds = [methods[m][metric]["std"] or 0.0 for m in order]
        shift = (offset - (len(metrics) - 1) / 2) * width
        ax.bar(x + shift, means, width, yerr=stds, capsize=2, label=metric.removesuffix("_acc"))
    ax.set_xticks(x, order, rotation=35, ha="right")
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=f"synthetic planted cues, {setting}: mean ± std over seeds")
    ax.legend(ncols=len(metrics), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(output_dir: Path, runs: Sequence[Run], table: MethodTable, settings: dict[str, Any]) -> dict[str, Any]:
    """Read every finished run back and write results.json, results.md, one plot per setting, routing.json and
    runs.json. `settings`: mode, common argv, jobs, threads and (when runs ran) elapsed_s."""
    for run in runs:
        if run.status == "pending":
            run.status = "cached" if run.done else "missing"
        meta = run.run_dir / META_FILE
        if run.wall_s is None and meta.is_file():
            run.wall_s, run.cpu_s = load_json(meta).get("wall_s"), load_json(meta).get("cpu_s")
    results = aggregate(runs)
    routing = {setting: routing_report(members) for setting, members in by_setting(runs).items()}
    routing = {setting: report for setting, report in routing.items() if report}
    write_json(output_dir / "results.json", results)
    write_json(output_dir / "routing.json", routing)
    write_json(output_dir / "runs.json", [run.record() for run in runs])
    bases = read_bases(output_dir, runs)
    text = write_markdown(output_dir / "results.md", results, runs, routing, bases, table, settings)
    plots = [plot_setting(plot_path(output_dir, s), s, methods, table) for s, methods in results.items()]
    return {"results": results, "routing": routing, "markdown": text, "plots": plots}
