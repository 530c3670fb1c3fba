"""Debiasing benchmark: every peer method, the two references and the ablations of CF-MoE, per task, regime, cue
setting and label noise, over seeds.

    python examples/benchmark_debiasing.py --output_dir out/bench                          # 3 seeds, full data
    python examples/benchmark_debiasing.py --output_dir out/bench --quick                  # 1 seed, smaller data
    python examples/benchmark_debiasing.py --output_dir out/bench --task sarcasm,sentiment --regime pretrained \
        --cue_settings tint_hashtag,mixed --label_noise 0.2,0.05 --methods vanilla,cfmoe --seeds 2
    python examples/benchmark_debiasing.py --output_dir out/smoke --quick --methods vanilla,cfmoe \
        --num_train 128 --num_validation 64 --num_test 64 --num_train_epochs 1   # extra flags go to every run

Every method is a switchable training method of the same model (the tiny offline CF-MoE), trained on the same
synthetic planted-cue data with the same budget by `examples/run_<task>.py`; the argv of each entry comes from the
`RUNS` table below (edit it there). Tasks: `sarcasm` and `sentiment` (three classes). Regimes: `scratch` (the tiny
model from a random initialisation) and `pretrained` (a perception-pretrained tiny LLaVA base per task and seed,
built once under `DIR/bases/<task>/seed<k>/` and reused, fine-tuned with the vision tower frozen). Each run also gets
`--cue_setting <name>` (the cue forms: `cfmoe.trainer.data.synthetic.CUE_SETTINGS`; `core_markers`, whose sarcasm
markers make an item sarcastic on their own, runs for sarcasm only) and `--label_noise <eta>`. Each (task, regime,
cue setting, noise, method, seed) runs in a fresh subprocess writing to
`DIR/runs/<task>/<regime>/<cue_setting>/noise<eta>/<method>/seed<k>/`; a finished run is not run again, so an
interrupted benchmark continues where it stopped. A run whose argv the run script's parser rejects is reported as
skipped, with the parser's reason, and a run that crashes as failed (its log is `benchmark.log` in its folder).

Writes `DIR/results.json` ({"<task>/<regime>/<cue_setting>/noise<eta>": {method: {metric: {"mean", "std", "n"}}}};
the headline is `robust_acc` = min(iid_acc, ood_acc) per run), `DIR/results.md` (overview, one table per setting
ranked on robust_acc, ablation costs, metric definitions, the bases, run times, the routing study), one plot per
setting `DIR/<task>_<regime>_<cue_setting>_noise<eta>.png`, `DIR/routing.json` and `DIR/runs.json` (status and times
of every run).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.debiasing import (
    DEFAULT_NOISE,
    REGIMES,
    TASKS,
    MethodTable,
    build_bases,
    check_argv,
    execute,
    plan_runs,
)
from benchmarks.report import plot_path, write_report
from benchmarks.routing import launch_run
from cfmoe.trainer.data.synthetic import CUE_SETTINGS

# ------------------------------------------------------------------------------------------------ the run table
# Extra argv of `examples/run_sarcasm.py` per method; edit the method configurations here.
# Ablations (names starting with "cfmoe_") list only what they change: the "cfmoe" entry is prepended to them.
JOINT = ["--detach_bias_branches", "False"]
ROUTED = ["--num_visual_experts", "4", "--num_text_experts", "4", "--experts_top_k", "2"]
NO_SPLIT = ["--counterfactual_fraction", "0", "--factual_task_weight", "1", "--upweight", "19"]
RUNS: dict[str, list[str]] = {
    # peers: same model, same data, same budget
    "vanilla": ["--method", "vanilla"],
    # the bias-aware peers train their bias branches jointly with the shared base, as in their papers and as measured
    "text_poe": ["--method", "text_poe", *JOINT],  # product of experts with the text-only bias branch
    "image_poe": ["--method", "image_poe", *JOINT],  # product of experts with the image-only bias branch
    "rubi": ["--method", "rubi", *JOINT],  # RUBi's sigmoid mask
    "cfvqa": ["--method", "cfvqa", *JOINT],  # counterfactual inference at test time: TIE with the learned prior
    "cfmoe": ["--method", "cfmoe"],  # the full method
    # references: may use what the others may not
    "oracle_unbiased": ["--method", "vanilla", "--rho_train", "0.5"],  # cue-free training data
    "group_dro": ["--method", "group_dro"],  # group labels
    # ablations of cfmoe (each adds its flags to the cfmoe entry)
    # routed experts (cfmoe has one expert per site): by bias evidence, by content, or all weighted equally
    "cfmoe_routed": [*ROUTED],
    "cfmoe_content_router": [*ROUTED, "--router_input", "content"],  # reads the pooled content (the cue's value too)
    "cfmoe_uniform_gates": [*ROUTED, "--uniform_gates", "True"],
    "cfmoe_no_text_cf": ["--text_counterfactuals", "False"],  # only the image context is swapped
    "cfmoe_no_visual_cf": ["--image_counterfactuals", "False"],  # only the text context is swapped
    "cfmoe_with_contrast": ["--counterfactual_types", "context_swapped,core_masked"],  # + core-masked rows, contrast
    "cfmoe_with_factual_task": ["--factual_task_weight", "1"],  # the fused head also learns from factual rows
    "cfmoe_joint_bias": [*JOINT],  # the bias branches' losses also train the shared base
    # no core/context split: whole-modality counterfactuals only (the text-only and image-only branches), used to
    # reweight the factual rows per modality (w = prod_m (1 + 19 [branch m wrong])), or with the JTT rule
    "cfmoe_no_split": [*NO_SPLIT],
    "cfmoe_no_split_combined_rule": [*NO_SPLIT, "--conflict_rule", "combined"],
}
TABLE = MethodTable(RUNS, full_method="cfmoe", references=("oracle_unbiased", "group_dro"))

# Budget shared by every run. Full: the run script's defaults (4000 / 1000 / 1000 items, 8 epochs).
FULL_ARGS: list[str] = []
QUICK_ARGS: list[str] = ["--num_train", "1500", "--num_validation", "500", "--num_test", "500"]
DEFAULT_SEEDS, QUICK_SEEDS = 3, 1
DEFAULT_CUE_SETTINGS = ("tint_hashtag", "local_mark", "presence_shared", "mixed")
# the tiny model gains little from intra-op threads: one single-threaded run per core is the fastest layout
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))
# benchmark flag -> flag of `examples/make_tiny_model.py --pretrain` (unset: its defaults)
PRETRAIN_FLAGS = {
    "pretrain_epochs": "--pretrain_epochs",
    "pretrain_num_train": "--pretrain_num_train",
    "pretrain_num_validation": "--pretrain_num_validation",
}


def parse_cli(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; every other flag goes to every run, before the table's argv (whose entries win)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag (e.g. --num_train 128 --num_train_epochs 1) goes to every run, before the table's argv.",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--task", default="sarcasm", help=f"comma-separated subset of: {', '.join(TASKS)}")
    parser.add_argument("--regime", default="scratch", help=f"comma-separated subset of: {', '.join(REGIMES)}")
    parser.add_argument(
        "--cue_settings",
        default=",".join(DEFAULT_CUE_SETTINGS),
        help=f"comma-separated cue settings (default %(default)s); known: {', '.join(CUE_SETTINGS)}",
    )
    parser.add_argument(
        "--label_noise",
        default=f"{DEFAULT_NOISE:g}",
        help="comma-separated training label noise levels (default %(default)s), e.g. 0.2,0.05",
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS}; quick 1)")
    parser.add_argument("--quick", action="store_true", help="1 seed and smaller data (QUICK_ARGS)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    for name in PRETRAIN_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="pretrained bases (default: make_tiny_model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / jobs)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="runs at a time (default min(4, cores))")
    parser.add_argument("--dry_run", action="store_true", help="print each run's argv and the rejected ones; no runs")
    parser.add_argument("--report_only", action="store_true", help="no runs: report the finished ones")
    return parser.parse_known_args(argv)


def names(spec: str | None, known: Sequence[str], what: str) -> list[str]:
    """The comma-separated names of `spec` (all of `known` when empty), each checked against `known`."""
    chosen = [name.strip() for name in (spec or "").split(",") if name.strip()] or list(known)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, passthrough = parse_cli(argv)
    seeds = range(args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))
    regimes = names(args.regime, REGIMES, "regime(s)")
    tasks = names(args.task, TASKS, "task(s)")
    try:
        noises = [float(value) for value in args.label_noise.split(",") if value.strip()]
    except ValueError as error:
        raise SystemExit(f"--label_noise takes comma-separated numbers, got {args.label_noise!r}") from error
    cue_settings = names(args.cue_settings, list(CUE_SETTINGS), "cue setting(s)")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    common = [*(QUICK_ARGS if args.quick else FULL_ARGS), *passthrough]
    pretrain_argv: list[str] = []
    for name, flag in PRETRAIN_FLAGS.items():
        if getattr(args, name) is not None:
            pretrain_argv += [flag, str(getattr(args, name))]
    output_dir = args.output_dir.resolve()  # the runs start in the repository root
    methods = names(args.methods, list(RUNS), "method(s)")
    runs = plan_runs(output_dir, TABLE, methods, seeds, regimes, cue_settings, common, tasks, noises)
    settings: dict[str, Any] = {"mode": "quick" if args.quick else "full", "common": common}
    settings |= {"jobs": args.jobs, "threads": threads}
    if args.dry_run:
        for run in runs:
            reason = check_argv(run.argv)
            rejected = f"\n  REJECTED: {reason}" if reason else ""
            print(f"{run.setting} {run.method} seed {run.seed}: {' '.join(run.argv)}{rejected}")
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        reason = check_argv(common)
        if reason is not None:  # a flag of the benchmark's command line that no run accepts
            raise SystemExit(f"the shared argv {common} is rejected by the run script: {reason}")
        begin = time.perf_counter()
        if "pretrained" in regimes:
            build_bases(output_dir, seeds, pretrain_argv, threads, args.jobs, tasks)
        execute(runs, threads, args.jobs, launch=launch_run)
        settings["elapsed_s"] = time.perf_counter() - begin
    report = write_report(output_dir, runs, TABLE, settings)
    print(report["markdown"].split("## Metrics")[0])
    plots = ", ".join(plot_path(output_dir, setting).name for setting in report["results"])
    print(f"wrote {output_dir / 'results.json'}, results.md, routing.json, runs.json, {plots}")
    return report


if __name__ == "__main__":
    main()
