"""`examples/benchmark_real.py` end to end in its quick mode, on the three repositories' files written here in their
released formats (a few dozen lines each, made up): MMSD 1.0's text release, MMSD2.0's JSON and DMSD-CL's OOD lines."""

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
        entries = [{"image_id": int(item), "text": tweet(i + 1), "label": (i + 1) % 2} for i, item in enumerate(items)]
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
    assert set(results["mmsd"]["cfmoe"]) == {"mmsd_test", "mmsd2_test", "dmsd_ood"}
    assert set(results["mmsd2"]["vanilla"]) == {"mmsd2_test", "dmsd_ood"}
    for train_set, splits in bench.TRAIN_SETS.items():
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
