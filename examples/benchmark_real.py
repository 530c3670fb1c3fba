"""Real-data benchmark: the tiny CF-MoE model trained on the text of real data sets, every method, over seeds.
Sarcasm (the default): trained on MMSD 1.0 and on MMSD2.0, evaluated on MMSD 1.0 test, MMSD2.0 test and the DMSD-CL
OOD set. Sentiment (`--task sentiment`): trained on MVSA-Single and on MVSA-Multiple as CLMLF released them, each
evaluated on both test splits.

    python examples/benchmark_real.py --data_root /data --output_dir out/real                 # 3 seeds, every method
    python examples/benchmark_real.py --data_root /data --output_dir out/real --seeds 1 --methods vanilla,cfmoe
    python examples/benchmark_real.py --data_root /data --output_dir out/real --data_report_only   # sizes, cues
    python examples/benchmark_real.py --task sentiment --data_root /data --output_dir out/real_sentiment

DATA_ROOT holds the repositories as cloned (docs/real_data.md; `benchmarks.real.TASKS`):
    DATA_ROOT/data-of-multimodal-sarcasm-detection/text/{train,valid2,test2}.txt    MMSD 1.0's text release
    DATA_ROOT/MMSD2.0/data/text_json_final/{train,valid,test}.json                   MMSD2.0
    DATA_ROOT/DMSD-CL/data/clean_data/ood_all.txt                                    the DMSD-CL OOD set
    DATA_ROOT/CLMLF/dataset/data/MVSA-{single,multiple}/10-flod-1/{train,dev,test}.json   MVSA (sentiment)
Sarcasm's training sets: `mmsd` (train on MMSD 1.0 train, model selection on MMSD 1.0 valid; evaluated on MMSD 1.0
test, on MMSD2.0 test, the same tweets with the cues removed and some labels corrected, and on the OOD set) and
`mmsd2` (train and select on MMSD2.0; evaluated on MMSD2.0 test and the OOD set). Sentiment's: `mvsa_single` and
`mvsa_multiple` (train and select on the collection's train and dev; evaluated on its test and the other's). The
images are not public: unless `--image_dir` gives them, every item gets one neutral grey placeholder image
(`DIR/placeholder.jpg`), so the runs read text only. Each (training set, method, seed) is `examples/run_<task>.py`
(the tiny model, its tokenizer trained on the training texts) in a fresh subprocess writing to
`DIR/runs/<training set>/<method>/seed<k>/`; a run whose `all_results.json` exists is not run again, so an
interrupted benchmark continues where it stopped.

Writes `DIR/results.json` ({training set: {method: {eval set: {"accuracy" | "macro_f1": {"mean", "std", "n"}}}}}),
`DIR/results.md` (one table per training set, mean ± sample std over seeds; the data report; run times),
`DIR/results.png`, `DIR/data_report.json` (items loaded per split and class; sarcasm: the label-giving text cues of
the released files; sentiment: hashtags, mentions, URLs and retweets per class and the label-giving hashtags; tokens
per word of the tiny tokenizers) and `DIR/runs.json`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.debiasing import META_FILE, MethodTable, Run, check_argv, execute, load_json, run_cli, write_json
from benchmarks.real import TASKS, check_data_root, data_report, data_section, load_all, placeholder_image, plan
from benchmarks.real_report import aggregate, plot, write_markdown

# ------------------------------------------------------------------------------------------------ the run table
# Extra argv of the run script per method, the peers configured as in examples/benchmark_debiasing.py:
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
# Budget shared by every run: 3 epochs of the tiny recipe (one seed of sarcasm's two training sets and every method
# takes about an hour on 2 CPU cores, docs/real_data.md); quick: 1 epoch, small batches (a smoke test).
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
    parser.add_argument("--task", choices=list(TASKS), default="sarcasm", help="the task's data sets (default sarcasm)")
    parser.add_argument("--data_root", type=Path, required=True, help="folder of the cloned repositories")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS}; quick 1)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(RUNS)} (default all)")
    known = "; ".join(f"{task}: {', '.join(spec.train_sets)}" for task, spec in TASKS.items())
    parser.add_argument("--train_sets", default=None, help=f"comma-separated subset of the task's ({known})")
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, passthrough = parse_cli(argv)
    root, output_dir = args.data_root.resolve(), args.output_dir.resolve()  # the runs start in the repository root
    task = args.task
    check_data_root(TASKS[task], root)
    if task == "sentiment" and args.image_dir and args.image_dir.is_dir():  # each run also tests the other collection
        raise SystemExit(
            "--image_dir: MVSA-Single and MVSA-Multiple number their tweets alike, one folder cannot hold "
            "both; give one image file (a placeholder) or run examples/run_sentiment.py per collection"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    images = args.image_dir.resolve() if args.image_dir else placeholder_image(output_dir)
    loaded = load_all(task, root, images)
    report = data_report(task, root, loaded)
    write_json(output_dir / "data_report.json", report)
    if args.data_report_only:
        text = "\n".join(data_section(task, report))
        print(text)
        return {"data_report": report, "markdown": text}
    seeds = range(args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))
    budget = list(QUICK_ARGS if args.quick else FULL_ARGS)
    if args.epochs is not None:
        budget[budget.index("--num_train_epochs") + 1] = str(args.epochs)
    common = [*budget, *passthrough]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    train_sets = names(args.train_sets, list(TASKS[task].train_sets), "training set(s)")
    methods = names(args.methods, list(RUNS), "method(s)")
    runs = plan(task, root, output_dir, images, train_sets, TABLE, methods, seeds, common)
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
    results = aggregate(task, runs, loaded)
    write_json(output_dir / "results.json", results)
    write_json(output_dir / "runs.json", [run.record() for run in runs])
    text = write_markdown(task, output_dir / "results.md", list(RUNS), results, runs, report, settings)
    figure = plot(task, output_dir / "results.png", list(RUNS), results, report) if results else None
    print(text.split("## Data")[0])
    print(
        f"wrote {output_dir / 'results.json'}, results.md, data_report.json, runs.json"
        + (", results.png" if figure else "")
    )
    return {"results": results, "data_report": report, "markdown": text}


if __name__ == "__main__":
    main()
