"""The counterfactual Trainer: gradient accumulation, logged components, ablation switches, end-to-end runs."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfmoe.trainer import CFMoECollator, CFMoETrainer, CFMoETrainingArguments
from cfmoe.trainer.data.synthetic import SyntheticConfig, make_synthetic_benchmark
from cfmoe.trainer.data.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
run_sarcasm = runpy.run_path(str(REPO / "examples" / "run_sarcasm.py"))["main"]  # the example's main(argv)
TINY_DATA = ["--num_train", "64", "--num_validation", "32", "--num_test", "32"]
NO_EVAL_OR_SAVE = ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False"]
CFMOE_COMPONENTS = {"task", "cf_task", "bias_text", "bias_image", "bias_prior", "contrast", "prior_kl", "aux"}


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic_benchmark(SyntheticConfig(num_train=16, num_validation=8, num_test=8, seed=3))


def _train_one_step(tmp_path: Path, data, batch_size: int, accumulation: int, model_config=None, **extra):
    model, processor = build_tiny_model("sarcasm", seed=0, router_jitter=0.0, **(model_config or {}))
    args = CFMoETrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        **extra,
    )
    trainer = CFMoETrainer(
        model=model,
        args=args,
        train_dataset=data["train"].select(range(8)),
        data_collator=CFMoECollator(processor, num_labels=2),
    )
    trainer.train()
    return trainer


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tiny_data):
    # upweighting on from step 0; the per-micro-batch balance loss, the random counterfactual rows and routing by
    # bias evidence (the context statistics count each micro-batch before its forward) cannot match a large batch
    # exactly, so they are off here
    model_config = {"router_input": "content", "counterfactual_fraction": 0.0, "router_aux_loss_coef": 0.0}
    extra = dict(method="cfmoe", debias_warmup_ratio=0.0, factual_task_weight=1.0, upweight=19.0,
                 model_config=model_config)  # fmt: skip
    big = _train_one_step(tmp_path / "big", tiny_data, 8, 1, **extra)
    accumulated = _train_one_step(tmp_path / "ga", tiny_data, 4, 2, **extra)
    big_log, ga_log = big.state.log_history[0], accumulated.state.log_history[0]
    for key in ("loss", "loss_task", "loss_bias_text", "loss_bias_image", "loss_bias_prior"):
        assert big_log[key] == pytest.approx(ga_log[key], rel=1e-4, abs=1e-6), key
    big_params = dict(big.model.named_parameters())
    for name, param in accumulated.model.named_parameters():
        torch.testing.assert_close(param, big_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_vanilla_logs_only_the_task_loss_and_ablations_switch_terms_off(tmp_path, tiny_data):
    vanilla = _train_one_step(tmp_path / "vanilla", tiny_data, 8, 1, method="vanilla")
    assert {k for k in vanilla.state.log_history[0] if k.startswith("loss_")} == {"loss_task"}
    ablated = _train_one_step(
        tmp_path / "ablated",
        tiny_data,
        8,
        1,
        {"counterfactual_fraction": 1.0, "counterfactual_types": ["context_swapped", "core_masked"]},
        method="cfmoe",
        contrast_loss_weight=0.0,
        prior_kl_weight=0.0,
        factual_task_weight=1.0,
        fused_warmup=True,
    )
    logged = {k.removeprefix("loss_") for k in ablated.state.log_history[0] if k.startswith("loss_")}
    assert logged == CFMOE_COMPONENTS - {"contrast", "prior_kl"}


def test_uniform_gates_ablation_weights_every_expert_equally(tmp_path, tiny_data):
    config = {"uniform_gates": True, "num_visual_experts": 4, "num_text_experts": 4, "experts_top_k": 2}
    trainer = _train_one_step(tmp_path / "uniform", tiny_data, 8, 1, config, method="cfmoe")
    shares = [v for k, v in trainer.state.log_history[0].items() if k.startswith("routing_visual_expert_")]
    assert shares == pytest.approx([0.25] * 4)


def test_methods_and_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        CFMoETrainingArguments(output_dir=str(tmp_path), method="magic")
    with pytest.raises(ValueError, match="remove_unused_columns"):
        CFMoETrainingArguments(output_dir=str(tmp_path), remove_unused_columns=True)


def test_group_dro_needs_group_labels(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="needs a `group` column"):
        _train_one_step(tmp_path / "dro", tiny_data, 8, 1, method="group_dro")


def test_short_vanilla_run_learns(tmp_path):
    results = run_sarcasm(
        [
            *TINY_DATA,
            "--num_train",
            "256",
            "--output_dir",
            str(tmp_path),
            "--method",
            "vanilla",
            "--num_train_epochs",
            "4",
            "--logging_steps",
            "4",
            *NO_EVAL_OR_SAVE,
        ],
    )
    losses = [
        e["loss"] for e in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert losses[-1] < 0.7 * losses[0]
    assert results["eval"]["test_iid"]["accuracy"] > 0.6  # the planted cues are easy to learn


def test_accelerate_launch_end_to_end_writes_results_and_components(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               str(REPO / "examples" / "run_sarcasm.py"), *TINY_DATA, "--output_dir", str(tmp_path),
               "--max_steps", "6", "--logging_steps", "3", "--per_device_train_batch_size", "8",
               "--counterfactual_fraction", "0.25", "--counterfactual_types", "context_swapped,core_masked",
               "--factual_task_weight", "1", "--fused_warmup", "True",
               "--eval_strategy", "steps", "--eval_steps", "3",
               "--save_strategy", "steps", "--save_steps", "3"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("all_results.json", "eval_results.json", "training.png", "model.safetensors", "config.json"):
        assert (tmp_path / name).is_file(), name
    eval_results = json.loads((tmp_path / "eval_results.json").read_text())
    assert set(eval_results) == {"test_iid", "test_ood", "test_neutral"}
    assert {"accuracy", "macro_f1", "worst_group_accuracy", "cue_reliance"} <= set(eval_results["test_ood"])
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    logged = {k.removeprefix("loss_") for entry in history for k in entry if k.startswith("loss_")}
    assert CFMOE_COMPONENTS <= logged
    assert any("eval_inferred_worst_group_accuracy" in entry for entry in history)


def test_lora_run_writes_adapter_base_merged_and_card(tmp_path):
    run_sarcasm(
        [
            *TINY_DATA,
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--use_lora",
            "True",
            "--merge_lora",
            "True",
            *NO_EVAL_OR_SAVE,
        ],
    )
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "base/config.json",
        "merged/model.safetensors",
        "merged/pipeline_cfmoe.py",
        "README.md",
    ):
        assert (tmp_path / name).is_file(), name
    card = (tmp_path / "README.md").read_text()
    assert "model-index" in card and "test_ood" in card


def test_load_in_8bit_quantises_a_stock_base_and_keeps_the_heads(tmp_path):
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration

    from cfmoe.trainer.arguments import ModelArguments
    from cfmoe.trainer.data.tiny import tiny_base_config
    from cfmoe.trainer.loading import load_model

    _, processor = build_tiny_model("sarcasm")
    stock = LlavaForConditionalGeneration(
        tiny_base_config("llava", vocab_size=len(processor.tokenizer), image_token_id=4, pad_token_id=0)
    )
    stock.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, _ = load_model(
        "sarcasm", ModelArguments(model_name_or_path=str(tmp_path), load_in_8bit=True), {0: "no", 1: "yes"}, seed=0
    )
    assert isinstance(model.mllm.language_model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert (
        type(model.fused_head) is torch.nn.Linear and type(model.mllm.multi_modal_projector.linear_1) is torch.nn.Linear
    )


def test_warmup_checkpoints_are_never_the_best_model_and_cfmoe_needs_a_fused_signal(tmp_path):
    model, _ = build_tiny_model("sarcasm", seed=0)
    args = CFMoETrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, metric_for_best_model="accuracy", max_steps=8
    )  # cfmoe, debias_warmup_ratio 0.25: steps 0 and 1 train the bias branches only
    trainer = CFMoETrainer(model=model, args=args)
    trainer.state.max_steps = 8
    trainer.state.global_step = 2  # after steps 0 and 1: the fused head is untrained
    assert not trainer._determine_best_metric({"eval_accuracy": 0.99}, None)
    trainer.state.global_step = 3
    assert trainer._determine_best_metric({"eval_accuracy": 0.5}, None)
    model.config.counterfactual_fraction = 0.0
    with pytest.raises(ValueError, match="context-swapped rows only, but there are none"):
        CFMoETrainer(model=model, args=CFMoETrainingArguments(str(tmp_path)))


def _one_logged_step(tmp_path: Path, model, batch: dict, **args) -> dict[str, float]:
    """`training_step` on `batch` (forward, backward), then the trainer's log: what a logging step writes."""
    trainer = CFMoETrainer(
        model=model, args=CFMoETrainingArguments(str(tmp_path), report_to="none", use_cpu=True, **args)
    )
    trainer.state.max_steps = 10
    trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop otherwise
    trainer.training_step(model, batch)
    logs = {"loss": 0.0}
    trainer.log(logs)
    return logs


def test_a_text_only_batch_logs_the_text_routing_under_its_own_name(tmp_path):
    model, _ = build_tiny_model("sarcasm", seed=0, num_visual_experts=4, num_text_experts=4, experts_top_k=2)
    ids = torch.randint(10, 200, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    logs = _one_logged_step(tmp_path, model, batch, debias_warmup_ratio=0.0)
    assert {key for key in logs if key.startswith("routing_")} == {f"routing_text_expert_{i}" for i in range(4)}


def test_the_balance_loss_is_weighted_once_by_the_config_coefficient(tmp_path, tiny_data):
    model, processor = build_tiny_model("sarcasm", seed=0, router_jitter=0.0, router_aux_loss_coef=0.5)
    batch = CFMoECollator(processor, num_labels=2)([tiny_data["train"][i] for i in range(4)])
    logs = _one_logged_step(tmp_path, model, dict(batch), method="text_poe")
    with torch.no_grad():  # the context statistics as the step left them, the same weights: the same routing
        raw = model.train()(**{k: v for k, v in batch.items() if k != "labels"}, counterfactuals="effects").aux_loss
    assert logs["loss_aux"] == pytest.approx(0.5 * float(raw), rel=1e-5)
