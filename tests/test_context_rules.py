"""What decides a strong token where the image cannot tell: the image-core test's power, the leak-prone forms, the
audit's rule per token."""

from __future__ import annotations

import torch

from cfmoe.modeling_cfmoe.context import ContextStatistics
from cfmoe.trainer.audit import RULES, core_test, token_audit
from cfmoe.trainer.data.tiny import build_tiny_model, train_text_tokenizer

TEXTS = ["i love this so much #Happy", "what a day <num> times", "so sad today #fail", "just a day  here"] * 50


def _counted(statistics: ContextStatistics, tokenizer, features: torch.Tensor | None = None) -> None:
    """Count `TEXTS` with labels: `love` and `#Happy` only in class 1, `sad` and `#fail` only in class 0; optional
    image-core features `(len(TEXTS), dim)` per item."""
    labels = torch.tensor([1, 1, 0, 0] * 50)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"].bool()
    statistics.update(ids, mask, None, labels)
    if features is not None:
        statistics.update_core_readings(ids, mask, labels, features)


def _statistics(features: torch.Tensor | None = None) -> tuple[ContextStatistics, object]:
    tokenizer = train_text_tokenizer(TEXTS, vocab_size=300)
    statistics = ContextStatistics(len(tokenizer), local_dim=27, num_labels=2, feature_dim=8)
    statistics.set_vocabulary(tokenizer)
    _counted(statistics, tokenizer, features)
    return statistics, tokenizer


def _ids(tokenizer, word: str) -> torch.Tensor:
    return torch.tensor(tokenizer(word, add_special_tokens=False)["input_ids"])


def test_without_image_evidence_plain_words_are_kept_and_leak_prone_forms_are_context():
    """One placeholder image for every item (identical image-core features): the core test has no power, reports
    no dependence; `love` points at one class as strongly as `#Happy` but only the hashtag (all of its pieces, the
    word `Happy` inside it included) and the `<num>` placeholder stay context."""
    statistics, tokenizer = _statistics(features=torch.ones(200, 8))
    assert not statistics.core_test_power()
    assert float(statistics.core_separation().max()) < 0.01
    effect, p_value = statistics.token_dependence(torch.arange(len(tokenizer)))
    assert effect.abs().max() == 0 and (p_value == 1).all()
    love, happy, num = _ids(tokenizer, " love"), _ids(tokenizer, " #Happy"), _ids(tokenizer, " <num>")
    assert statistics.token_determination(love).min() > 0.7
    assert statistics.token_strength(love, 0.15).max() == 0
    assert statistics.token_strength(happy, 0.15).max() > 0.7 and statistics.leak_share(happy).min() == 1
    assert statistics.token_strength(num, 0.15).max() > 0.7
    # the old rule: strength alone
    assert statistics.token_strength(love, 0.15, without_core_evidence="strength").min() > 0.7


def test_a_readable_image_core_tests_every_token_whatever_its_form():
    """Image-core features that separate the classes give the test power: `love` is then context unless it moves
    with the image (here every item of a class shows the same image core, so it does not)."""
    labels = torch.tensor([1, 1, 0, 0] * 50)
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) + 3.0 * labels.unsqueeze(1)
    statistics, tokenizer = _statistics(features)
    assert statistics.core_test_power()
    assert statistics.token_strength(_ids(tokenizer, " love"), 0.15).min() > 0.7


def test_the_audit_names_the_rule_that_kept_or_removed_each_token():
    model, _ = build_tiny_model("sarcasm", seed=0, texts=TEXTS)
    tokenizer = train_text_tokenizer(TEXTS)
    model.rows.set_vocabulary(tokenizer)
    _counted(model.rows.statistics, tokenizer)
    audit = token_audit(model, tokenizer)
    kept = {entry["text"].strip(): entry["rule"] for entry in audit["kept_as_core"]}
    context = {entry["text"].strip(): entry["rule"] for entry in audit["context"]}
    assert kept["love"] == RULES["plain"] and kept["sad"] == RULES["plain"]
    assert context["<num>"] == RULES["leak_form"]
    assert all(rule == RULES["leak_form"] for rule in context.values())
    summary = core_test(model)
    assert not summary["has_power"] and "placeholder" in summary["decides"]


def test_a_hashtag_written_apart_in_pre_tokenized_text_is_a_leak_prone_occurrence():
    """MMSD's release writes `#funny` as `# funny`: that occurrence of `funny` is of a leak-prone form, a plain
    `funny` in another item is not."""
    statistics, tokenizer = _statistics()
    encoded = tokenizer(
        ["so # funny quotes", "a funny day"], padding=True, return_tensors="pt", add_special_tokens=False
    )
    ids = encoded["input_ids"]
    leaks = statistics.leak_occurrences(ids, encoded["attention_mask"].bool())
    marked = [tokenizer.decode(row[flags]).strip() for row, flags in zip(ids, leaks, strict=True)]
    assert marked == ["# funny", ""]
    blank = tokenizer(["just a day  here"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert statistics.leak_occurrences(blank, torch.ones_like(blank, dtype=torch.bool)).sum() == 1  # the double space
