"""The CF-MoE model: round trips, remote code, batched counterfactual branches, effects, routing, errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_OUR_PACKAGES
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlavaForConditionalGeneration

from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification, CFMoEModelOutput, CFMoEOutput, Pooling
from cfmoe.modeling_cfmoe.context import spread
from cfmoe.modeling_cfmoe.counterfactual import drop_image_tokens, pool_by_row, pool_tokens
from cfmoe.trainer.data.tiny import build_tiny_model, tiny_base_config

MODELING_FILES = {"configuration_cfmoe.py", "modeling_cfmoe.py", "moe.py", "counterfactual.py"}


def test_save_load_round_trip_and_folder_contents(tiny_model, tiny_batch, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert MODELING_FILES <= files and "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_cfmoe.CFMoEForMultimodalClassification"
    assert auto_map["AutoConfig"] == "configuration_cfmoe.CFMoEConfig"
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:  # raw loads (Trainer resume) need these keys
        assert set(saved.keys()) == set(tiny_model.state_dict())
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is CFMoEForMultimodalClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**tiny_batch).logits, tiny_model(**tiny_batch).logits, rtol=0, atol=0)


# cfmoe 0.1's checkpoint layout (up to a255aa7): the body's modules at the top, the label statistics as
# `context_statistics`, the context knobs flat in config.json
OLD_LAYOUT = [(r"^model\.rows\.statistics\.", "context_statistics."), (r"^model\.", "")]


def test_a_checkpoint_of_the_old_layout_loads(make_tiny_model, tiny_batch, tmp_path):
    model = make_tiny_model(text_context_threshold=0.6, protected_words=["love"], counterfactual_types=["core_masked"])
    model.rows.statistics.token_counts[5, 1] = 7  # a counted buffer must come back too
    model.save_pretrained(tmp_path)
    old = {}
    for key, value in load_file(tmp_path / "model.safetensors").items():
        for pattern, replacement in OLD_LAYOUT:
            key = re.sub(pattern, replacement, key, count=1)
        old[key] = value
    assert {"mllm.language_model.norm.weight", "visual_moe.experts.up", "context_statistics.token_counts"} <= set(old)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(config.pop("context_config"))  # flat, as 0.1 wrote them
    (tmp_path / "config.json").write_text(json.dumps(config))

    reloaded, info = CFMoEForMultimodalClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no key missing, unexpected or mismatched
    context = reloaded.config.context_config
    assert (context.text_context_threshold, context.protected_words) == (0.6, ["love"])
    assert reloaded.config.counterfactual_types == ["core_masked"]
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**tiny_batch).logits, model.eval()(**tiny_batch).logits)


# this Python has no pillow: `import PIL` raises ModuleNotFoundError, `importlib.util.find_spec("PIL")` is None
NO_PILLOW = "import sys\nsys.modules['PIL'] = None\n"
REMOTE_LOADER = (
    NO_PILLOW
    + BLOCK_OUR_PACKAGES
    + textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load(sys.argv[2])
        with torch.no_grad():
            torch.save(model(**batch).logits, sys.argv[3])
        assert sys.modules["PIL"] is None
        """
    )
)


def test_remote_code_loads_without_our_packages_or_pillow(tiny_model, tiny_batch, tmp_path):
    """Loading a model and running it on tensors needs torch and transformers only."""
    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    batch = {k: v for k, v in tiny_batch.items() if k != "labels"}
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    # run from an empty folder with an isolated sys.path entry so the repo is not on the path either
    result = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = tiny_model(**batch).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_batched_counterfactual_forward_equals_separate_branches(tiny_model, tiny_batch):
    model = tiny_model
    with torch.no_grad():
        out = model(**tiny_batch, counterfactuals="effects")
        plain = model(**tiny_batch)
        torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)
        # text-only branch: the same model on the text alone, computed as its own forward
        text_ids, text_mask = drop_image_tokens(
            tiny_batch["input_ids"], tiny_batch["attention_mask"], model.mllm.config.image_token_id, 0
        )
        hidden = model.mllm.language_model(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        statistics = model.rows.statistics
        text_strength = (spread(statistics.token_scores(text_ids)) * text_mask).amax(1)
        pooled, _ = model.model._language_moe(
            pool_tokens(hidden, text_mask, Pooling.MEAN), statistics.bias_evidence(text_strength, None, None)
        )
        torch.testing.assert_close(out.text_only_logits, model.text_head(pooled), rtol=1e-5, atol=1e-6)
        # image-only branch: vision tower -> projector -> visual MoE (same gates) -> pooled -> head
        feats = torch.cat(model.mllm.get_image_features(pixel_values=tiny_batch["pixel_values"]).pooler_output)
        rows = torch.arange(4).repeat_interleave(16)
        feats = model.model.visual_moe(feats, out.visual_gates[rows])
        torch.testing.assert_close(
            out.image_only_logits, model.image_head(pool_by_row(feats, rows, 4)), rtol=1e-5, atol=1e-6
        )
        # each item alone gives the same factual and text-only logits as in the batch
        for i in range(4):
            single = {k: v[i : i + 1] for k, v in tiny_batch.items()}
            single["attention_mask"] = single["attention_mask"].clone()
            alone = model(**single, counterfactuals="effects")
            torch.testing.assert_close(alone.logits, out.logits[i : i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone.text_only_logits, out.text_only_logits[i : i + 1], rtol=1e-5, atol=1e-5)


def test_vision_tower_runs_once_per_image_and_once_per_edited_image(make_tiny_model, tiny_batch):
    model = make_tiny_model().train()
    calls = []
    model.mllm.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = model(**tiny_batch, counterfactuals="factual_and_counterfactual_rows")
    assert calls == [4, 1]  # the factual images, then the one context-swapped row's image, edited in pixel space
    assert out.counterfactual_logits.shape[0] == 1  # 25% of 4 rows, one counterfactual kind (context-swapped)


def test_counterfactual_rows_do_not_change_factual_rows(make_tiny_model, tiny_batch):
    model = make_tiny_model(counterfactual_types=["context_swapped", "core_masked"]).train()
    torch.manual_seed(0)
    with_cf = model(**tiny_batch, counterfactuals="factual_and_counterfactual_rows")
    torch.manual_seed(0)
    without = model(**tiny_batch)
    torch.testing.assert_close(with_cf.fused_logits, without.fused_logits, rtol=1e-5, atol=1e-6)
    assert set(with_cf.counterfactual_kind.tolist()) == {0, 1}


def test_effects_decompose_exactly_and_routing_is_valid(tiny_model, tiny_batch):
    with torch.no_grad():
        out = tiny_model(**tiny_batch, counterfactuals="effects")
    assert torch.equal(out.total_effect, out.direct_effect_text + out.direct_effect_image + out.indirect_effect)
    for gates in (out.visual_gates, out.text_gates):
        torch.testing.assert_close(gates.sum(-1), torch.ones(4))
        assert ((gates > 0).sum(-1) == tiny_model.config.experts_top_k).all()
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0


def test_tie_inference_mode_subtracts_direct_effects(make_tiny_model, tiny_batch):
    with torch.no_grad():
        out = make_tiny_model(inference_mode="tie").eval()(**tiny_batch)
    torch.testing.assert_close(out.logits, out.prior_logits + out.indirect_effect)
    assert not torch.allclose(out.logits, out.fused_logits)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "llava_onevision"])
def test_base_families_forward_and_backward(model_type):
    torch.manual_seed(0)
    config = CFMoEConfig(
        base_config=tiny_base_config(model_type, vocab_size=64).to_dict(), num_labels=3, counterfactual_fraction=0.5
    )
    model = CFMoEForMultimodalClassification(config).train()
    if model_type == "llava":
        pixel_values, extra = torch.randn(2, 3, 32, 32), {}
    else:  # anyres: base view + one 32x32 tile per image
        pixel_values, extra = torch.randn(2, 2, 3, 32, 32), {"image_sizes": torch.tensor([[32, 32], [32, 32]])}
    n_tokens = model.mllm.get_image_features(pixel_values=pixel_values, return_dict=True, **extra).pooler_output[0]
    input_ids = torch.tensor([[1] + [4] * n_tokens.shape[0] + [7, 8, 9]] * 2)
    out = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        labels=torch.tensor([0, 2]),
        counterfactuals="factual_and_counterfactual_rows",
        **extra,
    )
    (
        out.loss
        + out.aux_loss
        + out.text_only_logits.logsumexp(-1).sum()
        + out.image_only_logits.logsumexp(-1).sum()
        + out.counterfactual_logits.sum()
    ).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in (
        "fused_head.weight",
        "text_head.weight",
        "image_head.weight",
        "model.visual_moe.experts.down",
        "model.text_moe.experts.down",
        "model.mllm.vision_tower",
    ):
        assert any(k.startswith(name) and g is not None and g.abs().sum() > 0 for k, g in grads.items()), name


def _stock_llava(tmp_path: Path) -> LlavaForConditionalGeneration:
    torch.manual_seed(1)
    stock = LlavaForConditionalGeneration(tiny_base_config("llava", vocab_size=64)).eval()
    return stock


def _check_base_weights(model: CFMoEForMultimodalClassification, stock: LlavaForConditionalGeneration) -> None:
    expected, loaded = stock.model.state_dict(), model.mllm.state_dict()
    assert set(expected) == set(loaded)
    for key, value in expected.items():
        assert torch.equal(value, loaded[key]), key
    ids = torch.tensor([[1] + [4] * 16 + [9, 10, 11]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.mllm(input_ids=ids, pixel_values=pixels).last_hidden_state,
            stock.model(input_ids=ids, pixel_values=pixels).last_hidden_state,
        )


@pytest.fixture
def load_logs(caplog, monkeypatch):
    """The records of transformers' loggers (its load report) and ours, from INFO on."""
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    caplog.set_level(logging.INFO, logger="cfmoe.modeling_cfmoe")
    return caplog


def test_from_base_pretrained_loads_every_stock_weight(tmp_path, load_logs):
    stock = _stock_llava(tmp_path)
    stock.save_pretrained(tmp_path / "stock")  # v5 writes the legacy llava-hf key layout
    model = CFMoEForMultimodalClassification.from_base_pretrained(
        tmp_path / "stock", id2label={0: "no", 1: "yes"}, config_kwargs={"num_text_experts": 3}
    )
    assert model.config.id2label == {0: "no", 1: "yes"} and model.config.num_text_experts == 3
    _check_base_weights(model, stock)
    # no load report listing the new modules as MISSING and lm_head as UNEXPECTED: one line names them
    assert not [r for r in load_logs.records if r.levelno >= logging.WARNING and "LOAD REPORT" in r.getMessage()]
    (line,) = [r.getMessage() for r in load_logs.records if r.name == "cfmoe.modeling_cfmoe.modeling_pretrained"]
    assert line.endswith("every base weight loaded; initialised fused_head, image_head, prior_logits, rows, "
                         "text_head, text_moe, visual_moe")  # fmt: skip
    assert CFMoEForMultimodalClassification._keys_to_ignore_on_load_missing is None  # a later load reports all


def test_from_base_pretrained_accepts_v5_key_layout(tmp_path):
    stock = _stock_llava(tmp_path)
    folder = tmp_path / "v5"
    stock.config.save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in stock.state_dict().items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    _check_base_weights(CFMoEForMultimodalClassification.from_base_pretrained(folder, num_labels=2), stock)


def test_from_base_pretrained_rejects_a_mismatched_checkpoint(tmp_path, load_logs):
    stock = _stock_llava(tmp_path)
    folder = tmp_path / "broken"
    stock.config.save_pretrained(folder)
    weights = {k: v.contiguous() for k, v in stock.state_dict().items() if "layers.1." not in k}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing base weights"):
        CFMoEForMultimodalClassification.from_base_pretrained(folder, num_labels=2)
    (report,) = [r.getMessage() for r in load_logs.records if "LOAD REPORT" in r.getMessage()]
    assert "layers.1." in report and "MISSING" in report  # what the base really lacks, and only that
    assert not any(name in report for name in ("fused_head", "visual_moe", "prior_logits", "lm_head"))


def test_clear_errors_on_inconsistent_image_inputs(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"])
    text_ids = torch.tensor([[1, 9, 10, 11]] * 4)
    with pytest.raises(ValueError, match="no image token"):
        tiny_model(input_ids=text_ids, pixel_values=tiny_batch["pixel_values"])
    truncated = tiny_batch["input_ids"].clone()
    truncated[0, truncated[0] == tiny_model.mllm.config.image_token_id] = 9
    truncated[0, 1] = tiny_model.mllm.config.image_token_id
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        tiny_model(
            input_ids=truncated, attention_mask=tiny_batch["attention_mask"], pixel_values=tiny_batch["pixel_values"]
        )


def test_clear_errors_on_labels_and_unsupported_bases(tiny_model, tiny_batch):
    bad = dict(tiny_batch, labels=torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match=r"outside id2label"):
        tiny_model(**bad)
    with pytest.raises(ValueError, match=r"supported base model types are llava, llava_next, llava_onevision"):
        CFMoEConfig(base_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="experts_top_k"):
        CFMoEConfig(base_config=tiny_base_config("llava").to_dict(), experts_top_k=9)


def test_text_only_model_runs_without_images(tiny_model):
    ids = torch.tensor([[1, 9, 10, 11], [1, 12, 13, 0]])
    with torch.no_grad():
        out = tiny_model(input_ids=ids, attention_mask=(ids != 0).long(), counterfactuals="effects")
    torch.testing.assert_close(out.image_only_logits, out.prior_logits)
    assert out.visual_gates is None and out.text_router_logits.shape == (2, tiny_model.config.num_text_experts)


def test_make_tiny_model_script_writes_an_offline_checkpoint(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "make_tiny_model.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(tmp_path / "tiny"), "--task", "sentiment"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image
    from transformers import AutoProcessor

    model = AutoModel.from_pretrained(tmp_path / "tiny", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny")
    assert model.config.num_labels == 3 and model.config.id2label[1] == "neutral"
    batch = processor(images=[Image.new("RGB", (32, 32))], text=["<image>\nhappy day"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 3)


# ------------------------------------------------------------------------ real checkpoints (half precision, offload)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_step(tiny_model, tiny_batch, tmp_path, dtype):
    tiny_model.save_pretrained(tmp_path)
    loaded = CFMoEForMultimodalClassification.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.fused_head.weight.dtype == dtype
    statistics = loaded.rows.statistics
    assert statistics.local_moments.dtype == statistics.colour_moments.dtype == torch.float32
    assert loaded.model.text_moe.router.weight.dtype == torch.float32
    batch = dict(tiny_batch, pixel_values=tiny_batch["pixel_values"].to(dtype))
    for model in (loaded, copy.deepcopy(loaded).to(dtype)):  # as loaded, and cast whole (the table in `dtype` too)
        model.train()
        model.rows.update(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["pixel_values"])
        out = model(**batch, counterfactuals="factual_and_counterfactual_rows")
        (out.loss + out.aux_loss + out.text_only_logits.float().sum()).backward()
        assert torch.isfinite(out.loss) and model.rows.statistics.local_moments.isfinite().all()
        assert model.fused_head.weight.grad is not None


OFFLOAD_MAP = {
    "model.mllm": "cpu",
    "prior_logits": "cpu",
    "model.rows": "cpu",
    **dict.fromkeys(["model.visual_moe", "model.text_moe", "fused_head", "text_head", "image_head"], "disk"),
}


def test_disk_offloaded_experts_and_heads_match_the_reference(tiny_model, tiny_batch, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    offloaded = CFMoEForMultimodalClassification.from_pretrained(
        tmp_path / "ckpt", device_map=OFFLOAD_MAP, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.model.visual_moe.router.weight.device.type == "meta"  # really offloaded
    with torch.no_grad():
        want, got = (
            tiny_model(**tiny_batch, counterfactuals="effects"),
            offloaded(**tiny_batch, counterfactuals="effects"),
        )
    for name in ("logits", "text_only_logits", "image_only_logits", "pooled"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for site in ("visual_gates", "text_gates"):
        torch.testing.assert_close(got[site], want[site], rtol=0, atol=0)


# ------------------------------------------------------------------------ transformers conventions
def test_output_hidden_states_attentions_and_tuples(make_tiny_model, tiny_batch):
    model = make_tiny_model().eval()
    layers, (batch, length) = model.config.base_config.text_config.num_hidden_layers, tiny_batch["input_ids"].shape
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**tiny_batch, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**tiny_batch, return_dict=False)
        assert model(**tiny_batch).hidden_states is None
        model.config.output_hidden_states, model.config.return_dict = True, False
        from_config = model(**tiny_batch)
    assert len(out.hidden_states) == layers + 1 and out.hidden_states[-1].shape == (batch, length, 64)
    assert len(out.attentions) == layers and out.attentions[0].shape == (batch, 4, length, length)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert isinstance(from_config, tuple) and any(isinstance(x, tuple) and len(x) == layers + 1 for x in from_config)


def test_inputs_embeds_equal_the_input_ids_path(tiny_model, tiny_batch):
    batch = {k: v for k, v in tiny_batch.items() if k != "input_ids"}
    embeds = tiny_model.get_input_embeddings()(tiny_batch["input_ids"])
    with torch.no_grad():
        by_ids = tiny_model(**tiny_batch, counterfactuals="effects")
        by_embeds = tiny_model(**batch, inputs_embeds=embeds, counterfactuals="effects")
    for name in ("logits", "text_only_logits", "image_only_logits", "loss"):
        torch.testing.assert_close(by_embeds[name], by_ids[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        tiny_model(**tiny_batch, inputs_embeds=embeds)


def test_embeddings_are_routed_by_bias_evidence_as_their_token_ids_are(make_tiny_model, tiny_batch):
    routed = {"num_visual_experts": 4, "num_text_experts": 4, "experts_top_k": 2}
    model, unseen = make_tiny_model(**routed).eval(), make_tiny_model(**routed).eval()
    labels, ids = tiny_batch["labels"], tiny_batch["input_ids"]
    for _ in range(3):  # label statistics, so that tokens and pixels carry evidence
        model.rows.update(ids, labels, tiny_batch["attention_mask"], tiny_batch["pixel_values"])
    batch = {k: v for k, v in tiny_batch.items() if k != "input_ids"}
    with torch.no_grad():
        by_ids = model(**tiny_batch)
        by_embeds = model(**batch, inputs_embeds=model.get_input_embeddings()(ids))
        assert not torch.equal(by_ids.visual_gates, unseen(**tiny_batch).visual_gates)  # the evidence routes
    for name in ("visual_gates", "text_gates", "logits"):
        torch.testing.assert_close(by_embeds[name], by_ids[name], rtol=1e-5, atol=1e-6)


def test_language_model_never_builds_a_cache(tiny_model_and_processor, tiny_batch):
    model = copy.deepcopy(tiny_model_and_processor[0]).train()
    calls = []
    model.mllm.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("use_cache")), with_kwargs=True
    )
    model(**tiny_batch, counterfactuals="factual_and_counterfactual_rows")
    assert calls == [False, False]  # factual + counterfactual rows, text-only rows


def test_resized_vocabulary_saves_loads_and_trains(tiny_model_and_processor, tiny_batch, tmp_path):
    model = copy.deepcopy(tiny_model_and_processor[0])
    old = model.config.base_config.text_config.vocab_size
    model.resize_token_embeddings(old + 3)
    assert model.config.get_text_config().vocab_size == model.mllm.config.text_config.vocab_size == old + 3
    assert model.rows.statistics.token_counts.shape == (old + 3, model.config.num_labels)
    model.save_pretrained(tmp_path)
    reloaded = CFMoEForMultimodalClassification.from_pretrained(tmp_path).train()
    assert reloaded.get_input_embeddings().num_embeddings == old + 3
    ids = tiny_batch["input_ids"].clone()
    ids[:, -1] = torch.where(tiny_batch["attention_mask"][:, -1].bool(), old + 2, ids[:, -1])  # the new token
    reloaded.rows.update(ids, tiny_batch["labels"], tiny_batch["attention_mask"])
    out = reloaded(**dict(tiny_batch, input_ids=ids), counterfactuals="factual_and_counterfactual_rows")
    out.loss.backward()
    assert reloaded.rows.statistics.token_counts[old + 2].any()


def test_torch_export_of_fused_inference(tiny_model, tiny_batch):
    """The image checks read no value on the host (`torch_compilable_check`): the inference forward exports."""
    args = (tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["pixel_values"])
    exported = torch.export.export(tiny_model, args=args, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args).logits, tiny_model(*args).logits)


# ------------------------------------------------------------------------ routing
def test_bias_router_starts_by_routing_each_kind_of_evidence_to_its_own_expert():
    config = CFMoEConfig(base_config=tiny_base_config(), num_text_experts=4, num_visual_experts=4, experts_top_k=2)
    router = CFMoEForMultimodalClassification(config).model.text_moe.router
    evidence = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    routing = router.eval()(evidence)
    assert routing.gates.argmax(-1).tolist() == [0, 1, 2, 3]  # none, text, local pixels, colour
    assert torch.equal((routing.gates > 0).sum(-1), torch.full((4,), 2))  # top-2, the rest exactly zero


def test_uniform_gates_are_saved_with_the_model(tiny_batch, tmp_path):
    experts = {"num_visual_experts": 4, "num_text_experts": 4, "experts_top_k": 2}
    model = build_tiny_model("sarcasm", seed=0, uniform_gates=True, **experts)[0].eval()
    model.save_pretrained(tmp_path)
    reloaded = CFMoEForMultimodalClassification.from_pretrained(tmp_path).eval()
    assert (
        reloaded.config.uniform_gates
        and reloaded.model.visual_moe.uniform_gates
        and reloaded.model.text_moe.uniform_gates
    )
    with torch.no_grad():
        want, got = model(**tiny_batch), reloaded(**tiny_batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert all(torch.equal(gates, torch.full_like(gates, 0.25)) for gates in (got.visual_gates, got.text_gates))


def test_the_output_holds_every_body_field_after_the_heads():
    """`CFMoEOutput` is built from the body's output (`**states`): it declares each of the body's fields, in their
    order, after its own (loss and logits first in the tuple form, as transformers' classifiers)."""
    body = [field.name for field in dataclasses.fields(CFMoEModelOutput)]
    head = [field.name for field in dataclasses.fields(CFMoEOutput)]
    assert head[:2] == ["loss", "logits"] and head[-len(body) :] == body
