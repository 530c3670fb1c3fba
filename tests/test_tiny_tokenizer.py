"""The tiny offline tokenizer reads any text (byte fallback), keeps the synthetic words whole and, trained on real
texts, reads them a word at a time."""

from __future__ import annotations

import string

import pytest
from conftest import random_images

from cfmoe.trainer.data.synthetic import synthetic_vocabulary
from cfmoe.trainer.data.tiny import (
    build_tiny_model,
    tiny_processor,
    tokens_per_word,
    train_text_tokenizer,
    train_tiny_tokenizer,
)

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


# tweets in MMSD's pre-tokenized style (lower case, spaced punctuation, <user> / <num> placeholders)
TWEETS = [
    "what a lovely monday , stuck in traffic for <num> hours # blessed",
    "<user> thanks for showing up for our appointment today .",
    "i love it when my train is late again and again",
    "great view from the top of the mountain this morning",
    "can 't wait for another rainy weekend at home # not",
    "the new rating system is so awesome . that & the ads",
] * 20


def test_text_tokenizer_reads_real_text_a_word_at_a_time():
    tokenizer = train_text_tokenizer(TWEETS, vocab_size=600)
    held_out = ["what a lovely weekend , thanks <user>", "so awesome , stuck at home again"]
    assert tokens_per_word(tokenizer, held_out) == 1.0  # every word seen in training is one token
    assert tokens_per_word(train_tiny_tokenizer(synthetic_vocabulary("sarcasm")), held_out) > 1.5  # words unseen
    for text in [*TEXTS, *held_out]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.tokenize("traffic jam")[0] == "\u2581traffic"  # word-start marker kept (set_vocabulary)
    assert tokenizer.convert_ids_to_tokens(tokenizer("x").input_ids)[0] == "<s>"
    assert len(tokenizer) <= 600 + 256


def test_tiny_model_trained_on_texts_has_their_vocabulary():
    model, processor = build_tiny_model("sarcasm", texts=TWEETS)
    tokenizer = processor.tokenizer
    assert model.config.base_config.text_config.vocab_size == len(tokenizer)
    assert model.config.base_config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    prompt = model.config.prompt_template.format(image="<image>", text=TWEETS[0])
    tokens = tokenizer.convert_ids_to_tokens(processor(images=random_images(1), text=prompt).input_ids[0])
    words = [f"\u2581{word}" for word in TWEETS[0].split()]
    assert tokens == ["<s>", *["<image>"] * 16, "\u2581", "<0x0A>", *words]  # the prompt's newline, a token a word
