"""`examples/benchmark_speed.py` runs to the end in its tiny modes and writes the headline layout; its LLaVA shapes
have LLaVA-1.5-7B's proportions and dimensions, and the llava-7b code path (meta-device build, bf16, LoRA) works."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import benchmark_speed
import pytest
import torch

from benchmarks.shapes import LLAVA_SIZE, SHAPES, build_model, initialise_on, lora_model, parse_sizes
from benchmarks.speed import Runner, lm_to_tower_forward, make_batch
from cfmoe.trainer.loading import freeze_vision_tower

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark_speed.py"
HEADLINE = ("train_step_ratio", "inference_ratio", "peak_memory_ratio")
PARTS = ("vision_tower", "language_model", "context_statistics", "context_strength", "rest")


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_flop_shares(result: dict) -> None:
    for name in ("vanilla", "default"):
        shares = result[name]["flop_shares"]
        assert set(shares) == set(PARTS)
        assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9), shares
        assert all(share >= 0 for share in shares.values()), shares
    assert result["vanilla"]["flop_shares"]["context_statistics"] == 0  # vanilla counts no statistics
    assert result["default"]["flop_shares"]["context_statistics"] > 0  # the trainer's update, counted


def test_tiny_run_writes_finite_positive_ratios(tmp_path):
    done = run_script("--output_dir", str(tmp_path), "--tiny", "--sizes", "2x16,2x4")

    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["default"]) == set(report["trained_tower"]) == {"2x16", "2x4"}
    for result in [*report["default"].values(), *report["trained_tower"].values()]:
        for key in (*HEADLINE, "step_memory_ratio", "train_flop_ratio", "lm_token_ratio", "image_ratio"):
            assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
        vanilla, default = result["vanilla"], result["default"]
        assert vanilla["images"] == vanilla["inference_images"] == 2  # vanilla: each image once
        assert default["images"] > 2, "the default's counterfactual rows run edited images through the tower"
        assert default["inference_lm_tokens"] == vanilla["inference_lm_tokens"] == vanilla["lm_tokens"]
        assert_flop_shares(result)
    table = (tmp_path / "speed.md").read_text()
    assert "| 2 x (16 + 4) |" in table and table in done.stdout


def test_llava_shape_has_llava_proportions(tmp_path):
    """The scaled LLaVA: 576 image tokens from 336-pixel images, the tower's forward FLOPs about 1 : 22 of the
    language model's, as LLaVA-1.5-7B's dimensions give (counted on the meta device)."""
    done = run_script("--output_dir", str(tmp_path), "--shape", "llava", "--tiny")

    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report) == {"llava_shape", "setup"} and report["setup"]["shape"] == "llava"
    result = report["llava_shape"]["2x576"]
    assert 15 <= result["lm_to_tower_forward"] <= 40, result["lm_to_tower_forward"]
    reference = report["setup"]["llava_7b_lm_to_tower_forward"]
    assert 15 <= reference <= 40 and math.isclose(result["lm_to_tower_forward"], reference, rel_tol=0.15)
    for key in HEADLINE:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["vanilla"]["images"] == 2 and result["default"]["images"] == 4
    assert result["vanilla"]["lm_tokens"] == 2 * (1 + 576 + 58)
    assert_flop_shares(result)
    assert result["vanilla"]["flop_shares"]["language_model"] > 0.9  # the tower frozen, the LM trained
    table = (tmp_path / "speed.md").read_text()
    assert "| 2 x (576 + 58) |" in table and "| 2 x (576 + 58) | default |" in table and table in done.stdout


def test_llava_7b_shape_has_llava_1_5_dimensions():
    """LLaVA-1.5-7B (Llama-2-7B, CLIP ViT-L/14-336) on the meta device: its dimensions, parameter counts and dtype,
    and LoRA on the language model's attention and MLP projections, with the tower frozen."""
    model = build_model(LLAVA_SIZE, shape="llava-7b", device="meta", dtype=SHAPES["llava-7b"].dtype)
    text, vision = model.config.base_config.text_config, model.config.base_config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (text.intermediate_size, text.vocab_size, text.num_key_value_heads) == (11008, 32064, 32)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4096, 336, 14)
    base = model.config.base_config
    assert (base.vision_feature_layer, base.vision_feature_select_strategy) == (-2, "default")
    assert base.projector_hidden_act == "gelu"
    assert sum(p.numel() for p in model.vision_tower.parameters()) == 303_507_456  # CLIP ViT-L/14-336
    assert sum(p.numel() for p in model.language_model.parameters()) == 6_607_605_760  # Llama-2-7B, no lm_head
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16

    peft = lora_model(model)
    freeze_vision_tower(peft)
    trained = [name for name, p in peft.named_parameters() if p.requires_grad]
    adapted = {re.sub(r"\.lora_[AB]\..*", "", name) for name in trained if ".lora_" in name}
    projections = r"(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj$"  # as --use_lora True adapts them
    assert len(adapted) == 32 * 7 and all(re.search(projections, name) for name in adapted)
    assert not any("vision_tower" in name for name in trained)
    assert any("visual_moe" in name for name in trained) and any("fused_head" in name for name in trained)


def test_llava_7b_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark_speed.parse_args(["--output_dir", "unused", "--shape", "llava-7b"])
    assert "--shape llava-7b needs --device cuda" in capsys.readouterr().err


def test_meta_build_initialised_on_a_device_matches_a_cpu_build():
    """The path of a GPU run (built on the meta device, initialised on the device): the same buffers as a CPU
    build (context statistics, rotary frequencies, position ids) and finite weights."""
    size = parse_sizes("2x576", 14)[0]
    direct = build_model(size, shape="llava").state_dict()
    materialised = initialise_on(build_model(size, shape="llava", device="meta"), "cpu")
    buffers = dict(materialised.named_buffers())
    for name, buffer in build_model(size, shape="llava").named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    for name, value in materialised.state_dict().items():
        assert value.shape == direct[name].shape and torch.isfinite(value.float()).all(), name


def test_lora_bf16_runner_counts_its_step():
    """The llava-7b configuration in miniature on CPU: bf16 weights and autocast, LoRA; one counted step each."""
    size = parse_sizes("2x16")[0]
    generator = torch.Generator().manual_seed(0)
    batch, *counted = (make_batch(size, generator) for _ in range(3))
    runner = Runner("default", size, "cpu", lora=True, dtype=torch.bfloat16)
    assert runner.trainer.args.bf16 and runner.core.language_model.embed_tokens.weight.dtype == torch.bfloat16
    runner.fill_context_statistics(counted)
    work, seconds = runner.count("train_step", batch)
    assert work.images == 4 and set(seconds) == {"context_statistics", "context_strength"}
    flops = runner.flops("train_step", batch)
    assert flops["vision_tower"] > 0 and flops["language_model"] > 0 and flops["rest"] >= 0
    assert sum(flops[part] for part in PARTS) == flops["total"]
    runner.infer(batch)


def test_llava_shape_forward_flops_follow_llava_1_5():
    """Counted on the meta device: the scaled shape's tower : LM forward FLOPs within 5% of LLaVA-1.5-7B's."""
    scaled, real = lm_to_tower_forward("llava", LLAVA_SIZE), lm_to_tower_forward("llava-7b", LLAVA_SIZE)
    assert 20 <= real <= 24 and math.isclose(scaled, real, rel_tol=0.05), (scaled, real)
