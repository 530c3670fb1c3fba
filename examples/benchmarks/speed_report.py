"""What `examples/benchmark_speed.py` writes: one size's entry of `speed.json` from the two runners' counts and clocks
(`size_result`), and `speed.md`'s tables per section (`markdown`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from benchmarks.speed import CONTEXT_CALLS, compare

PARTS = ("vision_tower", "language_model", *CONTEXT_CALLS, "rest")  # the FLOP shares of a step


def size_result(
    counts: Mapping[str, dict],
    train: Mapping[str, list[float]],
    inference: Mapping[str, list[float]],
    text_tokens: int,
    parameters_m: dict[str, float],
) -> dict:
    """One size's entry: `default`'s ratios to `vanilla` (times: of the medians; memory, FLOPs, LM tokens and images
    of a training step; the LM : tower forward FLOPs of vanilla's inference), then each configuration's entry.

    counts: per configuration, `benchmarks.speed.probe` of a timed batch; train, inference: per configuration, the
    seconds of each timed batch (`benchmarks.speed.time_interleaved`); parameters_m: `benchmarks.speed.parameters`.
    """
    default, vanilla = counts["default"], counts["vanilla"]
    train_step, inference_step = compare(train, "default", "vanilla"), compare(inference, "default", "vanilla")
    forward = vanilla["inference_flops"]
    return {
        "train_step_ratio": train_step["ratio"],
        "inference_ratio": inference_step["ratio"],
        "peak_memory_ratio": default["peak_bytes"] / vanilla["peak_bytes"],
        "step_memory_ratio": default["step_bytes"] / vanilla["step_bytes"],
        "train_flop_ratio": default["flops"] / vanilla["flops"],
        "lm_token_ratio": default["train"].lm_tokens / vanilla["train"].lm_tokens,
        "image_ratio": default["train"].images / vanilla["train"].images,
        "lm_to_tower_forward": forward["language_model"] / forward["vision_tower"],
        "text_tokens": text_tokens,
        "parameters_m": parameters_m,
        "train_step": train_step,
        "inference": inference_step,
        **{name: configuration_result(c, train[name], inference[name]) for name, c in counts.items()},
    }


def configuration_result(counts: dict, train: list[float], inference: list[float]) -> dict:
    """One configuration at one size: median milliseconds of a training step and an inference (`train`,
    `inference`: seconds per batch), memory in MiB, FLOPs by part (`PARTS`), the context calls' milliseconds, the
    language-model calls, tokens and vision-tower images of a step and an inference, host syncs."""
    flops, inference_flops = counts["train_flops"], counts["inference_flops"]
    return {
        "train_step_ms": 1e3 * statistics.median(train),
        "inference_ms": 1e3 * statistics.median(inference),
        "peak_memory_mb": counts["peak_bytes"] / 2**20,
        "step_memory_mb": counts["step_bytes"] / 2**20,
        "train_step_gflops": counts["flops"] / 1e9,
        "flop_shares": {part: flops[part] / flops["total"] for part in PARTS},
        "gflops": {part: flops[part] / 1e9 for part in (*PARTS, "total")},
        "inference_gflops": {part: inference_flops[part] / 1e9 for part in (*PARTS, "total")},
        "context_ms": {part: 1e3 * seconds for part, seconds in counts["context_seconds"].items()},
        "lm_calls": [(call.rows, call.length) for call in counts["train"].lm_calls],
        "lm_tokens": counts["train"].lm_tokens,
        "images": counts["train"].images,
        "inference_lm_tokens": counts["inference"].lm_tokens,
        "inference_images": counts["inference"].images,
        "host_syncs": counts["host_syncs"],
    }


def markdown(report: dict, titles: Mapping[str, str]) -> str:
    """Per section of `report` (`titles`: section -> title, the headline first): default / vanilla at each size,
    with the counts behind it, and the FLOPs of a step by part next to the measured times."""
    setup = report["setup"]
    targets, lines = setup["targets"], []
    for name, title in titles.items():
        lines += [
            f"{title} ({setup['date']}, {setup['device']}, {setup['clock']}, median of {setup['steps']} steps; "
            f"targets: train step <= {targets['train_step_ratio']}, inference <= {targets['inference_ratio']}, "
            f"peak memory <= {targets['peak_memory_ratio']})",
            "",
            *size_table(report[name]),
            "",
            "FLOPs of one training step by part (torch's FLOP formulas: matmuls, convolutions, attention; forward + "
            "backward), the clock over the context calls of one step, and the language model's forward FLOPs per "
            "vision-tower forward FLOP in an inference (LLaVA-1.5-7B's dimensions: "
            f"{setup['llava_7b_lm_to_tower_forward']:.1f})",
            "",
            *flop_table(report[name]),
            "",
        ]
        if setup["device"] != "CPU":
            syncs = ", ".join(
                f"{n}: {r['vanilla']['host_syncs']} -> {r['default']['host_syncs']}" for n, r in report[name].items()
            )
            lines += [f"Host syncs per training step (vanilla -> default): {syncs}", ""]
    return "\n".join(lines)


def memory(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def size_table(results: dict) -> list[str]:
    """One row per size: step times, the ratios, memory, FLOPs, LM tokens and vision-tower images."""
    lines = [
        "| batch x (image + text tokens) | vanilla step ms | default step ms | **train step** | **inference** "
        "| **peak memory** | peak memory (vanilla -> default) | step memory | FLOPs | LM tokens per step "
        "| vision-tower images per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        batch, tokens = name.split("x")
        v, d = r["vanilla"], r["default"]
        lines.append(
            f"| {batch} x ({tokens} + {r['text_tokens']}) | {v['train_step_ms']:.0f} | {d['train_step_ms']:.0f} "
            f"| **{r['train_step_ratio']:.2f}** | **{r['inference_ratio']:.2f}** | **{r['peak_memory_ratio']:.2f}** "
            f"| {memory(v['peak_memory_mb'])} -> {memory(d['peak_memory_mb'])} "
            f"| {r['step_memory_ratio']:.2f} | {r['train_flop_ratio']:.2f} "
            f"| {v['lm_tokens']} -> {d['lm_tokens']} ({r['lm_token_ratio']:.2f}x) "
            f"| {v['images']} -> {d['images']} ({r['image_ratio']:.2f}x) |"
        )
    return lines


def flop_table(results: dict) -> list[str]:
    """One row per size and configuration: step time, GFLOPs and their shares by part, the context calls' times."""
    lines = [
        "| batch x (image + text tokens) | configuration | step ms | GFLOPs | vision tower | language model "
        "| context statistics | context strength | rest | statistics ms | strength ms | LM : tower forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        batch, tokens = name.split("x")
        for configuration in ("vanilla", "default"):
            c = r[configuration]
            shares = " | ".join(f"{c['flop_shares'][part]:.3f}" for part in PARTS)
            lines.append(
                f"| {batch} x ({tokens} + {r['text_tokens']}) | {configuration} | {c['train_step_ms']:.0f} "
                f"| {c['gflops']['total']:.3g} | {shares} | {c['context_ms']['context_statistics']:.1f} "
                f"| {c['context_ms']['context_strength']:.1f} | {r['lm_to_tower_forward']:.1f} |"
            )
    return lines
