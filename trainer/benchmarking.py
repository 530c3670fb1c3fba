"""The machinery of `examples/benchmark_debiasing.py` (which holds the command line and the table of methods).

* planning: one `Run` per (seed, regime, cue setting, method), folder `DIR/runs/<regime>/<cue_setting>/<method>/
  seed<k>/`; the `pretrained` regime fine-tunes a perception-pretrained tiny base per seed (`DIR/bases/seed<k>/`,
  built once by `examples/make_tiny_model.py --pretrain`) with the vision tower frozen;
* running: each run is `examples/run_sarcasm.py` in a fresh subprocess, then the routing study; a run whose
  `all_results.json` exists is not run again (resumable), one whose argv the run script's parser rejects is
  skipped with the parser's reason, one that crashes is reported as failed;
* reading back: per-run metrics (`run_metrics`, headline `robust_acc`), mean ± std over seeds per setting and
  method, the routing study, and the report (`results.json`, `results.md`, one plot per setting, `routing.json`,
  `runs.json`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import json
import math
import os
import runpy
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
from unittest import mock

import numpy as np

from .metrics import robust_accuracy, summarize_runs
from .pretrain import SUMMARY_FILE as PRETRAINING_FILE
from .synthetic import CUE_SETTINGS, NO_CUE, group_parts

ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPT = ROOT / "examples" / "run_sarcasm.py"
TASKS = ("sarcasm", "sentiment")
DEFAULT_NOISE = 0.2  # the run scripts' training label noise


def run_script(task: str) -> Path:
    """The run script of `task`: `examples/run_<task>.py`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return ROOT / "examples" / f"run_{task}.py"


def setting_name(task: str, regime: str, cue_setting: str, noise: float) -> str:
    """`<task>/<regime>/<cue_setting>/noise<eta>`: the key of a setting in the results."""
    return f"{task}/{regime}/{cue_setting}/noise{noise:g}"


MAKE_TINY_MODEL = ROOT / "examples" / "make_tiny_model.py"
REGIMES = ("scratch", "pretrained")

# ------------------------------------------------------------------------------------------------ metrics
TEST_SPLITS = ("test_iid", "test_ood", "test_neutral")
ROUTING_SPLITS = ("test_iid", "test_ood")
HEADLINE = "robust_acc"
METRICS = (HEADLINE, "iid_acc", "ood_acc", "neutral_acc", "worst_group_acc", "macro_f1", "cue_reliance", "core_kept")
METRIC_DEFINITIONS = {
    "robust_acc": "min(iid_acc, ood_acc) per run, then mean over seeds: the headline, on which methods are ranked "
    "(high only when a model is right both where the cues agree with the label and where they are flipped; "
    "following the cues fails ood, inverting them fails iid)",
    "iid_acc": "accuracy on `test_iid` (each cue agrees with the label with probability 0.95, as in training)",
    "ood_acc": "accuracy on `test_ood` (cues flipped: each agrees with the label with probability 0.05)",
    "neutral_acc": "accuracy on `test_neutral` (cues independent of the label, probability 0.5)",
    "worst_group_acc": "worst-group accuracy on `test_neutral`, the split where every (label, text cue, image cue) "
    "group is populated; groups of fewer than 10 items are ignored",
    "macro_f1": "mean of the macro-F1 of `test_iid`, `test_ood` and `test_neutral`",
    "cue_reliance": "on `test_neutral`: fraction of items whose prediction changes when only the planted cues are "
    "flipped (0: cues ignored)",
    "core_kept": "accuracy on the `test_ood` items whose text holds a sarcasm marker (a core that makes an item "
    "sarcastic on its own; the spurious cues flipped): whether debiasing kept a core that predicts alone "
    "(`core_markers` setting only)",
}
ABLATION_COST_THRESHOLD = 0.02  # an ablation costing less robust accuracy than this does not earn its component
RESULTS_FILE = "all_results.json"  # written by the run script
STATE_FILE = "trainer_state.json"
ROUTING_FILE = "routing_gates.json"  # written by the worker after training
META_FILE = "benchmark_run.json"  # argv, wall and CPU time of the run, written by the benchmark
TIMING_FILE = "worker_timing.json"
LOG_FILE = "benchmark.log"
ROUTING_FAILED = 3  # worker exit code: trained and evaluated, but the routing study failed


def run_metrics(eval_results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The benchmark's metrics from one run's `eval` ({split: {accuracy, macro_f1, ...}}); see METRIC_DEFINITIONS."""

    def get(split: str, key: str) -> float:  # NaN when absent: left out of the mean over seeds
        value = eval_results.get(split, {}).get(key)
        return math.nan if value is None else float(value)

    iid, ood = get("test_iid", "accuracy"), get("test_ood", "accuracy")
    return {
        "robust_acc": robust_accuracy(iid, ood),
        "iid_acc": iid,
        "ood_acc": ood,
        "neutral_acc": get("test_neutral", "accuracy"),
        "worst_group_acc": get("test_neutral", "worst_group_accuracy"),
        "macro_f1": float(np.mean([get(split, "macro_f1") for split in TEST_SPLITS])),
        "cue_reliance": get("test_neutral", "cue_reliance"),
        "core_kept": get("test_ood", "core_kept"),
    }


def summarize(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std and count over seeds of the finite values (`summarize_runs`); None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return summarize_runs(finite)


# ------------------------------------------------------------------------------------------------ the method table
@dataclass(frozen=True)
class MethodTable:
    """Extra run-script argv per method. Methods named `<full_method>_*` are ablations: the full method's argv is
    prepended to theirs. `references` may use what the peers may not (e.g. group labels)."""

    runs: dict[str, list[str]]
    full_method: str
    references: tuple[str, ...] = ()

    def argv(self, method: str) -> list[str]:
        """The table's argv of `method`; an ablation inherits the full method's argv before its own flags."""
        if method not in self.runs:
            raise KeyError(f"unknown method {method!r}; known: {', '.join(self.runs)}")
        if self.kind(method) == "ablation":
            return [*self.runs[self.full_method], *self.runs[method]]
        return list(self.runs[method])

    def kind(self, method: str) -> str:
        """peer, reference or ablation."""
        if method in self.references:
            return "reference"
        return "ablation" if method.startswith(f"{self.full_method}_") else "peer"

    def is_full_or_ablation(self, method: str) -> bool:
        """The full method and its ablations (the runs whose routing is studied per group in the report)."""
        return method == self.full_method or self.kind(method) == "ablation"


# ------------------------------------------------------------------------------------------------ the run script
class _Parsed(Exception):
    """Raised by the patched argument parser once the run script's arguments parse: stops the script there."""

    def __init__(self, parsed: tuple) -> None:
        super().__init__("parsed")
        self.parsed = parsed


def parse_run_args(argv: Sequence[str], script: Path | None = None) -> tuple:
    """The dataclasses the run script's `HfArgumentParser` makes of `argv`, whatever module defines them: the
    script runs as `__main__` up to its first complete parse (one that leaves no strings over) and no further.
    Raises the parser's `SystemExit` / `ValueError`."""
    from transformers import HfArgumentParser

    script = script or RUN_SCRIPT
    parse = HfArgumentParser.parse_args_into_dataclasses

    def parse_then_stop(self, *args, **kwargs):
        parsed = parse(self, *args, **kwargs)
        if inspect.signature(parse).bind(self, *args, **kwargs).arguments.get("return_remaining_strings"):
            return parsed  # a partial parse (a peek that picks the defaults): the full one follows
        raise _Parsed(parsed)

    with (
        mock.patch.object(HfArgumentParser, "parse_args_into_dataclasses", parse_then_stop),
        mock.patch.object(sys, "argv", [str(script), *argv]),
    ):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Parsed as parsed:
            return parsed.parsed
    raise RuntimeError(f"{script} ended without parsing its arguments")


def check_argv(argv: Sequence[str]) -> str | None:
    """None when the run script's argument parser accepts `argv`, else its reason (unknown flag, bad value)."""
    with tempfile.TemporaryDirectory() as scratch:
        stderr = io.StringIO()
        try:  # never create a run folder while checking
            with contextlib.redirect_stderr(stderr):
                parse_run_args([*argv, "--output_dir", scratch])
        except SystemExit:  # argparse: a value of the wrong type
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            return lines[-1] if lines else "rejected by the argument parser"
        except (ValueError, TypeError) as error:  # unused arguments, or a dataclass __post_init__ check
            return str(error)
    return None


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One (setting, method, seed): its full run-script argv, its folder and, once known, its outcome."""

    setting: str  # "<task>/<regime>/<cue_setting>/noise<eta>"
    method: str
    seed: int
    argv: list[str]
    run_dir: Path
    task: str = "sarcasm"
    status: str = "pending"  # ok, cached, skipped, failed, missing
    reason: str = ""
    wall_s: float | None = None
    cpu_s: float | None = None
    metrics: dict[str, float] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()

    def record(self) -> dict[str, Any]:
        fields = ("setting", "task", "method", "seed", "status", "reason", "wall_s", "cpu_s")
        return {**{name: getattr(self, name) for name in fields}, "run_dir": str(self.run_dir), "argv": self.argv}


def base_dir(output_dir: Path, seed: int, task: str = "sarcasm") -> Path:
    """Folder of the pretrained base of `task` and `seed`."""
    return output_dir / "bases" / task / f"seed{seed}"


def regime_argv(regime: str, output_dir: Path, seed: int, task: str = "sarcasm") -> list[str]:
    """Run-script argv of a regime: none from scratch; the seed's pretrained base, vision tower frozen, trained with
    the tiny recipe (a `--model_name_or_path` otherwise gets LLaVA-1.5's), so the regimes differ only in the
    initialisation and the frozen tower."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")
    if regime == "scratch":
        return []
    return [
        "--model_name_or_path",
        str(base_dir(output_dir, seed, task)),
        "--freeze_vision_tower",
        "True",
        "--recipe",
        "tiny",
    ]


def plan_runs(
    output_dir: Path,
    table: MethodTable,
    methods: Sequence[str],
    seeds: Iterable[int],
    regimes: Sequence[str],
    cue_settings: Sequence[str],
    common: Sequence[str],
    tasks: Sequence[str] = ("sarcasm",),
    noises: Sequence[float] = (DEFAULT_NOISE,),
) -> list[Run]:
    """Every (seed, task, regime, cue setting, label noise, method), seed-major (all of seed 0 first: a partial
    benchmark stays balanced); cue settings with sarcasm markers only for sarcasm. argv: shared flags, the table's,
    the regime's, the cue setting and noise, folder and seed. Folder: `DIR/runs/<setting>/<method>/seed<k>/`."""
    runs = []
    for seed, task, regime, cue_setting, noise, method in itertools.product(
        seeds, tasks, regimes, cue_settings, noises, methods
    ):
        if task != "sarcasm" and CUE_SETTINGS[cue_setting].marker_rate:
            continue
        setting = setting_name(task, regime, cue_setting, noise)
        run_dir = output_dir / "runs" / setting / method / f"seed{seed}"
        fixed = ["--cue_setting", cue_setting, "--label_noise", f"{noise:g}"]
        fixed += ["--output_dir", str(run_dir), "--seed", str(seed), "--report_to", "none"]
        argv = [*common, *table.argv(method), *regime_argv(regime, output_dir, seed, task), *fixed]
        runs.append(Run(setting, method, seed, argv, run_dir, task))
    return runs


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def subprocess_env(threads: int) -> dict[str, str]:
    """The environment of a run or base subprocess: the repository importable, `threads` intra-op threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def call_logged(command: Sequence[str], log_path: Path, threads: int) -> tuple[int, str]:
    """Run `command` from the repository root, output to `log_path`; returns (exit code, last 15 lines)."""
    with log_path.open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(threads), cwd=ROOT)
    return code, "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])


def launch_run(run: Run, threads: int) -> tuple[int, str]:
    """Run one run's `worker` in a fresh subprocess, output to its log; returns (exit code, tail of the log)."""
    if run.run_dir.exists() and not run.done:  # leftovers of an interrupted run: start it afresh
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    code = "import sys; from trainer.benchmarking import worker; sys.exit(worker(*sys.argv[1:3], sys.argv[3:]))"
    command = [sys.executable, "-c", code, str(run.run_dir), str(run_script(run.task)), *run.argv]
    return call_logged(command, run.run_dir / LOG_FILE, threads)


def worker(run_dir: str, script: str, argv: list[str]) -> int:
    """Subprocess entry: the run script `script` on `argv` (unless `all_results.json` exists), then the routing
    study."""
    import traceback

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(run_dir)
    if not (out / RESULTS_FILE).is_file():
        with mock.patch.object(sys, "argv", [script, *argv]):
            runpy.run_path(script, run_name="__main__")
    code = 0
    if not (out / ROUTING_FILE).is_file():
        try:
            write_json(out / ROUTING_FILE, study_routing(out, argv, Path(script)))
        except Exception:  # the metrics stand; the report marks the routing as missing
            traceback.print_exc()
            code = ROUTING_FAILED
    write_json(out / TIMING_FILE, {"cpu_s": time.process_time()})
    return code


def build_bases(
    output_dir: Path,
    seeds: Iterable[int],
    pretrain_argv: Sequence[str],
    threads: int,
    jobs: int = 1,
    tasks: Sequence[str] = ("sarcasm",),
) -> None:
    """Build the pretrained base of every task and seed (`make_tiny_model.py --pretrain --task t --seed k`, `jobs` at
    a time); a base whose `pretraining.json` exists is reused. Exits naming the log of a base that failed (its runs
    cannot start)."""

    def build(key: tuple[str, int]) -> tuple[int, str]:
        task, seed = key
        folder = base_dir(output_dir, seed, task)
        if (folder / PRETRAINING_FILE).is_file():
            return 0, ""
        if folder.exists():  # leftovers of an interrupted build
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(MAKE_TINY_MODEL), "--output_dir", str(folder), "--pretrain", "True"]
        command += ["--task", task, "--seed", str(seed), *pretrain_argv]
        print(f"building the pretrained {task} base of seed {seed} ({folder})", flush=True)
        return call_logged(command, folder.parent / f"seed{seed}.log", threads)

    keys = [(task, seed) for task in tasks for seed in seeds]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = dict(zip(keys, pool.map(build, keys), strict=True))
    for (task, seed), (code, tail) in outcomes.items():
        if code != 0:
            raise SystemExit(f"the pretrained {task} base of seed {seed} failed (exit code {code}):\n{tail}")


def read_bases(output_dir: Path, runs: Sequence[Run]) -> dict[tuple[str, int], dict[str, Any]]:
    """The pretraining summary of each built base that the pretrained regime's runs use, by (task, seed)."""
    keys = sorted({(run.task, run.seed) for run in runs if "/pretrained/" in run.setting})
    paths = {key: base_dir(output_dir, key[1], key[0]) / PRETRAINING_FILE for key in keys}
    return {key: load_json(path) for key, path in paths.items() if path.is_file()}


def execute(
    runs: Sequence[Run],
    threads: int,
    jobs: int = 1,
    check: Callable[[Sequence[str]], str | None] = check_argv,
    launch: Callable[[Run, int], tuple[int, str]] = launch_run,
) -> None:
    """Run every pending run (skipping finished and rejected ones), `jobs` at a time, printing one line per run."""
    reasons: dict[tuple[str, str], str | None] = {}

    def rejected(run: Run) -> str | None:  # argv of one setting and method differ between seeds in folder and seed
        key = (run.setting, run.method)
        if key not in reasons:
            reasons[key] = check(run.argv)
            if reasons[key] is not None:
                print(f"skipping {run.setting} {run.method}: argv rejected by the parser: {reasons[key]}", flush=True)
        return reasons[key]

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
                    print(f"warning: {run.setting} {run.method} seed {run.seed}: {run.reason}", flush=True)
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
            score = run_metrics(load_json(run.run_dir / RESULTS_FILE)["eval"])[HEADLINE] if run.done else math.nan
            score = f", {HEADLINE} {score:.3f}" if math.isfinite(score) else ""
            print(
                f"[{finished[0]}/{len(todo)}] {run.setting} {run.method} seed {run.seed}: {run.status} in {wall:.0f} s"
                f"{score} (elapsed {(time.perf_counter() - start) / 60:.1f} min)",
                flush=True,
            )
            if run.status == "failed":
                print(tail, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


# ------------------------------------------------------------------------------------------------ routing study
def cue_category(label: int, text_cue: int, image_cue: int) -> str:
    """aligned (every cue the item has points at the label), text_conflicting, image_conflicting or
    both_conflicting; a modality without a cue (`NO_CUE`) never conflicts."""
    text_ok, image_ok = text_cue in (label, NO_CUE), image_cue in (label, NO_CUE)
    if text_ok and image_ok:
        return "aligned"
    if image_ok:
        return "text_conflicting"
    return "image_conflicting" if text_ok else "both_conflicting"


CATEGORIES = ("aligned", "text_conflicting", "image_conflicting", "both_conflicting")
ROUTING_SUMMARIES = ("balance", "separation", "text_cue_sensitivity", "image_cue_sensitivity", "source_separation")


def mean_gates(gates: dict[str, np.ndarray], members: np.ndarray) -> dict[str, Any]:
    """Item count and mean gate per expert of each MoE site over `members` (a boolean mask)."""
    means = {site: g[members].mean(0, dtype=np.float64).round(4).tolist() for site, g in gates.items()}
    return {"n": int(members.sum()), **means}


def routing_by_group(
    gates: dict[str, np.ndarray], groups: np.ndarray, num_labels: int, sources: np.ndarray | None = None
) -> dict[str, Any]:
    """Routing shares of each site (mean gates), overall, per group id, per cue category and per item source (the
    modality that carries the cue in the `mixed` setting)."""
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
    if sources is not None:
        result["sources"] = {str(name): mean_gates(gates, sources == name) for name in np.unique(sources)}
    return result


def study_routing(
    run_dir: Path, argv: Sequence[str], script: Path | None = None, batch_size: int = 128
) -> dict[str, Any]:
    """Gates of the saved model on test_iid and test_ood (regenerated from the run's data config), per group;
    `argv` (parsed by the run script `script`) gives the training settings the model does not save."""
    import torch
    from transformers import AutoProcessor

    from modeling_cfmoe import CFMoEForMultimodalClassification

    from .collator import CFMoECollator
    from .synthetic import SyntheticConfig, make_synthetic_benchmark

    data_config = load_json(run_dir / RESULTS_FILE)["data"]
    model = CFMoEForMultimodalClassification.from_pretrained(run_dir).eval()
    processor = AutoProcessor.from_pretrained(run_dir)
    num_labels = model.config.num_labels
    collator = CFMoECollator(processor, num_labels=num_labels, prompt_template=model.config.prompt_template)
    # split seeds do not depend on the other splits' sizes: the test splits come out as in the run
    data = make_synthetic_benchmark(SyntheticConfig(**{**data_config, "num_train": 0, "num_validation": 0}))
    sites = ("visual", "text")
    collected: dict[str, dict[str, Any]] = {}
    for split in ROUTING_SPLITS:
        dataset, batches = data[split], {site: [] for site in sites}
        for begin in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))])
            batch.pop("labels")
            with torch.no_grad():
                outputs = model(**batch)
            for site in sites:
                batches[site].append(getattr(outputs, f"{site}_gates").float().numpy())
        collected[split] = {
            "gates": batches,
            "groups": np.asarray(dataset["group"]),
            "sources": np.asarray(dataset["source"]),
        }
    result: dict[str, Any] = {"num_labels": num_labels, "splits": {}}
    for split, parts in collected.items():
        gates = {site: np.concatenate(parts["gates"][site]) for site in sites}
        result["splits"][split] = routing_by_group(gates, parts["groups"], num_labels, parts["sources"])
    pooled = {site: np.concatenate([np.concatenate(c["gates"][site]) for c in collected.values()]) for site in sites}
    groups = np.concatenate([c["groups"] for c in collected.values()])
    sources = np.concatenate([c["sources"] for c in collected.values()])
    result["pooled"] = routing_by_group(pooled, groups, num_labels, sources)
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
    between the mean gates of the cue-aligned groups and of the cue-conflicting groups (n-weighted), averaged over
    labels (weighted by conflicting items). 0: the cues do not change the routing. Invariant to expert order."""
    distances, weights = [], []
    for label in sorted({group["label"] for group in groups.values()}):
        members = [g for g in groups.values() if g["label"] == label and g["n"] and site in g]
        aligned = [g for g in members if g["category"] == "aligned"]
        conflicting = [g for g in members if g["category"] != "aligned"]
        if aligned and conflicting:
            mean = {}
            for name, part in (("aligned", aligned), ("conflicting", conflicting)):
                mean[name] = np.average([g[site] for g in part], axis=0, weights=[g["n"] for g in part])
            distances.append(0.5 * np.abs(mean["aligned"] - mean["conflicting"]).sum())
            weights.append(sum(g["n"] for g in conflicting))
    return float(np.average(distances, weights=weights)) if distances else None


def cue_sensitivity(groups: dict[str, dict[str, Any]], site: str, cue: str) -> float | None:
    """How much one cue's value alone moves the routing: the total-variation distance between the mean gates of two
    groups that differ only in the class `cue` points at ("text_cue" or "image_cue"; same label, same other cue;
    both with that cue), averaged over such pairs weighted by the smaller group. 0: the router ignores which class
    the cue points at. Invariant to expert order."""
    other = "image_cue" if cue == "text_cue" else "text_cue"
    by_rest: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for group in groups.values():
        if group["n"] and site in group and group[cue] != NO_CUE:
            by_rest.setdefault((group["label"], group[other]), []).append(group)
    distances, weights = [], []
    for members in by_rest.values():
        for first, second in itertools.combinations(members, 2):
            distances.append(0.5 * np.abs(np.asarray(first[site]) - np.asarray(second[site])).sum())
            weights.append(min(first["n"], second["n"]))
    return float(np.average(distances, weights=weights)) if distances else None


def source_separation(study: dict[str, Any], site: str) -> float | None:
    """How much the routing follows the item's bias type: the total-variation distance between the mean gates of
    the items whose cue is in the text and of those whose cue is in the image (the `mixed` setting; None
    elsewhere). Invariant to expert order."""
    sources = study.get("sources", {})
    if not {"text", "image"} <= set(sources):
        return None
    return float(0.5 * np.abs(np.asarray(sources["text"][site]) - np.asarray(sources["image"][site])).sum())


def routing_report(runs: Sequence[Run]) -> dict[str, Any]:
    """Per method and seed, the final training shares and the test-time shares overall, per group and per cue
    category and per source; per method and site, over seeds: balance, separation, the sensitivity to each cue's
    value and the source separation."""
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
        separations = {site: [source_separation(s, site) for s in studied] for site in sites}
        summary["source_separation"] = {site: summarize(values) for site, values in separations.items()}
    return report


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
    names = ("balance", "separation", "text cue value", "image cue value", "source")
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
    lines += [
        "## Run times (mean over settings and seeds)",
        "",
        *markdown_table(["method", "wall s / run", "CPU s / run"], rows),
        "",
        f"Sum of run wall times: {total / 60:.1f} min ({elapsed}); {settings['jobs']} run(s) at a time, "
        f"{settings['threads']} torch thread(s) each. Wall times include the subprocess start, data generation, "
        "evaluation and the routing study; CPU time counts every thread of the run's process.",
        "",
        "## Routing study",
        "",
        ROUTING_INTRO,
    ]
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
