"""Write the tiny offline CF-MoE checkpoint: a 2-layer LLaVA base (hidden 64, 32x32 images, patch 8), experts and
heads, a BPE tokenizer trained locally on the synthetic benchmark's vocabulary and a LLaVA processor.

    python examples/make_tiny_model.py --output_dir tiny-cfmoe [--task sentiment] [--base_model_type llava_next]

The folder loads offline with `AutoModel.from_pretrained(DIR, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(DIR)`.
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from trainer.tiny import write_tiny_checkpoint


@dataclass
class TinyModelArguments:
    output_dir: str = field(metadata={"help": "folder to write the checkpoint to"})
    task: str = field(default="sarcasm", metadata={"help": "sarcasm (2 labels) or sentiment (3 labels)"})
    base_model_type: str = field(default="llava", metadata={"help": "llava, llava_next or llava_onevision"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})


if __name__ == "__main__":
    (args,) = HfArgumentParser(TinyModelArguments).parse_args_into_dataclasses()
    folder = write_tiny_checkpoint(args.output_dir, task=args.task, seed=args.seed, model_type=args.base_model_type)
    print(f"wrote {folder}")
