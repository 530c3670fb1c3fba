"""Arguments of the run scripts (`examples/run_sarcasm.py`, `examples/run_sentiment.py`) and their defaults.

Defaults depend on what is trained, and live in the argument dataclasses, so `--help` shows the ones that run:
- no `--model_name_or_path`: the tiny offline model on the synthetic benchmark ([`TinyTrainingArguments`]);
- a real checkpoint (`--recipe llava`, implied by `--model_name_or_path` unless `--recipe tiny`): the LLaVA-1.5
  fine-tuning recipe (`scripts/v1_5/finetune_task.sh`, full fine-tune, and
  `finetune_task_lora.sh`, LoRA) sized for one 80 GB GPU ([`CheckpointTrainingArguments`],
  [`LoraCheckpointTrainingArguments`], [`CheckpointModelArguments`]).
[`parse_args`] picks the set from the command line; every value can be overridden.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import HfArgumentParser
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.utils import is_torch_bf16_gpu_available

from modeling_cfmoe import CFMoEConfig

from .training_args import CFMoETrainingArguments

TINY, CHECKPOINT, LORA = 0, 1, 2
BF16_GPU = is_torch_bf16_gpu_available()  # bf16 for a checkpoint where the GPU has it (False on CPU)
# Defaults that depend on what is trained: (tiny model, real checkpoint, real checkpoint with --use_lora).
# Checkpoint values: LLaVA-1.5 fine-tuning (vision tower frozen, lr 2e-5 full / 2e-4 LoRA, LoRA r 128 alpha 256,
# warm-up 3%, cosine, no weight decay, bf16, gradient checkpointing, 1 epoch, global batch 128), here 8 items x 16
# accumulation steps on one GPU; evaluation and saving every 10% of training for model selection.
RUN_DEFAULTS: dict[str, tuple[Any, Any, Any]] = {
    "num_train_epochs": (8.0, 1.0, 1.0),
    "per_device_train_batch_size": (32, 8, 8),
    "gradient_accumulation_steps": (1, 16, 16),
    "per_device_eval_batch_size": (128, 8, 8),
    "learning_rate": (1e-3, 2e-5, 2e-4),
    "weight_decay": (0.01, 0.0, 0.0),
    "warmup_steps": (0.05, 0.03, 0.03),
    "eval_strategy": ("epoch", "steps", "steps"),
    "save_strategy": ("epoch", "steps", "steps"),
    "eval_steps": (None, 0.1, 0.1),
    "save_steps": (500, 0.1, 0.1),
    "dataloader_num_workers": (0, 4, 4),
    "activation_checkpointing": (False, True, True),
    "bf16": (False, BF16_GPU, BF16_GPU),
    "freeze_vision_tower": (False, True, True),
    "lora_r": (16, 128, 128),
    "lora_alpha": (32, 256, 256),
}


def _help(base: str, name: str) -> str:
    tiny, checkpoint, lora = RUN_DEFAULTS[name]
    if name == "bf16":
        checkpoint = lora = f"True on a GPU with bf16 support, else False (here {BF16_GPU})"
    with_lora = f" ({lora} with --use_lora)" if lora != checkpoint else ""
    return f"{base} [tiny recipe: {tiny}; llava recipe (a --model_name_or_path): {checkpoint}{with_lora}]"


def _training_field(name: str, default: Any):
    """`TrainingArguments.<name>` (help and parser settings kept) with another default."""
    return field(default=default, metadata=CFMoETrainingArguments.__dataclass_fields__[name].metadata)


def _default(name: str, which: int, base_help: str | None = None):
    """A field defaulting to `RUN_DEFAULTS[name][which]`, its help naming the value of every set."""
    if base_help is None:
        base_help = CFMoETrainingArguments.__dataclass_fields__[name].metadata.get("help", "")
    return field(default=RUN_DEFAULTS[name][which], metadata={"help": _help(base_help, name)})


@dataclass
class ModelArguments:
    """The model: the tiny offline default or a checkpoint, CF-MoE config overrides, LoRA and quantisation."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a CF-MoE checkpoint or a LLaVA-family base (llava, llava_next, llava_onevision); "
            "empty: the tiny offline default. Several defaults depend on it (see their help)"
        },
    )
    recipe: Literal["auto", "tiny", "llava"] = field(
        default="auto",
        metadata={
            "help": "which defaults: tiny (the tiny model's), llava (LLaVA-1.5 fine-tuning's) or auto (tiny without "
            "--model_name_or_path, llava with one); e.g. tiny for a small local base"
        },
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={
            "help": "dtype a checkpoint's weights are loaded in: float32 (master weights for mixed precision with "
            "--bf16), bfloat16 (half the memory; the optimizer then updates bf16 weights) or auto (the checkpoint's "
            "own: float16 for llava-hf, which AdamW cannot train)"
        },
    )
    num_visual_experts: int | None = field(default=None, metadata={"help": "experts after the projector"})
    num_text_experts: int | None = field(default=None, metadata={"help": "experts after the language model"})
    experts_top_k: int | None = field(default=None, metadata={"help": "experts kept per item by the router"})
    router_input: Literal["bias", "content"] | None = field(
        default=None,
        metadata={"help": "routers read each item's bias evidence (bias, the default) or its pooled content"},
    )
    uniform_gates: bool | None = field(default=None, metadata={"help": "ablation: every expert weighted equally"})
    counterfactual_fraction: float | None = field(
        default=None, metadata={"help": "fraction of the items that get fine-grained counterfactual rows (1.0)"}
    )
    counterfactual_types: str | None = field(
        default=None, metadata={"help": "comma separated: context_swapped (default), core_masked"}
    )
    text_counterfactuals: bool = field(default=True, metadata={"help": "counterfactual rows edit the text"})
    image_counterfactuals: bool = field(default=True, metadata={"help": "counterfactual rows edit the image"})
    inference_mode: Literal["fused", "tie"] | None = field(
        default=None, metadata={"help": "fused (one pass, default) or tie (subtract the direct effects; cfvqa's)"}
    )
    expert_intermediate_size: int | None = field(default=None, metadata={"help": "bottleneck width of an expert"})
    router_jitter: float | None = field(default=None, metadata={"help": "router input noise in training"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "load-balancing coefficient"})
    classifier_dropout: float | None = field(default=None, metadata={"help": "dropout before the heads"})
    prompt_template: str | None = field(default=None, metadata={"help": "prompt with {image} and {text}"})
    detach_bias_branches: bool | None = field(
        default=None, metadata={"help": "bias branches read stop-gradient states (probes; they never shape the base)"}
    )
    freeze_vision_tower: bool = _default(
        "freeze_vision_tower", TINY, "do not train the base's vision tower (its LoRA weights included), as LLaVA-1.5"
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the base; experts, routers, heads trained fully"})
    lora_r: int = _default("lora_r", TINY, "LoRA rank")
    lora_alpha: int = _default("lora_alpha", TINY, "LoRA alpha")
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "regex of LoRA targets; default: the base LM's attention and MLP projections"}
    )
    lora_include_vision: bool = field(default=False, metadata={"help": "LoRA on the vision tower too"})
    merge_lora: bool = field(default=False, metadata={"help": "also write a merged full checkpoint to OUTPUT/merged"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base in NF4 (QLoRA with --use_lora)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base in LLM.int8"})

    def __post_init__(self):
        if not (self.text_counterfactuals or self.image_counterfactuals):
            raise ValueError(
                "text_counterfactuals and image_counterfactuals cannot both be False; set "
                "--counterfactual_fraction 0 to switch the counterfactual rows off"
            )
        if self.lora_include_vision and self.freeze_vision_tower:
            raise ValueError(
                "--lora_include_vision trains LoRA weights in the vision tower, which --freeze_vision_tower keeps "
                "frozen (the default with a checkpoint): pass --freeze_vision_tower False with it"
            )

    def config_kwargs(self) -> dict:
        """The CF-MoE config values given on the command line (every field named as a `CFMoEConfig` argument, and
        the counterfactual modalities)."""
        names = [name for name in inspect.signature(CFMoEConfig.__init__).parameters if hasattr(self, name)]
        kwargs = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if "counterfactual_types" in kwargs:
            kwargs["counterfactual_types"] = [t.strip() for t in kwargs["counterfactual_types"].split(",") if t.strip()]
        modalities = {"text": self.text_counterfactuals, "image": self.image_counterfactuals}
        if not all(modalities.values()):
            kwargs["counterfactual_modalities"] = [name for name, on in modalities.items() if on]
        return kwargs


@dataclass
class CheckpointModelArguments(ModelArguments):
    """[`ModelArguments`] with a real checkpoint's defaults (LLaVA-1.5's frozen vision tower, LoRA rank and alpha)."""

    freeze_vision_tower: bool = _default(
        "freeze_vision_tower",
        CHECKPOINT,
        "do not train the base's vision tower (its LoRA weights included), as LLaVA-1.5",
    )
    lora_r: int = _default("lora_r", CHECKPOINT, "LoRA rank")
    lora_alpha: int = _default("lora_alpha", CHECKPOINT, "LoRA alpha")


@dataclass
class DataArguments:
    """The data: the synthetic benchmark (sizes, noise, cues) or a real data set's folder."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "synthetic (the task's planted-cue benchmark); mmsd (MMSD 1.0: its text release "
            "DATA_DIR/text/{train,valid2,test2}.txt with the release's discard words applied, or the JSON layout); "
            "mmsd2 (DATA_DIR/{train,valid,test}.json, e.g. MMSD2.0's data/text_json_final); mvsa_single, "
            "mvsa_multiple (docs/real_data.md)"
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "folder of a real data set"})
    image_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of <id>.jpg when not under data_dir, or one image file used for every item (a "
            "placeholder where the images are not at hand: a text-only run)"
        },
    )
    ood_file: str | None = field(
        default=None,
        metadata={"help": "DMSD-CL OOD file (data/clean_data/ood_all.txt, or JSON lines), evaluated as test_ood"},
    )
    extra_test: str | None = field(
        default=None,
        metadata={
            "help": "more test splits, NAME=DIR[,NAME=DIR]: the test split of data set NAME (mmsd or mmsd2) in DIR, "
            "evaluated as test_NAME (images from --image_dir), e.g. mmsd2=/data/MMSD2.0/data/text_json_final"
        },
    )
    num_train: int = field(default=4000, metadata={"help": "synthetic: training items"})
    num_validation: int = field(default=1000, metadata={"help": "synthetic: validation items (model selection)"})
    num_test: int = field(default=1000, metadata={"help": "synthetic: items per test split"})
    label_noise: float = field(default=0.2, metadata={"help": "synthetic: training label noise eta"})
    rho_train: float = field(default=0.95, metadata={"help": "synthetic: cue-label agreement in training"})
    cue_setting: str = field(
        default="tint_hashtag", metadata={"help": "synthetic: the planted cues' forms (docs/benchmark.md)"}
    )
    data_seed_offset: int = field(default=0, metadata={"help": "synthetic: data seed = training seed + offset"})
    max_length: int | None = field(default=None, metadata={"help": "max tokens; only text is ever truncated"})
    skip_bad_examples: bool = field(default=False, metadata={"help": "skip and count bad items instead of failing"})
    verify_images: bool = field(default=False, metadata={"help": "open every image while loading real data"})


@dataclass
class RunTrainingArguments(CFMoETrainingArguments):
    """[`CFMoETrainingArguments`] with the defaults shared by every run of the run scripts."""

    output_dir: str | None = _training_field("output_dir", "outputs/cfmoe")
    lr_scheduler_type: SchedulerType | str = _training_field("lr_scheduler_type", "cosine")
    logging_steps: float = _training_field("logging_steps", 10)
    save_total_limit: int | None = _training_field("save_total_limit", 2)
    load_best_model_at_end: bool = _training_field("load_best_model_at_end", True)
    metric_for_best_model: str | None = _training_field("metric_for_best_model", "inferred_worst_group_accuracy")
    report_to: None | str | list[str] = _training_field("report_to", "none")

    def __post_init__(self):
        if self.gradient_checkpointing is not None:  # the deprecated alias was given: it decides
            self.activation_checkpointing = None
        super().__post_init__()


@dataclass
class TinyTrainingArguments(RunTrainingArguments):
    """Training defaults of the tiny offline model on the synthetic benchmark (about 3 minutes on 2 CPU cores)."""

    num_train_epochs: float = _default("num_train_epochs", TINY)
    per_device_train_batch_size: int = _default("per_device_train_batch_size", TINY)
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps", TINY)
    per_device_eval_batch_size: int = _default("per_device_eval_batch_size", TINY)
    learning_rate: float = _default("learning_rate", TINY)
    weight_decay: float = _default("weight_decay", TINY)
    warmup_steps: float = _default("warmup_steps", TINY)
    eval_strategy: IntervalStrategy | str = _default("eval_strategy", TINY)
    save_strategy: SaveStrategy | str = _default("save_strategy", TINY)
    eval_steps: float | None = _default("eval_steps", TINY)
    save_steps: float = _default("save_steps", TINY)
    dataloader_num_workers: int = _default("dataloader_num_workers", TINY)
    activation_checkpointing: bool | None = _default("activation_checkpointing", TINY)
    bf16: bool = _default("bf16", TINY)


@dataclass
class CheckpointTrainingArguments(RunTrainingArguments):
    """Training defaults for a real checkpoint: LLaVA-1.5's full fine-tuning recipe on one GPU."""

    num_train_epochs: float = _default("num_train_epochs", CHECKPOINT)
    per_device_train_batch_size: int = _default("per_device_train_batch_size", CHECKPOINT)
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps", CHECKPOINT)
    per_device_eval_batch_size: int = _default("per_device_eval_batch_size", CHECKPOINT)
    learning_rate: float = _default("learning_rate", CHECKPOINT)
    weight_decay: float = _default("weight_decay", CHECKPOINT)
    warmup_steps: float = _default("warmup_steps", CHECKPOINT)
    eval_strategy: IntervalStrategy | str = _default("eval_strategy", CHECKPOINT)
    save_strategy: SaveStrategy | str = _default("save_strategy", CHECKPOINT)
    eval_steps: float | None = _default("eval_steps", CHECKPOINT)
    save_steps: float = _default("save_steps", CHECKPOINT)
    dataloader_num_workers: int = _default("dataloader_num_workers", CHECKPOINT)
    activation_checkpointing: bool | None = _default("activation_checkpointing", CHECKPOINT)
    bf16: bool = _default("bf16", CHECKPOINT)


@dataclass
class LoraCheckpointTrainingArguments(CheckpointTrainingArguments):
    """Training defaults for LoRA on a real checkpoint: LLaVA-1.5's LoRA recipe (a 10x larger learning rate)."""

    learning_rate: float = _default("learning_rate", LORA)


def run_argument_classes(recipe: str, model_name_or_path: str | None, use_lora: bool) -> tuple[type, type, type]:
    """The (model, data, training) argument dataclasses whose defaults fit what is trained."""
    if recipe == "tiny" or (recipe == "auto" and model_name_or_path is None):
        return ModelArguments, DataArguments, TinyTrainingArguments
    training = LoraCheckpointTrainingArguments if use_lora else CheckpointTrainingArguments
    return CheckpointModelArguments, DataArguments, training


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CFMoETrainingArguments]:
    """(model, data, training) arguments of a run script's command line (`sys.argv[1:]` when None), with the
    defaults of what it trains (`--recipe`): the tiny model, or a checkpoint given by `--model_name_or_path` (with
    `--use_lora`). `--help` lists the defaults of the command line it comes with."""
    argv = sys.argv[1:] if argv is None else list(argv)
    peek = HfArgumentParser(ModelArguments, add_help=False, allow_abbrev=False)
    model_args, _ = peek.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    parser = HfArgumentParser(
        run_argument_classes(model_args.recipe, model_args.model_name_or_path, model_args.use_lora),
        description="Defaults shown are those of this command line: add --model_name_or_path PATH (and --use_lora "
        "True) before --help to see a real checkpoint's (the llava recipe).",
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.method == "cfvqa" and model_args.inference_mode is None:
        model_args.inference_mode = "tie"  # CF-VQA predicts with the total indirect effect
    return model_args, data_args, training_args
