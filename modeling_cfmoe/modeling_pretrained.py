"""[`CFMoEPreTrainedModel`]: what every CF-MoE model shares: its config class, loading (safetensors only; a stock
LLaVA-family checkpoint wrapped by `from_base_pretrained`), saving (with the pipeline's entry in config.json) and
weight initialisation (every MoE site starts as the identity)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .base_families import CHECKPOINT_KEY_MAPPING
from .configuration_cfmoe import CFMoEConfig
from .context import ContextStatistics, core_projection
from .moe import AttentionRouter, BiasRouter, ExpertBank

logger = logging.get_logger(__name__)
WRAPPED_BASE = "model.mllm"  # where the classifier holds the LLaVA-family base
# checkpoints saved before the classifier held its body as `model` (version 0.1 of cfmoe): the body's modules sat at
# the top, the label statistics were `context_statistics`
LEGACY_KEY_MAPPING = {
    r"^(mllm|visual_moe|text_moe)\.": r"model.\1.",
    r"^context_statistics\.": "model.rows.statistics.",
}
BIAS_ROUTER_GAIN = 4.0  # initial score per unit of bias evidence (log(1 + spread)) on the expert of that kind


class CFMoEPreTrainedModel(PreTrainedModel):
    config_class = CFMoEConfig
    config: CFMoEConfig
    base_model_prefix = "model"  # the classifier's body, as LLaVA's
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]
    # routing and the context statistics stay float32 when a checkpoint loads in half precision
    _keep_in_fp32_modules_strict = ["router", "statistics"]

    @classmethod
    def from_pretrained(cls, *args, use_safetensors: bool | None = True, key_mapping: dict | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained` that reads safetensors only (pickle weight files, `*.bin`, can run code
        when loaded, so they are refused unless the caller opts in with `use_safetensors=False`) and checkpoints
        saved before the classifier held its body (`LEGACY_KEY_MAPPING`)."""
        key_mapping = LEGACY_KEY_MAPPING if key_mapping is None else key_mapping
        return super().from_pretrained(*args, use_safetensors=use_safetensors, key_mapping=key_mapping, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Saves the in-memory key layout (v5 would otherwise write the llava-hf legacy layout for the base),
        so that raw state-dict loads (Trainer's best model and resume) see the same keys as the model. The
        pipeline's save hook names it in config.json, and importing it here saves its code beside the model's."""
        from .pipeline_cfmoe import add_pipeline_entry

        self.config.custom_pipelines = add_pipeline_entry(getattr(self.config, "custom_pipelines", None))
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resizes the base's token embeddings (and its text config's `vocab_size`) and the token statistics: new
        tokens start unseen."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        for module in self.modules():
            if isinstance(module, ContextStatistics):
                module.resize_vocabulary(self.config.get_text_config().vocab_size)
        return embeddings

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.base_config.text_config, "initializer_range", 0.02)
        if isinstance(module, ExpertBank):
            init.normal_(module.up, mean=0.0, std=std)
            init.zeros_(module.up_bias)
            init.zeros_(module.down)  # every MoE site starts as the identity: the base is untouched at step 0
            init.zeros_(module.down_bias)
        elif isinstance(module, AttentionRouter):
            init.normal_(module.expert_keys, mean=0.0, std=1.0)
        elif isinstance(module, BiasRouter):  # expert 0: weak evidence; expert 1 + f: evidence of kind f
            num_experts, num_evidence = module.weight.shape
            bias = torch.zeros(num_experts, device=module.bias.device)
            bias[0] = BIAS_ROUTER_GAIN * math.log(2.0)  # expert 0 leads while every spread stays below 1
            eye = torch.eye(num_experts - 1, num_evidence, device=module.weight.device)
            init.copy_(module.weight, BIAS_ROUTER_GAIN * nn.functional.pad(eye, (0, 0, 1, 0)))
            init.copy_(module.bias, bias)
        elif isinstance(module, ContextStatistics):  # nothing counted yet; the fixed image-core projection
            for name, buffer in module.named_buffers(recurse=False):
                if name == "core_projection":
                    init.copy_(buffer, core_projection(*buffer.shape).to(buffer.device))
                else:
                    init.zeros_(buffer)

    @classmethod
    def from_base_pretrained(
        cls,
        base_model_name_or_path: str,
        num_labels: int = 2,
        id2label: dict[int, str] | None = None,
        config_kwargs: dict | None = None,
        **from_pretrained_kwargs,
    ):
        """Wrap an existing LLaVA-family checkpoint: its weights loaded, experts and heads freshly initialised.

        Accepts stock llava-hf layouts (legacy and v5 keys). `config_kwargs` go to [`CFMoEConfig`] (experts,
        counterfactuals); the rest (`dtype`, `device_map`, `quantization_config`, ...) to `from_pretrained`.
        """
        base_config = AutoConfig.from_pretrained(
            base_model_name_or_path, trust_remote_code=from_pretrained_kwargs.get("trust_remote_code")
        )
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        config = CFMoEConfig(
            base_config=base_config.to_dict(),
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **(config_kwargs or {}),
        )
        # transformers' load report would list every new module as MISSING and the base's unused lm_head as
        # UNEXPECTED: both are ignored for this load, so that the report shows only what the base really lacks
        saved = cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected
        cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = (
            [r"^(?!model\.mllm\.)"],
            ["lm_head"],
        )
        try:
            model, info = cls.from_pretrained(
                base_model_name_or_path,
                config=config,
                key_mapping=CHECKPOINT_KEY_MAPPING,
                output_loading_info=True,
                **from_pretrained_kwargs,
            )
        finally:
            cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = saved
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(
                f"{base_model_name_or_path} does not match its config: missing base weights "
                f"{sorted(info['missing_keys'])[:5]}, unexpected weights {sorted(info['unexpected_keys'])[:5]}"
            )
        new = sorted(
            {key.removeprefix("model.").split(".")[0] for key in model.state_dict() if ".mllm." not in f".{key}"}
        )
        logger.info("%s: every base weight loaded; initialised %s", base_model_name_or_path, ", ".join(new))
        return model
