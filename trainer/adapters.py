"""LoRA and 4/8-bit loading for CF-MoE: LoRA on the base model, full training of experts, routers and heads.

A LoRA run's output folder (written by [`save_lora_run`]):

    output_dir/adapter_model.safetensors, adapter_config.json   LoRA weights + trained experts, routers, heads
    output_dir/base/                                             the CF-MoE checkpoint the adapter applies to
    output_dir/<processor files>

`base/` holds every weight the adapter does not: the base model as loaded, the experts and heads as they were
before training (the adapter carries their trained copies), and the trained `prior_logits` and
`context_statistics` (a bare parameter and buffers that PEFT's `modules_to_save` cannot hold).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModel, AutoProcessor, BitsAndBytesConfig, PreTrainedModel

from cfmoe.modeling_cfmoe import BASE_FAMILIES, base_family
from cfmoe.modeling_cfmoe.modeling_pretrained import WRAPPED_BASE
from cfmoe.modeling_cfmoe.pipeline_cfmoe import save_pipeline

DEBIASING_MODULES = ["model.visual_moe", "model.text_moe", "fused_head", "text_head", "image_head"]
BASE = WRAPPED_BASE.replace(".", r"\.")  # where the CF-MoE model holds the wrapped base, as a regex
# bnb matches these from the start of a module's full name (or as a suffix of it): the projector needs its path
QUANTIZATION_SKIP_MODULES = [
    *DEBIASING_MODULES,
    *sorted({f"{WRAPPED_BASE}.{family.projector}" for family in BASE_FAMILIES.values()}),
    "lm_head",
]
EXTRA_TRAINABLE = ("prior_logits",)  # bare parameters of the CF-MoE model itself
BASE_DIR = "base"


def default_lora_target_modules(model: PreTrainedModel, include_vision: bool = False) -> str:
    """Regex (PEFT full-matches it against module names) over the base LM's attention and MLP projections,
    and the vision tower's when `include_vision` (the base family's `language_lora_targets` / `vision_lora_targets`);
    never the experts, routers or heads."""
    family = base_family(model.config.base_config.model_type)
    patterns = [rf"{BASE}\.{family.language_model}\.{family.language_lora_targets}"]
    if include_vision:
        patterns.append(rf"{BASE}\.{family.vision_tower}\.{family.vision_lora_targets}")
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in names):
            raise ValueError(
                f"no module of {type(model).__name__} matches the LoRA target pattern {pattern!r}; "
                "pass target_modules= for this base model"
            )
    return patterns[0] if len(patterns) == 1 else f"(?:{'|'.join(patterns)})"


def apply_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] | None = None,
    include_vision: bool = False,
    train_projector: bool = True,
) -> PeftModel:
    """LoRA on the base model; experts, routers, heads (and the projector) trained in full, `prior_logits` too.

    No `task_type`: the generic `PeftModel` forwards every keyword (`pixel_values`, `counterfactuals`).
    """
    family = base_family(model.config.base_config.model_type)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or default_lora_target_modules(model, include_vision),
        modules_to_save=DEBIASING_MODULES + ([f"{WRAPPED_BASE}.{family.projector}"] if train_projector else []),
    )
    peft_model = get_peft_model(model, config)
    _set_extra_trainable(peft_model)
    return peft_model


def _set_extra_trainable(peft_model: PeftModel) -> None:
    base = peft_model.get_base_model()
    for name in EXTRA_TRAINABLE:
        getattr(base, name).requires_grad_(True)


def _unadapted_state_dict(base: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The wrapped model's weights without PEFT: base layers and the originals of the modules to save."""
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return state


def _save_base(base: PreTrainedModel, base_dir: Path) -> None:
    state = _unadapted_state_dict(base)
    base.save_pretrained(base_dir, state_dict=state)
    if getattr(base, "hf_quantizer", None) is not None:
        # transformers 5.23 replaces a given state_dict by the model's own (LoRA keys and all) when quantised
        for written in base_dir.glob("model*.safetensors*"):
            written.unlink()
        save_torch_state_dict(state, base_dir, metadata={"format": "pt"})


def save_lora_run(peft_model: PeftModel, processor, output_dir: str | Path) -> Path:
    """Writes the adapter, `output_dir/base/` (see the module docstring) and the processor; returns `output_dir`."""
    output_dir = Path(output_dir)
    base_dir = output_dir / BASE_DIR
    _save_base(peft_model.get_base_model(), base_dir)
    processor.save_pretrained(base_dir)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base_dir.resolve())  # `load_lora_run` reads base/ wherever it is
    peft_model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def load_lora_run(output_dir: str | Path, is_trainable: bool = False, **from_pretrained_kwargs) -> PeftModel:
    """The model of a LoRA run (`AutoPeftModel` cannot load remote-code bases, so base and adapter separately)."""
    output_dir = Path(output_dir)
    base = AutoModel.from_pretrained(output_dir / BASE_DIR, trust_remote_code=True, **from_pretrained_kwargs)
    peft_model = PeftModel.from_pretrained(base, output_dir, is_trainable=is_trainable)
    if is_trainable:
        _set_extra_trainable(peft_model)
        keep_4bit_differentiable(peft_model)
    return peft_model


def merge_lora_run(output_dir: str | Path, merged_dir: str | Path) -> Path:
    """Merges LoRA into the base and writes a full-precision checkpoint (model, remote code, processor, pipeline)
    that loads with `AutoModel.from_pretrained(merged_dir, trust_remote_code=True)`; returns `merged_dir`.
    A quantised base (QLoRA) is dequantised first."""
    output_dir = Path(output_dir)
    base = AutoModel.from_pretrained(output_dir / BASE_DIR, trust_remote_code=True)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize()  # QLoRA: merge into the dequantised base, not back into 4/8 bits
    merged = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    save_pipeline(merged, AutoProcessor.from_pretrained(output_dir), merged_dir)
    return Path(merged_dir)


def quantization_config(
    load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype: torch.dtype | None = None
) -> BitsAndBytesConfig | None:
    """bitsandbytes config for the base model (None when neither is asked for): NF4 with double quantisation,
    or LLM.int8; the experts, routers, heads, projector and `lm_head` stay unquantised.

    `compute_dtype` of 4-bit defaults to bf16 on CUDA (fp16 where bf16 is unsupported) and float32 elsewhere.
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "4-bit and 8-bit loading need bitsandbytes: pip install cfmoe[bnb] (or pip install bitsandbytes)"
        ) from error
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES))
    if compute_dtype is None:
        compute_dtype = torch.float32
        if torch.cuda.is_available():
            compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def prepare_for_kbit_training(model: PreTrainedModel, gradient_checkpointing: bool = True) -> PreTrainedModel:
    """PEFT's k-bit preparation (call before [`apply_lora`]): freezes every weight, upcasts fp16/bf16 weights that
    are not quantised to float32 and enables non-reentrant gradient checkpointing (no input-grad hook needed).

    Also applies [`keep_4bit_differentiable`].
    """
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return keep_4bit_differentiable(model)


def keep_4bit_differentiable(model: torch.nn.Module) -> torch.nn.Module:
    """Keeps 4-bit layers off bitsandbytes' AVX512-BF16 CPU inference kernel. bnb 0.50 repacks a `Linear4bit` for
    it on the first no-grad eval forward on CPU (lossily: the double-quantised scales become bf16); that kernel has
    no backward, so a training step after an evaluation fails. No effect on GPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
