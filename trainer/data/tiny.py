"""The tiny offline default: a small LLaVA-family base built from a config, a BPE tokenizer trained
locally (with byte fallback, so it reads any text) on the synthetic benchmark's vocabulary or, for real data, on the
training texts, and a processor. Nothing is downloaded."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from .synthetic import synthetic_vocabulary

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]  # byte fallback: any character, as UTF-8 bytes
IMAGE_SIZE, PATCH_SIZE, HIDDEN = 32, 8, 64
# Vocabulary of a tokenizer trained on real texts (special tokens, alphabet and merges; 256 byte tokens on top):
# 1.29 tokens per whitespace word on MMSD2.0 test when trained on MMSD2.0 train (the synthetic tokenizer: 3.26)
TEXT_VOCAB_SIZE = 4096


def train_tiny_tokenizer(words: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A BPE tokenizer (Metaspace pre-tokenizer, as Llama's, after splitting off newlines) trained offline on
    `words`, with `<image>` special.

    Every word of `words` becomes one token (while `vocab_size`, the cap of the special tokens, printable ASCII and
    the merges, allows). Any other text is still read without `<unk>`: printable ASCII characters are in the
    alphabet, everything else falls back to its UTF-8 bytes (256 `<0xNN>` tokens on top of `vocab_size`), and
    decoding restores it (but for a space right after a newline).
    """
    return _train_bpe_tokenizer([" ".join(words)] * 4, vocab_size)


def train_text_tokenizer(texts: Sequence[str], vocab_size: int = TEXT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The tiny tokenizer of `train_tiny_tokenizer` (same special tokens, word markers and byte fallback) trained
    offline on real `texts` (e.g. the training split's tweets): the frequent words and word pieces of the texts
    become tokens, up to `vocab_size` (+ 256 byte tokens)."""
    return _train_bpe_tokenizer(texts, vocab_size)


def tokens_per_word(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> float:
    """Tokens (special tokens left out) per whitespace-separated word over `texts`: 1 when every word is a token."""
    tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])
    return tokens / max(1, sum(len(text.split()) for text in texts))


def _train_bpe_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Metaspace BPE trained on `corpus` (strings), byte fallback, `<s>` prepended, `<image>` special."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # a newline ends a word: the word after it starts with the word marker, as after a space (Metaspace alone would
    # glue "\nword" into one piece and spell the word out letter by letter)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace()]
    )
    alphabet = [char for char in string.printable if not char.isspace()]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    state["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),  # the word marker the pre-tokenizer put before and after a newline
            decoders.Replace("\n ", "\n"),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def tiny_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LLaVA processor for 32x32 images, patch 8: 16 image tokens per image (the CLS feature is dropped)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
# per base family (`modeling_cfmoe.BASE_FAMILIES`): its config class, its vision tower and its own settings
TINY_BASES = {
    "llava": (LlavaConfig, "clip_vision_model", {"vision_feature_select_strategy": "default"}),
    "llava_next": (
        LlavaNextConfig,
        "clip_vision_model",
        {"vision_feature_select_strategy": "default", "image_grid_pinpoints": PINPOINTS},
    ),
    "llava_onevision": (
        LlavaOnevisionConfig,
        "siglip_vision_model",
        {
            "vision_feature_select_strategy": "full",
            "image_grid_pinpoints": PINPOINTS,
            "vision_aspect_ratio": "anyres_max_9",
        },
    ),
}


def tiny_base_config(
    model_type: str = "llava",
    vocab_size: int = 320,
    image_token_id: int = 4,
    pad_token_id: int = 0,
    num_layers: int = 2,
    hidden_size: int = HIDDEN,
) -> PretrainedConfig:
    """A tiny LLaVA / LLaVA-NeXT / LLaVA-OneVision config: `hidden_size` (64) in the language model, `num_layers`
    layers, 4 heads, a 64-wide vision tower of `num_layers` layers, 32x32 images."""
    text = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    if model_type not in TINY_BASES:
        raise ValueError(f"no tiny config for {model_type!r}; use {', '.join(TINY_BASES)}")
    config_class, vision_model_type, family = TINY_BASES[model_type]
    return config_class(
        text_config=text,
        vision_config={"model_type": vision_model_type, **vision},
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        **family,
    )


def build_tiny_model(
    task: str = "sarcasm",
    model_type: str = "llava",
    seed: int = 0,
    texts: Sequence[str] | None = None,
    **config_kwargs,
):
    """(model, processor): the tiny CF-MoE classifier for `task`, freshly initialised. Its tokenizer is trained on
    the synthetic vocabulary, or on `texts` (real data's training texts: `train_text_tokenizer`) when given."""
    import torch

    from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification

    from .synthetic import id2label

    if texts is None:
        tokenizer = train_tiny_tokenizer(synthetic_vocabulary(task))
    else:
        tokenizer = train_text_tokenizer(texts)
    processor = tiny_processor(tokenizer)
    base = tiny_base_config(
        model_type,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    labels = id2label(task)
    config = CFMoEConfig(
        base_config=base.to_dict(),
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return CFMoEForMultimodalClassification(config), processor


def write_tiny_checkpoint(
    output_dir: str | Path, task: str = "sarcasm", seed: int = 0, model_type: str = "llava", **config_kwargs
) -> Path:
    """Write a complete, offline-loadable checkpoint folder (model, remote code, processor)."""
    model, processor = build_tiny_model(task, model_type=model_type, seed=seed, **config_kwargs)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return Path(output_dir)
