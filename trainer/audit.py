"""The context audit: what the counterfactual rows treat as each item's context, so that a user can check what
the method removes before trusting the debiased model.

[`context_report`] reads the model's context statistics and a sample of training items: the tokens treated as
context (with their per-class counts, how far they point at one class and how much they move with the image core),
the strong tokens kept as core because they move with the image, the declared and protected ones, and the share of
rows, tokens and pixels treated as context. [`plot_context_report`] draws it, with a few items' image context over
their images. [`ContextAuditCallback`] writes both (`context_report.json`, `context_report.png` in the output dir)
after cfmoe's bias-only warm-up and at the end of training.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from cfmoe.modeling_cfmoe.configuration_cfmoe import ContextConfig, WithoutCoreEvidence
from cfmoe.modeling_cfmoe.context import LEAK_SHARE, MIN_CORE_SEPARATION, SIGNIFICANCE

logger = logging.getLogger(__name__)

REPORT_FILE, FIGURE_FILE = "context_report.json", "context_report.png"
TOP_TOKENS = 25  # tokens listed per status
SAMPLE_ITEMS = 256  # training items whose context is measured
SHOWN_ITEMS = 6  # items drawn in the figure


def _token_entry(tokenizer, statistics, index: int, values: dict[str, torch.Tensor], rule: str) -> dict[str, Any]:
    counts = statistics.token_counts[index].tolist()
    return {
        "token": tokenizer.convert_ids_to_tokens(index),
        "text": tokenizer.decode([index]),
        "items_per_class": counts,
        "items": int(sum(counts)),
        **{name: round(float(value[index]), 4) for name, value in values.items()},
        "rule": rule,
    }


# what decided a strong token (one pointing at one class), in the order the rules apply
RULES = {
    "declared": "declared context",
    "protected": "protected word",
    "dependent": "moves with the image core: core",
    "blind": "blind to the image core: context",
    "leak_form": "leak-prone form, no image-core evidence: context",
    "plain": "plain word, no image-core evidence: kept as core (context only where written as a hashtag or mention)",
    "strength": "strength alone, no image-core test: context",
}


def token_rules(context: ContextConfig, statistics, ids: torch.Tensor, values: dict[str, torch.Tensor]) -> list[str]:
    """The `RULES` key that decides each token of `ids` (strong or not): declared, protected, the image-core test's
    verdict where it has power, else the form prior (`context_without_core_evidence="leak_forms"`) or strength."""
    tested = context.core_dependence_threshold is not None
    power = bool(statistics.core_test_power()) and tested
    prior = tested and context.context_without_core_evidence == WithoutCoreEvidence.LEAK_FORMS
    dependent = (values["dependence"] >= (context.core_dependence_threshold or 0)) & (
        values["dependence_p_value"] < SIGNIFICANCE
    )
    leak = values["leak_share"] >= LEAK_SHARE
    declared, protected = statistics.flag("declared_token", ids), statistics.flag("protected_token", ids)
    rules = []
    for index in range(len(ids)):
        if declared[index]:
            rules.append("declared")
        elif protected[index]:
            rules.append("protected")
        elif power:
            rules.append("dependent" if dependent[index] else "blind")
        elif prior:
            rules.append("leak_form" if leak[index] else "plain")
        else:
            rules.append("strength")
    return rules


@torch.no_grad()
def token_audit(model, tokenizer, top: int = TOP_TOKENS) -> dict[str, list[dict[str, Any]]]:
    """The vocabulary as the context statistics see it: per status (`context`; `kept_as_core`: pointing at one
    class but kept, because they move with the image core or, where the image cannot tell, because they are plain
    words; `declared`, `protected`) the `top` tokens by determination, each with its items per class,
    determination, dependence, share of leak-prone uses, strength and the rule that decided it (`RULES`)."""
    context, statistics = model.config.context_config, model.rows.statistics
    seen = statistics.token_counts.sum(-1) > 0
    ids = torch.arange(statistics.token_counts.shape[0], device=seen.device)
    declared, protected = statistics.flag("declared_token", ids), statistics.flag("protected_token", ids)
    effect, p_value = statistics.token_dependence(ids)
    values = {
        "determination": statistics.token_determination(ids),
        "dependence": effect,
        "dependence_p_value": p_value,
        "leak_share": statistics.leak_share(ids),
        "strength": statistics.token_strength(
            ids, context.core_dependence_threshold, context.context_without_core_evidence
        ),
    }
    strong = values["determination"] >= context.text_context_threshold
    discovered = strong if context.discover_text_context else torch.zeros_like(strong)
    masks = {
        "context": seen & (values["strength"] >= context.text_context_threshold) & ~declared,
        "kept_as_core": seen & discovered & (values["strength"] < context.text_context_threshold) & ~protected,
        "declared": seen & declared,
        "protected": seen & protected,
    }
    if not context.discover_text_context:
        masks["context"] = torch.zeros_like(seen)
    result = {}
    for status, mask in masks.items():
        chosen = ids[mask]
        chosen = chosen[values["determination"][chosen].argsort(descending=True)[:top]]
        rules = token_rules(context, statistics, chosen, {k: v[chosen] for k, v in values.items()})
        entries = zip(chosen.tolist(), rules, strict=True)
        result[status] = [_token_entry(tokenizer, statistics, i, values, RULES[rule]) for i, rule in entries]
    return result


def core_test(model) -> dict[str, Any]:
    """Whether the image core could test tokens (`ContextStatistics.core_test_power`), its numbers, and in words
    what decided instead where it could not."""
    context, statistics = model.config.context_config, model.rows.statistics
    power = context.core_dependence_threshold is not None and bool(statistics.core_test_power())
    if power:
        decides = "the image core: a strong token that moves with it is core, one blind to it is context"
    elif context.core_dependence_threshold is None:
        decides = "strength alone (core_dependence_threshold is None): every token that points at one class"
    elif context.context_without_core_evidence == WithoutCoreEvidence.LEAK_FORMS:
        decides = (
            "no image evidence (the images do not tell the classes apart, e.g. one placeholder image): only tokens "
            "of leak-prone forms (hashtags, mentions, URLs, emoji, placeholders, whitespace artefacts) that point at "
            "one class are context; plain words are kept. Declare others with declared_text_context"
        )
    else:
        decides = "no image evidence, strength alone (context_without_core_evidence='strength')"
    return {
        "has_power": power,
        "max_separation": round(float(statistics.core_separation().max()), 3),
        "min_separation_needed": MIN_CORE_SEPARATION,
        "p_value": float(statistics.core_p_value()),
        "decides": decides,
    }


@torch.no_grad()
def sample_audit(model, batches: list[dict[str, torch.Tensor]], tokenizer) -> dict[str, Any]:
    """Over collated training `batches`: the share of rows with any text context, of text tokens and of image
    pixels treated as context, and a few items (`SHOWN_ITEMS`) with their text (context words in brackets) and
    their image context mask."""
    rows_with, text_tokens, context_tokens, pixel_shares, shown = 0, 0, 0, [], []
    image_token = model.config.base_config.image_token_id
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        text, pixels = model.rows.find_context(ids, mask, batch.get("pixel_values"))
        words = mask & (ids != image_token)
        rows_with += int(text.any(1).sum())
        text_tokens += int(words.sum())
        context_tokens += int(text.sum())
        if pixels is not None:
            pixel_shares.append(pixels.float().flatten(1).mean(1))
        for row in range(ids.shape[0]):
            if len(shown) >= SHOWN_ITEMS:
                break
            pieces = [
                f"[{tokenizer.decode([int(t)])}]" if is_context else tokenizer.decode([int(t)])
                for t, keep, is_context in zip(ids[row], words[row], text[row], strict=True)
                if keep
            ]
            item: dict[str, Any] = {"text": " ".join(piece.strip() for piece in pieces)}
            if pixels is not None:
                item["image"] = batch["pixel_values"][row].float().cpu()
                item["image_context"] = pixels[row].cpu()
            shown.append(item)
    items = sum(len(batch["input_ids"]) for batch in batches)
    return {
        "items": items,
        "rows_with_text_context": rows_with / max(items, 1),
        "text_tokens_as_context": context_tokens / max(text_tokens, 1),
        "pixels_as_context": float(torch.cat(pixel_shares).mean()) if pixel_shares else None,
        "shown": shown,
    }


def context_report(model, tokenizer, batches: list[dict[str, torch.Tensor]], stage: str) -> dict[str, Any]:
    """The audit of `model` now (`stage`: when it was taken) on training `batches`: the JSON-ready report, and
    under `"shown"` a few items with their tensors (for the figure; not written to JSON)."""
    context, statistics = model.config.context_config, model.rows.statistics
    return {
        "stage": stage,
        "items_counted": int(statistics.class_counts.sum()),
        "items_with_image_core_features": int(statistics.core_feature_counts.sum()),
        "image_core_separation": statistics.core_separation().round(decimals=3).tolist(),
        "local_pixel_evidence_p_value": float(statistics.local_p_value()),
        "colour_evidence_p_value": float(statistics.colour_p_value()),
        "core_test": core_test(model),
        "image_context": {
            "colour": context.discover_image_context and bool(statistics.colour_p_value() < SIGNIFICANCE),
            "pixels": context.discover_image_context and bool(statistics.local_p_value() < SIGNIFICANCE),
            "declared_regions": len(context.declared_image_context),
        },
        "settings": {name: value for name, value in context.to_dict().items() if name != "context_covariance_pixels"},
        "tokens": token_audit(model, tokenizer),
        **sample_audit(model, batches, tokenizer),
    }


def plot_context_report(
    report: dict[str, Any], path: str | Path, pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None
) -> Path:
    """Writes [`context_figure`] to `path` (`context_report.png`)."""
    fig = context_figure(report, pixel_stats)
    import matplotlib.pyplot as plt  # set up headless by context_figure

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def context_figure(report: dict[str, Any], pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None):
    """Left: the strongest context tokens and the strong tokens kept as core, their determination and dependence on
    the image core; the title says which of the two exist and whether the image core could test tokens. Right: a
    few training items' images in their own colours (un-normalised with the processor's `pixel_stats`, mean and std
    per channel; else drawn over a fixed range), their image context in red, their text (context words in brackets)
    wrapped above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [item for item in report["shown"] if "image" in item]
    columns = max(1, min(3, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    fig = plt.figure(figsize=(7 + 3.6 * columns, max(5.0, 4.2 * rows)), layout="constrained")
    grid = fig.add_gridspec(rows, 1 + columns, width_ratios=[2] + [1] * columns)
    bars = fig.add_subplot(grid[:, 0])
    context = report["tokens"]["context"][:15]
    core = report["tokens"]["kept_as_core"][:10]
    entries = [("context", e) for e in context] + [("core", e) for e in core]
    if entries:
        labels = [f"{e['text'].strip() or e['token']} ({status})" for status, e in entries]
        positions = np.arange(len(entries))
        bars.barh(positions - 0.2, [e["determination"] for _, e in entries], 0.4, label="determination")
        bars.barh(positions + 0.2, [e["dependence"] for _, e in entries], 0.4, label="dependence on image core")
        bars.set_yticks(positions, labels, fontsize=9)
        bars.invert_yaxis()
        bars.legend(fontsize=9, loc="lower right")
    else:
        bars.text(0.5, 0.5, "no token passed the context thresholds", ha="center", fontsize=10)
        bars.set_axis_off()
    parts = [f"{len(context)} strongest context" if context else "no context token"]
    parts.append(f"{len(core)} strongest kept as core" if core else "no strong token kept as core")
    if "core_test" in report:
        parts.append("image core tested them" if report["core_test"]["has_power"] else "no image-core evidence")
    bars.set_title(textwrap.fill(f"tokens ({report['stage']}): " + ", ".join(parts), 80), fontsize=11)
    for index, item in enumerate(shown):
        ax = fig.add_subplot(grid[index // columns, 1 + index % columns])
        picture = _picture(item["image"], pixel_stats)
        mask = item["image_context"].reshape(-1, *item["image_context"].shape[-2:])[0].numpy()
        picture[mask] = 0.5 * picture[mask] + 0.5 * np.array([1.0, 0.0, 0.0])
        ax.imshow(picture, vmin=0.0, vmax=1.0)
        ax.set_title(textwrap.fill(textwrap.shorten(item["text"], 120, placeholder=" ..."), 34), fontsize=9)
        ax.axis("off")
    return fig


def _picture(image: torch.Tensor, pixel_stats: tuple[Sequence[float], Sequence[float]] | None) -> np.ndarray:
    """An item's first image (height, width, RGB) in [0, 1]: its normalised pixels times std plus mean, or, without
    the stats, mapped from [-2, 2] (about the range of CLIP-normalised pixels): never stretched per image, so that
    a grey placeholder stays one flat colour."""
    image = image.reshape(-1, *image.shape[-3:])[0].float()
    if pixel_stats is not None:
        mean, std = (torch.tensor(values, dtype=torch.float32).view(-1, 1, 1) for values in pixel_stats)
        image = image * std + mean
    else:
        image = (image + 2) / 4
    return image.clamp(0, 1).permute(1, 2, 0).numpy().copy()


def write_context_report(
    model,
    tokenizer,
    batches,
    output_dir: str | Path,
    stage: str,
    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Add the audit at `stage` to `output_dir/context_report.json` (one entry per stage) and draw it to
    `context_report.png` (images un-normalised with the processor's `pixel_stats`, mean and std); returns the
    JSON-ready report."""
    report = context_report(model, tokenizer, batches, stage)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plot_context_report(report, output / FIGURE_FILE, pixel_stats)
    report["shown"] = [{"text": item["text"]} for item in report["shown"]]
    path = output / REPORT_FILE
    stages = json.loads(path.read_text()) if path.is_file() else {}
    stages[stage] = report
    path.write_text(json.dumps(stages, indent=2) + "\n")
    top = ", ".join(entry["text"].strip() or entry["token"] for entry in report["tokens"]["context"][:8])
    logger.info(
        "context audit (%s): %.0f%% of rows have text context, %.1f%% of text tokens; strongest: %s. Decided by %s",
        stage,
        100 * report["rows_with_text_context"],
        100 * report["text_tokens_as_context"],
        top or "none",
        report["core_test"]["decides"],
    )
    return report


def read_context_report(output_dir: str | Path) -> dict[str, Any] | None:
    """The latest stage of `output_dir/context_report.json` (the end of training when written), or None."""
    path = Path(output_dir) / REPORT_FILE
    if not path.is_file():
        return None
    stages = json.loads(path.read_text())
    return stages.get("end") or next(reversed(stages.values()), None)


class ContextAuditCallback(TrainerCallback):
    """Writes the context audit after cfmoe's bias-only warm-up and at the end of training (`trainer` is the
    [`CFMoETrainer`]; the sample is the first `SAMPLE_ITEMS` training items)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def _audit(self, stage: str) -> None:
        trainer = self.trainer
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        if not trainer.is_world_process_zero():
            return
        if tokenizer is None:
            logger.warning("no context audit (%s): the trainer has no processing_class to read tokens with", stage)
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        dataset = trainer.train_dataset
        sample = dataset.select(range(min(SAMPLE_ITEMS, len(dataset))))
        size = trainer.args.per_device_eval_batch_size
        device = next(model.parameters()).device
        batches = []
        collator = trainer.data_collator
        with collator.uncounted() if hasattr(collator, "uncounted") else nullcontext():  # training counted them
            for begin in range(0, len(sample), size):
                batch = collator([sample[i] for i in range(begin, min(begin + size, len(sample)))])
                batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        images = getattr(trainer.processing_class, "image_processor", None)
        pixel_stats = (images.image_mean, images.image_std) if getattr(images, "image_mean", None) else None
        training = model.training
        model.eval()
        try:
            write_context_report(model, tokenizer, batches, trainer.args.output_dir, stage, pixel_stats)
        finally:
            model.train(training)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        step = state.global_step
        warmup = trainer.method.in_bias_only_warmup
        if step > 0 and warmup(state, step - 1) and not warmup(state, step):
            self._audit("after_warmup")

    def on_train_end(self, args, state, control, **kwargs):
        self._audit("end")
