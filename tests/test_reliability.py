"""Reliability of training runs: bad data end to end, NaN/inf losses, mixed precision, interruption and resume,
atomic checkpoints, experts without tokens, and safetensors-only loading."""

from __future__ import annotations

import json
import logging
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.trainer_utils import get_last_checkpoint

import cfmoe.trainer.methods as trainer_module
from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification
from cfmoe.modeling_cfmoe.moe import AttentionRouter
from cfmoe.modeling_cfmoe.preprocessing import BadExampleError
from cfmoe.trainer import CFMoECollator, CFMoETrainer, CFMoETrainingArguments
from cfmoe.trainer.data.synthetic import SyntheticConfig, make_synthetic_benchmark
from cfmoe.trainer.data.tiny import build_tiny_model

# the example's main(argv)
run_sarcasm = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "run_sarcasm.py"))["main"]
RUN = ["--num_train", "24", "--num_validation", "8", "--num_test", "8", "--per_device_train_batch_size", "4",
       "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
       "--load_best_model_at_end", "False", "--logging_steps", "2", "--seed", "5", "--use_cpu", "True",
       "--disable_tqdm", "True", "--report_to", "none"]  # fmt: skip
CHECKPOINT_PICKLES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
KL_TO_PRIOR = trainer_module.kl_to_prior


@pytest.fixture(scope="module")
def tiny_data():
    """8 training items: two optimizer steps of 4."""
    return make_synthetic_benchmark(SyntheticConfig(num_train=8, num_validation=4, num_test=4, seed=1))


def make_trainer(tmp_path: Path, data, **extra) -> CFMoETrainer:
    """A 2-step cfmoe Trainer with counterfactual rows for every item (so every loss term is on)."""
    model, processor = build_tiny_model(
        "sarcasm", seed=0, counterfactual_fraction=1.0, counterfactual_types=["context_swapped", "core_masked"]
    )
    options = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, weight_decay=0.1, logging_steps=1,
                   save_strategy="no", report_to="none", use_cpu=True, seed=0, debias_warmup_ratio=0.0,
                   factual_task_weight=1.0, upweight=19.0, disable_tqdm=True)  # fmt: skip
    args = CFMoETrainingArguments(output_dir=str(tmp_path), **{**options, **extra})
    collator = CFMoECollator(processor, num_labels=2)
    return CFMoETrainer(model=model, args=args, train_dataset=data["train"], data_collator=collator)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def poison(monkeypatch, value: float, calls: set[int] | None = None) -> None:
    """Multiply the prior-KL term by `value` (NaN or inf) in the given training forwards (1-based; all if None)."""
    real, count = KL_TO_PRIOR, []

    def poisoned(*args, **kwargs):
        count.append(1)
        term = real(*args, **kwargs)
        return term * value if calls is None or len(count) in calls else term

    monkeypatch.setattr(trainer_module, "kl_to_prior", poisoned)


# ------------------------------------------------------------------------------------------------ NaN / inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_before_the_update_and_names_the_term(tmp_path, tiny_data, monkeypatch, value):
    trainer = make_trainer(tmp_path, tiny_data)
    before = snapshot(trainer.model)
    poison(monkeypatch, value)
    with pytest.raises(FloatingPointError, match=r"optimizer step 1: loss_prior_kl is NaN or inf.*--nan_policy skip"):
        trainer.train()
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)


def test_skip_policy_drops_exactly_the_bad_updates_and_counts_them(tmp_path, tiny_data, monkeypatch, caplog):
    trainer = make_trainer(tmp_path / "all", tiny_data, nan_policy="skip")
    before = snapshot(trainer.model)
    poison(monkeypatch, float("nan"))
    with caplog.at_level(logging.WARNING, logger="cfmoe.trainer.nonfinite"):
        trainer.train()
    # no update at all (not even AdamW's weight decay) and no optimizer state for any parameter
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
    assert not trainer.optimizer.state
    assert [entry.get("nonfinite_skipped_steps") for entry in trainer.state.log_history[:2]] == [1, 2]
    assert "optimizer step 2: loss_prior_kl is NaN or inf; update skipped (2 so far)" in caplog.text

    poison(monkeypatch, float("nan"), calls={1})  # only the first of the two steps is bad
    trainer = make_trainer(tmp_path / "first", tiny_data, nan_policy="skip")
    trainer.train()
    assert all(torch.isfinite(param).all() for param in trainer.model.parameters())
    assert any(not torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())
    assert trainer.state.log_history[1]["nonfinite_skipped_steps"] == 1


def test_ignore_policy_lets_nan_reach_the_weights(tmp_path, tiny_data, monkeypatch):
    """What the default policy prevents."""
    trainer = make_trainer(tmp_path, tiny_data, nan_policy="ignore", max_steps=1)
    poison(monkeypatch, float("nan"))
    trainer.train()
    assert not all(torch.isfinite(param).all() for param in trainer.model.parameters())
    with pytest.raises(ValueError, match="nan_policy must be raise, skip or ignore"):
        CFMoETrainingArguments(output_dir=str(tmp_path), nan_policy="warn")


# ------------------------------------------------------------------------------------------------ mixed precision


def test_router_softmax_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    router = AttentionRouter(hidden_size=64, num_experts=4, top_k=2, jitter=0.0, temperature=1.0)
    torch.nn.init.normal_(router.expert_keys)
    pooled = torch.randn(5, 64)
    reference = router(pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = router(pooled)
    assert routed.router_logits.dtype == routed.gates.dtype == torch.float32
    torch.testing.assert_close(routed.router_logits, reference.router_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed.gates, reference.gates, rtol=1e-5, atol=1e-6)


def test_bf16_training_keeps_loss_terms_float32_and_finite(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, bf16=True, max_steps=1)
    model, batch = trainer.model.train(), next(iter(trainer.get_train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs["logits"].dtype == torch.bfloat16  # autocast is really on
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # every term is computed in float32
    trainer.train()  # the Trainer's own bf16 path on CPU
    assert np.isfinite(trainer.state.log_history[0]["loss"])


# ------------------------------------------------------------------------------------------------ routing under DDP


def test_experts_without_tokens_still_get_gradients(make_tiny_model, tiny_batch):
    """Experts are evaluated densely with zero gates, so an expert no item picked gets a zero gradient, never
    None: DDP needs no unused-parameter detection for them."""
    model = make_tiny_model(num_visual_experts=4, num_text_experts=4, experts_top_k=1).train()
    outputs = model(**tiny_batch, counterfactuals="effects")
    (outputs.fused_logits.sum() + outputs.text_only_logits.sum() + outputs.image_only_logits.sum()).backward()
    picked = (outputs.visual_gates > 0).any(0)
    assert not picked.all()  # with top-1 routing of 4 items, some expert receives no token
    for name in ("up", "up_bias", "down", "down_bias"):
        grad = getattr(model.model.visual_moe.experts, name).grad
        assert grad is not None and (grad[~picked] == 0).all(), name


# ------------------------------------------------------------------------------------------------ resume, atomic saves


def crash_while_saving(monkeypatch, step: int) -> None:
    """Stop the process (KeyboardInterrupt) in the middle of writing checkpoint-`step`: after the weights and the
    optimizer, before the RNG states and trainer_state.json."""
    real = CFMoETrainer._save_rng_state

    def interrupted(self, output_dir):
        if self.state.global_step == step:
            raise KeyboardInterrupt(f"stopped while saving checkpoint-{step}")
        return real(self, output_dir)

    monkeypatch.setattr(CFMoETrainer, "_save_rng_state", interrupted)


def test_interrupted_run_resumes_to_the_same_weights_and_metrics(tmp_path, monkeypatch):
    full = run_sarcasm([*RUN, "--output_dir", str(tmp_path / "full")])
    checkpoint = tmp_path / "full" / "checkpoint-6"
    files = {path.name for path in checkpoint.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files - CHECKPOINT_PICKLES)
    assert {name for name in files if name.endswith((".bin", ".pt", ".pth"))} == CHECKPOINT_PICKLES
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / "full" / "_checkpoint-staging").exists()  # save_total_limit=2 rotated, nothing left over

    # a second run is stopped in the middle of saving checkpoint-6: checkpoint-6 does not look like a checkpoint
    output = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        crash_while_saving(patch, step=6)
        with pytest.raises(KeyboardInterrupt):
            run_sarcasm([*RUN, "--output_dir", str(output)])
    staged = output / "_checkpoint-staging" / "checkpoint-6"
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    assert not (output / "checkpoint-6").exists()
    assert get_last_checkpoint(str(output)) == str(output / "checkpoint-4")

    # resume from the older checkpoint-2 (checkpoint-4 is written again, replacing the old one); every pickle of
    # the checkpoint is read with weights_only=True
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append((Path(str(args[0])).name, kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = run_sarcasm([*RUN, "--output_dir", str(output), "--resume_from_checkpoint", str(output / "checkpoint-2")])
    assert {name for name, _ in loads} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert all(weights_only is True for _, weights_only in loads), loads

    expected, actual = load_file(tmp_path / "full" / "model.safetensors"), load_file(output / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:  # bit-identical here; a tolerance for other platforms
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for split, metrics in full["eval"].items():
        assert resumed["eval"][split] == pytest.approx(metrics, nan_ok=True), split

    def losses(run: Path) -> dict[int, float]:
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry and entry["step"] > 2}

    assert losses(output) == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not (output / "_checkpoint-staging").exists()  # the stale staged folder was replaced and published


def test_resume_refuses_a_missing_or_incomplete_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint last: no checkpoint-"):
        run_sarcasm([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])
    partial = tmp_path / "checkpoint-2"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint .no trainer_state.json"):
        run_sarcasm([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(partial)])


# ------------------------------------------------------------------------------------------------ bad data, end to end


def write_mmsd2(root: Path) -> Path:
    """A tiny MMSD2.0 folder whose train split has a truncated JPEG (passes the loader, which only checks that
    the file exists) and a label outside {0, 1} (caught by the loader)."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
    data = (images / "3.jpg").read_bytes()
    (images / "3.jpg").write_bytes(data[: len(data) // 2])
    train = [{"image_id": i, "text": f"the weather is great {i}", "label": i % 2} for i in range(8)]
    train[5]["label"] = 7
    (root / "train.json").write_text(json.dumps(train))
    for split in ("valid", "test"):
        (root / f"{split}.json").write_text(json.dumps([{"image_id": 8, "text": "ok", "label": 0},
                                                         {"image_id": 9, "text": "fine", "label": 1}]))  # fmt: skip
    return root


def test_bad_files_fail_early_by_name_or_are_skipped_and_counted(tmp_path, caplog):
    root = write_mmsd2(tmp_path / "mmsd2")
    run = [*RUN, "--dataset", "mmsd2", "--data_dir", str(root), "--per_device_train_batch_size", "8",
           "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    with pytest.raises(ValueError, match=r"train\.json item 5 \(id '5'\): label 7 is not one of \[0, 1\]"):
        run_sarcasm([*run, "--output_dir", str(tmp_path / "strict")])
    with caplog.at_level(logging.WARNING):
        results = run_sarcasm([*run, "--output_dir", str(tmp_path / "skip"), "--skip_bad_examples", "True"])
    assert "skipped 1 bad item(s)" in caplog.text and "label 7" in caplog.text  # the loader's skip, logged
    assert "skipping bad example (1 skipped so far): item 3: image" in caplog.text  # the truncated JPEG
    assert results["skipped_examples"] == 1
    assert json.loads((tmp_path / "skip" / "all_results.json").read_text())["skipped_examples"] == 1
    (root / "train.json").write_text(json.dumps([{"image_id": 3, "text": "x", "label": 1},
                                                 {"image_id": 0, "text": "y", "label": 0}]))  # fmt: skip
    with pytest.raises(BadExampleError, match=r"item 3: image .*3\.jpg cannot be decoded .*replace the file"):
        run_sarcasm([*run, "--output_dir", str(tmp_path / "strict")])


# ------------------------------------------------------------------------------------------------ loading safety


def test_pickle_weights_are_refused_unless_opted_in(tiny_model, tmp_path):
    tiny_model.config.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    for load in (CFMoEForMultimodalClassification.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match="model.safetensors"):
            load(tmp_path)
    trusted = CFMoEForMultimodalClassification.from_pretrained(tmp_path, use_safetensors=False)
    for (name, expected), actual in zip(tiny_model.state_dict().items(), trusted.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    saved = tmp_path / "saved"
    trusted.save_pretrained(saved)
    assert not [name for name in os.listdir(saved) if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
