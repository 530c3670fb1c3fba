"""Write the tiny offline model: a 2-layer LLaVA base (hidden 64, 32x32 images, patch 8), a BPE tokenizer trained
locally on the synthetic benchmark's vocabulary and a LLaVA processor.

    python examples/make_tiny_model.py --output_dir tiny-cfmoe [--task sentiment] [--base_model_type llava_next]
    python examples/make_tiny_model.py --output_dir tiny-llava --pretrain [--pretrain_epochs 6] [--seed 1]

Without `--pretrain`: a freshly initialised CF-MoE checkpoint (base, experts, heads); it loads offline with
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` and `AutoProcessor.from_pretrained(DIR,
trust_remote_code=True)` (a stock LLaVA processor; the flag lets its tokenizer read the custom `config.json`).
With `--pretrain`: a perception-pretrained stock LLaVA base (`benchmarks.pretrain`), for the pretrained regime:
`examples/run_sarcasm.py --model_name_or_path DIR`. Its `pretraining.json` holds the validation accuracy per
perception target. The script prints the seconds it took.
"""

import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from benchmarks.pretrain import PretrainConfig, write_pretrained_base
from cfmoe.trainer.data.tiny import write_tiny_checkpoint

DEFAULTS = PretrainConfig()


@dataclass
class TinyModelArguments:
    output_dir: str = field(metadata={"help": "folder to write the checkpoint to"})
    task: str = field(default="sarcasm", metadata={"help": "sarcasm (2 labels) or sentiment (3 labels)"})
    base_model_type: str = field(default="llava", metadata={"help": "llava, llava_next or llava_onevision"})
    seed: int = field(default=0, metadata={"help": "initialisation seed (and pretraining order; data seed + 1000)"})
    pretrain: bool = field(default=False, metadata={"help": "write a perception-pretrained LLaVA base instead"})
    pretrain_epochs: int = field(default=DEFAULTS.num_epochs, metadata={"help": "pretraining epochs"})
    pretrain_num_train: int = field(default=DEFAULTS.num_train, metadata={"help": "pretraining items"})
    pretrain_num_validation: int = field(default=DEFAULTS.num_validation, metadata={"help": "validation items"})
    pretrain_batch_size: int = field(default=DEFAULTS.batch_size, metadata={"help": "pretraining batch size"})
    pretrain_learning_rate: float = field(default=DEFAULTS.learning_rate, metadata={"help": "AdamW learning rate"})
    pretrain_cue_setting: str = field(default=DEFAULTS.cue_setting, metadata={"help": "cue forms of the data"})


if __name__ == "__main__":
    start = time.perf_counter()
    (args,) = HfArgumentParser(TinyModelArguments).parse_args_into_dataclasses()
    if args.pretrain:
        config = PretrainConfig(
            task=args.task,
            model_type=args.base_model_type,
            seed=args.seed,
            num_train=args.pretrain_num_train,
            num_validation=args.pretrain_num_validation,
            num_epochs=args.pretrain_epochs,
            batch_size=args.pretrain_batch_size,
            learning_rate=args.pretrain_learning_rate,
            cue_setting=args.pretrain_cue_setting,
        )
        write_pretrained_base(args.output_dir, config)
    else:
        write_tiny_checkpoint(args.output_dir, task=args.task, seed=args.seed, model_type=args.base_model_type)
    print(f"wrote {args.output_dir} in {time.perf_counter() - start:.0f} s")
