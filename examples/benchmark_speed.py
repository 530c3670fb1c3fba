#!/usr/bin/env python
"""Cost of the default training configuration against `vanilla` fine-tuning: train step, inference, peak memory.

    python examples/benchmark_speed.py --output_dir out/speed                  # CPU, 1 thread, four sizes
    python examples/benchmark_speed.py --output_dir out/speed --device cuda    # GPU, bf16 autocast
    python examples/benchmark_speed.py --output_dir out/speed --tiny           # seconds: the test's smoke run

Both configurations train the same tiny LLaVA (`cfmoe.trainer.data.tiny`, images enlarged to the size's patch grid; same
weights, same batches) through `CFMoETrainer.training_step`, gradient clipping and the trainer's AdamW: `vanilla`
with `CFMoETrainingArguments(method="vanilla")`, the default with `CFMoETrainingArguments()` (`method="cfmoe"`,
what `examples/run_sarcasm.py` trains), past its bias-only warm-up (`debias_warmup_ratio=0`) so that it builds
its counterfactual rows. The batches carry the synthetic benchmark's cues (a class hashtag, a class tint), and
the context statistics are filled first, as the warm-up leaves them. Two configurations: `default` (the headline),
the vision tower frozen for both, as `run_sarcasm.py` fine-tunes a checkpoint and as the README's main job runs;
`trained_tower`, the tower trained for both, as the tiny from-scratch recipe does.

Per size `BxN` (B items, N image tokens, about N / 10 text tokens): after warm-up steps, `--steps` fresh batches
run through both configurations back to back (the order alternating); the ratios are of the medians. The clock
is the process CPU time with 1 thread on CPU, the wall time on CUDA. Peak memory: see
`benchmarks.speed.Runner.profile_train_step`. Forward hooks count the LM tokens (rows x length of every
language-model call) and vision-tower images of a step; on CUDA its host syncs are counted too. Writes
`speed.json` (`{"default": {"BxN": {"train_step_ratio", "inference_ratio", "peak_memory_ratio", ...}},
"trained_tower": {...}, "setup": {...}}`) and `speed.md`, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

from benchmarks.speed import Runner, Size, compare, make_batch, parse_sizes, time_interleaved

# the headline first: the vision tower frozen, as the llava recipe and the README's main job train; then the tiny
# from-scratch recipe, which trains the tower (both configurations and vanilla alike)
CONFIGURATIONS = {
    "default": "Default training configuration / vanilla, vision tower frozen",
    "trained_tower": "Default training configuration / vanilla, vision tower trained (the tiny from-scratch recipe)",
}
TARGETS = {"train_step_ratio": 1.3, "inference_ratio": 1.05, "peak_memory_ratio": 1.3}
FULL = {"sizes": "8x64,8x144,8x256,4x576", "steps": 20, "warmup": 3}
TINY = {"sizes": "2x16", "steps": 2, "warmup": 1}  # the test's smoke run
STATISTICS_BATCHES, TINY_STATISTICS_BATCHES = 16, 2  # batches counted into the context statistics before timing


def measure(size: Size, cli: argparse.Namespace, freeze_tower: bool) -> dict:
    """Vanilla and the default training configuration side by side at one size, the vision tower frozen or not."""
    generator = torch.Generator().manual_seed(cli.seed)

    def batches(count: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(cli.device) for k, v in make_batch(size, generator).items()} for _ in range(count)]

    runners = [
        Runner("vanilla", size, cli.device, freeze_tower=freeze_tower, method="vanilla"),
        Runner("default", size, cli.device, freeze_tower=freeze_tower),
    ]
    statistics_batches, warmup, timed = batches(cli.statistics_batches), batches(cli.warmup), batches(cli.steps)
    for runner in runners:
        runner.fill_context_statistics(statistics_batches)
        for batch in warmup:
            runner.train_step(batch)
    raw = {
        runner.name: {
            "train": runner.count("train_step", timed[0]),
            "inference": runner.count("infer", timed[0]),
            **runner.profile_train_step(timed[0]),
            "host_syncs": runner.count_host_syncs(timed[0]) if cli.device == "cuda" else None,
        }
        for runner in runners
    }
    train = time_interleaved(runners, "train_step", timed)
    inference = time_interleaved(runners, "infer", timed)
    result = {
        "text_tokens": size.text_tokens,
        "train_step": compare(train, "default", "vanilla"),
        "inference": compare(inference, "default", "vanilla"),
    }
    for name, counts in raw.items():
        result[name] = {
            "train_step_ms": 1e3 * statistics.median(train[name]),
            "inference_ms": 1e3 * statistics.median(inference[name]),
            "peak_memory_mb": counts["peak_bytes"] / 2**20,
            "step_memory_mb": counts["step_bytes"] / 2**20,
            "train_step_gflops": counts["flops"] / 1e9,
            "lm_calls": [(call.rows, call.length) for call in counts["train"].lm_calls],
            "lm_tokens": counts["train"].lm_tokens,
            "images": counts["train"].images,
            "inference_lm_tokens": counts["inference"].lm_tokens,
            "inference_images": counts["inference"].images,
            "host_syncs": counts["host_syncs"],
        }
    default, vanilla = raw["default"], raw["vanilla"]
    return {
        "train_step_ratio": result["train_step"]["ratio"],
        "inference_ratio": result["inference"]["ratio"],
        "peak_memory_ratio": default["peak_bytes"] / vanilla["peak_bytes"],
        "step_memory_ratio": default["step_bytes"] / vanilla["step_bytes"],
        "train_flop_ratio": default["flops"] / vanilla["flops"],
        "lm_token_ratio": default["train"].lm_tokens / vanilla["train"].lm_tokens,
        "image_ratio": default["train"].images / vanilla["train"].images,
        **result,
    }


def markdown(report: dict) -> str:
    """One table per configuration (the headline first): default / vanilla at each size, with the counts behind it."""
    setup = report["setup"]
    lines = []
    for name, title in CONFIGURATIONS.items():
        lines += [
            f"{title} ({setup['date']}, {setup['device']}, {setup['clock']}, median of {setup['steps']} steps; "
            f"targets: train step <= {TARGETS['train_step_ratio']}, inference <= {TARGETS['inference_ratio']}, "
            f"peak memory <= {TARGETS['peak_memory_ratio']})",
            "",
            *size_table(report[name]),
            "",
        ]
    if setup["device"] != "CPU":
        syncs = ", ".join(
            f"{n}: {r['vanilla']['host_syncs']} -> {r['default']['host_syncs']}" for n, r in report["default"].items()
        )
        lines += [f"Host syncs per training step (vanilla -> default): {syncs}", ""]
    return "\n".join(lines)


def size_table(results: dict) -> list[str]:
    lines = [
        "| batch x (image + text tokens) | vanilla step ms | default step ms | **train step** | **inference** "
        "| **peak memory** | step memory | FLOPs | LM tokens per step | vision-tower images per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        batch, tokens = name.split("x")
        v, d = r["vanilla"], r["default"]
        lines.append(
            f"| {batch} x ({tokens} + {r['text_tokens']}) | {v['train_step_ms']:.0f} | {d['train_step_ms']:.0f} "
            f"| **{r['train_step_ratio']:.2f}** | **{r['inference_ratio']:.2f}** | **{r['peak_memory_ratio']:.2f}** "
            f"| {r['step_memory_ratio']:.2f} | {r['train_flop_ratio']:.2f} "
            f"| {v['lm_tokens']} -> {d['lm_tokens']} ({r['lm_token_ratio']:.2f}x) "
            f"| {v['images']} -> {d['images']} ({r['image_ratio']:.2f}x) |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where speed.json and speed.md are written")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 autocast")
    parser.add_argument("--sizes", default=None, help=f"comma-separated BxN (N a square), default {FULL['sizes']}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="one small size, 2 steps: a smoke run for the tests")
    cli = parser.parse_args(argv)
    for name, value in (TINY if cli.tiny else FULL).items():
        if getattr(cli, name) is None:
            setattr(cli, name, value)
    cli.statistics_batches = TINY_STATISTICS_BATCHES if cli.tiny else STATISTICS_BATCHES
    return cli


def main(argv: list[str] | None = None) -> dict:
    """Measure every size, write `speed.json` and `speed.md`, print the table; returns the report."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    report = {
        **{name: {} for name in CONFIGURATIONS},
        "setup": {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if cli.device == "cuda" else "CPU",
            "clock": "wall time, bf16 autocast" if cli.device == "cuda" else f"CPU time, torch threads {cli.threads}",
            "steps": cli.steps,
            "warmup": cli.warmup,
            "torch": torch.__version__,
            "targets": TARGETS,
        },
    }
    for name in CONFIGURATIONS:
        for size in parse_sizes(cli.sizes):
            print(f"measuring {name} {size.name} (+{size.text_tokens} text tokens)", flush=True)
            report[name][size.name] = measure(size, cli, freeze_tower=name == "default")
    output = Path(cli.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (output / "speed.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
