"""Write a tiny LLaVA base that has read tweets: its tokenizer and language model trained (causal LM) on the released
training texts of the data sets given, offline (`benchmarks.text_pretrain`; docs/text_base.md).

    python examples/pretrain_text_base.py --output_dir outputs/tweet-base \\
        --mmsd DIR --mmsd2 DIR --mvsa_single DIR --mvsa_multiple DIR      # any subset of the four
    python examples/run_sentiment.py --model_name_or_path outputs/tweet-base --recipe tiny \\
        --dataset mvsa_single --data_dir DIR --image_dir grey.jpg --output_dir out

Only the train splits are read for training (tokenizer and LM); the validation splits only measure the LM loss.
The folder holds a stock LLaVA checkpoint, its processor and `text_pretraining.json` (texts per data set, vocabulary,
tokens per word and LM loss / perplexity on each validation split, time). One torch thread unless
`--num_threads` says otherwise; the tokenizer runs on one thread. The script prints the seconds it took.
"""

import os
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from benchmarks.text_pretrain import LOADERS, TextPretrainConfig, write_text_base


@dataclass
class TextBaseArguments:
    output_dir: str = field(metadata={"help": "folder to write the base to"})
    mmsd: str | None = field(default=None, metadata={"help": "MMSD 1.0's text release (holds text/train.txt)"})
    mmsd2: str | None = field(default=None, metadata={"help": "MMSD2.0's data/text_json_final (train.json)"})
    mvsa_single: str | None = field(default=None, metadata={"help": "CLMLF's MVSA-single/10-flod-1 (train.json)"})
    mvsa_multiple: str | None = field(default=None, metadata={"help": "CLMLF's MVSA-multiple/10-flod-1"})
    num_threads: int = field(default=1, metadata={"help": "torch threads"})


if __name__ == "__main__":
    start = time.perf_counter()
    args, config = HfArgumentParser((TextBaseArguments, TextPretrainConfig)).parse_args_into_dataclasses()
    data_dirs = {name: getattr(args, name) for name in LOADERS if getattr(args, name)}
    if not data_dirs:
        raise SystemExit(f"error: give at least one data set: {', '.join('--' + name for name in LOADERS)}")
    torch.set_num_threads(args.num_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's training and encoding on this thread too
    summary = write_text_base(args.output_dir, data_dirs, config)
    losses = ", ".join(
        f"{name} {summary['validation_loss_initial'][name]:.2f} -> {loss:.2f}"
        for name, loss in summary["validation_loss"].items()
    )
    print(f"{summary['train_texts']} training texts, vocabulary {summary['vocabulary']}; validation LM loss: {losses}")
    print(f"wrote {args.output_dir} in {time.perf_counter() - start:.0f} s")
