"""`examples/benchmark_debiasing.py` and its harness (`examples/benchmarks`): aggregation and report on fake run
folders, and one tiny real benchmark over both regimes (a pretrained base, runs of the real run script)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import debiasing as bm
from benchmarks import report as rp
from benchmarks import routing as rt
from cfmoe.trainer.data.synthetic import NO_CUE, group_index

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark_debiasing.py"
SETTINGS = {"mode": "quick", "common": ["--num_train", "64"], "jobs": 1, "threads": 1}
SETTING = "sarcasm/scratch/tint_hashtag/noise0.2"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_debiasing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_debiasing"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark_debiasing", None)


def plan(bench, root: Path, methods, seeds, regimes=("scratch",), cues=("tint_hashtag",)) -> list[bm.Run]:
    return bm.plan_runs(root, bench.TABLE, methods, seeds, regimes, cues, [])


def split_scores(acc: float, f1: float, worst: float = 0.5, reliance: float = 0.1) -> dict[str, float]:
    return {"accuracy": acc, "macro_f1": f1, "binary_f1": f1, "worst_group_accuracy": worst, "cue_reliance": reliance}


def write_fake_run(
    run_dir: Path,
    iid: float = 0.9,
    ood: float = 0.8,
    neutral: float = 0.85,
    worst: float = 0.7,
    f1: tuple[float, float, float] = (0.9, 0.8, 0.85),
    reliance: float = 0.1,
    routing: bool = True,
) -> None:
    """A finished run: all_results.json, trainer_state.json with routing shares, optionally routing_gates.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = {
        "test_iid": split_scores(iid, f1[0], worst=0.9, reliance=0.9),
        "test_ood": split_scores(ood, f1[1], worst=0.2, reliance=0.8),
        "test_neutral": split_scores(neutral, f1[2], worst=worst, reliance=reliance),
    }
    results = {"eval": evals, "method": "cfmoe", "seed": 0, "data": {"task": "sarcasm", "num_test": 8}}
    (run_dir / "all_results.json").write_text(json.dumps(results))
    log = [
        {"step": 10, "loss": 1.0, "routing_visual_expert_0": 0.9, "routing_visual_expert_1": 0.1},
        {"step": 20, "loss": 0.5, **{f"routing_visual_expert_{i}": s for i, s in enumerate((0.7, 0.3))}},
        {"step": 20, "eval_accuracy": 0.5},
    ]
    log[1] |= {"routing_text_expert_1": 0.4, "routing_text_expert_0": 0.6}
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    if routing:  # gates visual [[1, 0], [1, 0], [0, 1]], text all 0.5, on two aligned items and one conflicting
        aligned = {"n": 2, "visual": [1.0, 0.0], "text": [0.5, 0.5]}
        conflicting = {"n": 1, "visual": [0.0, 1.0], "text": [0.5, 0.5]}
        pooled = {
            "overall": {"n": 3, "visual": [2 / 3, 1 / 3], "text": [0.5, 0.5]},
            "groups": {
                "0": {"label": 0, "text_cue": 0, "image_cue": 0, "category": "aligned", **aligned},
                "3": {"label": 0, "text_cue": 1, "image_cue": 1, "category": "both_conflicting", **conflicting},
            },
            "categories": {"aligned": aligned, "both_conflicting": conflicting},
        }
        (run_dir / "routing_gates.json").write_text(json.dumps({"splits": {}, "pooled": pooled}))


def fake_launch(calls: list):
    """A launcher that records its runs and writes a finished run folder instead of training."""

    def launch(run, threads):
        calls.append((run.method, run.seed))
        write_fake_run(run.run_dir, ood=0.5 + 0.1 * run.seed)
        (run.run_dir / bm.TIMING_FILE).write_text(json.dumps({"cpu_s": 3.0}))
        return 0, ""

    return launch


def accept_all(argv):
    return None


def test_table_and_plan(bench, tmp_path):
    required = {"vanilla", "text_poe", "image_poe", "rubi", "cfvqa", "cfmoe", "oracle_unbiased", "group_dro"}
    ablations = {name for name in bench.RUNS if name.startswith("cfmoe_")}
    assert required <= set(bench.RUNS) and len(ablations) == 10
    for name in ablations:
        assert bench.TABLE.kind(name) == "ablation"
        assert bench.TABLE.argv(name) == [*bench.RUNS["cfmoe"], *bench.RUNS[name]]
    assert bench.TABLE.kind("group_dro") == "reference" and bench.TABLE.kind("rubi") == "peer"
    scratch, pretrained = plan(bench, tmp_path, ["rubi"], [2], ("scratch", "pretrained"), ("mixed",))
    assert (
        scratch.setting == "sarcasm/scratch/mixed/noise0.2"
        and scratch.run_dir == tmp_path / "runs/sarcasm/scratch/mixed/noise0.2/rubi/seed2"
    )
    fixed = ["--cue_setting", "mixed", "--label_noise", "0.2", "--output_dir", str(scratch.run_dir), "--seed", "2"]
    fixed += ["--report_to", "none"]
    assert scratch.argv == [*bench.RUNS["rubi"], *fixed] and bench.RUNS["rubi"][:2] == ["--method", "rubi"]
    base = ["--model_name_or_path", str(tmp_path / "bases/sarcasm/seed2"), "--freeze_vision_tower", "True"]
    base += ["--recipe", "tiny"]
    fixed[5] = str(pretrained.run_dir)
    assert pretrained.argv == [*bench.RUNS["rubi"], *base, *fixed]
    assert bench.names("mixed, local_mark", ["local_mark", "mixed"], "x") == ["mixed", "local_mark"]
    # tasks and label noise are axes too; sarcasm markers only for sarcasm, each task with its own script and base
    grid = bm.plan_runs(
        tmp_path, bench.TABLE, ["cfmoe"], [0], ["pretrained"], ["tint_hashtag", "core_markers"], [],
        ("sarcasm", "sentiment"), (0.2, 0.05),
    )  # fmt: skip
    assert [run.setting for run in grid] == [
        "sarcasm/pretrained/tint_hashtag/noise0.2", "sarcasm/pretrained/tint_hashtag/noise0.05",
        "sarcasm/pretrained/core_markers/noise0.2", "sarcasm/pretrained/core_markers/noise0.05",
        "sentiment/pretrained/tint_hashtag/noise0.2", "sentiment/pretrained/tint_hashtag/noise0.05",
    ]  # fmt: skip
    sentiment = grid[-1]
    assert sentiment.task == "sentiment" and bm.run_script("sentiment").name == "run_sentiment.py"
    assert ["--label_noise", "0.05"] == sentiment.argv[sentiment.argv.index("--label_noise") :][:2]
    assert str(tmp_path / "bases/sentiment/seed0") in sentiment.argv
    with pytest.raises(SystemExit, match="unknown regime"):
        bench.names("scratch,finetuned", bm.REGIMES, "regime")


def test_results_json_schema_robust_acc_and_ranking(bench, tmp_path):
    root = tmp_path / "runs/sarcasm/scratch/tint_hashtag/noise0.2"
    write_fake_run(root / "vanilla/seed0", iid=0.9, ood=0.1, neutral=0.5, worst=0.2, f1=(0.9, 0.1, 0.5))
    write_fake_run(root / "vanilla/seed1", iid=0.8, ood=0.3, neutral=0.6, worst=0.4, f1=(0.6, 0.3, 0.3))
    write_fake_run(root / "cfvqa/seed0", iid=0.05, ood=0.95)  # inverts the cues: high ood, robust 0.05
    write_fake_run(root / "cfmoe/seed0", iid=0.8, ood=0.7, reliance=0.25)
    write_fake_run(tmp_path / "runs/sarcasm/scratch/mixed/noise0.2/vanilla/seed0", iid=0.7, ood=0.6)
    runs = plan(bench, tmp_path, ["vanilla", "cfvqa", "cfmoe"], [0, 1], cues=("tint_hashtag", "mixed"))
    report = rp.write_report(tmp_path, runs, bench.TABLE, SETTINGS)

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [SETTING, "sarcasm/scratch/mixed/noise0.2"] and list(
        results["sarcasm/scratch/mixed/noise0.2"]
    ) == ["vanilla"]
    for metrics in results[SETTING].values():
        assert list(metrics) == list(bm.METRICS) and bm.METRICS[0] == "robust_acc"
        assert all(set(summary) == {"mean", "std", "n"} for summary in metrics.values())
    vanilla = results[SETTING]["vanilla"]
    assert vanilla["robust_acc"]["mean"] == pytest.approx(0.2) and vanilla["robust_acc"]["n"] == 2  # min per run
    assert vanilla["robust_acc"]["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert vanilla["iid_acc"]["mean"] == pytest.approx(0.85)
    assert vanilla["worst_group_acc"]["mean"] == pytest.approx(0.3)  # test_neutral's worst group
    assert vanilla["macro_f1"]["mean"] == pytest.approx(np.mean([0.5, 0.4]))  # mean over the three splits
    assert results[SETTING]["cfvqa"]["robust_acc"]["mean"] == pytest.approx(0.05)
    assert results[SETTING]["cfmoe"]["cue_reliance"] == {"mean": 0.25, "std": 0.0, "n": 1}

    text = report["markdown"]
    assert "synthetic planted-cue data, not mmsd2.0 figures" in text.lower()
    section = text.split(f"## {SETTING}\n")[1]
    order = [line.split(" | ")[0].strip("| ") for line in section.splitlines()[3:6]]
    assert order == ["cfmoe", "vanilla", "cfvqa"]  # ranked on robust_acc, not ood
    assert "| vanilla | peer | 2 | 0.200 ± 0.141 | 0.850 ± 0.071 | 0.200 ± 0.141 |" in section
    assert (
        f"| method | kind | {SETTING} | sarcasm/scratch/mixed/noise0.2 |" in text
        and "| cfvqa | peer | 0.050 ± 0.000 | n/a |" in text
    )
    assert f"| {SETTING} | cfmoe | 1 | missing |" in text  # cfmoe seed 1 never ran
    for name in bm.METRICS:
        assert f"- `{name}`:" in text
    plots = ["sarcasm_scratch_tint_hashtag_noise0.2.png", "sarcasm_scratch_mixed_noise0.2.png"]
    assert [p.name for p in report["plots"]] == plots
    assert all(p.stat().st_size > 0 for p in report["plots"])
    records = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["setting"], r["method"], r["seed"], r["status"]) for r in records} >= {
        (SETTING, "cfmoe", 1, "missing"),
        ("sarcasm/scratch/mixed/noise0.2", "vanilla", 0, "cached"),
    }


def test_ablation_cost_on_robust_acc(bench, tmp_path):
    robust = {"cfmoe": 0.90, "cfmoe_with_contrast": 0.89, "cfmoe_uniform_gates": 0.80, "cfmoe_routed": 0.95}
    for method, value in robust.items():
        write_fake_run(tmp_path / f"runs/sarcasm/scratch/tint_hashtag/noise0.2/{method}/seed0", iid=0.99, ood=value)
    report = rp.write_report(tmp_path, plan(bench, tmp_path, list(robust), [0]), bench.TABLE, SETTINGS)

    costs = rp.ablation_costs(report["results"][SETTING], bench.TABLE)
    assert set(costs) == set(robust) - {"cfmoe"}
    assert costs["cfmoe_with_contrast"]["cost"] == pytest.approx(0.01) and costs["cfmoe_with_contrast"]["cheap"]
    assert costs["cfmoe_uniform_gates"]["cost"] == pytest.approx(0.10) and not costs["cfmoe_uniform_gates"]["cheap"]
    assert costs["cfmoe_routed"]["cheap"]  # better than the full method: costs nothing
    assert "Cheap ablations: cfmoe_with_contrast, cfmoe_routed." in report["markdown"]
    assert "| cfmoe_uniform_gates | 0.800 ± 0.000 | +10.0 | no |" in report["markdown"]


def test_resume_skips_finished_runs(bench, tmp_path, capsys):
    runs = plan(bench, tmp_path, ["vanilla", "cfmoe"], [0, 1])
    write_fake_run(runs[1].run_dir, ood=0.77)
    (runs[1].run_dir / "benchmark_run.json").write_text(
        json.dumps({"argv": runs[1].argv, "wall_s": 12.0, "cpu_s": 10.0})
    )
    write_fake_run(runs[2].run_dir, routing=False)  # vanilla seed 1: trained; only its routing study is left
    calls: list = []
    bm.execute(runs, threads=1, check=accept_all, launch=fake_launch(calls))

    assert sorted(calls) == [("cfmoe", 1), ("vanilla", 0), ("vanilla", 1)]
    assert [r.status for r in runs] == ["ok", "cached", "cached", "ok"]
    assert runs[1].wall_s == 12.0 and runs[1].cpu_s == 10.0  # cached times read back
    meta = json.loads((runs[0].run_dir / "benchmark_run.json").read_text())
    assert meta["argv"] == runs[0].argv and meta["cpu_s"] == 3.0
    assert "3 run(s) to do, 2 already trained" in capsys.readouterr().out

    calls.clear()  # a second invocation finds everything done
    again = plan(bench, tmp_path, ["vanilla", "cfmoe"], [0, 1])
    bm.execute(again, threads=1, check=accept_all, launch=fake_launch(calls))
    assert calls == [] and {r.status for r in again} == {"cached"}
    report = rp.write_report(tmp_path, again, bench.TABLE, SETTINGS)
    assert report["results"][SETTING]["cfmoe"]["ood_acc"]["mean"] == pytest.approx((0.77 + 0.6) / 2)


def test_rejected_and_failed_runs_are_reported(bench, tmp_path, capsys):
    def check(argv):
        return "unknown flag --text_counterfactuals" if "--text_counterfactuals" in argv else None

    calls: list = []
    ok = fake_launch(calls)

    def launch(run, threads):
        if run.method == "rubi":
            run.run_dir.mkdir(parents=True, exist_ok=True)
            return 1, "Traceback ...\nRuntimeError: boom"
        return ok(run, threads)

    runs = plan(bench, tmp_path, ["cfmoe", "cfmoe_no_text_cf", "rubi"], [0, 1])
    bm.execute(runs, threads=1, check=check, launch=launch)
    assert sorted(calls) == [("cfmoe", 0), ("cfmoe", 1)]
    status = {(r.method, r.seed): r.status for r in runs}
    assert status[("cfmoe_no_text_cf", 1)] == "skipped" and status[("rubi", 0)] == "failed"
    assert (
        capsys.readouterr().out.count("skipping sarcasm/scratch/tint_hashtag/noise0.2 cfmoe_no_text_cf") == 1
    )  # checked once

    report = rp.write_report(tmp_path, runs, bench.TABLE, SETTINGS)
    assert list(report["results"][SETTING]) == ["cfmoe"]
    text = report["markdown"]
    assert f"| {SETTING} | cfmoe_no_text_cf | 0 | skipped | argv rejected by the parser: unknown flag" in text
    assert f"| {SETTING} | rubi | 0 | failed | exit code 1: RuntimeError: boom (log: " in text


def test_routing_study_summaries(bench, tmp_path):
    gid = {cues: int(group_index(*cues, 2)) for cues in ((0, 0, 0), (0, 1, 1), (0, 0, 1), (0, 1, 0), (1, 1, 1))}
    assert [rt.cue_category(1, *cues) for cues in ((1, 1), (0, 1), (1, 0), (0, 0))] == list(rt.CATEGORIES)
    assert rt.cue_category(1, NO_CUE, 1) == "aligned" and rt.cue_category(1, NO_CUE, 0) == "image_conflicting"
    gates = {"visual": np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), "text": np.full((3, 2), 0.5)}
    groups = np.array([gid[0, 0, 0], gid[0, 0, 0], gid[0, 1, 1]])
    routed = rt.routing_by_group(gates, groups, num_labels=2)
    aligned = routed["groups"][str(gid[0, 0, 0])]
    assert routed["overall"] == {"n": 3, "visual": [0.5, 0.5], "text": [0.5, 0.5]}
    assert aligned["category"] == "aligned" and aligned["visual"] == [0.75, 0.25]
    assert routed["categories"]["both_conflicting"] == {"n": 1, "visual": [0.0, 1.0], "text": [0.5, 0.5]}
    assert rt.separation(routed["groups"], "visual") == pytest.approx(0.75)  # |[.75, .25] - [0, 1]| / 2
    assert rt.separation(routed["groups"], "text") == pytest.approx(0.0)
    single_cue = rt.routing_by_group(gates, np.array([gid[0, 0, 0], gid[0, 0, 1], gid[0, 1, 0]]), num_labels=2)
    assert rt.cue_sensitivity(single_cue["groups"], "visual", "image_cue") == pytest.approx(0.5)
    assert rt.cue_sensitivity(single_cue["groups"], "visual", "text_cue") == pytest.approx(1.0)
    assert rt.cue_sensitivity(single_cue["groups"], "text", "text_cue") == pytest.approx(0.0)
    assert rt.cue_sensitivity(routed["groups"], "visual", "text_cue") is None  # the groups differ in both cues
    other_label = rt.routing_by_group(gates, np.array([gid[0, 0, 0]] * 2 + [gid[1, 1, 1]]), num_labels=2)
    assert rt.separation(other_label["groups"], "visual") is None
    assert rt.balance([0.25] * 4) == pytest.approx(1.0) and rt.balance([1.0, 0.0]) == pytest.approx(0.0)

    runs = plan(bench, tmp_path, ["vanilla", "cfmoe"], [0])
    write_fake_run(runs[1].run_dir)
    write_fake_run(runs[0].run_dir, routing=False)
    report = rp.write_report(tmp_path, runs, bench.TABLE, SETTINGS)
    routing = json.loads((tmp_path / "routing.json").read_text())[SETTING]
    assert routing["cfmoe"]["seeds"]["0"]["final_training_shares"] == {"visual": [0.7, 0.3], "text": [0.6, 0.4]}
    assert routing["cfmoe"]["separation"]["visual"]["mean"] == pytest.approx(1.0)
    assert "test" not in routing["vanilla"]["seeds"]["0"]
    assert "#### cfmoe: test shares per group" in report["markdown"] and "#### vanilla" not in report["markdown"]
    assert "| y=0 text=1 image=1 (both_conflicting) | 1 | 0.00 / 1.00 | 0.50 / 0.50 |" in report["markdown"]


def test_check_argv_uses_the_run_script_parser():
    assert bm.check_argv(["--method", "vanilla", "--num_train", "64", "--cue_setting", "mixed"]) is None
    assert bm.check_argv(["--model_name_or_path", "some/base", "--freeze_vision_tower", "True"]) is None
    assert "--no_such_flag" in bm.check_argv(["--no_such_flag", "1"])
    assert "invalid int value" in bm.check_argv(["--num_train", "many"])


def test_tiny_benchmark_both_regimes(bench, tmp_path, capsys):
    """The real thing at toy size: one pretrained base, cfmoe from scratch and from the base, then a resume."""
    argv = ["--output_dir", str(tmp_path), "--regime", "scratch,pretrained", "--cue_settings", "mixed"]
    argv += ["--methods", "cfmoe", "--seeds", "1", "--jobs", "2", "--threads", "1"]
    argv += ["--pretrain_epochs", "1", "--pretrain_num_train", "32", "--pretrain_num_validation", "16"]
    argv += ["--num_train", "32", "--num_validation", "16", "--num_test", "16", "--num_train_epochs", "1"]
    report = bench.main(argv)

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["sarcasm/scratch/mixed/noise0.2", "sarcasm/pretrained/mixed/noise0.2"]
    for setting in results:
        metrics = results[setting]["cfmoe"]
        assert set(metrics) == set(bm.METRICS) and metrics["robust_acc"]["n"] == 1
        regime = setting.split("/")[1]
        evals = json.loads(
            (tmp_path / f"runs/sarcasm/{regime}/mixed/noise0.2/cfmoe/seed0/all_results.json").read_text()
        )["eval"]
        expected = min(evals["test_iid"]["accuracy"], evals["test_ood"]["accuracy"])
        assert metrics["robust_acc"]["mean"] == pytest.approx(expected)
    assert (tmp_path / "bases/sarcasm/seed0/pretraining.json").is_file()
    assert (tmp_path / "sarcasm_pretrained_mixed_noise0.2.png").is_file()
    assert "## Pretrained bases" in report["markdown"] and "32 items x 1 epochs (all_forms)" in report["markdown"]
    routing = json.loads((tmp_path / "routing.json").read_text())
    assert (
        set(routing) == {"sarcasm/scratch/mixed/noise0.2", "sarcasm/pretrained/mixed/noise0.2"}
        and "test" in routing["sarcasm/pretrained/mixed/noise0.2"]["cfmoe"]["seeds"]["0"]
    )
    capsys.readouterr()

    bench.main(argv)  # everything cached: no base rebuilt, no run
    out = capsys.readouterr().out
    assert "building the pretrained" not in out and "0 run(s) to do, 2 already trained" in out
