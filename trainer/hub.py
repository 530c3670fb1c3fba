"""Model card and Hub upload of a CF-MoE checkpoint folder.

`model.push_to_hub` would replace README.md with a generic card, so [`push_folder_to_hub`] uploads the folder
itself after [`complete_hub_folder`] has checked it and added what remote loading needs.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

import cfmoe.modeling_cfmoe as modeling_cfmoe
from cfmoe.modeling_cfmoe import CFMoEConfig
from cfmoe.modeling_cfmoe.pipeline_cfmoe import TASK, add_pipeline_entry

CARD_TAG = "cfmoe"
TAGS = ["multimodal", "debiasing", "mixture-of-experts", "counterfactual", "custom_code", CARD_TAG]
# every CF-MoE knob of the model config (the arguments of `CFMoEConfig`), read from one place
CONFIG_SETTINGS = tuple(
    name for name in inspect.signature(CFMoEConfig.__init__).parameters if name not in ("self", "base_config", "kwargs")
)
METRIC_ORDER = ("accuracy", "macro_f1", "binary_f1", "worst_group_accuracy", "cue_reliance")
# The Hub's pipeline tags have no classifier of (image, text) pairs (huggingface_hub keeps no list of them):
# image-text-to-text announces a generative VLM and the Hub's widget would chat with it; text- or
# image-classification would feed it one modality. "other" is the Hub's tag for a task no pipeline covers; the
# card's code loads our custom pipeline (task "multimodal-debiased-classification") with trust_remote_code.
PIPELINE_TAG = "other"
TINY_BASE = "the tiny offline LLaVA-architecture model of `cfmoe` (built locally from a config; not on the Hub)"
# never uploaded: intermediate checkpoints, TensorBoard logs, pickles (weights here are safetensors only)
IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "__pycache__/*"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
BIBTEX = """@inproceedings{wu2025beyond,
  title         = {Beyond Spurious Signals: Debiasing Multimodal Large Language Models via Counterfactual
                   Inference and Adaptive Expert Routing},
  author        = {Wu and Huang and Wu},
  booktitle     = {Findings of the Association for Computational Linguistics: EMNLP 2025},
  year          = {2025},
  eprint        = {2509.15361},
  archivePrefix = {arXiv}
}"""
LIMITATIONS = (
    "## Limitations\n\n"
    "- Sarcasm and sentiment data sets (MMSD, MMSD2.0, MVSA) are small, English, Twitter-derived and full "
    "of spurious cues (hashtags, emoji, image styles); a model trained on them inherits their gaps.\n"
    "- Debiasing removes what a single modality predicts on its own. It does not fix label noise, biases "
    "that only appear in the combination of text and image, cues absent from training, or annotator "
    "disagreement about what counts as sarcastic; out-of-distribution accuracy can still drop.\n"
    "- Results on the synthetic planted-cue benchmark show the mechanism at work on a tiny model; they are "
    "not MMSD2.0 (or any real data set) figures.\n"
    "- Not meant for decisions about people (moderation, profiling) without human review."
)


def method_settings_from_config(config) -> dict[str, Any]:
    """The CF-MoE settings of a model config worth a line in the card (experts, routing, counterfactuals)."""
    return {name: getattr(config, name) for name in CONFIG_SETTINGS if getattr(config, name, None) is not None}


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str | None,
    dataset_name: str,
    method_settings: Mapping[str, Any],
    eval_results: Mapping[str, Mapping[str, float]],
    routing_shares: Mapping[str, Any] | None = None,
    context_audit: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset_id: str | None = None,
    task: str = "sarcasm-detection",
    pipeline_tag: str = PIPELINE_TAG,
    license: str = "apache-2.0",
    synthetic: bool = False,
    kept_checkpoint: str | None = None,
    placeholder_image: str | None = None,
) -> ModelCard:
    """Writes `output_dir/README.md`: metadata (tags, base model, model-index of `eval_results`) and the body.

    eval_results: `{split: {metric: value}}`, e.g. `{"test_ood": {"accuracy": 0.81, "macro_f1": 0.8}}`.
    routing_shares: `{site: [share of expert 0, ...]}` or the trainer's logged `routing_<site>_expert_<i>` keys.
    context_audit: one stage of `context_report.json` (`cfmoe.trainer.audit`): what training treated as context.
    base_model: a Hub id; a local folder is named in the text only, and None means the tiny offline default.
    repo_id: the Hub id used in the card's loading example; model_name defaults to its last part.
    synthetic: the results come from the planted-cue benchmark; the card says so next to the numbers.
    kept_checkpoint: which checkpoint's weights the run kept, in words (`cfmoe.trainer.loading.kept_summary`).
    placeholder_image: the one image every item was given (no real image used); the card says so.
    """
    output_dir = Path(output_dir)
    base_text, base_model = _describe_base(base_model)
    model_name = model_name or (repo_id or str(output_dir.resolve())).rpartition("/")[2]
    task_name = f"Multimodal {task.replace('-', ' ')}"
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=[*TAGS, task],
        eval_results=_model_index(eval_results, pipeline_tag, task_name, dataset_name, dataset_id) or None,
    )
    sections = [
        _intro_section(model_name, base_text, task_name),
        _training_section(base_text, dataset_name, method_settings, placeholder_image, kept_checkpoint),
        _results_section(eval_results, dataset_name, synthetic, placeholder_image is not None),
        *([_routing_section(routing_shares)] if routing_shares else []),
        _intended_use_section(task_name),
        LIMITATIONS,
        *([_audit_section(context_audit)] if context_audit else []),
        _usage_section(repo_id or "REPO_ID"),
        f"## Citation\n\n```bibtex\n{BIBTEX}\n```",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return card


def _describe_base(base_model: str | None) -> tuple[str, str | None]:
    """(the base model in the card's words, its Hub id for the metadata): a local folder is named in the text only,
    None is the tiny offline default."""
    if base_model is not None and Path(base_model).expanduser().exists():
        return f"the local model `{base_model}` (a folder, not a Hub repo)", None
    return (f"`{base_model}`" if base_model else TINY_BASE), base_model


def _model_index(
    eval_results: Mapping[str, Mapping[str, float]],
    task_type: str,
    task_name: str,
    dataset_name: str,
    dataset_id: str | None,
) -> list[EvalResult]:
    """One `EvalResult` per finite `{split: {metric: value}}` entry (the Hub rejects NaN in model-index, e.g.
    worst-group with too few items); `dataset_id` defaults to a slug of `dataset_name`."""
    dataset_id = dataset_id or re.sub(r"[^a-z0-9]+", "-", dataset_name.lower()).strip("-")
    return [
        EvalResult(
            task_type=task_type,
            task_name=task_name,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric,
            metric_name=f"{_pretty(metric)} ({split})",
            metric_value=float(value),
        )
        for split, metrics in eval_results.items()
        for metric, value in metrics.items()
        if math.isfinite(value)
    ]


def _pretty(metric: str) -> str:
    return metric.replace("_", " ").capitalize().replace("f1", "F1")


def _intro_section(model_name: str, base_text: str, task_name: str) -> str:
    """The title and what the model is: the base wrapped by CF-MoE, and whose method it implements."""
    return (
        f"# {model_name}\n\n"
        f"A {task_name.lower()} classifier: {base_text} wrapped by CF-MoE, counterfactual debiasing with "
        "debiasing experts. Visual debiasing experts sit after the vision projector and language debiasing experts "
        "after the language model; text-only, image-only and prior branches estimate the direct effect of each "
        "modality. In training the fused head learns from context-swapped counterfactual rows: each item keeps its "
        "core and takes another item's context (the tokens and pixels that carry a shortcut), so that the context "
        "no longer follows the label. Inference is one forward pass.\n\n"
        "This is an independent implementation of the method of Wu, Huang and Wu (Findings of EMNLP 2025, "
        "arXiv 2509.15361), built from its abstract; it is not the authors' code."
    )


def _training_section(
    base_text: str,
    dataset_name: str,
    settings: Mapping[str, Any],
    placeholder_image: str | None,
    kept_checkpoint: str | None,
) -> str:
    """The base, the data, the images when only a placeholder was used, the weights kept, and the settings table."""
    lines = ["## Training\n", f"- Base model: {base_text}", f"- Data set: {dataset_name}"]
    if placeholder_image:
        lines.append(
            f"- Images: **no real image was used**: every item, in training and evaluation, was given the same "
            f"placeholder image (`{Path(placeholder_image).name}`), so the model learned from the texts alone"
        )
    if kept_checkpoint:
        lines.append(f"- Weights: {kept_checkpoint}")
    table = _table(["Setting", "Value"], [[f"`{k}`", _code_cell(v)] for k, v in settings.items()])
    return "\n".join([*lines, "", table])


def _intended_use_section(task_name: str) -> str:
    return (
        "## Intended use\n\n"
        f"Research on robust multimodal classification ({task_name.lower()}) of image-text posts, and a "
        "baseline for debiasing studies: score an (image, text) pair, and inspect with `return_effects=True` how "
        "much of a prediction each modality contributes directly (NDE) versus jointly (TIE)."
    )


def _usage_section(repo: str) -> str:
    return (
        "## How to use\n\n"
        "Loading the model and running it on tensors needs `torch` and `transformers` only; the processor and the "
        "pipeline decode images, which needs `pillow` too (`pip install torch transformers pillow`).\n\n"
        "```python\n"
        "from transformers import AutoModel, AutoProcessor, pipeline\n\n"
        f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)\n'
        "# a stock LlavaProcessor; the flag lets its tokenizer read this repo's config.json (custom code)\n"
        f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)\n\n'
        f'classifier = pipeline(model="{repo}", trust_remote_code=True)  # task "{TASK}"\n'
        'classifier({"image": "post.jpg", "text": "what a lovely monday"}, return_effects=True)\n'
        "# [{'label': ..., 'score': ..., 'effects': {'TE': ..., 'NDE_T': ..., 'NDE_V': ..., 'TIE': ...}}, ...]\n"
        "```\n\n"
        'Inference Endpoints use `handler.py` (inputs `{"image": <base64>, "text": str}` or a list).'
    )


def _code_cell(value: Any) -> str:
    """`value` as inline code in a Markdown table cell: newlines written as \\n, pipes escaped."""
    return "`" + str(value).replace("\n", "\\n").replace("|", "\\|") + "`"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _results_section(eval_results, dataset_name, synthetic, placeholder) -> str:
    metrics = sorted({m for values in eval_results.values() for m in values}, key=_metric_rank)
    rows = [[split] + [_number(values.get(metric)) for metric in metrics] for split, values in eval_results.items()]
    note = ""
    if synthetic:
        note = (
            f"\n\n> These numbers come from {dataset_name}, the synthetic benchmark with planted spurious cues: "
            "they are not MMSD2.0 results and do not predict accuracy on real posts."
        )
    if placeholder:
        note += "\n\n> No real image was used: these are the numbers of a text-only model on image-text data."
    return f"## Evaluation\n\n{_table(['Split', *map(_pretty, metrics)], rows)}{note}"


def _metric_rank(metric: str) -> tuple[int, str]:
    return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), metric)


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _audit_section(audit: Mapping[str, Any]) -> str:
    """What training treated as context (`cfmoe.trainer.audit.context_report`), for a reader to check."""

    def tokens(status: str) -> str:
        entries = audit["tokens"].get(status, [])[:12]
        return ", ".join(f"`{e['text'].strip() or e['token']}` ({'/'.join(map(str, e['items_per_class']))})"
                         for e in entries) or "none"  # fmt: skip

    pixels = audit.get("pixels_as_context")
    image = audit["image_context"]
    lines = [
        "## Context audit",
        "",
        "What the counterfactual rows treated as context (swapped out of each item), read from the training "
        "statistics (`context_report.json` and `context_report.png` in the training output folder). A token is "
        "context when its training items lean toward one class (`text_context_threshold`) and, within each class, "
        "its items' images show what the others' show (a shortcut caused by the label, blind to the image); a "
        "strong token whose items' images differ is kept as core. Where the images cannot tell the classes apart "
        "(text-only data, a placeholder image), only leak-prone forms (hashtags, mentions, URLs, emoji, "
        "placeholders, double spaces) can be context and plain words are kept. Declared context and protected words "
        "override all of this. Check this list before trusting the model: a word that carries the meaning should "
        "not be in it.",
        "",
        f"- Decided by: {audit['core_test']['decides']}",
        f"- Context tokens, strongest first (training items per class): {tokens('context')}",
        f"- Strong tokens kept as core: {tokens('kept_as_core')}",
        f"- Declared context: {tokens('declared')}; protected: {tokens('protected')}",
        f"- Share of training rows with text context: {audit['rows_with_text_context']:.2f}; of text tokens: "
        f"{audit['text_tokens_as_context']:.3f}" + (f"; of image pixels: {pixels:.3f}" if pixels is not None else ""),
        f"- Image context: the colour {'was' if image['colour'] else 'was not'}, local pixels "
        f"{'were' if image['pixels'] else 'were not'} treated as context",
    ]
    return "\n".join(lines)


def _routing_section(routing: Mapping[str, Any]) -> str:
    shares: dict[str, dict[int, float]] = {}
    for key, value in routing.items():
        logged = re.fullmatch(r"routing_(\w+)_expert_(\d+)", key)
        if logged:
            shares.setdefault(logged[1], {})[int(logged[2])] = float(value)
        else:
            shares[key] = dict(enumerate(map(float, value)))
    width = max(max(site) + 1 for site in shares.values())
    rows = [[site] + [_number(values.get(i)) for i in range(width)] for site, values in shares.items()]
    return "## Routing\n\nMean gate of each expert per MoE site (top-k gates sum to one per item):\n\n" + _table(
        ["Site", *(f"Expert {i}" for i in range(width))], rows
    )


def complete_hub_folder(folder: str | Path) -> list[str]:
    """Checks that `folder` is a complete CF-MoE checkpoint and adds what is missing and can be added: our remote
    code files (from the installed `modeling_cfmoe`), `handler.py` and `custom_pipelines` in config.json.
    Returns the names it added; raises `ValueError` listing what cannot be fixed here."""
    folder = Path(folder)
    problems = []
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if "AutoModel" not in config.get("auto_map", {}):
        problems.append("config.json with auto_map (save the model with save_pretrained; merge a LoRA run first)")
    if not any((folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json")):
        problems.append("model.safetensors (save_pretrained writes it)")
    if not any((folder / name).exists() for name in TOKENIZER_FILES) or not any(
        (folder / name).exists() for name in PROCESSOR_FILES
    ):
        problems.append("the processor files (processor.save_pretrained(folder))")
    if not _is_our_card(folder / "README.md"):
        problems.append("README.md written by cfmoe.trainer.hub.write_model_card")
    if problems:
        raise ValueError(f"{folder} is not a complete CF-MoE model folder; missing: " + "; ".join(problems))
    added = []
    for source in sorted(Path(modeling_cfmoe.__file__).parent.glob("*.py")):
        if source.name != "__init__.py" and not (folder / source.name).exists():
            shutil.copyfile(source, folder / source.name)  # handler.py lands at the repo root, as Endpoints expect
            added.append(source.name)
    if TASK not in config.get("custom_pipelines", {}):
        config["custom_pipelines"] = add_pipeline_entry(config.get("custom_pipelines"))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        added.append("config.json:custom_pipelines")
    return added


def _is_our_card(path: Path) -> bool:
    return path.exists() and CARD_TAG in (ModelCard.load(path).data.tags or [])


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload CF-MoE model",
    token: str | None = None,
):
    """Completes `folder` ([`complete_hub_folder`]), creates `repo_id` if needed and uploads the folder in one
    commit (checkpoints, logs and pickles left out). Returns the commit info."""
    complete_hub_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS
    )
