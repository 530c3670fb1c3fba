"""Debiasing benchmark: every peer method, the two references and the ablations of CF-MoE, over seeds.

    python examples/benchmark_debiasing.py --output_dir out/bench                 # 3 seeds, full data
    python examples/benchmark_debiasing.py --output_dir out/bench --quick         # 1 seed, smaller data
    python examples/benchmark_debiasing.py --output_dir out/bench --methods vanilla,cfmoe --seeds 2
    python examples/benchmark_debiasing.py --output_dir out/smoke --quick --methods vanilla,cfmoe \
        --num_train 128 --num_validation 64 --num_test 64 --num_train_epochs 1   # extra flags go to every run

Every method is a switchable training method of the same model (the tiny offline CF-MoE), trained on the same
synthetic planted-cue data with the same budget by `trainer.run.main("sarcasm", argv)`; the argv of each entry
comes from the `RUNS` table below (edit it there). Each (method, seed) runs in a fresh subprocess writing to
`DIR/runs/<method>/seed<k>/`; a run whose `all_results.json` exists is not run again, so an interrupted
benchmark continues where it stopped. A run whose argv the argument parser rejects is reported as skipped, with
the parser's reason, and a run that crashes as failed (its log is `DIR/runs/<method>/seed<k>/benchmark.log`).

Writes `DIR/results.json` ({method: {metric: {"mean", "std", "n"}}}), `DIR/results.md` (the table, the metric
definitions, ablation costs, run times, the routing study), `DIR/results.png`, `DIR/routing.json` (router
shares per modality site, overall and per group) and `DIR/runs.json` (status and times of every run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.metrics import summarize_runs  # noqa: E402

TASK = "sarcasm"

# ------------------------------------------------------------------------------------------------ the run table
# Extra argv of `trainer.run.main(TASK, argv)` per method; edit the method configurations here.
# Ablations (names starting with "cfmoe_") list only what they change: the "cfmoe" entry is prepended to them.
FULL_METHOD = "cfmoe"
NO_SPLIT = ["--counterfactual_fraction", "0", "--factual_task_weight", "1", "--upweight", "19"]
ABLATION_PREFIX = f"{FULL_METHOD}_"
RUNS: dict[str, list[str]] = {
    # peers: same model, same data, same budget
    "vanilla": ["--method", "vanilla"],
    "text_poe": ["--method", "text_poe"],  # product of experts with the text-only bias branch
    "image_poe": ["--method", "image_poe"],  # product of experts with the image-only bias branch
    "rubi": ["--method", "rubi"],  # RUBi's sigmoid mask
    "cfvqa": ["--method", "cfvqa"],  # counterfactual inference at test time: TIE with the learned prior
    "cfmoe": ["--method", "cfmoe"],  # the full method
    # references: may use what the others may not
    "oracle_unbiased": ["--method", "vanilla", "--rho_train", "0.5"],  # cue-free training data
    "group_dro": ["--method", "group_dro"],  # group labels
    # ablations of cfmoe (each adds its flags to the cfmoe entry)
    "cfmoe_single_expert": ["--num_visual_experts", "1", "--num_text_experts", "1", "--experts_top_k", "1"],
    "cfmoe_uniform_gates": ["--uniform_gates", "True"],
    "cfmoe_no_text_cf": ["--text_counterfactuals", "False"],  # only the image context is swapped
    "cfmoe_no_visual_cf": ["--image_counterfactuals", "False"],  # only the text context is swapped
    "cfmoe_with_contrast": ["--counterfactual_types", "context_swapped,core_masked"],  # + core-masked rows, contrast
    "cfmoe_with_factual_task": ["--factual_task_weight", "1"],  # the fused head also learns from factual rows
    # no core/context split: whole-modality counterfactuals only (the text-only and image-only branches), used to
    # reweight the factual rows per modality (w = prod_m (1 + 19 [branch m wrong])), or with DESIGN.md's JTT rule
    "cfmoe_no_split": [*NO_SPLIT],
    "cfmoe_no_split_combined_rule": [*NO_SPLIT, "--conflict_rule", "combined"],
}
REFERENCES = ("oracle_unbiased", "group_dro")

# Budget shared by every run. Full: the run script's defaults (4000 / 1000 / 1000 items, 8 epochs).
FULL_ARGS: list[str] = []
QUICK_ARGS: list[str] = ["--num_train", "1500", "--num_validation", "500", "--num_test", "500"]
DEFAULT_SEEDS, QUICK_SEEDS = 3, 1
# the tiny model gains little from intra-op threads: one single-threaded run per core is the fastest layout
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))

# ------------------------------------------------------------------------------------------------ metrics
TEST_SPLITS = ("test_iid", "test_ood", "test_neutral")
ROUTING_SPLITS = ("test_iid", "test_ood")
METRICS = ("iid_acc", "ood_acc", "neutral_acc", "worst_group_acc", "macro_f1", "cue_reliance")
METRIC_DEFINITIONS = {
    "iid_acc": "accuracy on `test_iid` (each cue agrees with the label with probability 0.95, as in training)",
    "ood_acc": "accuracy on `test_ood` (cues flipped: each agrees with the label with probability 0.05)",
    "neutral_acc": "accuracy on `test_neutral` (cues independent of the label, probability 0.5)",
    "worst_group_acc": "worst-group accuracy on `test_neutral`, the split where every (label, text cue, image cue) "
    "group is populated; groups of fewer than 10 items are ignored",
    "macro_f1": "mean of the macro-F1 of `test_iid`, `test_ood` and `test_neutral`",
    "cue_reliance": "on `test_neutral`: fraction of items whose prediction changes when only the two planted cues "
    "are flipped (0: cues ignored)",
}
ABLATION_COST_THRESHOLD = 0.02  # an ablation costing less OOD accuracy than this does not earn its component
RESULTS_FILE = "all_results.json"  # written by trainer.run.main
STATE_FILE = "trainer_state.json"
ROUTING_FILE = "routing_gates.json"  # written by the worker after training
META_FILE = "benchmark_run.json"  # argv, wall and CPU time of the run, written by the benchmark
TIMING_FILE = "worker_timing.json"
LOG_FILE = "benchmark.log"
ROUTING_FAILED = 3  # worker exit code: trained and evaluated, but the routing study failed


def run_argv(method: str) -> list[str]:
    """The table's argv of `method`; an ablation inherits the full method's argv before its own flags."""
    if method not in RUNS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(RUNS)}")
    if method.startswith(ABLATION_PREFIX):
        return [*RUNS[FULL_METHOD], *RUNS[method]]
    return list(RUNS[method])


def kind_of(method: str) -> str:
    """peer, reference or ablation."""
    if method in REFERENCES:
        return "reference"
    return "ablation" if method.startswith(ABLATION_PREFIX) else "peer"


def is_cfmoe_run(method: str) -> bool:
    """The full method and its ablations (the runs whose routing is studied per group in the report)."""
    return method == FULL_METHOD or method.startswith(ABLATION_PREFIX)


def run_metrics(eval_results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The benchmark's metrics from one run's `eval` ({split: {accuracy, macro_f1, ...}}); see METRIC_DEFINITIONS."""

    def get(split: str, key: str) -> float:  # NaN when absent: left out of the mean over seeds
        value = eval_results.get(split, {}).get(key)
        return math.nan if value is None else float(value)

    return {
        "iid_acc": get("test_iid", "accuracy"),
        "ood_acc": get("test_ood", "accuracy"),
        "neutral_acc": get("test_neutral", "accuracy"),
        "worst_group_acc": get("test_neutral", "worst_group_accuracy"),
        "macro_f1": float(np.mean([get(split, "macro_f1") for split in TEST_SPLITS])),
        "cue_reliance": get("test_neutral", "cue_reliance"),
    }


def summarize(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std and count over seeds of the finite values (`summarize_runs`); None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return summarize_runs(finite)


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One (method, seed): its full argv for `trainer.run.main`, its folder and, once known, its outcome."""

    method: str
    seed: int
    argv: list[str]
    run_dir: Path
    status: str = "pending"  # ok, cached, skipped, failed, missing
    reason: str = ""
    wall_s: float | None = None
    cpu_s: float | None = None
    metrics: dict[str, float] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "status": self.status,
            "reason": self.reason,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "run_dir": str(self.run_dir),
            "argv": self.argv,
        }


def plan_runs(output_dir: Path, methods: Sequence[str], seeds: Iterable[int], common: Sequence[str]) -> list[Run]:
    """Every (method, seed), seed-major (all methods of seed 0 first, so a partial benchmark stays balanced)."""
    runs = []
    for seed in seeds:
        for method in methods:
            run_dir = output_dir / "runs" / method / f"seed{seed}"
            fixed = ["--output_dir", str(run_dir), "--seed", str(seed), "--report_to", "none"]
            runs.append(Run(method, seed, [*common, *run_argv(method), *fixed], run_dir))
    return runs


def check_argv(argv: Sequence[str]) -> str | None:
    """None when `trainer.run`'s argument parser accepts `argv`, else its reason (unknown flag, bad value)."""
    from trainer.run import parse_args

    with tempfile.TemporaryDirectory() as scratch:
        argv = [*argv, "--output_dir", scratch]  # never create a run folder while checking
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parse_args(TASK, argv)
        except SystemExit:  # argparse: a value of the wrong type
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            return lines[-1] if lines else "rejected by the argument parser"
        except (ValueError, TypeError) as error:  # unused arguments, or a dataclass __post_init__ check
            return str(error)
    return None


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def worker_command(run: Run) -> list[str]:
    """`python -c` calling `worker` (this file) on the run: `trainer.run.main`, then the routing study."""
    code = "import sys, benchmark_debiasing as b; sys.exit(b.worker(sys.argv[1], sys.argv[2:]))"
    return [sys.executable, "-c", code, str(run.run_dir), *run.argv]


def launch_run(run: Run, threads: int) -> tuple[int, str]:
    """Run one (method, seed) in a fresh subprocess, output to its log; returns (exit code, tail of the log)."""
    if run.run_dir.exists() and not run.done:  # leftovers of an interrupted run: start it afresh
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    log_path = run.run_dir / LOG_FILE
    with log_path.open("w") as log:
        code = subprocess.call(worker_command(run), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    lines = log_path.read_text(errors="replace").splitlines()
    return code, "\n".join(lines[-15:])


def worker(run_dir: str, argv: list[str]) -> int:
    """Subprocess entry: train and evaluate (unless `all_results.json` exists), then the routing study."""
    import traceback

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from trainer.run import main as run_main

    out = Path(run_dir)
    if not (out / RESULTS_FILE).is_file():
        run_main(TASK, argv)
    code = 0
    if not (out / ROUTING_FILE).is_file():
        try:
            write_json(out / ROUTING_FILE, study_routing(out, argv))
        except Exception:  # the metrics stand; the report marks the routing as missing
            traceback.print_exc()
            code = ROUTING_FAILED
    write_json(out / TIMING_FILE, {"cpu_s": time.process_time()})
    return code


def execute(
    runs: Sequence[Run],
    threads: int,
    jobs: int = 1,
    check: Callable[[Sequence[str]], str | None] = check_argv,
    launch: Callable[[Run, int], tuple[int, str]] = launch_run,
) -> None:
    """Run every pending run (skipping finished and rejected ones), `jobs` at a time, printing one line per run."""
    reasons: dict[str, str | None] = {}

    def rejected(run: Run) -> str | None:  # argv differ between seeds only in output_dir and seed
        if run.method not in reasons:
            reasons[run.method] = check(run.argv)
            if reasons[run.method] is not None:
                print(f"skipping {run.method}: argv rejected by the parser: {reasons[run.method]}", flush=True)
        return reasons[run.method]

    todo: list[Run] = []
    for run in runs:
        if run.done:
            run.status = "cached"
            meta_path = run.run_dir / META_FILE
            if meta_path.is_file():
                meta = load_json(meta_path)
                run.wall_s, run.cpu_s = meta.get("wall_s"), meta.get("cpu_s")
                if meta.get("argv") != run.argv:
                    run.reason = "argv changed since this run; delete its folder to run it again"
                    print(f"warning: {run.method} seed {run.seed}: {run.reason}", flush=True)
            if not (run.run_dir / ROUTING_FILE).is_file() and rejected(run) is None:
                todo.append(run)  # only the routing study is left to do
        elif (reason := rejected(run)) is not None:
            run.status, run.reason = "skipped", f"argv rejected by the parser: {reason}"
        else:
            todo.append(run)
    cached = sum(run.status == "cached" for run in runs)
    print(f"{len(todo)} run(s) to do, {cached} already trained, {jobs} at a time x {threads} thread(s)", flush=True)

    lock, start, finished = threading.Lock(), time.perf_counter(), [0]

    def one(run: Run) -> None:
        begin = time.perf_counter()
        code, tail = launch(run, threads)
        wall = time.perf_counter() - begin
        timing = run.run_dir / TIMING_FILE
        if run.done:
            if run.status != "cached":  # trained now (a cached run only had its routing study redone)
                run.status, run.wall_s = "ok", wall
                run.cpu_s = load_json(timing).get("cpu_s") if timing.is_file() else None
                write_json(run.run_dir / META_FILE, {"argv": run.argv, "wall_s": run.wall_s, "cpu_s": run.cpu_s})
            if code == ROUTING_FAILED:
                run.reason = f"routing study failed (see {run.run_dir / LOG_FILE})"
        else:
            run.status, run.wall_s = "failed", wall
            last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
            run.reason = f"exit code {code}: {last} (log: {run.run_dir / LOG_FILE})"
        with lock:
            finished[0] += 1
            ood = run_metrics(load_json(run.run_dir / RESULTS_FILE)["eval"])["ood_acc"] if run.done else math.nan
            ood = f", ood {ood:.3f}" if math.isfinite(ood) else ""
            print(
                f"[{finished[0]}/{len(todo)}] {run.method} seed {run.seed}: {run.status} in {wall:.0f} s{ood} "
                f"(elapsed {(time.perf_counter() - start) / 60:.1f} min)",
                flush=True,
            )
            if run.status == "failed":
                print(tail, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


# ------------------------------------------------------------------------------------------------ routing study
def group_parts(group: int, num_labels: int) -> tuple[int, int, int]:
    """(label, text cue, image cue) of a group id `(label * K + text_cue) * K + image_cue`."""
    return group // (num_labels * num_labels), (group // num_labels) % num_labels, group % num_labels


def cue_category(label: int, text_cue: int, image_cue: int) -> str:
    """aligned (both cues point at the label), text_conflicting, image_conflicting or both_conflicting."""
    text_ok, image_ok = text_cue == label, image_cue == label
    if text_ok and image_ok:
        return "aligned"
    if image_ok:
        return "text_conflicting"
    return "image_conflicting" if text_ok else "both_conflicting"


CATEGORIES = ("aligned", "text_conflicting", "image_conflicting", "both_conflicting")
ROUTING_SUMMARIES = ("balance", "separation", "text_cue_sensitivity", "image_cue_sensitivity")


def mean_gates(gates: dict[str, np.ndarray], members: np.ndarray) -> dict[str, Any]:
    """Item count and mean gate per expert of each MoE site over `members` (a boolean mask)."""
    means = {site: g[members].mean(0, dtype=np.float64).round(4).tolist() for site, g in gates.items()}
    return {"n": int(members.sum()), **means}


def routing_by_group(gates: dict[str, np.ndarray], groups: np.ndarray, num_labels: int) -> dict[str, Any]:
    """Routing shares of each site (mean gates), overall, per group id and per cue category."""
    parts = {int(g): group_parts(int(g), num_labels) for g in np.unique(groups)}
    category = np.array([cue_category(*parts[int(g)]) for g in groups])
    result = {"overall": mean_gates(gates, np.ones(len(groups), dtype=bool)), "groups": {}, "categories": {}}
    for group, (label, text_cue, image_cue) in parts.items():
        entry = {"label": label, "text_cue": text_cue, "image_cue": image_cue}
        entry |= {"category": cue_category(label, text_cue, image_cue), **mean_gates(gates, groups == group)}
        result["groups"][str(group)] = entry
    for name in CATEGORIES:
        if (category == name).any():
            result["categories"][name] = mean_gates(gates, category == name)
    return result


def study_routing(run_dir: Path, argv: Sequence[str], batch_size: int = 128) -> dict[str, Any]:
    """Gates of the saved model on test_iid and test_ood (regenerated from the run's data config), per group."""
    import torch
    from transformers import AutoProcessor

    from modeling_cfmoe import CFMoEForMultimodalClassification
    from modeling_cfmoe.moe import DebiasingMoE
    from trainer.collator import CFMoECollator
    from trainer.data import SyntheticConfig, make_synthetic_benchmark
    from trainer.run import parse_args

    training_args = parse_args(TASK, list(argv))[2]
    data_config = load_json(run_dir / RESULTS_FILE)["data"]
    model = CFMoEForMultimodalClassification.from_pretrained(run_dir).eval()
    model.config.inference_mode = "fused"  # the gates do not depend on it; skips cfvqa's extra branches
    for module in model.modules():
        if isinstance(module, DebiasingMoE):
            module.uniform_gates = training_args.uniform_gates  # not saved with the model: set as in training
    processor = AutoProcessor.from_pretrained(run_dir)
    num_labels = model.config.num_labels
    collator = CFMoECollator(processor, num_labels=num_labels, prompt_template=model.config.prompt_template)
    # split seeds do not depend on the other splits' sizes: the test splits come out as in the run
    data = make_synthetic_benchmark(SyntheticConfig(**{**data_config, "num_train": 0, "num_validation": 0}))
    sites = ("visual", "text")
    collected: dict[str, dict[str, list]] = {}
    for split in ROUTING_SPLITS:
        dataset, batches = data[split], {site: [] for site in sites}
        for begin in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))])
            batch.pop("labels")
            with torch.no_grad():
                outputs = model(**batch)
            for site, gates in zip(sites, outputs.routing_gates, strict=True):
                batches[site].append(gates.float().numpy())
        collected[split] = {"gates": batches, "groups": np.asarray(dataset["group"])}
    result: dict[str, Any] = {"num_labels": num_labels, "splits": {}}
    for split, parts in collected.items():
        gates = {site: np.concatenate(parts["gates"][site]) for site in sites}
        result["splits"][split] = routing_by_group(gates, parts["groups"], num_labels)
    pooled = {site: np.concatenate([np.concatenate(c["gates"][site]) for c in collected.values()]) for site in sites}
    groups = np.concatenate([c["groups"] for c in collected.values()])
    result["pooled"] = routing_by_group(pooled, groups, num_labels)
    return result


def final_training_shares(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Routing share of each expert per site at the last logging step that has them (`routing_<site>_expert_<i>`)."""
    for entry in reversed(log_history):
        keys = [key for key in entry if key.startswith("routing_")]
        if keys:
            shares: dict[str, dict[int, float]] = {}
            for key in keys:
                site, _, index = key.removeprefix("routing_").rpartition("_expert_")
                shares.setdefault(site, {})[int(index)] = float(entry[key])
            return {site: [values[i] for i in sorted(values)] for site, values in shares.items()}
    return {}


def balance(shares: Sequence[float]) -> float:
    """Normalised entropy of a share vector: 1 when every expert gets the same share, 0 when one takes all."""
    p = np.asarray(shares, dtype=float)
    if p.size < 2:
        return 1.0
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(shares)))


def separation(groups: dict[str, dict[str, Any]], site: str) -> float | None:
    """How differently the router treats cue-conflicting items: within each label, the total-variation distance
    between the mean gates of the cue-aligned group and of the cue-conflicting groups (n-weighted), averaged over
    labels (weighted by conflicting items). 0: the cues do not change the routing. Invariant to expert order."""
    distances, weights = [], []
    for label in sorted({group["label"] for group in groups.values()}):
        members = [g for g in groups.values() if g["label"] == label and g["n"] and site in g]
        aligned = [g for g in members if g["category"] == "aligned"]
        conflicting = [g for g in members if g["category"] != "aligned"]
        if aligned and conflicting:
            counts = np.array([g["n"] for g in conflicting], dtype=float)
            mean_conflicting = np.average([g[site] for g in conflicting], axis=0, weights=counts)
            distances.append(0.5 * np.abs(np.asarray(aligned[0][site]) - mean_conflicting).sum())
            weights.append(counts.sum())
    return float(np.average(distances, weights=weights)) if distances else None


def cue_sensitivity(groups: dict[str, dict[str, Any]], site: str, cue: str) -> float | None:
    """How much one cue alone moves the routing: the total-variation distance between the mean gates of two groups
    that differ only in `cue` ("text_cue" or "image_cue"; same label, same other cue), averaged over such pairs
    weighted by the smaller group. 0: the router ignores that cue. Invariant to expert order."""
    other = "image_cue" if cue == "text_cue" else "text_cue"
    by_rest: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for group in groups.values():
        if group["n"] and site in group:
            by_rest.setdefault((group["label"], group[other]), []).append(group)
    distances, weights = [], []
    for members in by_rest.values():
        for first, second in itertools.combinations(members, 2):
            distances.append(0.5 * np.abs(np.asarray(first[site]) - np.asarray(second[site])).sum())
            weights.append(min(first["n"], second["n"]))
    return float(np.average(distances, weights=weights)) if distances else None


def routing_report(runs: Sequence[Run]) -> dict[str, Any]:
    """`routing.json`: per method and seed, the final training shares and the test-time shares overall, per group
    and per cue category; per method and site, over seeds: balance, separation and the sensitivity to each cue."""
    report: dict[str, Any] = {}
    for run in runs:
        if not run.done:
            continue
        entry: dict[str, Any] = {}
        state = run.run_dir / STATE_FILE
        if state.is_file():
            entry["final_training_shares"] = final_training_shares(load_json(state).get("log_history", []))
        routing = run.run_dir / ROUTING_FILE
        if routing.is_file():
            study = load_json(routing)
            entry["test"] = study["pooled"]
            entry["test_per_split"] = {split: value["overall"] for split, value in study["splits"].items()}
        report.setdefault(run.method, {"seeds": {}})["seeds"][str(run.seed)] = entry
    for summary in report.values():
        studied = [s["test"] for s in summary["seeds"].values() if "test" in s]
        sites = sorted({key for s in studied for key in s["overall"] if key != "n"})
        summary["balance"] = {site: summarize([balance(s["overall"][site]) for s in studied]) for site in sites}
        summary["separation"] = {site: summarize([separation(s["groups"], site) for s in studied]) for site in sites}
        for cue in ("text_cue", "image_cue"):
            summary[f"{cue}_sensitivity"] = {
                site: summarize([cue_sensitivity(s["groups"], site, cue) for s in studied]) for site in sites
            }
    return report


# ------------------------------------------------------------------------------------------------ aggregation
def collect_metrics(runs: Sequence[Run]) -> dict[str, list[dict[str, float]]]:
    """Per method, the metrics of every finished seed (read back from each run's `all_results.json`)."""
    per_method: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        if run.done:
            run.metrics = run_metrics(load_json(run.run_dir / RESULTS_FILE)["eval"])
            per_method.setdefault(run.method, []).append(run.metrics)
    return per_method


def aggregate(per_method: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """`results.json`: {method: {metric: {"mean", "std", "n"}}}, std the sample std over seeds (0 for one seed)."""
    return {
        method: {metric: summarize([seed[metric] for seed in seeds]) for metric in METRICS}
        for method, seeds in per_method.items()
    }


def ablation_costs(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per ablation: cost = full method's mean ood_acc - the ablation's; `cheap` when under the threshold
    (the removed component does not earn its place on the OOD split)."""
    full = results.get(FULL_METHOD, {}).get("ood_acc", {}).get("mean")
    costs = {}
    for method, metrics in results.items():
        ablated = metrics["ood_acc"]["mean"]
        if method.startswith(ABLATION_PREFIX) and full is not None and ablated is not None:
            cost = full - ablated
            costs[method] = {"ood_acc": ablated, "cost": cost, "cheap": cost < ABLATION_COST_THRESHOLD}
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


def results_table(results: dict[str, dict[str, dict[str, Any]]], runs: Sequence[Run]) -> list[str]:
    header = ["method", "kind", "n", *METRICS, "wall s / run"]
    rows = []
    for method, metrics in results.items():
        wall = mean_time(runs, method, "wall_s")
        n = max(m["n"] for m in metrics.values())
        row = [method, kind_of(method), n, *(fmt(metrics[m]) for m in METRICS)]
        rows.append([*row, f"{wall:.0f}" if wall is not None else "n/a"])
    return markdown_table(header, rows)


def group_table(method: str, seeds: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown table per method: rows overall + each group, per seed the visual and the text shares."""
    studied = {seed: entry["test"] for seed, entry in sorted(seeds.items(), key=lambda i: int(i[0])) if "test" in entry}
    if not studied:
        return []
    names = {"overall": "overall"}
    for test in studied.values():
        for group_id, group in test["groups"].items():
            cues = f"y={group['label']} text={group['text_cue']} image={group['image_cue']}"
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
    return ["", f"### {method}: test shares per group", "", *markdown_table(header, rows)]


def routing_section(routing: dict[str, Any]) -> list[str]:
    lines = [
        "## Routing study",
        "",
        "Shares are mean gates (top-k, renormalised) per expert: `visual` is the MoE after the projector, `text` "
        "the MoE after the language model. *Train* shares are the last logged training step's; *test* shares are "
        "the saved (selected) model's on `test_iid` + `test_ood`. Expert indices are not comparable across seeds, "
        "so the seed-level summaries are order-free: *balance* (normalised entropy of the test shares, 1 = even), "
        "*separation* (within each label, the total-variation distance between the mean gates of the "
        "cue-aligned group and of the cue-conflicting groups, averaged over labels; 0 = the cues do not change the "
        "routing) and the sensitivity to each cue (*text cue*, *image cue*: the total-variation distance between "
        "groups that differ only in that cue; 0 = the router ignores it).",
        "",
    ]
    rows = []
    for method, summary in routing.items():
        first = summary["seeds"][min(summary["seeds"], key=int)]
        train = first.get("final_training_shares", {})
        row = [method]
        for site in ("visual", "text"):
            row += [fmt(summary[key].get(site), 2) for key in ROUTING_SUMMARIES]
        rows.append([*row, shares_text(train.get("visual")), shares_text(train.get("text"))])
    header = [
        f"{site}: {name}" for site in ("visual", "text") for name in ("balance", "separation", "text cue", "image cue")
    ]
    lines += markdown_table(["method", *header, "train shares visual (first seed)", "train shares text"], rows)
    for method, summary in routing.items():
        if is_cfmoe_run(method):
            lines += group_table(method, summary["seeds"])
    lines += [
        "",
        "Groups: label y x the class each cue points at; `aligned` when both cues point at the label, "
        "`text_conflicting` / `image_conflicting` when that modality's cue points elsewhere, `both_conflicting`. "
        "Per split and per cue category (labels pooled): `routing.json`.",
    ]
    return lines


def write_markdown(
    path: Path,
    results: dict[str, dict[str, dict[str, Any]]],
    runs: Sequence[Run],
    routing: dict[str, Any],
    settings: dict[str, Any],
) -> str:
    """results.md: the table, the definitions, ablation costs, skipped/failed runs, run times, routing."""
    seeds = sorted({run.seed for run in runs})
    lines = [
        "# Debiasing benchmark",
        "",
        "**Synthetic planted-cue data, not MMSD2.0 figures.** Task: sarcasm (the AND-incongruity core, label noise "
        "and one spurious cue per modality; BENCHMARK.md). Every method trains the same tiny CF-MoE model on the "
        "same data with the same budget; model selection on validation by the run script's label-free default.",
        "",
        f"Mode: {settings['mode']}; seeds {seeds}; argv shared by every run: `{' '.join(settings['common']) or '-'}`.",
        "",
        "Mean ± sample std over seeds (n = finished seeds).",
        "",
        *results_table(results, runs),
        "",
        "## Metrics",
        "",
        *(f"- `{name}`: {text}" for name, text in METRIC_DEFINITIONS.items()),
        "",
        "Kinds: *peer* methods compete on equal terms; *reference* runs may use what the others may not "
        "(`oracle_unbiased`: training data with cues independent of the label, rho 0.5; `group_dro`: group "
        "labels); *ablation* runs are `cfmoe` with one component removed.",
        "",
        "## Ablations",
        "",
    ]
    costs = ablation_costs(results)
    if costs:
        full = results[FULL_METHOD]["ood_acc"]
        lines.append(f"Cost = `cfmoe` mean ood_acc ({fmt(full)}) - the ablation's mean ood_acc, in points.")
        lines.append("")
        rows = [
            [
                method,
                fmt(results[method]["ood_acc"]),
                f"{100 * cost['cost']:+.1f}",
                f"**yes**: removing it costs < {100 * ABLATION_COST_THRESHOLD:.0f} points" if cost["cheap"] else "no",
            ]
            for method, cost in costs.items()
        ]
        lines += markdown_table(["ablation", "ood_acc", "cost (points)", "cheap (< 2 points of ood_acc)"], rows)
        cheap = [method for method, cost in costs.items() if cost["cheap"]]
        lines += ["", f"Cheap ablations: {', '.join(cheap) if cheap else 'none'}."]
    else:
        lines.append("No ablation could be compared (the full method or the ablations have no finished run).")
    unfinished = [run for run in runs if run.status in ("skipped", "failed", "missing") or run.reason]
    if unfinished:
        lines += ["", "## Skipped, failed and flagged runs", ""]
        rows = [[r.method, r.seed, r.status, r.reason.splitlines()[0] if r.reason else ""] for r in unfinished]
        lines += markdown_table(["method", "seed", "status", "reason"], rows)
    lines += ["", "## Run times", ""]
    rows = []
    for method in dict.fromkeys(run.method for run in runs):
        wall, cpu = mean_time(runs, method, "wall_s"), mean_time(runs, method, "cpu_s")
        rows.append([method, f"{wall:.0f}" if wall else "n/a", f"{cpu:.0f}" if cpu else "n/a"])
    lines += markdown_table(["method", "wall s / run", "CPU s / run"], rows)
    total = sum(run.wall_s for run in runs if run.wall_s is not None)
    elapsed = settings.get("elapsed_s")
    elapsed = f"this invocation took {elapsed / 60:.1f} min" if elapsed is not None else "no run in this invocation"
    lines += [
        "",
        f"Sum of run wall times: {total / 60:.1f} min ({elapsed}); {settings['jobs']} run(s) at a time, "
        f"{settings['threads']} torch thread(s) each. Wall times include the subprocess start, data generation, "
        "evaluation and the routing study; CPU time counts every thread of the run's process.",
        "",
        *routing_section(routing),
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_results(path: Path, results: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Grouped bars of iid / ood / neutral accuracy per method, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    metrics = ("iid_acc", "ood_acc", "neutral_acc")
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.5))
    x = np.arange(len(methods))
    for offset, metric in enumerate(metrics):
        means = [results[m][metric]["mean"] or 0.0 for m in methods]
        stds = [results[m][metric]["std"] or 0.0 for m in methods]
        ax.bar(x + (offset - 1) * width, means, width, yerr=stds, capsize=2, label=metric.removesuffix("_acc"))
    ax.set_xticks(x, methods, rotation=35, ha="right")
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="synthetic planted-cue sarcasm: mean ± std over seeds")
    ax.legend(ncols=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(output_dir: Path, runs: Sequence[Run], settings: dict[str, Any]) -> dict[str, Any]:
    """Read every finished run back and write results.json, results.md, results.png, routing.json, runs.json."""
    for run in runs:
        if run.status == "pending":
            run.status = "cached" if run.done else "missing"
        meta = run.run_dir / META_FILE
        if run.wall_s is None and meta.is_file():
            run.wall_s, run.cpu_s = load_json(meta).get("wall_s"), load_json(meta).get("cpu_s")
    results = aggregate(collect_metrics(runs))
    routing = routing_report(runs)
    write_json(output_dir / "results.json", results)
    write_json(output_dir / "routing.json", routing)
    write_json(output_dir / "runs.json", [run.record() for run in runs])
    text = write_markdown(output_dir / "results.md", results, runs, routing, settings)
    if results:
        plot_results(output_dir / "results.png", results)
    return {"results": results, "routing": routing, "markdown": text}


# ------------------------------------------------------------------------------------------------ command line
def parse_cli(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; every other flag goes to every run, before the table's argv (whose entries win)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag (e.g. --num_train 128 --num_train_epochs 1) goes to every run, before the table's argv.",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS}; quick 1)")
    parser.add_argument("--quick", action="store_true", help="1 seed and smaller data (QUICK_ARGS)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default cores / jobs)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="runs at a time (default min(4, cores))")
    parser.add_argument("--dry_run", action="store_true", help="print each run's argv and the rejected ones; no runs")
    parser.add_argument("--report_only", action="store_true", help="no runs: report the finished ones")
    return parser.parse_known_args(argv)


def select_methods(spec: str | None) -> list[str]:
    if not spec:
        return list(RUNS)
    methods = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in methods if name not in RUNS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    return methods


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, passthrough = parse_cli(argv)
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    common = [*(QUICK_ARGS if args.quick else FULL_ARGS), *passthrough]
    output_dir = args.output_dir.resolve()  # the runs start in the repository root
    runs = plan_runs(output_dir, select_methods(args.methods), range(seeds), common)
    settings = {"mode": "quick" if args.quick else "full", "common": common, "jobs": args.jobs, "threads": threads}
    if args.dry_run:
        for run in runs:
            reason = check_argv(run.argv)
            print(f"{run.method} seed {run.seed}: {' '.join(run.argv)}" + (f"\n  REJECTED: {reason}" if reason else ""))
        return {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        reason = check_argv(common)
        if reason is not None:  # a flag of the benchmark's command line that no run accepts
            raise SystemExit(f"the shared argv {common} is rejected by trainer.run: {reason}")
        begin = time.perf_counter()
        execute(runs, threads, args.jobs)
        settings["elapsed_s"] = time.perf_counter() - begin
    report = write_report(output_dir, runs, settings)
    print(report["markdown"].split("## Metrics")[0])
    print(f"wrote {output_dir / 'results.json'}, results.md, results.png, routing.json, runs.json")
    return report


if __name__ == "__main__":
    main()
