#!/usr/bin/env python
"""Fine-tune and evaluate CF-MoE for multimodal sarcasm detection (not sarcastic / sarcastic).

    accelerate launch examples/run_sarcasm.py --output_dir out                 # tiny model, synthetic data
    accelerate launch examples/run_sarcasm.py --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --dataset mmsd2 --data_dir /data/MMSD2.0 --ood_file /data/dmsd_ood.txt --output_dir out
    python examples/run_sarcasm.py --help                                      # every argument and its default

Without `--model_name_or_path` it trains the tiny offline model on the synthetic planted-cue benchmark
(docs/benchmark.md); with one, the defaults are those of LLaVA-1.5's fine-tuning recipe (README: "Defaults").
From Python: `main(["--output_dir", "out", ...])` returns what `OUTPUT/all_results.json` holds. From the command
line, bad arguments or data end the script with a one-line `error: ...` and exit code 2 (`CFMOE_TRACEBACK=1`
shows the traceback).
This script is `run_sentiment.py` with another `TASK`; keep the two in step.
"""

from __future__ import annotations

import logging
import sys
import time

import datasets
import transformers
from transformers import set_seed

from trainer import CFMoECollator, CFMoETrainer
from trainer.arguments import parse_args
from trainer.errors import exit_on_user_error
from trainer.evaluation import build_debiasing_compute_metrics
from trainer.methods import get_method
from trainer.run import (
    count_skipped,
    data_record,
    evaluate_test_splits,
    finish_output_folder,
    labels_of,
    load_data,
    load_model,
    resume_checkpoint,
    save_model,
    split_table,
    train_texts,
    write_card,
)

TASK = "sarcasm"
logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate every test split, save; returns the run's results (also in `OUTPUT/all_results.json`)."""
    start = time.perf_counter()
    # See all possible arguments in trainer/arguments.py, or by passing the --help flag to this script. Defaults
    # depend on what is trained: the tiny model, or a checkpoint given by --model_name_or_path (with --use_lora).
    model_args, data_args, training_args = parse_args(argv)

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (__name__, "trainer", "modeling_cfmoe"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, bf16: {training_args.bf16}"
    )
    logger.debug(f"Training/evaluation parameters {training_args}")

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Data: the synthetic planted-cue benchmark (train, validation, test_iid, test_ood, test_neutral) or a real
    # data set's folder (train, validation, test, with --extra_test test_<name>, with --ood_file test_ood).
    data, synthetic = load_data(TASK, data_args, training_args.seed)

    # Model and processor: the tiny offline model (on real data its tokenizer is trained on the training texts), a
    # CF-MoE checkpoint, or a LLaVA-family base wrapped by CF-MoE.
    model, processor = load_model(
        TASK,
        model_args,
        labels_of(TASK, data, synthetic),
        training_args.seed,
        method=training_args.method,
        texts=train_texts(data, synthetic),
    )
    collator = CFMoECollator(
        processor,
        num_labels=model.config.num_labels,
        prompt_template=model.config.prompt_template,
        max_length=data_args.max_length,
        skip_bad_examples=data_args.skip_bad_examples,
        return_groups=get_method(training_args.method).uses_group_labels,
    )

    # Initialize our Trainer. It does not push: the finished folder is pushed once, with our model card.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = CFMoETrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=build_debiasing_compute_metrics(model.config.num_labels),
    )

    # Training
    train_result = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    metrics = train_result.metrics
    metrics["train_samples"] = len(data["train"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics, combined=False)
    trainer.save_state()

    # Evaluation of every test split (the validation split served model selection)
    logger.info("*** Evaluate ***")
    collator.return_groups = False
    eval_results = evaluate_test_splits(trainer, data, synthetic)
    for split, split_metrics in eval_results.items():
        trainer.log_metrics(split, split_metrics)
    trainer.save_metrics("eval", eval_results, combined=False)
    results = {
        "train": metrics,
        "eval": eval_results,
        "method": training_args.method,
        "seed": training_args.seed,
        "skipped_examples": count_skipped(trainer, collator),
        "data": data_record(data_args, synthetic),
    }
    trainer.save_metrics("all", results, combined=False)  # all_results.json: the run's record

    save_model(trainer, processor, model_args)
    if trainer.is_world_process_zero():
        write_card(trainer, model_args, data_args, eval_results, TASK)
        finish_output_folder(trainer, model_args, push_to_hub)
        data_name = f"synthetic {TASK} benchmark, cues {data_args.cue_setting}" if synthetic else data_args.dataset
        print(f"\n{split_table(eval_results, f'method {training_args.method} on {data_name}:')}\n")
        print(f"finished in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    exit_on_user_error(main)
