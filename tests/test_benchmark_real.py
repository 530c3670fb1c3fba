"""`examples/benchmark_real.py` end to end in its quick mode, on the repositories' files written here in their
released formats (a few dozen lines each, made up): for sarcasm MMSD 1.0's text release, MMSD2.0's JSON and DMSD-CL's
OOD lines; for sentiment CLMLF's MVSA-Single and MVSA-Multiple JSON splits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark_real.py"
WORDS = "what a lovely monday great view from the top stuck in traffic again love it when my train is late".split()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_real"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark_real", None)


def tweet(index: int) -> str:
    return " ".join(WORDS[(index * 7 + k) % len(WORDS)] for k in range(4 + index % 5))


def write_repositories(root: Path) -> dict[str, int]:
    """The three repositories' data files under ROOT; returns how many items each loaded split should hold."""
    counts = {"train": 40, "valid": 12, "test": 12}
    ids = {split: [f"8{n}{i:016d}" for i in range(count)] for n, (split, count) in enumerate(counts.items())}
    text = root / "data-of-multimodal-sarcasm-detection" / "text"
    text.mkdir(parents=True)
    lines = [f"['{item}', '{tweet(i)} ', {i % 2}]" for i, item in enumerate(ids["train"])]
    lines += ["['799999999999999999', 'is this # sarcasm ? <url>', 1]"]  # discarded by the release's rule
    (text / "train.txt").write_text("\n".join(lines) + "\n")
    for split, name in (("valid", "valid2"), ("test", "test2")):
        rows = [f"['{item}', \"{tweet(i)} , isn 't it\", {i % 2}, {(i // 2) % 2}]" for i, item in enumerate(ids[split])]
        (text / f"{name}.txt").write_text("\n".join(rows) + "\n")
    final = root / "MMSD2.0" / "data" / "text_json_final"
    final.mkdir(parents=True)
    for split, items in ids.items():
        # a third of MMSD2.0's tweets hold the `<num>` placeholder, as the release's do
        texts = [tweet(i + 1) + (" <num>" if i % 3 == 0 else "") for i in range(len(items))]
        entries = [
            {"image_id": int(item), "text": text, "label": (i + 1) % 2}
            for i, (item, text) in enumerate(zip(items, texts, strict=True))
        ]
        (final / f"{split}.json").write_text(json.dumps(entries))
    ood = root / "DMSD-CL" / "data" / "clean_data"
    ood.mkdir(parents=True)
    rows = [f"[{item},{tweet(i)}, right?,{i % 2}]" for i, item in enumerate(ids["test"][:10])]
    (ood / "ood_all.txt").write_text("\n".join(rows) + "\n")
    return {"train": 40, "validation": 12, "test": 12, "test_ood": 10}


def test_quick_benchmark_on_released_formats(bench, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    sizes = write_repositories(data)
    argv = ["--data_root", str(data), "--output_dir", str(out), "--quick", "--methods", "vanilla,cfmoe"]
    report = bench.main([*argv, "--jobs", "2", "--threads", "1"])

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"mmsd", "mmsd2"} and set(results["mmsd"]) == {"vanilla", "cfmoe"}
    assert set(results["mmsd"]["cfmoe"]) == {"mmsd_test", "mmsd2_test", "mmsd2_test_no_num", "dmsd_ood"}
    assert set(results["mmsd2"]["vanilla"]) == {"mmsd2_test", "mmsd2_test_no_num", "dmsd_ood"}
    # the subset is scored from the run's saved predictions, on the test tweets without the `<num>` leak
    run = out / "runs/mmsd2/vanilla/seed0"
    predicted = json.loads((run / "test_predictions.json").read_text())["test"]
    tweets = json.loads((data / "MMSD2.0/data/text_json_final/test.json").read_text())
    labels = {str(tweet["image_id"]): tweet["label"] for tweet in tweets if "<num>" not in tweet["text"].split()}
    right = [p == labels[i] for i, p in zip(predicted["id"], predicted["prediction"], strict=True) if i in labels]
    assert 0 < len(right) < len(tweets)
    assert results["mmsd2"]["vanilla"]["mmsd2_test_no_num"]["accuracy"]["mean"] == pytest.approx(
        sum(right) / len(right)
    )
    for train_set, splits in bench.TASKS["sarcasm"].train_sets.items():
        for method in ("vanilla", "cfmoe"):
            evals = json.loads((out / f"runs/{train_set}/{method}/seed0/all_results.json").read_text())["eval"]
            assert set(evals) == set(splits.eval_sets)
            for split, eval_set in splits.eval_sets.items():
                for metric in ("accuracy", "macro_f1"):
                    summary = results[train_set][method][eval_set][metric]
                    assert summary["n"] == 1 and summary["mean"] == pytest.approx(evals[split][metric])
    # the run's tokenizer was trained on the training texts: each fixture word is one token
    tokenizer = AutoTokenizer.from_pretrained(out / "runs/mmsd/vanilla/seed0")
    assert len(tokenizer.tokenize(" ".join(WORDS))) == len(WORDS)

    data_report = json.loads((out / "data_report.json").read_text())
    loaded = data_report["items_per_class"]
    assert {split: sum(counts) for split, counts in loaded["mmsd2"].items()} == sizes
    assert {split: sum(counts) for split, counts in loaded["mmsd"].items()} == {**sizes, "test_mmsd2": 12}
    assert data_report["text_cues_per_class"]["mmsd_train"]["ends in a space"] == [20, 20]  # as released
    tokens = data_report["tokens_per_word"]
    assert tokens["trained on mmsd2 train"]["mmsd2_test"] == 1.0 < tokens[next(iter(tokens))]["mmsd2_test"]

    markdown = (out / "results.md").read_text()
    assert markdown == report["markdown"] and "not comparable to published ones" in markdown
    assert "## Trained on mmsd train" in markdown and "| majority class | 0.500 | 0.333 |" in markdown
    assert "| mmsd | train | 40 (20 / 20) |" in markdown and (out / "results.png").is_file()
    assert (out / "placeholder.jpg").is_file() and "--image_dir" in json.loads((out / "runs.json").read_text())[0][
        "argv"
    ]
    capsys.readouterr()

    bench.main([*argv, "--jobs", "1"])  # resumable: every run finished, none run again
    assert "4 of 4 run(s) finished before: not run again" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="git clone https://github.com/JoeYing1019/MMSD2.0"):
        bench.main(["--data_root", str(tmp_path / "nowhere"), "--output_dir", str(out)])


def write_clmlf(root: Path) -> None:
    """CLMLF's MVSA splits under ROOT/CLMLF, 30 / 9 / 9 items per collection, CLMLF's emotion_label (0 positive,
    1 neutral, 2 negative) cycling; positive texts hold #happy, neutral ones a mention, negative ones a URL."""
    forms = {0: " #happy", 1: " @someone", 2: " http://t.co/x"}
    for n, collection in enumerate(("single", "multiple")):
        folder = root / "CLMLF" / "dataset" / "data" / f"MVSA-{collection}" / "10-flod-1"
        folder.mkdir(parents=True)
        for k, (split, count) in enumerate((("train", 30), ("dev", 9), ("test", 9))):
            items = [
                {"id": str(1000 * n + 100 * k + i), "text": tweet(i + n) + forms[i % 3], "emotion_label": i % 3}
                for i in range(count)
            ]
            (folder / f"{split}.json").write_text(json.dumps(items))


def test_quick_sentiment_benchmark_on_clmlf_files(bench, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_clmlf(data)
    argv = ["--task", "sentiment", "--data_root", str(data), "--output_dir", str(out)]
    report = bench.main([*argv, "--data_report_only"])
    assert "#happy" in report["markdown"] and not (out / "results.json").exists()
    report = bench.main([*argv, "--quick", "--methods", "cfmoe", "--jobs", "2", "--threads", "1"])  # 2 runs: < 60 s

    results = json.loads((out / "results.json").read_text())
    eval_sets = {"single_test", "multiple_test"}
    assert set(results) == {"mvsa_single", "mvsa_multiple"}
    assert all(
        set(results[train_set]) == {"cfmoe"} and set(results[train_set]["cfmoe"]) == eval_sets for train_set in results
    )
    for train_set, splits in bench.TASKS["sentiment"].train_sets.items():
        evals = json.loads((out / f"runs/{train_set}/cfmoe/seed0/all_results.json").read_text())["eval"]
        assert set(evals) == set(splits.eval_sets)
        for split, eval_set in splits.eval_sets.items():
            summary = results[train_set]["cfmoe"][eval_set]["macro_f1"]
            assert summary["n"] == 1 and summary["mean"] == pytest.approx(evals[split]["macro_f1"])
    assert {run["task"] for run in json.loads((out / "runs.json").read_text())} == {"sentiment"}

    data_report = report["data_report"]
    assert data_report["classes"] == ["negative", "neutral", "positive"]
    assert data_report["items_per_class"]["mvsa_single"] == {
        "train": [10, 10, 10],
        "validation": [3, 3, 3],
        "test": [3, 3, 3],
        "test_mvsa_multiple": [3, 3, 3],
    }
    forms = data_report["tweet_forms_per_class"]["mvsa_multiple_train"]  # CLMLF's 0 (positive) is our 2
    assert forms == {
        "items": [10, 10, 10],
        "hashtag": [0, 0, 10],
        "mention": [0, 10, 0],
        "URL": [10, 0, 0],
        "RT @": [0, 0, 0],
    }
    hashtags = data_report["label_giving_hashtags"]["mvsa_single"]
    assert hashtags["hashtags"] == [{"hashtag": "happy", "train": [0, 0, 10], "test": [0, 0, 3]}]
    assert hashtags["test_covered"] == hashtags["test_rule_right"] == 3

    markdown = (out / "results.md").read_text()
    assert markdown == report["markdown"] and "not comparable to published ones" in markdown
    assert (
        "## Trained on mvsa_multiple train" in markdown
        and "| majority class | 0.333 | 0.167 | 0.333 | 0.167 |" in markdown
    )
    assert "| mvsa_single_train | 10 / 10 / 10 | 0% / 0% / 100% |" in markdown and (out / "results.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="number their tweets alike"):  # ids of both collections overlap
        bench.main([*argv, "--image_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="git clone https://github.com/Link-Li/CLMLF"):
        bench.main(["--task", "sentiment", "--data_root", str(tmp_path / "nowhere"), "--output_dir", str(out)])
