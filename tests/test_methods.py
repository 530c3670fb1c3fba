"""The debiasing methods: every built-in one trains a step through `CFMoETrainer`, and a method registered here, with
no other code changed, trains through the trainer and through the run script."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from cfmoe.modeling_cfmoe import CounterfactualMode
from cfmoe.trainer import METHODS, CFMoECollator, CFMoETrainer, CFMoETrainingArguments
from cfmoe.trainer.data.synthetic import SyntheticConfig, make_synthetic_benchmark
from cfmoe.trainer.data.tiny import build_tiny_model
from cfmoe.trainer.methods import DebiasingMethod, LossTerms, get_method, method_names, register_method

REPO = Path(__file__).resolve().parents[1]
BIAS_TERMS = {"bias_text", "bias_image", "bias_prior"}
LOGGED_TERMS = {  # what one step logs (`loss_<term>`), past cfmoe's warm-up
    "vanilla": {"task"},
    "text_poe": {"task", "aux", *BIAS_TERMS},
    "image_poe": {"task", "aux", *BIAS_TERMS},
    "poe": {"task", "aux", *BIAS_TERMS},
    "rubi": {"task", "aux", *BIAS_TERMS},
    "cfvqa": {"task", "aux", *BIAS_TERMS},
    "group_dro": {"task", "aux"},
    "cfmoe": {"cf_task", "aux", *BIAS_TERMS},
}


@register_method
class LabelSmoothedTask(DebiasingMethod):
    """A toy method: the fused head's cross-entropy against labels smoothed toward the prior branch, selected on
    accuracy; it logs how confident the fused head is."""

    name = "toy_label_smoothed"
    selection_metric = "accuracy"

    def forward_mode(self, config, training, state):
        return CounterfactualMode.EFFECTS  # it reads the prior in training too

    def loss_terms(self, outputs, labels, groups, state):
        fused = outputs.fused_logits.float().log_softmax(-1)
        target = 0.9 * torch.nn.functional.one_hot(labels, fused.shape[-1]) + 0.1 * outputs.prior_logits.softmax(-1)
        confidence = fused.exp().amax(-1).mean().detach()
        return LossTerms({"smoothed_task": -(target.detach() * fused).sum(-1).mean()}, {"confidence": confidence})


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic_benchmark(SyntheticConfig(num_train=16, num_validation=8, num_test=8, seed=3))


def _train_one_step(tmp_path: Path, data, method: str) -> CFMoETrainer:
    """One SGD step of `method` on 8 synthetic items, the model built with the config values the method needs."""
    model, processor = build_tiny_model("sarcasm", seed=0, router_jitter=0.0, **get_method(method).model_config)
    args = CFMoETrainingArguments(
        output_dir=str(tmp_path),
        method=method,
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        debias_warmup_ratio=0.0,
    )
    collator = CFMoECollator(processor, num_labels=2, return_groups=get_method(method).uses_group_labels)
    trainer = CFMoETrainer(model=model, args=args, train_dataset=data["train"].select(range(8)), data_collator=collator)
    trainer.train()
    return trainer


def test_the_registry_holds_every_built_in_method_in_order():
    assert METHODS == ("vanilla", "text_poe", "image_poe", "poe", "rubi", "cfvqa", "group_dro", "cfmoe")
    assert method_names()[: len(METHODS)] == METHODS and "toy_label_smoothed" in method_names()
    assert get_method("cfmoe").selection_metric == "counterfactual_macro_f1"
    assert get_method("cfvqa").model_config == {"inference_mode": "tie"} and get_method("group_dro").uses_group_labels

    class Impostor(DebiasingMethod):
        name = "cfmoe"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Impostor)
    with pytest.raises(ValueError, match="method must be one of vanilla, text_poe"):
        get_method("magic")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step(tmp_path, tiny_data, method):
    model, _ = build_tiny_model("sarcasm", seed=0)
    before = model.fused_head.weight.detach().clone()
    trainer = _train_one_step(tmp_path, tiny_data, method)
    log = trainer.state.log_history[0]
    terms = {key.removeprefix("loss_"): value for key, value in log.items() if key.startswith("loss_")}
    assert set(terms) == LOGGED_TERMS[method]
    assert log["loss"] == pytest.approx(sum(terms.values()), rel=1e-4)
    assert not torch.equal(trainer.model.fused_head.weight.detach(), before)  # the fused head learned


def test_a_method_registered_by_a_test_trains_through_the_trainer_and_the_run_script(tmp_path, tiny_data):
    trainer = _train_one_step(tmp_path / "trainer", tiny_data, "toy_label_smoothed")
    log = trainer.state.log_history[0]
    assert {key for key in log if key.startswith("loss_")} == {"loss_smoothed_task"} and 0.5 <= log["confidence"] <= 1
    args = CFMoETrainingArguments(
        str(tmp_path),
        method="toy_label_smoothed",
        load_best_model_at_end=True,
        eval_strategy="epoch",
        save_strategy="epoch",
    )
    assert args.metric_for_best_model == "accuracy"

    main = runpy.run_path(str(REPO / "examples" / "run_sarcasm.py"))["main"]
    results = main(
        ["--method", "toy_label_smoothed", "--num_train", "16", "--num_validation", "8", "--num_test", "8"]
        + ["--max_steps", "1", "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy"]
        + ["no", "--load_best_model_at_end", "False", "--output_dir", str(tmp_path / "run")]
    )
    assert results["method"] == "toy_label_smoothed" and "accuracy" in results["eval"]["test_ood"]
