"""`examples/benchmark_speed.py` runs to the end in its tiny mode and writes the headline layout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark_speed.py"
HEADLINE = ("train_step_ratio", "inference_ratio", "peak_memory_ratio")


def test_tiny_run_writes_finite_positive_ratios(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--tiny", "--sizes", "2x16,2x4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["default"]) == set(report["trained_tower"]) == {"2x16", "2x4"}
    for result in [*report["default"].values(), *report["trained_tower"].values()]:
        for key in (*HEADLINE, "step_memory_ratio", "train_flop_ratio", "lm_token_ratio", "image_ratio"):
            assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
        vanilla, default = result["vanilla"], result["default"]
        assert vanilla["images"] == vanilla["inference_images"] == 2  # vanilla: each image once
        assert default["images"] > 2, "the default's counterfactual rows run edited images through the tower"
        assert default["inference_lm_tokens"] == vanilla["inference_lm_tokens"] == vanilla["lm_tokens"]
    table = (tmp_path / "speed.md").read_text()
    assert "| 2 x (16 + 4) |" in table and table in done.stdout
