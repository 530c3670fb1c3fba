"""Arguments of the run scripts (`examples/run_sarcasm.py`, `examples/run_sentiment.py`) and their defaults.

Defaults depend on what is trained, and live in the argument dataclasses, so `--help` shows the ones that run:
- no `--model_name_or_path`: the tiny offline model on the synthetic benchmark ([`TinyTrainingArguments`]);
- a real checkpoint (`--recipe llava`, implied by `--model_name_or_path` unless `--recipe tiny`): the LLaVA-1.5
  fine-tuning recipe (`scripts/v1_5/finetune_task.sh`, full fine-tune, and
  `finetune_task_lora.sh`, LoRA) sized for one 80 GB GPU ([`CheckpointTrainingArguments`],
  [`LoraCheckpointTrainingArguments`], [`CheckpointModelArguments`]).
[`parse_args`] picks the set from the command line (`recipe_flags`, read before the parse) and parses it once;
every value can be overridden.

Every flag is a dataclass field, declared here or in [`CFMoETrainingArguments`]: the CF-MoE config values in
[`ConfigArguments`], one per `CFMoEConfig` argument (`CONFIG_FLAGS`; `tests/test_command_line.py` checks that no
config knob lacks one). [`RunArgumentParser`] lists each in its `--help` group (`HELP_GROUPS`, `help_group`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.utils import is_torch_bf16_gpu_available

from cfmoe.modeling_cfmoe import SUPPORTED_BASE_MODEL_TYPES, CFMoEConfig

from .data.synthetic import SyntheticConfig
from .errors import UserValueError, name_flags, require, user_input
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

# what CFMoETrainingArguments adds to TrainingArguments: the --help group "method"
METHOD_FIELDS = tuple(
    f.name for f in fields(CFMoETrainingArguments) if f.name not in TrainingArguments.__dataclass_fields__
)
HELP_GROUPS = {  # --help_all: the groups of the run scripts' options, in this order; --help: the first four
    "data": "the synthetic benchmark (sizes, noise, cues) or a real data set's folder",
    "model": "the tiny offline default or a checkpoint, LoRA and quantisation",
    "method": "the debiasing method and the weights of its loss terms",
    "training": "where the run writes and how long it trains (transformers.TrainingArguments; some defaults set "
    "by the run scripts, see their help)",
    "model config": "CF-MoE config values; a CF-MoE checkpoint keeps its own unless one is given",
    "more training": "every other transformers.TrainingArguments option",
}
# what --help lists (--help_all: everything), by group
SHORT_HELP = {
    "data": ("dataset", "data_dir", "image_dir", "ood_file", "extra_test", "num_train", "cue_setting",
             "skip_bad_examples"),
    "model": ("model_name_or_path", "recipe", "dtype", "freeze_vision_tower", "use_lora", "load_in_4bit"),
    "method": ("method", "debias_warmup_ratio"),
    "training": ("output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "seed", "bf16", "use_cpu", "eval_strategy", "save_strategy",
                 "resume_from_checkpoint", "push_to_hub", "hub_model_id", "log_level"),
}  # fmt: skip


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


def _config(help_text: str, default: Any) -> Any:
    """A CF-MoE config flag: None, its value when not given, keeps the config's (`default`, stated in the help) or a
    CF-MoE checkpoint's own."""
    shown = repr(default) if isinstance(default, str) else default
    text = f"{help_text} (default: {shown}; a CF-MoE checkpoint: its own)"
    return field(default=None, metadata={"help": text.replace("%", "%%")})


@dataclass
class ConfigArguments:
    """The CF-MoE config values of the command line: one flag per `CFMoEConfig` argument, in its order and named as
    it, but `base_config` (from --model_name_or_path) and `counterfactual_modalities` (--text_counterfactuals,
    --image_counterfactuals). None keeps the config's value; [`ModelArguments.config_kwargs`] turns the others into
    the config's keywords."""

    _argument_group_name = "model config"

    num_visual_experts: int | None = _config(
        "visual side (--num_text_experts sets the text side): experts of the debiasing MoE after the projector; 1 is "
        "one residual bottleneck MLP, with more a router picks --experts_top_k of them per item",
        1,
    )
    num_text_experts: int | None = _config(
        "text side (--num_visual_experts sets the visual side): experts of the debiasing MoE after the language "
        "model; 1 is one residual bottleneck MLP, with more a router picks --experts_top_k of them per item",
        1,
    )
    experts_top_k: int | None = _config("experts kept per item by the router (gates renormalised over them)", 1)
    router_input: Literal["bias", "content"] | None = _config(
        "what the routers read: bias (each item's bias evidence: how strongly its text, local pixels and overall "
        "colour carry a shortcut) or content (the pooled item state, which also carries the cue's value)",
        "bias",
    )
    uniform_gates: bool | None = _config("every expert weighted 1/num_experts, whatever the router says", False)
    expert_intermediate_size: int | None = _config("bottleneck width of each expert; None: hidden size // 4", None)
    router_jitter: float | None = _config("multiplicative noise on the router input while training", 0.01)
    router_temperature: float | None = _config("softmax temperature of the attention router", 1.0)
    router_aux_loss_coef: float | None = _config(
        "weight of the load-balance aux_loss in the model's loss and the training objective", 0.01
    )
    pooling: Literal["mean", "last"] | None = _config("mean over attended tokens or the last attended token", "mean")
    classifier_dropout: float | None = _config("dropout before the heads", 0.0)
    counterfactual_fraction: float | None = _config(
        "fraction of the items that get fine-grained counterfactual rows in training", 1.0
    )
    counterfactual_types: str | None = _config(
        "comma separated: context_swapped (the item's context replaced by another item's, its core kept), "
        "core_masked (its core removed, its context kept)",
        "context_swapped",
    )
    text_context_threshold: float | None = _config(
        "a token is text context when its training items lean toward one class at least this far of the way from "
        "the class prior to certainty (0.7: 85% of its items in one of two balanced classes) and it is blind to the "
        "image core; its whole word is context",
        0.7,
    )
    context_support: float | None = _config(
        "pseudo-items pulling a token's class distribution toward the prior before it is scored (10: a token in 10 "
        "items, all of one class, gets half of the way)",
        10.0,
    )
    core_dependence_threshold: float | None = _config(
        "a token whose items' image core differs within their class by at least this many standard deviations "
        "moves with the image: it is core, whatever its strength (needs images; --core_dependence_test False: no "
        "such test)",
        0.15,
    )
    context_without_core_evidence: Literal["leak_forms", "strength"] | None = _config(
        "what decides where the image core cannot test a token (text-only data, one placeholder image): leak_forms "
        "(only tokens used mostly in hashtags, mentions, URLs, emoji, placeholders or whitespace artefacts can be "
        "context) or strength (every token that points at one class is context)",
        "leak_forms",
    )
    declared_text_context: list[str] | None = _config(
        "word patterns that are always context: regular expressions matched against each vocabulary piece, or "
        "hashtag, mention, url, emoji",
        None,
    )
    protected_words: list[str] | None = _config("words and phrases that are never context", None)
    discover_text_context: bool | None = _config(
        "text side: find context from the statistics (False: only what is declared)", True
    )
    discover_image_context: bool | None = _config(
        "image side: find context from the statistics (False: only what is declared)", True
    )
    declared_image_context: list[float] | None = _config(
        "left top right bottom, 4 numbers per box: image regions that are always context, as fractions of the image "
        "side (0 0 0.25 0.25: a watermark in the top-left corner)",
        None,
    )
    image_context_threshold: float | None = _config(
        "image context is the image's mean colour plus the pixels whose local discriminant scores reach this "
        "fraction of the batch's strongest pixel",
        0.5,
    )
    context_covariance_pixels: int | None = _config(
        "the pixel covariance is counted from the first images of each training batch that reach this many pixels "
        "(at least one image): its cost stays bounded at large images",
        32768,
    )
    detach_bias_branches: bool | None = _config(
        "the text-only and image-only heads read stop-gradient states: they measure one modality without shaping "
        "the shared base (docs/method.md)",
        True,
    )
    inference_mode: Literal["fused", "tie"] | None = _config(
        "fused (one pass) or tie (subtract the direct effects)", "fused"
    )
    prompt_template: str | None = _config(
        "how an item becomes a prompt, with {image} (the processor's image token) and {text}; saved with the model",
        "{image}\n{text}",
    )


# the CF-MoE config flags (`tests/test_command_line.py` checks them against `CFMoEConfig`'s arguments)
CONFIG_FLAGS = tuple(f.name for f in fields(ConfigArguments))


@dataclass
class ModelLoadingArguments:
    """The model's loading arguments: the tiny offline default or a checkpoint, LoRA and quantisation."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"a CF-MoE checkpoint or a LLaVA-family base ({', '.join(SUPPORTED_BASE_MODEL_TYPES)}); "
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
    text_counterfactuals: bool = field(default=True, metadata={"help": "counterfactual rows edit the text"})
    image_counterfactuals: bool = field(default=True, metadata={"help": "counterfactual rows edit the image"})
    core_dependence_test: bool = field(
        default=True, metadata={"help": "release tokens that move with the image core (False: strength alone)"}
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


@dataclass
class ModelArguments(ConfigArguments, ModelLoadingArguments):
    """The model: the tiny offline default or a checkpoint, LoRA and quantisation ([`ModelLoadingArguments`]), and
    the CF-MoE config values given ([`ConfigArguments`])."""

    _argument_group_name = "model"

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
        require(self.lora_r >= 1, "lora_r", ">= 1", self.lora_r)
        require(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)", self.lora_dropout)
        if self.declared_image_context is not None and len(self.declared_image_context) % 4:
            raise ValueError(
                f"--declared_image_context takes 4 numbers per box (left top right bottom), got "
                f"{len(self.declared_image_context)}"
            )
        self._check_config_values()

    def _check_config_values(self) -> None:
        """The CF-MoE config values given, checked by `CFMoEConfig` itself, its messages naming the flags."""
        values = self.config_kwargs()
        if self.model_name_or_path is not None:
            values.pop("experts_top_k", None)  # bounded by the checkpoint's own expert counts
        try:
            CFMoEConfig(**values)
        except ValueError as error:
            raise ValueError(name_flags(str(error), values)) from error

    def config_kwargs(self) -> dict:
        """The CF-MoE config values given on the command line, as `CFMoEConfig`'s (flat) keywords: the
        `CONFIG_FLAGS` given, in the config's forms, and the counterfactual modalities."""
        kwargs = {name: getattr(self, name) for name in CONFIG_FLAGS if getattr(self, name) is not None}
        if "counterfactual_types" in kwargs:
            kwargs["counterfactual_types"] = [t.strip() for t in kwargs["counterfactual_types"].split(",") if t.strip()]
        if not self.core_dependence_test:
            kwargs["core_dependence_threshold"] = None
        if "declared_image_context" in kwargs:
            values = kwargs["declared_image_context"]
            kwargs["declared_image_context"] = [values[i : i + 4] for i in range(0, len(values), 4)]
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


# DataArguments fields of the synthetic benchmark only: a real data set's run neither uses nor records them
SYNTHETIC_FIELDS = ("num_train", "num_validation", "num_test", "label_noise", "rho_train", "cue_setting",
                    "data_seed_offset")  # fmt: skip


@dataclass
class DataArguments:
    """The data: the synthetic benchmark (sizes, noise, cues) or a real data set's folder."""

    _argument_group_name = "data"

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "synthetic (the task's planted-cue benchmark); mmsd (MMSD 1.0: its text release "
            "DATA_DIR/text/{train,valid2,test2}.txt with the release's discard words applied, or the JSON layout); "
            "mmsd2 (DATA_DIR/{train,valid,test}.json, e.g. MMSD2.0's data/text_json_final); mvsa_single, "
            "mvsa_multiple (CLMLF's released splits DATA_DIR/{train,dev,test}.json, or MVSA's raw layout split 8:1:1; "
            "docs/real_data.md)"
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "folder of a real data set, e.g. /data/CLMLF/dataset/data/MVSA-single/10-flod-1"},
    )
    image_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder of <id>.jpg when not found beside data_dir (DATA_DIR/images, DATA_DIR/dataset_image, "
            "DATA_DIR/../dataset_image, DATA_DIR/../../dataset_image; raw MVSA: DATA_DIR/data), or one image file "
            "used for every item of every split (a placeholder where the images are not at hand: a text-only run)"
        },
    )
    ood_file: str | None = field(
        default=None,
        metadata={"help": "DMSD-CL OOD file (data/clean_data/ood_all.txt, or JSON lines), evaluated as test_ood"},
    )
    extra_test: str | None = field(
        default=None,
        metadata={
            "help": "more test splits, NAME=DIR[,NAME=DIR]: the test split of data set NAME in DIR, evaluated as "
            "test_NAME (images from --image_dir); NAME of the run's task: mmsd or mmsd2 for sarcasm (e.g. "
            "mmsd2=/data/MMSD2.0/data/text_json_final), mvsa_single or mvsa_multiple for sentiment (e.g. "
            "mvsa_multiple=/data/CLMLF/dataset/data/MVSA-multiple/10-flod-1)"
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

    def __post_init__(self):
        if self.max_length is not None:
            require(self.max_length >= 1, "max_length", ">= 1", self.max_length)
        if self.dataset != "synthetic":
            return
        for name in ("num_train", "num_validation", "num_test"):
            require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        try:  # the benchmark's own checks of its values (noise, agreement, cue setting; whatever the task)
            self.synthetic_config("sarcasm", 0)
        except ValueError as error:
            raise ValueError(name_flags(str(error), [f.name for f in fields(self)])) from error

    def synthetic_config(self, task: str, seed: int) -> SyntheticConfig:
        """The synthetic benchmark these arguments describe, for `task` and the training `seed`."""
        return SyntheticConfig(
            task=task,
            num_train=self.num_train,
            num_validation=self.num_validation,
            num_test=self.num_test,
            label_noise=self.label_noise,
            rho_train=self.rho_train,
            cue_setting=self.cue_setting,
            seed=seed + self.data_seed_offset,
        )


@dataclass
class RunTrainingArguments(CFMoETrainingArguments):
    """[`CFMoETrainingArguments`] with the defaults shared by every run of the run scripts."""

    _argument_group_name = "training"

    output_dir: str | None = _training_field("output_dir", "outputs/cfmoe")
    lr_scheduler_type: SchedulerType | str = _training_field("lr_scheduler_type", "cosine")
    logging_steps: float = _training_field("logging_steps", 10)
    save_total_limit: int | None = _training_field("save_total_limit", 2)
    load_best_model_at_end: bool = _training_field("load_best_model_at_end", True)
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "the validation metric that selects the best checkpoint; default: counterfactual_macro_f1 for "
            "cfmoe (macro-F1 on context-swapped validation rows), inferred_worst_group_accuracy for the others"
        },
    )
    report_to: None | str | list[str] = _training_field("report_to", "none")

    def __post_init__(self):
        self._check_output_dir()
        if self.gradient_checkpointing is not None:  # the deprecated alias was given: it decides
            self.activation_checkpointing = None
        super().__post_init__()

    def _check_output_dir(self) -> None:
        """`output_dir` must be a folder or a path where one can be made: not a file, nor under one."""
        path = Path(self.output_dir)
        existing = next(folder for folder in (path, *path.parents, Path(".")) if folder.exists())
        if not existing.is_dir():
            raise ValueError(f"--output_dir {self.output_dir}: {existing} is a file, not a folder; name another")


@dataclass
class TinyTrainingArguments(RunTrainingArguments):
    """Training defaults of the tiny offline model on the synthetic benchmark (about a minute on 2 CPU cores)."""

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
    `--use_lora`). `--help` lists the common options with the defaults of the command line it comes with,
    `--help_all` every option. A value the run cannot use (an unknown or abbreviated flag, a bad value) raises a
    [`~cfmoe.trainer.errors.UserInputError`] naming its flag. Where `--model_name_or_path` points is checked when
    the run starts ([`~cfmoe.trainer.model_source.check_model_source`]): a benchmark plans runs on bases it has not
    built yet."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with user_input():
        classes = run_argument_classes(**recipe_flags(argv))
        return run_argument_parser(classes, full_help="--help_all" in argv).parse_run_args(argv)


def recipe_flags(argv: list[str]) -> dict[str, Any]:
    """The flags that pick the argument classes (`run_argument_classes`), read from `argv` before it is parsed:
    `--recipe`, `--model_name_or_path` and `--use_lora` (the last of each; a bad value is the parse's to report)."""
    flags = {"recipe": "auto", "model_name_or_path": None, "use_lora": False}
    for index, argument in enumerate(argv):
        flag, given, value = argument.partition("=")
        name = flag[2:].replace("-", "_")
        if not flag.startswith("--") or name not in flags:
            continue
        if not given:  # `--flag VALUE`, or `--use_lora` alone: True
            following = argv[index + 1] if index + 1 < len(argv) else None
            alone = following is None or following.startswith("-")
            value = "true" if name == "use_lora" and alone else following
        # `--use_lora`'s value as transformers' `string_to_bool` reads it
        flags[name] = value.lower() in ("yes", "true", "t", "y", "1") if name == "use_lora" else value
    return flags


def unknown_arguments(known: list[str], unknown: list[str]) -> str:
    """The message for arguments a parser does not know, with the closest `known` flag of each unknown one."""
    flags = [argument.partition("=")[0] for argument in unknown if argument.startswith("-")] or unknown
    named = []
    for flag in flags:
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        named.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return f"unrecognized arguments: {', '.join(named)}"


def help_group(title: str, name: str) -> str:
    """The `HELP_GROUPS` group of the flag `name` of a dataclass whose `_argument_group_name` is `title`: the CF-MoE
    config values apart from the model's other flags ([`ConfigArguments`]), the training flags split into method
    (what [`CFMoETrainingArguments`] adds), training (`SHORT_HELP`) and more training."""
    if name in CONFIG_FLAGS:
        return ConfigArguments._argument_group_name
    if title != "training":
        return title
    if name in METHOD_FIELDS:
        return "method"
    return "training" if name in SHORT_HELP["training"] else "more training"


class RunHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option once (not its dashed alias), with one default: none added where the help names its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        dashed = {option.replace("_", "-") for option in action.option_strings if "_" in option}
        shown = copy.copy(action)
        shown.option_strings = [option for option in action.option_strings if option not in dashed]
        return super()._format_action_invocation(shown)


class DeclaredFlags:
    """What [`RunArgumentParser`] gives `HfArgumentParser` as a dataclass's argument group (which it asks for by the
    dataclass's `_argument_group_name`): it records the flags added, which the parser then adds to their
    `HELP_GROUPS` groups."""

    def __init__(self, title: str, declared: list[tuple[str, tuple[str, ...], dict[str, Any]]]) -> None:
        self.title, self.declared = title, declared

    def add_argument(self, *flags: str, **settings: Any) -> None:
        self.declared.append((self.title, flags, settings))


class RunArgumentParser(HfArgumentParser):
    """`HfArgumentParser` that takes no abbreviated flags, raises its errors as a
    [`~cfmoe.trainer.errors.UserValueError`] (the run scripts print it on one line) instead of printing the usage
    and exiting, and lists each flag in its `HELP_GROUPS` group (`help_group`): `--help` the `SHORT_HELP` ones,
    `--help_all` (`full_help`) every one."""

    def __init__(self, dataclass_types: tuple[type, ...], full_help: bool = False, **kwargs: Any) -> None:
        self.full_help = full_help
        self.declared: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []  # (dataclass group, flags, settings)
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=RunHelpFormatter, **kwargs)
        self.add_argument("--help_all", action="help", help="show every option and exit")
        self.known_flags = ["--help", "--help_all"]
        self._add_declared_flags()

    def add_argument_group(self, title: str | None = None, description: str | None = None, **kwargs: Any) -> Any:
        """argparse's group; for a dataclass's group (`HELP_GROUPS`), a [`DeclaredFlags`] recording its flags."""
        if title in HELP_GROUPS:
            return DeclaredFlags(title, self.declared)
        return super().add_argument_group(title, description, **kwargs)

    def _add_declared_flags(self) -> None:
        """The dataclasses' flags in their `HELP_GROUPS` groups; with `--help` (not `full_help`) the groups and
        flags not in `SHORT_HELP` unlisted, and never a `--no_X` (the description says it once)."""
        groups: dict[str, list] = {title: [] for title in HELP_GROUPS}
        for title, flags, settings in self.declared:
            name = settings.get("dest", flags[0][2:])
            group = help_group(title, name)
            if settings.get("action") == "store_false" or not (self.full_help or name in SHORT_HELP.get(group, ())):
                settings = {**settings, "help": argparse.SUPPRESS}
            groups[group].append((name, flags, settings))
        groups["training"].sort(key=lambda added: SHORT_HELP["training"].index(added[0]))  # output_dir, then length
        for title, added in groups.items():
            shown = self.full_help or title in SHORT_HELP
            group = super().add_argument_group(title, HELP_GROUPS[title] if shown else None)
            for _, flags, settings in added:
                group.add_argument(*flags, **settings)
                self.known_flags += [flag for flag in flags if flag.startswith("--")]

    def parse_run_args(self, argv: list[str]) -> tuple[Any, ...]:
        """One instance of each dataclass from `argv`, parsed once; an unknown flag is named before the
        dataclasses' own checks run."""
        namespace, unknown = self.parse_known_args(argv)
        if unknown:
            self.error(unknown_arguments(self.known_flags, unknown))
        values = vars(namespace)
        return tuple(
            dtype(**{f.name: values[f.name] for f in fields(dtype) if f.init}) for dtype in self.dataclass_types
        )

    def error(self, message: str) -> NoReturn:
        raise UserValueError(message)


def run_argument_parser(classes: tuple[type, type, type], full_help: bool = False) -> RunArgumentParser:
    """The run scripts' parser. Its `--help` lists the options a run sets first (`SHORT_HELP`) in the groups
    data, model, method and training; `--help_all` (`full_help`) lists every option, the CF-MoE config values and
    the other `TrainingArguments` options in two more groups (`HELP_GROUPS`)."""
    return RunArgumentParser(
        classes,
        full_help=full_help,
        usage="%(prog)s [--dataset NAME] [--model_name_or_path PATH] [--method METHOD] [--output_dir DIR] [...]",
        description="Defaults shown are those of this command line: add --model_name_or_path PATH (and --use_lora "
        "True) before --help to see a real checkpoint's (the llava recipe). An option X that takes True/False is "
        "also set False by --no_X. "
        + ("Every option is listed." if full_help else "The common options are listed: --help_all lists them all."),
    )
