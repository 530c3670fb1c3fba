"""The reusable pieces of the run scripts (`examples/run_sarcasm.py`, `examples/run_sentiment.py`): data and model
loading, resuming, evaluation of every test split, saving, the model card and the Hub folder, the results table.
Their arguments are in [`cfmoe.trainer.arguments`]."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, Image
from transformers import AutoConfig, AutoModel, AutoProcessor, PreTrainedModel, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .adapters import apply_lora, merge_lora_run, prepare_for_kbit_training, quantization_config, save_lora_run
from .arguments import SYNTHETIC_FIELDS, DataArguments, ModelArguments
from .audit import read_context_report
from .cfmoe_trainer import CFMoETrainer
from .checkpointing import match_sibling_modes
from .collator import CFMoECollator
from .data.benchmarks import dataset_task, load_benchmark, parse_extra_test
from .data.synthetic import SyntheticConfig, flip_cues, id2label, make_synthetic_benchmark
from .data.tiny import build_tiny_model
from .errors import UserFileNotFoundError, UserValueError, user_input
from .evaluation import evaluate_split, predict_labels
from .hub import complete_hub_folder, method_settings_from_config, push_folder_to_hub, write_model_card
from .methods import get_method
from .plots import plot_training
from .training_args import CFMoETrainingArguments

logger = logging.getLogger(__name__)
PREDICTIONS_FILE = "test_predictions.json"

# the method knobs of the training arguments (what `CFMoETrainingArguments` adds to `TrainingArguments`)
LOSS_SETTINGS = tuple(
    field.name
    for field in fields(CFMoETrainingArguments)
    if field.name not in TrainingArguments.__dataclass_fields__ and field.name != "nan_policy"
)
TABLE_METRICS = {"accuracy": "accuracy", "macro_f1": "macro F1", "worst_group_accuracy": "worst group",
                 "cue_reliance": "cue reliance", "core_kept": "core kept",
                 "clean_accuracy": "no-cue items"}  # fmt: skip


def load_data(task: str, data_args: DataArguments, seed: int) -> tuple[DatasetDict, SyntheticConfig | None]:
    """(splits, the synthetic benchmark's config or None for real data: `--dataset` in `--data_dir`, with
    `--image_dir`, `--ood_file` and `--extra_test` passed to `load_benchmark`). Images stay undecoded: the collator
    opens them item by item, so that a corrupt file is named there (or skipped and counted with
    `skip_bad_examples`). Data the loaders refuse, or a data set of the other task, raises a
    [`~cfmoe.trainer.errors.UserInputError`]."""
    if data_args.dataset == "synthetic":
        synthetic = data_args.synthetic_config(task, seed)
        data = make_synthetic_benchmark(synthetic)
    else:
        synthetic = None
        kwargs = {"skip_bad_examples": data_args.skip_bad_examples, "verify_images": data_args.verify_images}
        if data_args.image_dir:
            kwargs["image_dir"] = data_args.image_dir
        if data_args.ood_file:
            kwargs["ood_file"] = data_args.ood_file
        with user_input():  # arguments or a data set the loaders refuse: the message says what to fix
            if data_args.extra_test:
                kwargs["extra_test"] = parse_extra_test(data_args.extra_test)
            if dataset_task(data_args.dataset) != task:
                other = dataset_task(data_args.dataset)
                raise ValueError(f"--dataset {data_args.dataset} is a {other} data set: run examples/run_{other}.py")
            data = load_benchmark(data_args.dataset, data_args.data_dir, **kwargs)
    return data.cast_column("image", Image(decode=False)), synthetic


def labels_of(task: str, data: DatasetDict, synthetic: SyntheticConfig | None) -> dict[int, str]:
    """Class id -> name: the task's classes on synthetic data, else the data set's own."""
    return id2label(task) if synthetic is not None else dict(enumerate(data["train"].features["label"].names))


def check_training_labels(data: DatasetDict, labels: dict[int, str]) -> None:
    """Raises a [`~cfmoe.trainer.errors.UserValueError`] when the training split holds fewer than two classes: a
    classifier learns nothing from it, and scores every test item of that class as right."""
    present = set(data["train"]["label"])
    if len(present) < 2:
        items = f"{len(data['train']):,} item" + "s" * (len(data["train"]) != 1)
        held = f"a single class ({items}, all {labels[present.pop()]!r})" if present else "no item"
        raise UserValueError(f"the training split holds {held}: a classifier learns nothing from it; check its labels")


def majority_class(data: DatasetDict) -> tuple[int, dict[str, float]]:
    """The training split's most frequent class, and the accuracy of always predicting it on each test split (from
    the split's own labels): the floor an accuracy is read against."""
    majority = int(np.bincount(np.asarray(data["train"]["label"])).argmax())
    tests = [split for split in data if split.startswith("test")]
    return majority, {split: float(np.mean(np.asarray(data[split]["label"]) == majority)) for split in tests}


def train_texts(data: DatasetDict, synthetic: SyntheticConfig | None) -> list[str] | None:
    """The training split's texts on real data (the tiny default's tokenizer is trained on them), None on synthetic
    data (its tokenizer knows the synthetic vocabulary)."""
    return None if synthetic is not None else list(data["train"]["text"])


def load_model(
    task: str,
    model_args: ModelArguments,
    labels: dict[int, str],
    seed: int,
    method: str = "cfmoe",
    texts: list[str] | None = None,
):
    """(model, processor): the tiny default (its tokenizer trained on `texts` when given, see `train_texts`), a
    CF-MoE checkpoint, or a fresh wrapper around a base, with the config values the training `method` needs
    (`DebiasingMethod.model_config`) unless given; quantised and wrapped with LoRA when asked, the vision tower
    frozen when asked."""
    overrides = {**get_method(method).model_config, **model_args.config_kwargs()}
    model, processor = _load_base_model(task, model_args, overrides, labels, seed, texts)
    model.rows.set_vocabulary(processor.tokenizer)  # word pieces, declared context and protected words
    if model_args.use_lora:
        if model_args.load_in_4bit or model_args.load_in_8bit:
            model = prepare_for_kbit_training(model)
        model = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            include_vision=model_args.lora_include_vision,
        )
    if model_args.freeze_vision_tower:
        logger.info("vision tower frozen: %d parameters", freeze_vision_tower(model))
    return model, processor


def _load_base_model(
    task: str,
    model_args: ModelArguments,
    overrides: dict,
    labels: dict[int, str],
    seed: int,
    texts: list[str] | None = None,
):
    path = model_args.model_name_or_path
    quantization = quantization_config(model_args.load_in_4bit, model_args.load_in_8bit)
    if path is None:
        if quantization is not None:
            raise ValueError("--load_in_4bit / --load_in_8bit quantise a checkpoint: give --model_name_or_path")
        return build_tiny_model(task, seed=seed, texts=texts, **overrides)
    processor = AutoProcessor.from_pretrained(path)
    load_kwargs = {"dtype": model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)}
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization
    if AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == "cfmoe":
        return AutoModel.from_pretrained(path, trust_remote_code=True, **overrides, **load_kwargs), processor
    from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification

    model = CFMoEForMultimodalClassification.from_base_pretrained(
        path, id2label=labels, config_kwargs=overrides, **load_kwargs
    )
    return model, processor


def freeze_vision_tower(model: PreTrainedModel) -> int:
    """Stops training the wrapped base's vision tower (its base family's `vision_tower`, LoRA weights in it
    included), also under a `PeftModel`. Returns the number of parameters frozen."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = list(core.vision_tower.parameters())
    for parameter in parameters:
        parameter.requires_grad_(False)
    return sum(parameter.numel() for parameter in parameters)


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (`last`: the newest in `output_dir`), checked complete."""
    resume = args.resume_from_checkpoint
    if resume == "last":  # restart where an interrupted run stopped
        resume = get_last_checkpoint(args.output_dir)
        if resume is None:
            raise UserFileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* in {args.output_dir}")
    if resume is not None and not (Path(resume) / "trainer_state.json").is_file():
        # the Trainer would silently restart at step 0 from such a folder's weights
        raise UserFileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint (no trainer_state.json); "
            "pick another checkpoint-* folder or 'last'"
        )
    return resume


def evaluate_test_splits(
    trainer: CFMoETrainer, data: DatasetDict, synthetic: SyntheticConfig | None
) -> dict[str, dict[str, float]]:
    """Metrics of every `test*` split; on synthetic data cue reliance too (against a cue-flipped copy). Each item's
    prediction is written to `OUTPUT/test_predictions.json` (`{split: {"id": [...], "prediction": [...]}}`), so that
    any subset of a split can be scored afterwards."""
    results, predictions = {}, {}
    for split in (name for name in data if name.startswith("test")):
        flipped = flip_cues(data[split], synthetic) if synthetic is not None else None
        predicted = predict_labels(trainer, data[split])
        results[split] = evaluate_split(trainer, data[split], flipped, predicted)
        predictions[split] = {"id": list(map(str, data[split]["id"])), "prediction": predicted.tolist()}
    if trainer.is_world_process_zero():
        (Path(trainer.args.output_dir) / PREDICTIONS_FILE).write_text(json.dumps(predictions) + "\n")
    return results


def count_skipped(trainer: CFMoETrainer, collator: CFMoECollator) -> int:
    """Items the collator skipped as bad (training and evaluation), summed over the processes."""
    skipped = collator.num_skipped
    if trainer.accelerator.num_processes > 1:
        skipped = int(trainer.accelerator.reduce(torch.tensor(skipped, device=trainer.args.device), reduction="sum"))
    if skipped:
        logger.warning("%d bad example(s) were skipped (--skip_bad_examples); the warnings above name them", skipped)
    return skipped


def data_record(data_args: DataArguments, synthetic: SyntheticConfig | None) -> dict:
    """What the run trained and evaluated on, for `all_results.json`: the synthetic config, or the data arguments
    that apply to real data (not the synthetic benchmark's sizes, noise and cues)."""
    if synthetic is not None:
        return asdict(synthetic)
    return {f.name: getattr(data_args, f.name) for f in fields(data_args) if f.name not in SYNTHETIC_FIELDS}


def save_model(trainer: CFMoETrainer, processor, model_args: ModelArguments) -> None:
    """The final model: weights (or LoRA adapter + `base/`, and `merged/` when asked) and processor."""
    if not model_args.use_lora:
        trainer.save_model()
    elif trainer.is_world_process_zero():
        output = Path(trainer.args.output_dir)
        save_lora_run(trainer.model, processor, output)
        if model_args.merge_lora:
            merge_lora_run(output, output / "merged")


def kept_step(trainer: CFMoETrainer) -> int | None:
    """The step of the checkpoint whose weights the run ended with (`--load_best_model_at_end`), None for the last
    step's."""
    best = trainer.state.best_model_checkpoint
    if not trainer.args.load_best_model_at_end or best is None:
        return None
    return int(Path(best).name.rpartition("-")[2])


def kept_summary(trainer: CFMoETrainer) -> str:
    """Which weights the run kept, in words: the selected checkpoint (its step, metric and value) or the last."""
    state, step = trainer.state, kept_step(trainer)
    if step is None:
        return f"kept the weights of the last step ({state.global_step:,})"
    metric = trainer.args.metric_for_best_model
    return (
        f"kept checkpoint-{step} (step {step:,} of {state.global_step:,}), the best on the validation split by "
        f"{metric} ({state.best_metric:.4f}); the model and the test results are those of this checkpoint"
    )


def warmup_in_effect(trainer: CFMoETrainer) -> str:
    """The bias-only warm-up the run had, as a share of training and in steps (`--debias_warmup_ratio`, or its
    default: the first pass over the data, at most a quarter of training)."""
    steps, total = trainer.method.bias_only_warmup_steps(trainer.state), trainer.state.max_steps
    default = steps and trainer.args.debias_warmup_ratio is None
    how = "; default: the first pass over the data, at most 0.25" if default else ""
    return f"{steps / max(total, 1):.4g} ({steps:,} of {total:,} steps{how})"


def write_card(
    trainer: CFMoETrainer, model_args: ModelArguments, data_args: DataArguments, eval_results: dict, task: str
) -> None:
    """Our model card (`OUTPUT/README.md`): base, data, method settings in effect, the kept checkpoint, the
    evaluation table, routing shares."""
    args = trainer.args
    synthetic = data_args.dataset == "synthetic"
    settings = {**method_settings_from_config(trainer.model.config), **{n: getattr(args, n) for n in LOSS_SETTINGS}}
    settings["debias_warmup_ratio"] = warmup_in_effect(trainer)
    last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    image = data_args.image_dir
    write_model_card(
        args.output_dir,
        base_model=model_args.model_name_or_path,
        dataset_name=f"synthetic planted-cue {task} benchmark" if synthetic else data_args.dataset,
        method_settings=settings,
        eval_results=eval_results,
        routing_shares={k: v for k, v in last_log.items() if k.startswith("routing_")},
        context_audit=read_context_report(args.output_dir),
        repo_id=args.hub_model_id,
        task="sarcasm-detection" if task == "sarcasm" else "sentiment-analysis",
        synthetic=synthetic,
        kept_checkpoint=kept_summary(trainer),
        placeholder_image=image if not synthetic and image and Path(image).is_file() else None,
    )


def validation_note(synthetic: SyntheticConfig | None) -> str | None:
    """What to read the validation metrics with: on the synthetic benchmark, its validation labels are noisy."""
    if synthetic is None or not synthetic.label_noise:
        return None
    return (
        f"validation labels carry the benchmark's label noise ({synthetic.label_noise:.0%} flipped, as in training): "
        f"accuracy on them stays near {1 - synthetic.label_noise:.2f} at best; the test splits' labels are clean"
    )


def finish_output_folder(
    trainer: CFMoETrainer, model_args: ModelArguments, push_to_hub: bool, validation_note: str | None = None
) -> None:
    """`training.png` (with the warm-up's end, the kept checkpoint and `validation_note`), and for a full model the
    remote code, handler and pipeline beside it; every file readable as the umask says; pushed when asked."""
    output = Path(trainer.args.output_dir)
    plot_training(
        trainer.state.log_history,
        output / "training.png",
        trainer.args.metric_for_best_model,
        warmup_end=trainer.method.bias_only_warmup_steps(trainer.state),
        kept_step=kept_step(trainer),
        validation_note=validation_note,
    )
    if not model_args.use_lora:  # a LoRA run's folder is an adapter: its `merged/` is the full model
        complete_hub_folder(output)
    match_sibling_modes(output)
    if push_to_hub:
        args = trainer.args
        push_folder_to_hub(
            output, args.hub_model_id or output.name, private=bool(args.hub_private_repo), token=args.hub_token
        )


def split_table(
    eval_results: dict[str, dict[str, float]], title: str, majority: tuple[str, dict[str, float]] | None = None
) -> str:
    """The test splits' accuracy, macro F1, worst-group accuracy and cue reliance as a text table,
    `robust accuracy = min(iid, ood)` where both splits exist, and with `majority` (the training split's majority
    class, each split's accuracy of always predicting it) the line an accuracy is read against."""
    metrics = [name for name in TABLE_METRICS if any(name in values for values in eval_results.values())]
    width = max(len(split) for split in eval_results)
    lines = [title, f"{'split':<{width}}  " + "  ".join(f"{TABLE_METRICS[name]:>12}" for name in metrics)]
    for split, values in eval_results.items():
        cells = (f"{values.get(name, math.nan):>12.3f}" for name in metrics)
        lines.append(f"{split:<{width}}  " + "  ".join(cells))
    if {"test_iid", "test_ood"} <= eval_results.keys():
        robust = min(eval_results["test_iid"]["accuracy"], eval_results["test_ood"]["accuracy"])
        lines.append(f"robust accuracy min(iid, ood): {robust:.3f}")
    if majority is not None:
        name, accuracy = majority
        floors = ", ".join(f"{split} {value:.3f}" for split, value in accuracy.items())
        lines.append(f"majority class ({name!r} in training), accuracy of always predicting it: {floors}")
    return "\n".join(lines)
