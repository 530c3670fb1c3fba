"""What CF-MoE knows of each supported base family, one entry per `model_type` (as PEFT's per-model-type target
module mappings): which processor outputs its image encoder reads, where its parts sit, which modules LoRA adapts,
and the key layouts of its stock checkpoints. Code that needs base-specific knowledge reads it here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseFamily:
    """One LLaVA-family base.

    image_inputs: the processor outputs besides `pixel_values` that `get_image_features` reads (anyres tiling).
    vision_tower / projector / language_model: the submodules of the wrapped base (`model.mllm` of the classifier).
    language_lora_targets / vision_lora_targets: regexes, relative to the language model / vision tower, of the
        attention and MLP projections that LoRA adapts.
    """

    image_inputs: tuple[str, ...] = ("image_sizes",)
    vision_tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    language_model: str = "language_model"
    language_lora_targets: str = r"layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
    vision_lora_targets: str = r"(?:.+\.)?layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"


BASE_FAMILIES = {
    "llava": BaseFamily(),
    "llava_next": BaseFamily(),
    "llava_onevision": BaseFamily(image_inputs=("image_sizes", "batch_num_images")),
}
SUPPORTED_BASE_MODEL_TYPES = tuple(BASE_FAMILIES)
# Stock llava-hf checkpoints, into the classifier's `model.mllm`: the legacy layout (`language_model.model.*`) and v5's
# (`model.*`), for every family above.
CHECKPOINT_KEY_MAPPING = {
    r"^language_model\.model\.": "model.mllm.language_model.",
    r"^model\.(?!mllm\.)": "model.mllm.",
    r"^(vision_tower|multi_modal_projector|image_newline)": r"model.mllm.\1",
}


def base_family(model_type: str | None) -> BaseFamily:
    """The entry of `model_type`; a type without one raises `ValueError` naming the supported types."""
    if model_type not in BASE_FAMILIES:
        raise ValueError(
            f"base model type {model_type!r} is not supported; supported base model types are "
            f"{', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
        )
    return BASE_FAMILIES[model_type]
