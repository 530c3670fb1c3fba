"""Perception pretraining of the tiny LLaVA base: the stand-in for a pretrained LLaVA checkpoint.

Real users fine-tune a base that already perceives its inputs. The tiny base gets that from a short supervised
pretraining: linear heads on its pooled last hidden state (mean over attended tokens) predict the perception
targets of the synthetic benchmark at once (sum of cross-entropies): `text_polarity`, `image_polarity`,
`text_cue`, `image_cue` and, for sarcasm, `marker` (whether the text holds one of the sarcasm markers, in a quarter
of the items). The data are cue-random and clean (rho 0.5, no label noise), their cue forms drawn per item from
every family (cue setting `all_forms`), from a data seed apart from the fine-tuning seeds, so the base learns to
see every cue and marker without learning that any of them predicts a label (no target is the task's label: the
base knows what an item shows, not what makes it sarcastic). The vision tower, projector and language
model are trained; the heads are dropped.

The result is a stock LLaVA checkpoint (`save_pretrained` of the `*ForConditionalGeneration` class plus the
processor), loadable with `CFMoEForMultimodalClassification.from_base_pretrained(dir)`, i.e. the run script's
`--model_name_or_path dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, get_cosine_schedule_with_warmup

from cfmoe.trainer.collator import CFMoECollator
from cfmoe.trainer.data.synthetic import NO_CUE, SyntheticConfig, id2label, make_synthetic_benchmark
from cfmoe.trainer.data.tiny import build_tiny_model

PERCEPTION_TARGETS = ("text_polarity", "image_polarity", "text_cue", "image_cue")
MARKER_RATE = 0.25  # sarcasm pretraining data: items holding a sarcasm marker, whose presence is a target
POLARITY_CLASSES = 3  # polarity -1 / 0 / +1 -> class id polarity + 1 (sarcasm uses -1 and +1 only)
SUMMARY_FILE = "pretraining.json"  # written last: its presence marks a finished base


@dataclass
class PretrainConfig:
    """Budget and data of the perception pretraining. The data seed is `seed + data_seed_offset`."""

    task: str = "sarcasm"
    model_type: str = "llava"
    seed: int = 0
    num_train: int = 4000
    num_validation: int = 500
    num_epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    cue_setting: str = "all_forms"
    marker_rate: float | None = None  # sarcasm markers in the data (perceived, not tied to a label); None: MARKER_RATE
    data_seed_offset: int = 1000


def perception_data(config: PretrainConfig) -> tuple[Dataset, Dataset]:
    """(train, validation): cue-random (rho 0.5), noise-free synthetic items of `config.cue_setting`."""
    data = make_synthetic_benchmark(
        SyntheticConfig(
            task=config.task,
            num_train=config.num_train,
            num_validation=config.num_validation,
            num_test=0,
            label_noise=0.0,
            rho_train=0.5,
            cue_setting=config.cue_setting,
            marker_rate=_marker_rate(config),
            seed=config.seed + config.data_seed_offset,
        )
    )
    return data["train"], data["validation"]


def _marker_rate(config: PretrainConfig) -> float:
    """Sarcasm markers in the pretraining data: `config.marker_rate`, by default `MARKER_RATE` (sarcasm only)."""
    if config.marker_rate is not None:
        return config.marker_rate
    return MARKER_RATE if config.task == "sarcasm" else 0.0


def target_names(config: PretrainConfig) -> tuple[str, ...]:
    """The perception targets: `PERCEPTION_TARGETS`, and `marker` (whether the text holds a sarcasm marker) when the
    data have markers."""
    return PERCEPTION_TARGETS + (("marker",) if _marker_rate(config) > 0 else ())


def perception_targets(dataset: Dataset, names: tuple[str, ...] = PERCEPTION_TARGETS) -> dict[str, torch.Tensor]:
    """Class ids `(N,)` per target of `names`: polarity + 1, the cue's class (`NO_CUE` where a modality has none),
    the marker flag."""
    return {
        name: torch.tensor(dataset[name], dtype=torch.long) + (1 if name.endswith("polarity") else 0) for name in names
    }


def encode(dataset: Dataset, collator: CFMoECollator) -> dict[str, torch.Tensor]:
    """Every item through the project's collator once: `input_ids`, `attention_mask` `(N, L)`, `pixel_values`."""
    batch = collator([dataset[i] for i in range(len(dataset))])
    batch.pop("labels")
    return batch


def pooled_state(mllm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`(B, hidden)`: the base's last hidden state averaged over the attended tokens (text and image)."""
    hidden = mllm(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class PerceptionHeads(nn.Module):
    """One linear head per perception target on the pooled state; `forward` gives {target: (B, classes)}."""

    def __init__(self, hidden: int, num_labels: int, names: tuple[str, ...] = PERCEPTION_TARGETS):
        super().__init__()
        sizes = {"text_polarity": POLARITY_CLASSES, "image_polarity": POLARITY_CLASSES, "marker": 2}
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, sizes.get(name, num_labels)) for name in names})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(pooled) for name, head in self.heads.items()}

    def loss(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over targets of the cross-entropy (items without a cue are ignored for that cue)."""
        return sum(nn.functional.cross_entropy(logits[n], targets[n], ignore_index=NO_CUE) for n in logits)


def _slice(tensors: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor[index] for name, tensor in tensors.items()}


@torch.no_grad()
def perception_accuracy(
    mllm: nn.Module,
    heads: PerceptionHeads,
    inputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy per target (items with a target of `NO_CUE` left out) and their mean (`mean`)."""
    mllm.eval()
    size = len(next(iter(targets.values())))
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    for begin in range(0, size, batch_size):
        logits = heads(pooled_state(mllm, _slice(inputs, torch.arange(begin, min(begin + batch_size, size)))))
        for name in targets:
            predictions[name].append(logits[name].argmax(-1))
    accuracy = {}
    for name in targets:
        kept = targets[name] != NO_CUE
        accuracy[name] = float((torch.cat(predictions[name])[kept] == targets[name][kept]).float().mean())
    accuracy["mean"] = sum(accuracy.values()) / len(targets)
    return accuracy


def pretrain_perception(config: PretrainConfig, progress: bool = True) -> tuple[nn.Module, object, dict]:
    """Train the tiny base on the perception targets; returns (its `mllm`, the processor, a summary with the
    validation accuracies, the mean training loss per epoch and the seconds taken). Deterministic given the seed."""
    start = time.perf_counter()
    model, processor = build_tiny_model(config.task, model_type=config.model_type, seed=config.seed)
    mllm = model.mllm
    torch.manual_seed(config.seed)
    names = target_names(config)
    heads = PerceptionHeads(mllm.config.text_config.hidden_size, len(id2label(config.task)), names)
    collator = CFMoECollator(
        processor, num_labels=len(id2label(config.task)), prompt_template=model.config.prompt_template
    )
    train, validation = perception_data(config)
    train_inputs, train_targets = encode(train, collator), perception_targets(train, names)
    parameters = [*mllm.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train) // config.batch_size)
    total = steps_per_epoch * config.num_epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(config.seed)
    epoch_losses = []
    with tqdm(total=total, desc="perception pretraining", disable=not progress) as bar:
        for epoch in range(config.num_epochs):
            mllm.train()
            order, losses = torch.randperm(len(train), generator=generator), []
            for begin in range(0, len(train), config.batch_size):
                index = order[begin : begin + config.batch_size]
                logits = heads(pooled_state(mllm, _slice(train_inputs, index)))
                loss = heads.loss(logits, _slice(train_targets, index))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            epoch_losses.append(sum(losses) / len(losses))
    validation_targets = perception_targets(validation, names)
    accuracy = perception_accuracy(mllm, heads, encode(validation, collator), validation_targets)
    summary = {
        "config": asdict(config),
        "validation_accuracy": accuracy,
        "epoch_train_loss": epoch_losses,
        "seconds": time.perf_counter() - start,
    }
    return mllm, processor, summary


def write_pretrained_base(output_dir: str | Path, config: PretrainConfig, progress: bool = True) -> dict:
    """Pretrain (`pretrain_perception`) and save a stock LLaVA checkpoint + processor to `output_dir`, then
    `pretraining.json` (the summary). Prints the validation accuracy per target; returns the summary."""
    mllm, processor, summary = pretrain_perception(config, progress=progress)
    base = AutoModelForImageTextToText.from_config(mllm.config)
    base.model.load_state_dict(mllm.state_dict())
    output = Path(output_dir)
    base.save_pretrained(output)
    processor.save_pretrained(output)
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    scores = ", ".join(f"{name} {value:.3f}" for name, value in summary["validation_accuracy"].items())
    print(f"perception pretraining: {summary['seconds']:.0f} s; validation accuracy: {scores}", flush=True)
    return summary
