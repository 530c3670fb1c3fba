"""The tiny offline tokenizer reads any text (byte fallback) and keeps the synthetic words whole."""

from __future__ import annotations

import string

import pytest
from conftest import random_images

from trainer.synthetic import synthetic_vocabulary
from trainer.tiny import tiny_processor, train_tiny_tokenizer

TEXTS = [
    "Great, another Monday!!! #not",
    "Sure, I LOVE waiting 45 min for the bus... 🙃🙄 #blessed",
    "naïve café — 日本語のテキスト, Ünïcödé & emoji 👍🏽🎉",
    "tabs\tand\nnew lines,  double  spaces",
    string.ascii_letters + string.digits + string.punctuation,
]


@pytest.fixture(scope="module", params=["sarcasm", "sentiment"])
def tokenizer(request):
    return train_tiny_tokenizer(synthetic_vocabulary(request.param)), request.param


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips_without_unk(tokenizer, text):
    tokenizer, _ = tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_synthetic_words_stay_single_tokens(tokenizer):
    tokenizer, task = tokenizer
    long = [word for word in synthetic_vocabulary(task) if len(tokenizer.tokenize(word)) != 1]
    assert not long
    words = synthetic_vocabulary(task)[::7]
    assert len(tokenizer.tokenize(" ".join(words))) == len(words)


def test_processor_reads_a_users_post(tokenizer):
    tokenizer, _ = tokenizer
    processor = tiny_processor(tokenizer)
    batch = processor(images=random_images(1), text=f"<image>\n{TEXTS[1]}", return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert tokenizer.unk_token_id not in ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 16
