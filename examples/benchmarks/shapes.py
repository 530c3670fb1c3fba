"""The models of `examples/benchmark_speed.py`: the tiny LLaVA enlarged to a patch grid (`tiny`), a LLaVA scaled
down with LLaVA-1.5-7B's proportions (`llava`), LLaVA-1.5-7B's real dimensions (`llava-7b`); random weights, wrapped
at the default CF-MoE configuration; the batch sizes, and LoRA as `--use_lora True` trains it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import LlavaConfig, PretrainedConfig

from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification
from cfmoe.trainer.adapters import apply_lora
from cfmoe.trainer.data.tiny import PATCH_SIZE, tiny_base_config

PAD, BOS, IMAGE_TOKEN, VOCAB = 0, 1, 4, 320
CLIP_PATCH = 14  # CLIP ViT-L/14 at 336 x 336 pixels: a 24 x 24 patch grid, 576 image tokens (+ CLS)


@dataclass(frozen=True)
class Shape:
    """One model of the benchmark: its patch size, its weights' dtype (None: float32), and for a LLaVA shape the
    config values of its Llama decoder (`text`) and CLIP vision tower (`vision`); None: the tiny LLaVA."""

    patch_size: int
    dtype: torch.dtype | None = None
    text: dict | None = None
    vision: dict | None = None


# `llava`: head sizes of LLaVA-1.5-7B (128 in the decoder, 64 in the tower), Llama's MLP ratio (11008 / 4096) and
# CLIP's (4), depths chosen so that the tower's forward FLOPs against the decoder's over 4 x (576 + 58) tokens,
# attention included, are 1 : 21.6, as LLaVA-1.5-7B's (0.3B CLIP ViT-L/14-336 over 577 tokens, 6.6B Llama-2-7B over
# 576 + 58: 1 : 22.1); one training step takes about 1.2-1.7 s on one CPU thread. `llava-7b`: Llama-2-7B and CLIP
# ViT-L/14-336, as `llava-hf/llava-1.5-7b-hf`, in bf16, AdamW's states too: 40 GB a runner between steps (in float32
# two runners would not fit 141 GB).
SHAPES = {
    "tiny": Shape(PATCH_SIZE),
    "llava": Shape(
        CLIP_PATCH,
        text={"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 5, "num_attention_heads": 2},
        vision={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1},
    ),
    "llava-7b": Shape(
        CLIP_PATCH,
        torch.bfloat16,
        text={
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        vision={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
        },
    ),
}


@dataclass(frozen=True)
class Size:
    """`batch` items, each with `image_tokens` image tokens (a square grid of `patch_size`-pixel patches) and up to
    `text_tokens`."""

    batch: int
    image_tokens: int
    text_tokens: int
    patch_size: int = PATCH_SIZE

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.image_tokens}"

    @property
    def image_size(self) -> int:
        return math.isqrt(self.image_tokens) * self.patch_size


def parse_sizes(spec: str, patch_size: int = PATCH_SIZE, text_ratio: float = 0.1) -> list[Size]:
    """`"8x64,4x576"` -> sizes with about `text_ratio` text tokens per image token (at least 4; 576 image tokens:
    58, a tweet and its prompt)."""
    sizes = []
    for item in spec.split(","):
        batch, tokens = (int(x) for x in item.strip().lower().split("x"))
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"image tokens must fill a square patch grid, got {tokens}")
        sizes.append(Size(batch, tokens, max(4, round(tokens * text_ratio)), patch_size))
    return sizes


LLAVA_SIZE = Size(4, 576, 58, CLIP_PATCH)  # LLaVA-1.5's: 4 items, 24 x 24 patches, a tweet of 44-58 tokens


def base_config(shape: str, size: Size) -> PretrainedConfig:
    """The LLaVA config of `shape` (`SHAPES`) with images of `size.image_size` pixels."""
    text, vision = SHAPES[shape].text, SHAPES[shape].vision
    if text is None:  # the tiny LLaVA: hidden 64, 2 layers in both towers
        base = tiny_base_config(vocab_size=VOCAB, image_token_id=IMAGE_TOKEN, pad_token_id=PAD)
        base.vision_config.image_size = size.image_size
        base.text_config.max_position_embeddings = 2048
        return base
    text = {"vocab_size": VOCAB, "max_position_embeddings": 2048, **text}
    return LlavaConfig(
        text_config={
            "model_type": "llama",
            "num_key_value_heads": text["num_attention_heads"],
            "pad_token_id": PAD,
            "bos_token_id": BOS,
            "eos_token_id": 2,
            **text,
        },
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": size.image_size,
            "patch_size": size.patch_size,
            "hidden_act": "quick_gelu",
            **vision,
        },
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_model(
    size: Size, seed: int = 0, shape: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> CFMoEForMultimodalClassification:
    """The `shape` LLaVA (`base_config`) wrapped at the default CF-MoE configuration, initialised from `seed`, its
    weights in `dtype` (None: float32; the context statistics and routers stay float32), on `device`: drawn on the
    CPU as `cfmoe.trainer.data.tiny` builds its models, elsewhere built on the meta device and initialised there
    (`initialise_on`), `meta`: no weights."""
    config = CFMoEConfig(base_config=base_config(shape, size).to_dict(), num_labels=2)
    torch.manual_seed(seed)
    if torch.device(device).type == "cpu":
        return CFMoEForMultimodalClassification._from_config(config, dtype=dtype)
    with torch.device("meta"):
        model = CFMoEForMultimodalClassification._from_config(config, dtype=dtype)
    return model if torch.device(device).type == "meta" else initialise_on(model, device)


def initialise_on(
    model: CFMoEForMultimodalClassification, device: str | torch.device
) -> CFMoEForMultimodalClassification:
    """`model`, built on the meta device, given storage on `device` and initialised there (`initialize_weights`, as
    `from_pretrained` initialises what a checkpoint lacks, buffers included): a 7B is never drawn on the CPU, and
    no factory runs under a device context (the context statistics draw their projection with a CPU generator)."""
    model.to_empty(device=device)
    model.initialize_weights()
    return model


def lora_model(model: CFMoEForMultimodalClassification) -> PeftModel:
    """LoRA as `--use_lora True` trains it (`cfmoe.trainer.adapters.apply_lora`: rank 16 on the language model's
    attention and MLP projections); the experts, routers, heads and projector trained in full."""
    return apply_lora(model)
