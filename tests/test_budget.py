"""The compute budget of a training step, by counting calls, rows and tokens (never by timing).

Budget of one `cfmoe` training step (docs/cost.md), for B items of padded length L (N image tokens each):
- the vision tower runs on the B images, then once more on the edited images of the counterfactual rows (their
  visual context is transplanted in pixel space), and not for any branch;
- language-model call 1: the B factual rows plus `ceil(counterfactual_fraction * B)` rows per entry of
  `counterfactual_types`, at length L plus at most the partner's transplanted text tokens (a shorter second call
  for rows compacted to their kept tokens is allowed: it only lowers the count);
- the text-only call: the B text-only rows, at most as long as the longest text (no image token);
- the image-only branch and the prior take no language-model call.
When the loss reads no fused prediction of the factual rows (the default objective: `factual_task_weight=0`, no
contrast), they stay out of call 1. `vanilla` (and default inference): one language-model call of the B factual
rows at length L.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.speed import Work, count_work
from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification
from cfmoe.trainer.cfmoe_trainer import CFMoETrainer
from cfmoe.trainer.data.tiny import IMAGE_SIZE, PATCH_SIZE, tiny_base_config
from cfmoe.trainer.training_args import CFMoETrainingArguments

IMAGE_TOKEN, PAD, BOS, VOCAB = 4, 0, 1, 64
N_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the tiny tower's patches; its CLS feature is dropped


def tiny_model(**config_kwargs) -> CFMoEForMultimodalClassification:
    base = tiny_base_config(vocab_size=VOCAB, image_token_id=IMAGE_TOKEN, pad_token_id=PAD)
    torch.manual_seed(0)
    return CFMoEForMultimodalClassification(CFMoEConfig(base_config=base.to_dict(), num_labels=2, **config_kwargs))


def batch_of(batch: int, text_lengths: list[int]) -> dict[str, torch.Tensor]:
    """`<s> <image>*N text <pad>...` rows with the given text lengths (right padding), images, labels."""
    gen = torch.Generator().manual_seed(1)
    length = 1 + N_IMAGE + max(text_lengths)
    input_ids = torch.full((batch, length), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, n_text in enumerate(text_lengths):
        input_ids[row, 0] = BOS
        input_ids[row, 1 : 1 + N_IMAGE] = IMAGE_TOKEN
        input_ids[row, 1 + N_IMAGE : 1 + N_IMAGE + n_text] = torch.randint(5, VOCAB, (n_text,), generator=gen)
        attention_mask[row, : 1 + N_IMAGE + n_text] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        "labels": torch.randint(0, 2, (batch,), generator=gen),
    }


def train_step_calls(model, method: str, inputs: dict, tmp_path, step: int = 100, **overrides) -> Work:
    """One training step (compute_loss + backward) through `CFMoETrainer` at `step` of 100 (default: past the
    warm-up), with the full objective on."""
    overrides = {"factual_task_weight": 1.0, "upweight": 19.0, **overrides}  # every term on
    args = CFMoETrainingArguments(output_dir=str(tmp_path), method=method, report_to="none", use_cpu=True, **overrides)
    trainer = CFMoETrainer(model=model, args=args)
    trainer.state.global_step, trainer.state.max_steps = step, 100
    model.train()
    with count_work(model) as work:
        trainer.compute_loss(model, inputs).backward()
    return work


TEXT_LENGTHS = [7, 3, 5, 6, 2]  # B = 5: ceil(0.25 * 5) = 2 rows per counterfactual type


@pytest.mark.parametrize(
    "fraction, types",
    [
        (None, None),  # the default configuration
        (0.25, ["context_swapped", "core_masked"]),
        (0.5, ["core_masked"]),
        (1.0, ["context_swapped", "core_masked"]),
        (0.0, ["context_swapped", "core_masked"]),
    ],
)
def test_cfmoe_step_stays_within_the_documented_budget(tmp_path, fraction, types):
    overrides = {"counterfactual_fraction": fraction, "counterfactual_types": types}
    model = tiny_model(**{name: value for name, value in overrides.items() if value is not None})
    inputs = batch_of(len(TEXT_LENGTHS), TEXT_LENGTHS)
    batch, length = inputs["input_ids"].shape
    calls = train_step_calls(model, "cfmoe", inputs, tmp_path)
    config = model.config
    n_cf = math.ceil(config.counterfactual_fraction * batch) * len(config.counterfactual_types)

    images, *edited = calls.vision_calls
    assert images == batch and sum(edited) == n_cf, "each image once, each edited image once"
    *row_calls, text_only = calls.lm_calls  # merged image + text rows, then the short text-only rows
    assert 1 <= len(row_calls) <= 2, calls.lm_calls
    assert not text_only.image_ids, "the text-only rows hold no image token"
    assert text_only.rows == batch and text_only.length <= 1 + max(TEXT_LENGTHS)
    assert text_only.attended == sum(1 + n for n in TEXT_LENGTHS), "every text token, nothing else"
    factual = row_calls[0]
    assert factual.length == length and factual.rows >= batch, "the factual rows, at full length"
    assert sum(c.rows for c in row_calls) == batch + n_cf
    longest = length + max(TEXT_LENGTHS)  # a row's own tokens and at most all of its partner's text
    assert all(c.length <= longest for c in row_calls)
    budget = (batch + n_cf) * longest + batch * (1 + max(TEXT_LENGTHS))
    assert sum(c.rows * c.length for c in calls.lm_calls) <= budget


def test_default_objective_runs_the_language_model_on_the_counterfactual_rows_only(tmp_path):
    """The default loss reads the fused head on the context-swapped rows only: the factual rows stay out of the
    language-model call (only the short text-only rows run beside them)."""
    model = tiny_model()
    inputs = batch_of(len(TEXT_LENGTHS), TEXT_LENGTHS)
    calls = train_step_calls(model, "cfmoe", inputs, tmp_path, factual_task_weight=0.0, upweight=0.0)
    n_cf = math.ceil(model.config.counterfactual_fraction * len(TEXT_LENGTHS))
    *row_calls, text_only = calls.lm_calls
    assert [c.rows for c in row_calls] == [n_cf] and text_only.rows == len(TEXT_LENGTHS)
    assert calls.vision_calls == [len(TEXT_LENGTHS), n_cf]


def test_vanilla_step_is_one_language_model_call_of_the_batch(tmp_path):
    model = tiny_model()
    inputs = batch_of(len(TEXT_LENGTHS), TEXT_LENGTHS)
    calls = train_step_calls(model, "vanilla", inputs, tmp_path)
    assert calls.vision_calls == [len(TEXT_LENGTHS)]
    assert [(c.rows, c.length) for c in calls.lm_calls] == [tuple(inputs["input_ids"].shape)]


@pytest.mark.parametrize("method, step", [("cfmoe", 0), ("text_poe", 100)])
def test_no_counterfactual_rows_where_the_loss_does_not_read_them(tmp_path, method, step):
    """cfmoe's bias-only warm-up and the peer methods: the factual rows and the short text-only rows only."""
    model = tiny_model(counterfactual_fraction=1.0)
    inputs = batch_of(len(TEXT_LENGTHS), TEXT_LENGTHS)
    calls = train_step_calls(model, method, inputs, tmp_path, step=step)
    assert [c.rows for c in calls.lm_calls] == [len(TEXT_LENGTHS)] * 2


@pytest.mark.parametrize("mode, lm_calls", [("fused", 1), ("tie", 2)])
def test_inference_budget(mode, lm_calls):
    """Default inference is one pass; the optional `tie` mode adds the short text-only call, no fine-grained
    counterfactual rows."""
    model = tiny_model(inference_mode=mode).eval()
    inputs = batch_of(len(TEXT_LENGTHS), TEXT_LENGTHS)
    inputs.pop("labels")
    with torch.no_grad(), count_work(model) as calls:
        model(**inputs)
    assert calls.vision_calls == [len(TEXT_LENGTHS)]
    assert len(calls.lm_calls) == lm_calls
    assert (calls.lm_calls[0].rows, calls.lm_calls[0].length) == tuple(inputs["input_ids"].shape)
    if mode == "tie":
        assert calls.lm_calls[1].rows == len(TEXT_LENGTHS) and not calls.lm_calls[1].image_ids
