"""The run scripts' body as functions: `train_and_evaluate` trains, evaluates every test split and saves one run
(what `examples/run_sarcasm.py` and `examples/run_sentiment.py` do, and what the benchmarks call); `main` parses a
command line, sets up logging and calls it."""

from __future__ import annotations

import logging
import sys
import time

import datasets
import transformers
from datasets import DatasetDict
from transformers import PreTrainedModel, ProcessorMixin, set_seed

from .arguments import DataArguments, ModelArguments, parse_args
from .cfmoe_trainer import CFMoETrainer
from .collator import CFMoECollator
from .data.synthetic import SyntheticConfig
from .evaluation import build_debiasing_compute_metrics
from .loading import (
    check_training_labels,
    count_skipped,
    data_record,
    evaluate_test_splits,
    finish_output_folder,
    kept_summary,
    labels_of,
    load_data,
    load_model,
    majority_class,
    resume_checkpoint,
    save_model,
    split_table,
    train_texts,
    validation_note,
    write_card,
)
from .methods import get_method
from .model_source import check_model_source
from .training_args import CFMoETrainingArguments

logger = logging.getLogger(__name__)


def setup_logging(training_args: CFMoETrainingArguments) -> None:
    """Logging as transformers' example scripts set it up, but quieter: our own messages at info on the main
    process; transformers' and datasets' at warning (their info lines repeat configs and steps) unless
    `--log_level` asks for more; the run's settings at debug. `--disable_tqdm` hides every progress bar."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger("cfmoe").setLevel(log_level)
    libraries = log_level if training_args.log_level != "passive" else max(log_level, logging.WARNING)
    datasets.utils.logging.set_verbosity(libraries)
    transformers.utils.logging.set_verbosity(libraries)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    if training_args.disable_tqdm:  # the Trainer's bars, and also those of loading and saving weights
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.disable_progress_bar()
    logger.info(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, bf16: {training_args.bf16}"
    )
    logger.debug(f"Training/evaluation parameters {training_args}")


def train_and_evaluate(
    task: str, model_args: ModelArguments, data_args: DataArguments, training_args: CFMoETrainingArguments
) -> dict:
    """Train one run of `task` ("sarcasm" or "sentiment"), evaluate every test split, save the model, its card and
    `all_results.json` in `training_args.output_dir`; returns what `all_results.json` holds."""
    check_model_source(model_args.model_name_or_path)  # a missing folder or an unknown Hub id fails now, not later
    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Data: the synthetic planted-cue benchmark (train, validation, test_iid, test_ood, test_neutral) or a real
    # data set's folder (train, validation, test, with --extra_test test_<name>, with --ood_file test_ood).
    data, synthetic = load_data(task, data_args, training_args.seed)

    # Model and processor: the tiny offline model (on real data its tokenizer is trained on the training texts), a
    # CF-MoE checkpoint, or a LLaVA-family base wrapped by CF-MoE.
    labels, texts = labels_of(task, data, synthetic), train_texts(data, synthetic)
    check_training_labels(data, labels)
    model, processor = load_model(
        task, model_args, labels, training_args.seed, method=training_args.method, texts=texts
    )

    # Initialize our Trainer. It does not push: the finished folder is pushed once, with our model card.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = build_trainer(model, processor, data, data_args, training_args)
    metrics = train(trainer)
    eval_results = evaluate(trainer, data, synthetic)
    majority, floors = majority_class(data)
    results = {
        "train": metrics,
        "eval": eval_results,
        "majority_class": {"label": labels[majority], "accuracy": floors},  # what each accuracy is read against
        "method": training_args.method,
        "seed": training_args.seed,
        "skipped_examples": count_skipped(trainer, trainer.data_collator),
        "data": data_record(data_args, synthetic),
    }
    trainer.save_metrics("all", results, combined=False)  # all_results.json: the run's record

    save_model(trainer, processor, model_args)
    if trainer.is_world_process_zero():
        write_card(trainer, model_args, data_args, eval_results, task)
        finish_output_folder(trainer, model_args, push_to_hub, validation_note=validation_note(synthetic))
        data_name = f"synthetic {task} benchmark, cues {data_args.cue_setting}" if synthetic else data_args.dataset
        table = split_table(eval_results, f"method {training_args.method} on {data_name}:", (labels[majority], floors))
        print(f"\n{table}\n{kept_summary(trainer)}\n")
    return results


def build_trainer(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    data: DatasetDict,
    data_args: DataArguments,
    training_args: CFMoETrainingArguments,
) -> CFMoETrainer:
    """The collator (group labels when the method uses them) and the Trainer on the train and validation splits,
    with the debiasing metrics."""
    collator = CFMoECollator(
        processor,
        num_labels=model.config.num_labels,
        prompt_template=model.config.prompt_template,
        max_length=data_args.max_length,
        skip_bad_examples=data_args.skip_bad_examples,
        return_groups=get_method(training_args.method).uses_group_labels,
    )
    return CFMoETrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=build_debiasing_compute_metrics(model.config.num_labels),
    )


def train(trainer: CFMoETrainer) -> dict[str, float]:
    """Train (resuming where `--resume_from_checkpoint` says), log and save the training metrics
    (`train_results.json`) and the trainer state; returns the metrics."""
    train_result = trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args))
    metrics = train_result.metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics, combined=False)
    trainer.save_state()
    return metrics


def evaluate(
    trainer: CFMoETrainer, data: DatasetDict, synthetic: SyntheticConfig | None
) -> dict[str, dict[str, float]]:
    """Evaluate every test split (the validation split served model selection), log and save the metrics
    (`eval_results.json`); returns them, `{split: {metric: value}}`."""
    logger.info("*** Evaluate ***")
    trainer.data_collator.return_groups = False
    eval_results = evaluate_test_splits(trainer, data, synthetic)
    for split, split_metrics in eval_results.items():
        trainer.log_metrics(split, split_metrics)
    trainer.save_metrics("eval", eval_results, combined=False)
    return eval_results


def main(task: str, argv: list[str] | None = None) -> dict:
    """A run script: parse `argv` (`sys.argv[1:]` when None; defaults depend on what is trained: the tiny model, or
    a checkpoint given by --model_name_or_path, with --use_lora), train and evaluate; returns the run's results."""
    start = time.perf_counter()
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    results = train_and_evaluate(task, model_args, data_args, training_args)
    if training_args.should_log:
        print(f"finished in {time.perf_counter() - start:.0f} s")
    return results
