#!/usr/bin/env python
"""Fine-tune and evaluate CF-MoE for multimodal sentiment analysis (negative / neutral / positive).

    accelerate launch examples/run_sentiment.py --output_dir out               # tiny model, synthetic data
    accelerate launch examples/run_sentiment.py --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --dataset mvsa_single --data_dir /data/CLMLF/dataset/data/MVSA-single/10-flod-1 \
        --extra_test mvsa_multiple=/data/CLMLF/dataset/data/MVSA-multiple/10-flod-1 --output_dir out
    python examples/run_sentiment.py --help         # the common arguments and their defaults (--help_all: all)

`--dataset mvsa_single` / `mvsa_multiple` read CLMLF's released splits (`DATA_DIR/{train,dev,test}.json`, CLMLF's
labels 0 positive / 2 negative mapped to ours, 0 negative / 2 positive) or MVSA's raw layout; images from
`DATA_DIR/../dataset_image` or `--image_dir` (one image file: a placeholder for every item; docs/real_data.md).

Without `--model_name_or_path` it trains the tiny offline model on the synthetic planted-cue benchmark
(docs/benchmark.md); with one, the defaults are those of LLaVA-1.5's fine-tuning recipe (docs/training.md: "Defaults").
The body is `cfmoe.trainer.train.train_and_evaluate` (read it there; the other task's script calls it too). From Python:
`main(["--output_dir", "out", ...])` returns what `OUTPUT/all_results.json` holds. From the command
line, bad arguments or data end the script with a one-line `error: ...` and exit code 2 (`CFMOE_TRACEBACK=1`
shows the traceback).
"""

from __future__ import annotations

from cfmoe.trainer.errors import exit_on_user_error
from cfmoe.trainer.train import main as run

TASK = "sentiment"


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate every test split, save; returns the run's results (also in `OUTPUT/all_results.json`)."""
    return run(TASK, argv)


if __name__ == "__main__":
    exit_on_user_error(main)
