#!/usr/bin/env python
"""Cost of the default training configuration against `vanilla` fine-tuning: train step, inference, peak memory.

    python examples/benchmark_speed.py --output_dir out/speed                  # CPU, 1 thread, four sizes
    python examples/benchmark_speed.py --output_dir out/speed --device cuda    # GPU, bf16 autocast
    python examples/benchmark_speed.py --output_dir out/speed --tiny           # seconds: the test's smoke run
    python examples/benchmark_speed.py --output_dir out/speed_llava --shape llava         # CPU, 1 thread, ~2 min
    python examples/benchmark_speed.py --output_dir out/speed_llava --shape llava --tiny  # the test's smoke run
    python examples/benchmark_speed.py --output_dir out/speed_7b --shape llava-7b --device cuda  # H200, 10 steps

Shapes (`benchmarks.shapes`, random weights): `tiny` (default), the tiny LLaVA of `cfmoe.trainer.data.tiny`, the
vision tower as large as the language model, images enlarged to the size's patch grid; `llava`, a LLaVA with
LLaVA-1.5-7B's proportions on one CPU thread (Llama decoder 256 x 5 layers, CLIP tower 64 x 2 layers, patch 14 at
336 x 336 pixels: 576 image tokens, the tower's forward FLOPs 1 : 21.6 of the decoder's, as LLaVA-1.5-7B's 1 : 22);
`llava-7b`, LLaVA-1.5-7B's dimensions (Llama-2-7B, CLIP ViT-L/14-336) in bf16, CUDA only, the language model
fully fine-tuned or with LoRA as `--use_lora True` trains it. Both configurations train the same model (same weights,
same batches) through `CFMoETrainer.training_step`, gradient clipping and the trainer's AdamW: `vanilla` with
`CFMoETrainingArguments(method="vanilla")`, the default with `CFMoETrainingArguments()` (`method="cfmoe"`, what
`examples/run_sarcasm.py` trains), past its bias-only warm-up (`debias_warmup_ratio=0`) so that it builds its
counterfactual rows. The batches carry the synthetic benchmark's cues (a class hashtag, a class tint), and the
context statistics are filled first, as the warm-up leaves them. Tiny shape: two configurations, `default` (the
headline) with the vision tower frozen for both, as `run_sarcasm.py` fine-tunes a checkpoint and as the README's
main job runs, and `trained_tower`, the tower trained for both, as the tiny from-scratch recipe does. The LLaVA
shapes: the tower frozen.

Per size `BxN` (B items, N image tokens, about N / 10 text tokens: 58 at 576, a tweet): after warm-up steps,
`--steps` fresh batches run through both configurations back to back (the order alternating); the ratios are of
the medians. The clock is the process CPU time with 1 thread on CPU, the wall time on CUDA. Peak memory: see
`benchmarks.speed.Runner.profile_train_step`. Forward hooks count the LM tokens (rows x length of every
language-model call) and vision-tower images of a step; on CUDA its host syncs are counted too. FLOPs of one
training step by part (`benchmarks.speed.Runner.flops`, forward + backward): vision tower, language model, the
context statistics' update and the context strength, the rest; and the tower : LM ratio of an inference forward.
Writes `speed.json` (`{"default": {"BxN": {"train_step_ratio", "inference_ratio", "peak_memory_ratio", ...,
"vanilla": {..., "flop_shares", "gflops"}, "default": {...}}}, "trained_tower": {...}, "setup": {...}}`; with
`--shape llava` the section `llava_shape`, with `--shape llava-7b` `llava_7b_full` and `llava_7b_lora`) and
`speed.md` (both laid out by `benchmarks.speed_report`), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
from pathlib import Path

import torch

from benchmarks.shapes import LLAVA_SIZE, SHAPES, Size, parse_sizes
from benchmarks.speed import Runner, lm_to_tower_forward, make_batch, parameters, probe, time_interleaved
from benchmarks.speed_report import markdown, size_result

# per --shape, speed.json's sections: title, Runner options. The headline first: the vision tower frozen, as the
# llava recipe and the README's main job train; then the tiny from-scratch recipe, which trains the tower
SECTIONS = {
    "tiny": {
        "default": ("Default training configuration / vanilla, vision tower frozen", {}),
        "trained_tower": (
            "Default training configuration / vanilla, vision tower trained (the tiny from-scratch recipe)",
            {"freeze_tower": False},
        ),
    },
    "llava": {
        "llava_shape": (
            "Default training configuration / vanilla, LLaVA-1.5-7B's proportions (Llama 256 x 5 layers, "
            "CLIP 64 x 2 layers, 336 px, patch 14), vision tower frozen",
            {},
        ),
    },
    # llava-7b: LoRA first (2 x 14 GB of weights), written before the full fine-tuning (2 runners: about 110 GB) runs
    "llava-7b": {
        "llava_7b_lora": (
            "Default training configuration / vanilla, LLaVA-1.5-7B's dimensions (random weights, bf16), LoRA "
            "(rank 16) on the language model's attention and MLP projections, experts, heads and projector trained "
            "in full, "
            "vision tower frozen",
            {"lora": True},
        ),
        "llava_7b_full": (
            "Default training configuration / vanilla, LLaVA-1.5-7B's dimensions (random weights, bf16), "
            "language model fully fine-tuned, vision tower frozen",
            {},
        ),
    },
}
# per --shape: the tiny model's tower is as large as its language model; LLaVA-1.5's is a 1 : 22 share of it
LLAVA_TARGETS = {"train_step_ratio": 1.15, "inference_ratio": 1.02, "peak_memory_ratio": 1.15}
TARGETS = {
    "tiny": {"train_step_ratio": 1.3, "inference_ratio": 1.05, "peak_memory_ratio": 1.2},
    "llava": LLAVA_TARGETS,
    "llava-7b": LLAVA_TARGETS,
}
RUNS = {  # per --shape: the full run, the --tiny smoke run (the tests')
    "tiny": ({"sizes": "8x64,8x144,8x256,4x576", "steps": 20, "warmup": 3}, {"sizes": "2x16", "steps": 2, "warmup": 1}),
    "llava": ({"sizes": "4x576", "steps": 20, "warmup": 3}, {"sizes": "2x576", "steps": 2, "warmup": 1}),
    "llava-7b": ({"sizes": "4x576", "steps": 10, "warmup": 2}, {"sizes": "4x576", "steps": 2, "warmup": 1}),
}
STATISTICS_BATCHES, TINY_STATISTICS_BATCHES = 16, 2  # batches counted into the context statistics before timing


def measure(size: Size, cli: argparse.Namespace, freeze_tower: bool = True, lora: bool = False) -> dict:
    """Vanilla and the default training configuration side by side at one size of `cli.shape`, the vision tower
    frozen or not, the language model fully trained or with LoRA."""
    generator = torch.Generator().manual_seed(cli.seed)

    def batches(count: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(cli.device) for k, v in make_batch(size, generator).items()} for _ in range(count)]

    options = {"freeze_tower": freeze_tower, "shape": cli.shape, "lora": lora, "dtype": SHAPES[cli.shape].dtype}
    runners = [
        Runner("vanilla", size, cli.device, cli.seed, method="vanilla", **options),
        Runner("default", size, cli.device, cli.seed, **options),
    ]
    statistics_batches, warmup, timed = batches(cli.statistics_batches), batches(cli.warmup), batches(cli.steps)
    for runner in runners:
        runner.fill_context_statistics(statistics_batches)
        for batch in warmup:
            runner.train_step(batch)
    counts = {runner.name: probe(runner, timed[0]) for runner in runners}
    train = time_interleaved(runners, "train_step", timed)
    inference = time_interleaved(runners, "infer", timed)
    return size_result(counts, train, inference, size.text_tokens, parameters(runners[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where speed.json and speed.md are written")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 autocast")
    parser.add_argument("--shape", choices=SHAPES, default="tiny", help="the model (benchmarks.shapes)")
    parser.add_argument("--sizes", default=None, help="comma-separated BxN (N a square), default per shape")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="one small size, 2 steps: a smoke run for the tests")
    cli = parser.parse_args(argv)
    if cli.shape == "llava-7b" and cli.device != "cuda":
        parser.error("--shape llava-7b needs --device cuda (LLaVA-1.5-7B's dimensions, bf16)")
    full, tiny = RUNS[cli.shape]
    for name, value in (tiny if cli.tiny else full).items():
        if getattr(cli, name) is None:
            setattr(cli, name, value)
    cli.statistics_batches = TINY_STATISTICS_BATCHES if cli.tiny else STATISTICS_BATCHES
    return cli


def main(argv: list[str] | None = None) -> dict:
    """Measure every section and size, write `speed.json` and `speed.md`, print the tables; returns the report."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    sizes = parse_sizes(cli.sizes, SHAPES[cli.shape].patch_size)
    report = {
        **{name: {} for name in SECTIONS[cli.shape]},
        "setup": {
            "date": datetime.date.today().isoformat(),
            "shape": cli.shape,
            "device": torch.cuda.get_device_name() if cli.device == "cuda" else "CPU",
            "clock": "wall time, bf16 autocast" if cli.device == "cuda" else f"CPU time, torch threads {cli.threads}",
            "steps": cli.steps,
            "warmup": cli.warmup,
            "torch": torch.__version__,
            "targets": TARGETS[cli.shape],
            # the reference: LLaVA-1.5-7B's dimensions over 4 x (576 + 58) tokens, counted on the meta device
            "llava_7b_lm_to_tower_forward": lm_to_tower_forward("llava-7b", LLAVA_SIZE),
        },
    }
    output = Path(cli.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for name, (_, options) in SECTIONS[cli.shape].items():
        for size in sizes:
            print(f"measuring {name} {size.name} (+{size.text_tokens} text tokens)", flush=True)
            report[name][size.name] = measure(size, cli, **options)
            gc.collect()  # the runners' models before the next ones (llava-7b: 2 x 40 GB)
            if cli.device == "cuda":
                torch.cuda.empty_cache()
            (output / "speed.json").write_text(json.dumps(report, indent=2) + "\n")  # what is done so far
    table = markdown(report, {name: title for name, (title, _) in SECTIONS[cli.shape].items()})
    (output / "speed.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
