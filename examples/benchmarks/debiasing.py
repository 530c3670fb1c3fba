"""The runs of `examples/benchmark_debiasing.py` (which holds the command line and the table of methods); the
routing study is in `routing`, the report in `report`.

* planning: one `Run` per (seed, regime, cue setting, method), folder `DIR/runs/<regime>/<cue_setting>/<method>/
  seed<k>/`; the `pretrained` regime fine-tunes a perception-pretrained tiny base per seed (`DIR/bases/seed<k>/`,
  built once by `examples/make_tiny_model.py --pretrain`) with the vision tower frozen;
* running: each run is `examples/run_<task>.py` in a fresh subprocess (`run_cli`), then the routing study; a run whose
  `all_results.json` exists is not run again (resumable), one whose argv the run script's parser rejects is
  skipped with the parser's reason, one that crashes is reported as failed;
* reading back: per-run metrics (`run_metrics`, headline `robust_acc`), mean ± std over seeds per setting and
  method, the routing study, and the report (`results.json`, `results.md`, one plot per setting, `routing.json`,
  `runs.json`).
"""

from __future__ import annotations

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

from cfmoe.trainer.arguments import parse_args
from cfmoe.trainer.data.synthetic import CUE_SETTINGS
from cfmoe.trainer.metrics import robust_accuracy, summarize_runs

from .pretrain import SUMMARY_FILE as PRETRAINING_FILE

ROOT = Path(__file__).resolve().parents[2]  # the repository
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
METRICS = (
    HEADLINE, "iid_acc", "ood_acc", "neutral_acc", "worst_group_acc", "macro_f1", "cue_reliance", "core_kept",
    "clean_iid_acc",
)  # fmt: skip
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
    "clean_iid_acc": "accuracy on the `test_iid` items that carry no cue (the `sparse` setting): what "
    "debiasing costs the items without a shortcut",
}
ABLATION_COST_THRESHOLD = 0.02  # an ablation costing less robust accuracy than this does not earn its component
RESULTS_FILE = "all_results.json"  # written by the run script
STATE_FILE = "trainer_state.json"
ROUTING_FILE = "routing_gates.json"  # written by `launch_run` after training
META_FILE = "benchmark_run.json"  # argv, wall and CPU time of the run, written by the benchmark
TIMING_FILE = "run_timing.json"  # CPU seconds of the run's subprocess
LOG_FILE = "benchmark.log"
ROUTING_FAILED = 3  # `launch_run` code: trained and evaluated, but the routing study failed


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
        "clean_iid_acc": get("test_iid", "clean_accuracy"),
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
def check_argv(argv: Sequence[str]) -> str | None:
    """None when the run script's argument parser accepts `argv`, else its reason (unknown flag, bad value)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:  # never create a run folder while checking
            parse_args([*argv, "--output_dir", scratch])
        except (ValueError, TypeError) as error:  # an unknown flag, a value argparse or a __post_init__ check refuses
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


def call_logged(command: Sequence[str], log_path: Path, threads: int) -> tuple[int, str, float]:
    """Run `command` from the repository root, output to `log_path`; returns (exit code, last 15 lines, CPU seconds
    of the subprocess, all its threads)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(threads), cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    return process.returncode, tail, usage.ru_utime + usage.ru_stime


def run_cli(run: Run, threads: int) -> tuple[int, str]:
    """The run script of the run's task on its argv in a fresh subprocess (the real command line), output to its
    log, its CPU time to `TIMING_FILE`; a folder left by an interrupted run is started afresh."""
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    code, tail, cpu_s = call_logged(
        [sys.executable, str(run_script(run.task)), *run.argv], run.run_dir / LOG_FILE, threads
    )
    write_json(run.run_dir / TIMING_FILE, {"cpu_s": cpu_s})
    return code, tail


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
        return call_logged(command, folder.parent / f"seed{seed}.log", threads)[:2]

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
    launch: Callable[[Run, int], tuple[int, str]] = run_cli,
) -> None:
    """Run every pending run (skipping finished and rejected ones), `jobs` at a time, printing one line per run."""
    todo = pending_runs(runs, check)
    cached = sum(run.status == "cached" for run in runs)
    print(f"{len(todo)} run(s) to do, {cached} already trained, {jobs} at a time x {threads} thread(s)", flush=True)

    lock, start, finished = threading.Lock(), time.perf_counter(), [0]

    def one(run: Run) -> None:
        begin = time.perf_counter()
        code, tail = launch(run, threads)
        wall = time.perf_counter() - begin
        record_outcome(run, code, tail, wall)
        with lock:
            finished[0] += 1
            print(f"[{finished[0]}/{len(todo)}] {progress_line(run, wall, start)}", flush=True)
            if run.status == "failed":
                print(tail, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


def pending_runs(runs: Sequence[Run], check: Callable[[Sequence[str]], str | None]) -> list[Run]:
    """The runs to launch: those not trained yet whose argv `check` accepts, and trained ones whose routing study is
    missing. Marks the trained ones `cached` (`read_cached`) and the rejected ones `skipped`, printing each
    rejection once per setting and method."""
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
            read_cached(run)
            if not (run.run_dir / ROUTING_FILE).is_file() and rejected(run) is None:
                todo.append(run)  # only the routing study is left to do
        elif (reason := rejected(run)) is not None:
            run.status, run.reason = "skipped", f"argv rejected by the parser: {reason}"
        else:
            todo.append(run)
    return todo


def read_cached(run: Run) -> None:
    """Mark a trained run `cached` with the wall and CPU time of its `META_FILE`, warning when its argv changed."""
    run.status = "cached"
    meta_path = run.run_dir / META_FILE
    if meta_path.is_file():
        meta = load_json(meta_path)
        run.wall_s, run.cpu_s = meta.get("wall_s"), meta.get("cpu_s")
        if meta.get("argv") != run.argv:
            run.reason = "argv changed since this run; delete its folder to run it again"
            print(f"warning: {run.setting} {run.method} seed {run.seed}: {run.reason}", flush=True)


def record_outcome(run: Run, code: int, tail: str, wall: float) -> None:
    """The run's status after its launch (exit `code`, last log lines `tail`, `wall` seconds): `ok` with its times
    in `META_FILE` when trained now, `failed` with the last log line; a routing study that failed is noted."""
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


def progress_line(run: Run, wall: float, start: float) -> str:
    """`<setting> <method> seed <k>: <status> in <wall> s`, the headline score when trained, and the minutes since
    `start` (a `time.perf_counter()` reading)."""
    score = run_metrics(load_json(run.run_dir / RESULTS_FILE)["eval"])[HEADLINE] if run.done else math.nan
    score = f", {HEADLINE} {score:.3f}" if math.isfinite(score) else ""
    return (
        f"{run.setting} {run.method} seed {run.seed}: {run.status} in {wall:.0f} s{score} "
        f"(elapsed {(time.perf_counter() - start) / 60:.1f} min)"
    )
