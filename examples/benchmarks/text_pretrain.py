"""Language-model pretraining of the tiny LLaVA base on real training texts: a base that has read tweets.

The tiny default on real data starts from random weights. This base is the text counterpart of the
perception-pretrained base (`pretrain`): the released **training** texts of the data sets it is given (MMSD 1.0,
MMSD2.0, MVSA-Single, MVSA-Multiple), whitespace-normalised as the collator normalises them and deduplicated, train
a BPE tokenizer (`train_text_tokenizer`), then the tiny LLaVA's language model as a causal LM. Each text is one
sequence in the run scripts' prompt for an item without an image (`<s>` and `prompt_template.format(image="",
text=text)`: `<s> \\n text`), so the base reads words as fine-tuning presents them and is tied to no placeholder image;
the vision tower and projector stay as initialised. The validation texts only measure the LM loss; test is never read.

The result is a stock LLaVA checkpoint (`save_pretrained` of `LlavaForConditionalGeneration` plus the processor),
loadable with `CFMoEForMultimodalClassification.from_base_pretrained(dir)`, i.e. the run scripts'
`--model_name_or_path dir`, and `text_pretraining.json` (the summary). docs/text_base.md: what it buys.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, PreTrainedModel, get_cosine_schedule_with_warmup

from cfmoe.modeling_cfmoe.preprocessing import DEFAULT_PROMPT_TEMPLATE
from cfmoe.trainer.data.real import load_mmsd, load_mmsd_release, load_mvsa_clmlf
from cfmoe.trainer.data.tiny import tiny_base_config, tiny_processor, tokens_per_word, train_text_tokenizer

# the released layouts read, by data set: MMSD 1.0's text release, MMSD2.0's JSON, CLMLF's MVSA splits
LOADERS: dict[str, Callable] = {
    "mmsd": load_mmsd_release,
    "mmsd2": load_mmsd,
    "mvsa_single": load_mvsa_clmlf,
    "mvsa_multiple": load_mvsa_clmlf,
}
SUMMARY_FILE = "text_pretraining.json"  # written last: its presence marks a finished base
HEAD_CHUNK = 128  # positions per LM-head call: logits under glibc's mmap threshold (whole batches: ~20% slower)
LENGTH_GROUP = 64  # batches per pool sorted by length (less padding; the pools and the batch order stay random)


@dataclass
class TextPretrainConfig:
    """Tokenizer, model size and budget of the language-model pretraining."""

    vocab_size: int = field(default=8192, metadata={"help": "BPE entries (+ 256 byte tokens)"})
    hidden_size: int = field(default=64, metadata={"help": "language model width"})
    num_layers: int = field(default=2, metadata={"help": "language model and vision tower layers"})
    num_epochs: int = field(default=3, metadata={"help": "passes over the training texts"})
    # 32: twice the steps of 64 in the same time, a lower loss after an epoch
    batch_size: int = field(default=32, metadata={"help": "texts per step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate (cosine schedule)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up share of the steps"})
    seed: int = field(default=0, metadata={"help": "initialisation and batch order"})


def split_texts(name: str, data_dir: str | Path, split: str, image: Path) -> list[str]:
    """The texts of one split of data set `name` (a key of `LOADERS`) as its loader reads them, whitespace
    normalised as the collator normalises them; `image` is a placeholder image file (the texts alone are read)."""
    dataset, _ = LOADERS[name](data_dir, split, image_dir=image)
    return [" ".join(text.split()) for text in dataset["text"]]


def read_corpora(data_dirs: dict[str, str | Path]) -> tuple[list[str], dict[str, list[str]], dict[str, dict]]:
    """(training texts, validation texts per data set, counts per data set) of the data sets in `data_dirs`.

    The training texts are every data set's train split, deduplicated over all of them (first occurrence kept, in
    the order of `data_dirs`); counts: `train` (texts read), `train_new` (kept), `validation`.
    """
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "placeholder.jpg"
        Image.new("RGB", (32, 32), (128, 128, 128)).save(image)
        train, validation, counts, seen = [], {}, {}, set()
        for name, data_dir in data_dirs.items():
            texts = split_texts(name, data_dir, "train", image)
            new = [text for text in dict.fromkeys(texts) if text not in seen]
            seen.update(new)
            train += new
            validation[name] = split_texts(name, data_dir, "validation", image)
            counts[name] = {"train": len(texts), "train_new": len(new), "validation": len(validation[name])}
    return train, validation, counts


def encode(tokenizer, texts: Sequence[str], prompt_template: str) -> list[list[int]]:
    """Token ids per text: `<s>` and the prompt of an item without an image, cut at the tokenizer's max length."""
    prompts = [prompt_template.format(image="", text=text) for text in texts]
    return tokenizer(prompts, truncation=True, verbose=False)["input_ids"]


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` `(B, longest)`, padded on the right."""
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def lm_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, tokens predicted) of a padded batch; the head runs on real targets only."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = mask[:, 1:].bool()
    hidden, labels = hidden[targets], ids[:, 1:][targets]
    loss = sum(
        torch.nn.functional.cross_entropy(
            model.lm_head(hidden[i : i + HEAD_CHUNK]), labels[i : i + HEAD_CHUNK], reduction="sum"
        )
        for i in range(0, len(labels), HEAD_CHUNK)
    )
    return loss, len(labels)


@torch.no_grad()
def mean_loss(model: PreTrainedModel, sequences: list[list[int]], pad_id: int, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats per token) over `sequences`."""
    model.eval()
    total, count = 0.0, 0
    for begin in range(0, len(sequences), batch_size):
        loss, tokens = lm_loss(model, *pad(sequences[begin : begin + batch_size], pad_id))
        total, count = total + float(loss), count + tokens
    return total / max(1, count)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of indices: shuffled, sorted by length within pools of `LENGTH_GROUP` batches, cut into
    batches, the batches shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * LENGTH_GROUP
    batches = []
    for begin in range(0, len(order), pool):
        chunk = sorted(order[begin : begin + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def pretrain_text_base(
    train: list[str], validation: dict[str, list[str]], config: TextPretrainConfig, progress: bool = True
) -> tuple[PreTrainedModel, object, dict]:
    """Train the tokenizer and the tiny LLaVA's language model on `train`; returns (the LLaVA model, the processor, a
    summary: vocabulary, tokens, tokens per word and LM loss / perplexity per validation set before and after, mean
    training loss per epoch, wall and CPU seconds). Deterministic given the seed (and the thread count)."""
    start, cpu = time.perf_counter(), time.process_time()
    tokenizer = train_text_tokenizer(train, config.vocab_size)
    processor = tiny_processor(tokenizer)
    model = init_text_model(tokenizer, config)
    template = DEFAULT_PROMPT_TEMPLATE
    sequences = encode(tokenizer, train, template)
    held_out = {name: encode(tokenizer, texts, template) for name, texts in validation.items()}
    pad_id = tokenizer.pad_token_id
    initial = {name: mean_loss(model, ids, pad_id) for name, ids in held_out.items()}
    epoch_losses = train_language_model(model, sequences, pad_id, config, progress)
    final = {name: mean_loss(model, ids, pad_id) for name, ids in held_out.items()}
    summary = {
        "config": asdict(config),
        "vocabulary": len(tokenizer),
        "parameters": {
            "language_model": sum(p.numel() for p in model.model.language_model.parameters()),
            "total": sum(p.numel() for p in model.parameters()),
        },
        "train_texts": len(train),
        "train_tokens": sum(map(len, sequences)),
        "prompt": "<s>" + template.format(image="", text="{text}"),
        "tokens_per_word": {name: tokens_per_word(tokenizer, texts) for name, texts in validation.items()},
        "epoch_train_loss": epoch_losses,
        "validation_loss_initial": initial,
        "validation_loss": final,
        "validation_perplexity": {name: math.exp(loss) for name, loss in final.items()},
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }
    return model, processor, summary


def init_text_model(tokenizer, config: TextPretrainConfig) -> PreTrainedModel:
    """The tiny LLaVA (`config`'s width and layers) over `tokenizer`'s vocabulary, initialised from `config.seed`."""
    base = tiny_base_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
    )
    torch.manual_seed(config.seed)
    return AutoModelForImageTextToText.from_config(base)


def train_language_model(
    model: PreTrainedModel, sequences: list[list[int]], pad_id: int, config: TextPretrainConfig, progress: bool
) -> list[float]:
    """`config.num_epochs` passes of next-token training over `sequences` (token ids per text) in length-grouped
    batches: AdamW, a cosine schedule with warm-up, the batch order drawn from `config.seed`. Returns the mean
    training loss (nats per token) of each epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(sequences) // config.batch_size)
    total = steps_per_epoch * config.num_epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(ids) for ids in sequences]
    epoch_losses = []
    with tqdm(total=total, desc="text pretraining", disable=not progress) as bar:
        for epoch in range(config.num_epochs):
            model.train()
            summed, tokens = 0.0, 0
            for index in length_grouped_batches(lengths, config.batch_size, generator):
                loss, count = lm_loss(model, *pad([sequences[i] for i in index], pad_id))
                optimizer.zero_grad()
                (loss / count).backward()
                optimizer.step()
                scheduler.step()
                summed, tokens = summed + loss.item(), tokens + count
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item() / count:.3f}")
            epoch_losses.append(summed / tokens)
    return epoch_losses


def write_text_base(
    output_dir: str | Path, data_dirs: dict[str, str | Path], config: TextPretrainConfig, progress: bool = True
) -> dict:
    """Read the corpora (`read_corpora`), pretrain (`pretrain_text_base`), save the LLaVA checkpoint + processor to
    `output_dir`, then `text_pretraining.json` (the summary with the data sets' folders and counts)."""
    start = time.perf_counter()
    train, validation, counts = read_corpora(data_dirs)
    model, processor, summary = pretrain_text_base(train, validation, config, progress=progress)
    output = Path(output_dir)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    summary = {
        "data_sets": {
            name: {"folder": str(Path(folder).resolve()), **counts[name]} for name, folder in data_dirs.items()
        },
        "splits_read": {"train": "tokenizer and language model", "validation": "LM loss only"},
        **summary,
        "seconds_total": time.perf_counter() - start,
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
