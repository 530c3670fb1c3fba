"""The training job behind `examples/run_sarcasm.py` and `examples/run_sentiment.py`.

With no arguments it trains the tiny offline CF-MoE on the synthetic planted-cue benchmark and evaluates
every test split; with `--model_name_or_path` and `--dataset mmsd2 --data_dir DIR` the same code runs on a
real checkpoint and data folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformers
from datasets import DatasetDict, Image
from transformers import AutoConfig, AutoModel, AutoProcessor, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .adapters import apply_lora, merge_lora_run, prepare_for_kbit_training, quantization_config, save_lora_run
from .collator import CFMoECollator
from .data import SyntheticConfig, flip_cues, id2label, load_benchmark, make_synthetic_benchmark
from .evaluation import build_debiasing_compute_metrics, evaluate_split
from .hub import complete_hub_folder, method_settings_from_config, push_folder_to_hub, write_model_card
from .plots import plot_training
from .tiny import build_tiny_model
from .trainer import CFMoETrainer
from .training_args import CFMoETrainingArguments

logger = logging.getLogger(__name__)

LOSS_SETTINGS = (
    "factual_task_weight",
    "upweight",
    "conflict_rule",
    "debias_warmup_ratio",
    "counterfactual_task_weight",
    "contrast_loss_weight",
    "prior_kl_weight",
    "bias_loss_weight",
    "aux_loss_weight",
)
CONFIG_OVERRIDES = (
    "num_visual_experts",
    "num_text_experts",
    "experts_top_k",
    "expert_intermediate_size",
    "router_jitter",
    "router_aux_loss_coef",
    "classifier_dropout",
    "prompt_template",
    "image_context",
    "detach_bias_branches",
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a CF-MoE checkpoint or a LLaVA-family base (llava, llava_next, llava_onevision); "
            "empty: the tiny offline default"
        },
    )
    num_visual_experts: int | None = field(default=None, metadata={"help": "experts after the projector"})
    num_text_experts: int | None = field(default=None, metadata={"help": "experts after the language model"})
    experts_top_k: int | None = field(default=None, metadata={"help": "experts kept per item by the router"})
    expert_intermediate_size: int | None = field(default=None, metadata={"help": "bottleneck width of an expert"})
    router_jitter: float | None = field(default=None, metadata={"help": "router input noise in training"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "load-balancing coefficient"})
    classifier_dropout: float | None = field(default=None, metadata={"help": "dropout before the heads"})
    prompt_template: str | None = field(default=None, metadata={"help": "prompt with {image} and {text}"})
    image_context: str | None = field(
        default=None, metadata={"help": "what counterfactual rows treat as image context: global or patches"}
    )
    detach_bias_branches: bool | None = field(
        default=None, metadata={"help": "bias branches read stop-gradient states (probes; they never shape the base)"}
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the base; experts, routers, heads trained fully"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "regex of LoRA targets; default: the base LM's attention and MLP projections"}
    )
    lora_include_vision: bool = field(default=False, metadata={"help": "LoRA on the vision tower too"})
    merge_lora: bool = field(default=False, metadata={"help": "also write a merged full checkpoint to OUTPUT/merged"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base in NF4 (QLoRA with --use_lora)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base in LLM.int8"})

    def config_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in CONFIG_OVERRIDES if getattr(self, name) is not None}


@dataclass
class DataArguments:
    dataset: str = field(
        default="synthetic",
        metadata={"help": "synthetic (the task's planted-cue benchmark), mmsd, mmsd2, mvsa_single, mvsa_multiple"},
    )
    data_dir: str | None = field(default=None, metadata={"help": "folder of a real data set"})
    image_dir: str | None = field(default=None, metadata={"help": "image folder when not under data_dir"})
    ood_file: str | None = field(default=None, metadata={"help": "DMSD-CL OOD file, evaluated as test_ood"})
    num_train: int = field(default=4000, metadata={"help": "synthetic: training items"})
    num_validation: int = field(default=1000, metadata={"help": "synthetic: validation items (model selection)"})
    num_test: int = field(default=1000, metadata={"help": "synthetic: items per test split"})
    label_noise: float = field(default=0.2, metadata={"help": "synthetic: training label noise eta"})
    rho_train: float = field(default=0.95, metadata={"help": "synthetic: cue-label agreement in training"})
    data_seed_offset: int = field(default=0, metadata={"help": "synthetic: data seed = training seed + offset"})
    max_length: int | None = field(default=None, metadata={"help": "max tokens; only text is ever truncated"})
    skip_bad_examples: bool = field(default=False, metadata={"help": "skip and count bad items instead of failing"})
    verify_images: bool = field(default=False, metadata={"help": "open every image while loading real data"})


# Defaults of the embedded run (the tiny model on the synthetic benchmark); any of them can be overridden.
DEFAULT_TRAINING_ARGS = [
    "--output_dir", "outputs/cfmoe", "--num_train_epochs", "8", "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "128", "--learning_rate", "1e-3", "--weight_decay", "0.01",
    "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine", "--logging_steps", "10",
    "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "2",
    "--load_best_model_at_end", "True", "--metric_for_best_model", "inferred_worst_group_accuracy",
    "--report_to", "none", "--dataloader_num_workers", "0",
]  # fmt: skip


def parse_args(task: str, argv: list[str] | None = None):
    import sys

    parser = HfArgumentParser((ModelArguments, DataArguments, CFMoETrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args_into_dataclasses(args=DEFAULT_TRAINING_ARGS + list(argv))


def load_data(task: str, data_args: DataArguments, seed: int) -> tuple[DatasetDict, SyntheticConfig | None]:
    if data_args.dataset == "synthetic":
        config = SyntheticConfig(
            task=task,
            num_train=data_args.num_train,
            num_validation=data_args.num_validation,
            num_test=data_args.num_test,
            label_noise=data_args.label_noise,
            rho_train=data_args.rho_train,
            seed=seed + data_args.data_seed_offset,
        )
        return make_synthetic_benchmark(config), config
    kwargs = {"skip_bad_examples": data_args.skip_bad_examples, "verify_images": data_args.verify_images}
    if data_args.image_dir:
        kwargs["image_dir"] = data_args.image_dir
    if data_args.ood_file:
        kwargs["ood_file"] = data_args.ood_file
    return load_benchmark(data_args.dataset, data_args.data_dir, **kwargs), None


def load_model(task: str, model_args: ModelArguments, labels: dict[int, str], seed: int):
    """(model, processor): the tiny default, a CF-MoE checkpoint, or a fresh wrapper around a base; quantised
    and wrapped with LoRA when asked."""
    model, processor = _load_base_model(task, model_args, labels, seed)
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
    return model, processor


def _load_base_model(task: str, model_args: ModelArguments, labels: dict[int, str], seed: int):
    overrides = model_args.config_kwargs()
    path = model_args.model_name_or_path
    quantization = quantization_config(model_args.load_in_4bit, model_args.load_in_8bit)
    if path is None:
        if quantization is not None:
            raise ValueError("--load_in_4bit / --load_in_8bit quantise a checkpoint: give --model_name_or_path")
        return build_tiny_model(task, seed=seed, **overrides)
    processor = AutoProcessor.from_pretrained(path)
    load_kwargs = {"quantization_config": quantization} if quantization is not None else {}
    if AutoConfig.from_pretrained(path, trust_remote_code=True).model_type == "cfmoe":
        model = AutoModel.from_pretrained(path, trust_remote_code=True, **load_kwargs)
        for name, value in overrides.items():
            setattr(model.config, name, value)
        return model, processor
    from modeling_cfmoe import CFMoEForMultimodalClassification

    model = CFMoEForMultimodalClassification.from_base_pretrained(
        path, id2label=labels, config_kwargs=overrides, **load_kwargs
    )
    return model, processor


def _count_skipped(trainer: CFMoETrainer, collator: CFMoECollator) -> int:
    """Items the collator skipped as bad (training and evaluation), summed over the processes."""
    skipped = collator.num_skipped
    if trainer.accelerator.num_processes > 1:
        skipped = int(trainer.accelerator.reduce(torch.tensor(skipped, device=trainer.args.device), reduction="sum"))
    if skipped:
        logger.warning("%d bad example(s) were skipped (--skip_bad_examples); the warnings above name them", skipped)
    return skipped


def main(task: str, argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(task, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    data, synthetic = load_data(task, data_args, training_args.seed)
    # images are decoded by the collator, item by item, so that a corrupt file is named there (or skipped and
    # counted with --skip_bad_examples) instead of failing inside the dataset
    data = data.cast_column("image", Image(decode=False))
    labels = (
        id2label(task) if data_args.dataset == "synthetic" else dict(enumerate(data["train"].features["label"].names))
    )
    model, processor = load_model(task, model_args, labels, training_args.seed)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # we push once, with our own card
    collator = CFMoECollator(
        processor,
        num_labels=model.config.num_labels,
        prompt_template=model.config.prompt_template,
        max_length=data_args.max_length,
        skip_bad_examples=data_args.skip_bad_examples,
        return_groups=training_args.method == "group_dro",
    )
    trainer = CFMoETrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=processor,
        compute_metrics=build_debiasing_compute_metrics(model.config.num_labels),
    )
    resume = training_args.resume_from_checkpoint
    if resume == "last":  # restart where an interrupted run stopped
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* in {training_args.output_dir}")
    if resume is not None and not (Path(resume) / "trainer_state.json").is_file():
        # the Trainer would silently restart at step 0 from such a folder's weights
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint (no trainer_state.json); "
            "pick another checkpoint-* folder or 'last'"
        )
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()

    results = {
        "train": train_result.metrics,
        "method": training_args.method,
        "seed": training_args.seed,
    }
    collator.return_groups = False
    eval_results = {}
    for split in (name for name in data if name.startswith("test")):
        flipped = flip_cues(data[split], synthetic) if synthetic is not None else None
        eval_results[split] = evaluate_split(trainer, data[split], flipped)
        logger.info("%s: %s", split, json.dumps(eval_results[split]))
    results["eval"] = eval_results
    results["skipped_examples"] = _count_skipped(trainer, collator)
    results["data"] = (
        asdict(synthetic) if synthetic is not None else {f.name: getattr(data_args, f.name) for f in fields(data_args)}
    )
    save_model(trainer, processor, model_args, Path(training_args.output_dir))
    if trainer.is_world_process_zero():
        output = Path(training_args.output_dir)
        (output / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        (output / "all_results.json").write_text(json.dumps(results, indent=2, default=str))
        plot_training(trainer.state.log_history, output / "training.png")
        write_card(trainer, model_args, data_args, eval_results, synthetic is not None, task)
        if not model_args.use_lora:  # a full model: remote code, handler and pipeline beside it, ready to push
            complete_hub_folder(output)
        if push_to_hub:
            push_folder_to_hub(
                output,
                training_args.hub_model_id or output.name,
                private=bool(training_args.hub_private_repo),
                token=training_args.hub_token,
            )
    return results


def save_model(trainer: CFMoETrainer, processor, model_args: ModelArguments, output: Path) -> None:
    """The final model: weights (or LoRA adapter + `base/`, and `merged/` when asked) and processor."""
    if not model_args.use_lora:
        trainer.save_model()
    elif trainer.is_world_process_zero():
        save_lora_run(trainer.model, processor, output)
        if model_args.merge_lora:
            merge_lora_run(output, output / "merged")


def write_card(
    trainer, model_args: ModelArguments, data_args: DataArguments, eval_results: dict, synthetic: bool, task: str
) -> None:
    args = trainer.args
    settings = {
        **method_settings_from_config(trainer.model.config),
        "method": args.method,
        **{name: getattr(args, name) for name in LOSS_SETTINGS},
    }
    last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    write_model_card(
        args.output_dir,
        base_model=model_args.model_name_or_path,
        dataset_name=f"synthetic planted-cue {task} benchmark" if synthetic else data_args.dataset,
        method_settings=settings,
        eval_results=eval_results,
        routing_shares={k: v for k, v in last_log.items() if k.startswith("routing_")},
        repo_id=args.hub_model_id,
        task="sarcasm-detection" if task == "sarcasm" else "sentiment-analysis",
        synthetic=synthetic,
    )
