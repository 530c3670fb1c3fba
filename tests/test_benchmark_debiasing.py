"""Aggregation and report code of `examples/benchmark_debiasing.py`, on fake run folders (no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark_debiasing.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_debiasing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_debiasing"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark_debiasing", None)


SETTINGS = {"mode": "quick", "common": ["--num_train", "64"], "jobs": 1, "threads": 1}


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
        (run.run_dir / "worker_timing.json").write_text(json.dumps({"cpu_s": 3.0}))
        return 0, ""

    return launch


def accept_all(argv):
    return None


def test_table_holds_every_method_and_ablations_inherit_cfmoe(bench):
    required = {"vanilla", "text_poe", "image_poe", "rubi", "cfvqa", "cfmoe", "oracle_unbiased", "group_dro"}
    ablations = {
        "cfmoe_single_expert",
        "cfmoe_uniform_gates",
        "cfmoe_no_text_cf",
        "cfmoe_no_visual_cf",
        "cfmoe_with_contrast",
        "cfmoe_with_factual_task",
        "cfmoe_no_split",
        "cfmoe_no_split_combined_rule",
    }
    assert required | ablations <= set(bench.RUNS)
    for name in ablations:
        assert bench.kind_of(name) == "ablation"
        argv = bench.run_argv(name)
        assert (
            argv[: len(bench.RUNS["cfmoe"])] == bench.RUNS["cfmoe"]
            and argv[-len(bench.RUNS[name]) :] == (bench.RUNS[name])
        )
    assert bench.run_argv("oracle_unbiased") == bench.RUNS["oracle_unbiased"]
    assert bench.kind_of("group_dro") == "reference" and bench.kind_of("rubi") == "peer"
    run = bench.plan_runs(Path("out"), ["rubi"], [2], ["--num_train", "8"])[0]
    assert run.argv == [
        *["--num_train", "8", "--method", "rubi"],
        *["--output_dir", str(Path("out/runs/rubi/seed2")), "--seed", "2", "--report_to", "none"],
    ]


def test_results_json_schema_and_mean_std(bench, tmp_path):
    write_fake_run(tmp_path / "runs/vanilla/seed0", iid=0.9, ood=0.1, neutral=0.5, worst=0.2, f1=(0.9, 0.1, 0.5))
    write_fake_run(tmp_path / "runs/vanilla/seed1", iid=0.8, ood=0.3, neutral=0.6, worst=0.4, f1=(0.6, 0.3, 0.3))
    write_fake_run(tmp_path / "runs/cfmoe/seed0", ood=0.7, reliance=0.25)
    runs = bench.plan_runs(tmp_path, ["vanilla", "cfmoe"], [0, 1], [])
    bench.write_report(tmp_path, runs, SETTINGS)

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["vanilla", "cfmoe"]
    for metrics in results.values():
        assert set(metrics) == set(bench.METRICS)
        assert all(set(summary) == {"mean", "std", "n"} for summary in metrics.values())
    vanilla = results["vanilla"]
    assert vanilla["iid_acc"]["mean"] == pytest.approx(0.85) and vanilla["iid_acc"]["n"] == 2
    assert vanilla["ood_acc"]["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert vanilla["worst_group_acc"]["mean"] == pytest.approx(0.3)  # test_neutral's worst group
    assert vanilla["macro_f1"]["mean"] == pytest.approx(np.mean([0.5, 0.4]))  # mean over the three splits
    assert results["cfmoe"]["cue_reliance"] == {"mean": 0.25, "std": 0.0, "n": 1}  # test_neutral's

    text = (tmp_path / "results.md").read_text()
    assert "synthetic planted-cue data, not mmsd2.0 figures" in text.lower()
    assert "| vanilla | peer | 2 | 0.850 ± 0.071 | 0.200 ± 0.141 |" in text
    assert "| cfmoe | 1 | missing |" in text  # cfmoe seed 1 never ran
    for name in bench.METRICS:
        assert f"- `{name}`:" in text
    assert (tmp_path / "results.png").stat().st_size > 0
    records = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["method"], r["seed"], r["status"]) for r in records} >= {
        ("cfmoe", 1, "missing"),
        ("vanilla", 0, "cached"),
    }


def test_ablation_cost_flagging(bench, tmp_path):
    for method, ood in {"cfmoe": 0.90, "cfmoe_with_contrast": 0.89, "cfmoe_uniform_gates": 0.80}.items():
        write_fake_run(tmp_path / f"runs/{method}/seed0", ood=ood)
    write_fake_run(tmp_path / "runs/cfmoe_single_expert/seed0", ood=0.95)
    methods = ["cfmoe", "cfmoe_with_contrast", "cfmoe_uniform_gates", "cfmoe_single_expert"]
    report = bench.write_report(tmp_path, bench.plan_runs(tmp_path, methods, [0], []), SETTINGS)

    costs = bench.ablation_costs(report["results"])
    assert set(costs) == set(methods[1:])
    assert costs["cfmoe_with_contrast"]["cost"] == pytest.approx(0.01) and costs["cfmoe_with_contrast"]["cheap"]
    assert costs["cfmoe_uniform_gates"]["cost"] == pytest.approx(0.10) and not costs["cfmoe_uniform_gates"]["cheap"]
    assert costs["cfmoe_single_expert"]["cheap"]  # better than the full method: costs nothing
    assert "Cheap ablations: cfmoe_with_contrast, cfmoe_single_expert." in report["markdown"]
    assert "| cfmoe_uniform_gates | 0.800 ± 0.000 | +10.0 | no |" in report["markdown"]
    assert bench.ablation_costs({"cfmoe_with_contrast": report["results"]["cfmoe_with_contrast"]}) == {}


def test_resume_skips_finished_runs(bench, tmp_path, capsys):
    runs = bench.plan_runs(tmp_path, ["vanilla", "cfmoe"], [0, 1], [])
    write_fake_run(tmp_path / "runs/cfmoe/seed0", ood=0.77)
    (tmp_path / "runs/cfmoe/seed0/benchmark_run.json").write_text(
        json.dumps({"argv": runs[1].argv, "wall_s": 12.0, "cpu_s": 10.0})
    )
    write_fake_run(tmp_path / "runs/vanilla/seed1", routing=False)  # trained; only its routing study is left
    calls: list = []
    bench.execute(runs, threads=1, check=accept_all, launch=fake_launch(calls))

    assert sorted(calls) == [("cfmoe", 1), ("vanilla", 0), ("vanilla", 1)]
    status = {(r.method, r.seed): r.status for r in runs}
    assert status == {("vanilla", 0): "ok", ("cfmoe", 0): "cached", ("vanilla", 1): "cached", ("cfmoe", 1): "ok"}
    assert runs[1].wall_s == 12.0 and runs[1].cpu_s == 10.0  # cached times read back
    meta = json.loads((tmp_path / "runs/vanilla/seed0/benchmark_run.json").read_text())
    assert meta["argv"] == runs[0].argv and meta["cpu_s"] == 3.0
    assert "3 run(s) to do, 2 already trained" in capsys.readouterr().out

    calls.clear()  # a second invocation finds everything done
    again = bench.plan_runs(tmp_path, ["vanilla", "cfmoe"], [0, 1], [])
    bench.execute(again, threads=1, check=accept_all, launch=fake_launch(calls))
    assert calls == [] and {r.status for r in again} == {"cached"}
    report = bench.write_report(tmp_path, again, SETTINGS)
    assert report["results"]["cfmoe"]["ood_acc"]["mean"] == pytest.approx((0.77 + 0.6) / 2)


def test_rejected_argv_reported_as_skipped(bench, tmp_path, capsys):
    def check(argv):
        return "unknown flag --text_counterfactuals" if "--text_counterfactuals" in argv else None

    runs = bench.plan_runs(tmp_path, ["cfmoe", "cfmoe_no_text_cf"], [0, 1], [])
    calls: list = []
    bench.execute(runs, threads=1, check=check, launch=fake_launch(calls))
    assert sorted(calls) == [("cfmoe", 0), ("cfmoe", 1)]
    skipped = [r for r in runs if r.method == "cfmoe_no_text_cf"]
    assert all(r.status == "skipped" and "--text_counterfactuals" in r.reason for r in skipped)
    assert capsys.readouterr().out.count("skipping cfmoe_no_text_cf") == 1  # checked once per method

    report = bench.write_report(tmp_path, runs, SETTINGS)
    assert "cfmoe_no_text_cf" not in report["results"]
    assert "| cfmoe_no_text_cf | 0 | skipped | argv rejected by the parser: unknown flag" in report["markdown"]
    records = json.loads((tmp_path / "runs.json").read_text())
    assert [r["status"] for r in records if r["method"] == "cfmoe_no_text_cf"] == ["skipped", "skipped"]


def test_failed_run_is_reported_and_the_rest_go_on(bench, tmp_path):
    calls: list = []
    ok = fake_launch(calls)

    def launch(run, threads):
        if run.method == "rubi":
            run.run_dir.mkdir(parents=True, exist_ok=True)
            return 1, "Traceback ...\nRuntimeError: boom"
        return ok(run, threads)

    runs = bench.plan_runs(tmp_path, ["rubi", "vanilla"], [0], [])
    bench.execute(runs, threads=1, check=accept_all, launch=launch)
    assert [r.status for r in runs] == ["failed", "ok"]
    assert "RuntimeError: boom" in runs[0].reason
    report = bench.write_report(tmp_path, runs, SETTINGS)
    assert list(report["results"]) == ["vanilla"]
    assert "| rubi | 0 | failed | exit code 1: RuntimeError: boom (log: " in report["markdown"]


def test_routing_study_summaries(bench, tmp_path):
    assert bench.group_parts(6, 2) == (1, 1, 0)
    assert [bench.cue_category(1, *cues) for cues in ((1, 1), (0, 1), (1, 0), (0, 0))] == list(bench.CATEGORIES)
    gates = {"visual": np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), "text": np.full((3, 2), 0.5)}
    routed = bench.routing_by_group(gates, np.array([0, 0, 3]), num_labels=2)
    assert routed["overall"] == {"n": 3, "visual": [0.5, 0.5], "text": [0.5, 0.5]}
    assert routed["groups"]["0"]["category"] == "aligned" and routed["groups"]["0"]["visual"] == [0.75, 0.25]
    assert routed["categories"]["both_conflicting"] == {"n": 1, "visual": [0.0, 1.0], "text": [0.5, 0.5]}
    assert bench.separation(routed["groups"], "visual") == pytest.approx(0.75)  # |[.75, .25] - [0, 1]| / 2
    assert bench.separation(routed["groups"], "text") == pytest.approx(0.0)
    single_cue = bench.routing_by_group(gates, np.array([0, 1, 2]), num_labels=2)  # 1: image cue moved, 2: text
    assert bench.cue_sensitivity(single_cue["groups"], "visual", "image_cue") == pytest.approx(0.5)
    assert bench.cue_sensitivity(single_cue["groups"], "visual", "text_cue") == pytest.approx(1.0)
    assert bench.cue_sensitivity(single_cue["groups"], "text", "text_cue") == pytest.approx(0.0)
    assert bench.cue_sensitivity(routed["groups"], "visual", "text_cue") is None  # groups 0, 3 differ in both
    other_label = bench.routing_by_group(gates, np.array([0, 0, 7]), num_labels=2)  # (y=1, aligned): no conflict
    assert bench.separation(other_label["groups"], "visual") is None
    assert bench.balance([0.25] * 4) == pytest.approx(1.0) and bench.balance([1.0, 0.0]) == pytest.approx(0.0)

    write_fake_run(tmp_path / "runs/cfmoe/seed0")
    write_fake_run(tmp_path / "runs/vanilla/seed0", routing=False)
    report = bench.write_report(tmp_path, bench.plan_runs(tmp_path, ["vanilla", "cfmoe"], [0], []), SETTINGS)
    routing = json.loads((tmp_path / "routing.json").read_text())
    assert routing["cfmoe"]["seeds"]["0"]["final_training_shares"] == {"visual": [0.7, 0.3], "text": [0.6, 0.4]}
    assert routing["cfmoe"]["seeds"]["0"]["test"]["categories"]["aligned"]["n"] == 2
    assert routing["cfmoe"]["separation"]["visual"]["mean"] == pytest.approx(1.0)
    assert "test" not in routing["vanilla"]["seeds"]["0"]
    assert "### cfmoe: test shares per group" in report["markdown"]
    assert "| y=0 text=1 image=1 (both_conflicting) | 1 | 0.00 / 1.00 | 0.50 / 0.50 |" in report["markdown"]
    assert "### vanilla" not in report["markdown"]
    row = "| cfmoe | 0.92 ± 0.00 | 1.00 ± 0.00 | n/a | n/a | 1.00 ± 0.00 | 0.00 ± 0.00 | n/a | n/a | 0.70 / 0.30 |"
    assert row in report["markdown"]  # balance, separation, text-cue and image-cue sensitivity per site


def test_check_argv_uses_the_run_parser(bench):
    assert bench.check_argv(["--method", "vanilla", "--num_train", "64"]) is None
    assert "--no_such_flag" in bench.check_argv(["--no_such_flag", "1"])
    assert "method must be one of" in bench.check_argv(["--method", "nope"])
    assert "invalid int value" in bench.check_argv(["--num_train", "many"])
