"""LoRA (train, save, reload, merge), 4/8-bit loading on CPU and a QLoRA step."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from test_modeling import REMOTE_LOADER
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration

from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification
from cfmoe.trainer.adapters import (
    QUANTIZATION_SKIP_MODULES,
    apply_lora,
    default_lora_target_modules,
    load_lora_run,
    merge_lora_run,
    prepare_for_kbit_training,
    quantization_config,
    save_lora_run,
)
from cfmoe.trainer.data.tiny import tiny_base_config

NOT_QUANTISED = (
    "model.visual_moe",
    "model.text_moe",
    "fused_head",
    "text_head",
    "image_head",
    "model.mllm.multi_modal_projector",
)


@pytest.fixture
def fresh_model(tiny_model_and_processor):
    return copy.deepcopy(tiny_model_and_processor[0]).train()


def _loss(out, labels):
    """Every branch and the prior (through the TIE-mode logits) take part: every trainable tensor gets a gradient."""
    ce = nn.functional.cross_entropy
    tie_logits = out.prior_logits + out.indirect_effect
    return out.loss + out.aux_loss + ce(out.text_only_logits, labels) + ce(tie_logits, labels)


def test_lora_targets_only_base_projections(fresh_model):
    names = [name for name, _ in fresh_model.named_modules()]
    language = [n for n in names if re.fullmatch(default_lora_target_modules(fresh_model), n)]
    assert len(language) == 2 * 7 and all(n.startswith("model.mllm.language_model.layers.") for n in language)
    both = [n for n in names if re.fullmatch(default_lora_target_modules(fresh_model, include_vision=True), n)]
    assert set(both) - set(language) == {n for n in both if n.startswith("model.mllm.vision_tower.")}
    assert len(both) == len(language) + 2 * 6  # q, k, v, out, fc1, fc2 per vision layer


def test_only_lora_experts_heads_projector_and_prior_are_trainable(fresh_model):
    peft_model = apply_lora(fresh_model, r=4, alpha=8)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".lora_" in name or ".modules_to_save.default." in name or name.endswith(".prior_logits"), name
    saved_modules = {name.split(".modules_to_save.")[0].removeprefix("base_model.model.") for name in trainable}
    assert set(NOT_QUANTISED) <= saved_modules
    assert any(name.endswith(".prior_logits") for name in trainable)
    assert not any("vision_tower" in name or "embed_tokens" in name for name in trainable)


def test_lora_train_save_reload_and_merge(fresh_model, processor, tiny_batch, tmp_path):
    peft_model = apply_lora(fresh_model, r=4, alpha=8, dropout=0.0)
    prior_before = fresh_model.prior_logits.detach().clone()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(0)
    for _ in range(3):
        peft_model.rows.update(tiny_batch["input_ids"], tiny_batch["labels"])
        _loss(
            peft_model(**tiny_batch, counterfactuals="factual_and_counterfactual_rows"), tiny_batch["labels"]
        ).backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    inputs = {k: v for k, v in tiny_batch.items() if k != "labels"}
    with torch.no_grad():
        trained = peft_model(**inputs).logits
    assert not torch.equal(fresh_model.prior_logits, prior_before) and fresh_model.rows.statistics.token_counts.any()

    run = save_lora_run(peft_model, processor, tmp_path / "run")
    assert {"adapter_model.safetensors", "adapter_config.json", "base"} <= {p.name for p in run.iterdir()}
    with safe_open(run / "base" / "model.safetensors", "pt") as base_file:
        assert set(base_file.keys()) == set(CFMoEForMultimodalClassification(fresh_model.config).state_dict())

    reloaded = load_lora_run(run).eval()
    for name in ("prior_logits", "model.rows.statistics.token_counts"):  # not in the adapter: carried by base/
        torch.testing.assert_close(reloaded.get_base_model().state_dict()[name], fresh_model.state_dict()[name])
    base_only = AutoModel.from_pretrained(run / "base").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=1e-6)
        assert not torch.allclose(base_only(**inputs).logits, trained, atol=1e-3)  # the adapter matters

    merged = merge_lora_run(run, tmp_path / "merged")
    torch.save(inputs, tmp_path / "batch.pt")
    (tmp_path / "load.py").write_text(REMOTE_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(merged), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), trained, rtol=1e-4, atol=1e-5)


def _check_quantised(model, linear_class) -> None:
    for name, module in model.named_modules():
        if name.startswith("model.mllm.language_model.layers.") and isinstance(module, nn.Linear):
            assert isinstance(module, linear_class), name
        if name.startswith(NOT_QUANTISED):
            assert not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), name
            assert all(p.dtype == torch.float32 for p in module.parameters(recurse=False)), name


def test_4bit_checkpoint_and_8bit_base_load_on_cpu(tiny_model, tiny_batch, tmp_path):
    inputs = {k: v for k, v in tiny_batch.items() if k != "labels"}
    tiny_model.save_pretrained(tmp_path / "ckpt")
    four = AutoModel.from_pretrained(tmp_path / "ckpt", quantization_config=quantization_config(load_in_4bit=True))
    _check_quantised(four, bnb.nn.Linear4bit)
    LlavaForConditionalGeneration(tiny_base_config("llava", vocab_size=64)).save_pretrained(tmp_path / "stock")
    eight = CFMoEForMultimodalClassification.from_base_pretrained(
        tmp_path / "stock", quantization_config=quantization_config(load_in_8bit=True)
    )
    _check_quantised(eight, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        torch.testing.assert_close(four.eval()(**inputs).logits, tiny_model(**inputs).logits, rtol=0, atol=0.1)
        ids = torch.tensor([[1] + [4] * 16 + [9, 10, 11]])
        assert torch.isfinite(eight.eval()(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits).all()


def test_qlora_step_after_evaluation_then_save_reload_merge(tiny_model, processor, tiny_batch, tmp_path):
    inputs = {k: v for k, v in tiny_batch.items() if k != "labels"}
    tiny_model.save_pretrained(tmp_path / "ckpt")
    model = AutoModel.from_pretrained(tmp_path / "ckpt", quantization_config=quantization_config(load_in_4bit=True))
    model = apply_lora(prepare_for_kbit_training(model), r=4, alpha=8, dropout=0.0)
    assert model.get_base_model().is_activation_checkpointing
    q_proj = model.get_base_model().mllm.language_model.layers[0].self_attn.q_proj
    lora_b, packed = q_proj.lora_B["default"].weight, q_proj.base_layer.weight.detach().clone()
    with torch.no_grad():  # an evaluation first: bnb's CPU inference kernel must not take over the 4-bit layers
        model.eval()(**inputs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _loss(
        model.train()(**tiny_batch, counterfactuals="factual_and_counterfactual_rows"), tiny_batch["labels"]
    ).backward()
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    optimizer.step()
    assert lora_b.abs().sum() > 0 and torch.equal(q_proj.base_layer.weight, packed)
    with torch.no_grad():
        trained = model.eval()(**inputs).logits
        run = save_lora_run(model, processor, tmp_path / "run")
        reloaded = load_lora_run(run, is_trainable=True).eval()  # trainable: the exact 4-bit kernel, as in training
        assert isinstance(
            reloaded.get_base_model().mllm.language_model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit
        )
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=1e-5)
        merged = AutoModel.from_pretrained(merge_lora_run(run, tmp_path / "merged")).eval()  # dequantised
        assert type(merged.mllm.language_model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(merged(**inputs).logits, trained, rtol=0, atol=1e-4)


def test_quantization_config_and_missing_bitsandbytes(monkeypatch):
    assert quantization_config() is None
    four = quantization_config(load_in_4bit=True)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32  # CPU
    assert set(four.llm_int8_skip_modules) == set(QUANTIZATION_SKIP_MODULES) >= {"lm_head", *NOT_QUANTISED}
    assert quantization_config(load_in_8bit=True).load_in_8bit
    with pytest.raises(ValueError, match="choose one"):
        quantization_config(load_in_4bit=True, load_in_8bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install cfmoe\[bnb\]"):
        quantization_config(load_in_4bit=True)
