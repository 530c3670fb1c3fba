"""`examples/pretrain_text_base.py` end to end on made-up files in the released formats (MMSD 1.0's text release,
MMSD2.0's JSON, CLMLF's MVSA-Single and MVSA-Multiple splits): the base loads as a CF-MoE model's base, its
tokenizer has read the training texts only, and its language model learnt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification

ROOT = Path(__file__).resolve().parents[1]
WORDS = "sunshine makes me happy today but the rain again ruins my lovely weekend plans".split()
VALIDATION_ONLY = "quokkaland"  # in every validation and test text, in no training text


def tweet(index: int) -> str:
    """A made-up text, a different one for each index below 84 (first word and length differ)."""
    return " ".join(WORDS[(index + k) % len(WORDS)] for k in range(4 + index // len(WORDS)))


def write_data_sets(root: Path) -> dict[str, Path]:
    """Each data set's folder under ROOT: 24 training texts (MMSD2.0 repeats MMSD 1.0's: deduplicated), 6
    validation and 6 test texts holding `VALIDATION_ONLY`."""
    held_out = [f"{tweet(i)} {VALIDATION_ONLY}" for i in range(6)]
    mmsd = root / "mmsd"
    (mmsd / "text").mkdir(parents=True)
    (mmsd / "text" / "train.txt").write_text("".join(f"['{i}', '{tweet(i)}', {i % 2}]\n" for i in range(24)))
    for name in ("valid2", "test2"):
        lines = "".join(f"['{100 + i}', '{text}', 0, {i % 2}]\n" for i, text in enumerate(held_out))
        (mmsd / "text" / f"{name}.txt").write_text(lines)
    folders = {"mmsd": mmsd}
    for name, offset, files, keys in (
        ("mmsd2", 0, ("train", "valid", "test"), ("image_id", "label")),
        ("mvsa_single", 30, ("train", "dev", "test"), ("id", "emotion_label")),
        ("mvsa_multiple", 60, ("train", "dev", "test"), ("id", "emotion_label")),
    ):
        folder = folders[name] = root / name
        folder.mkdir()
        for file, texts in zip(files, ([tweet(offset + i) for i in range(24)], held_out, held_out), strict=True):
            entries = [{keys[0]: str(i), "text": text, keys[1]: i % 2} for i, text in enumerate(texts)]
            (folder / f"{file}.json").write_text(json.dumps(entries))
    return folders


def test_text_base_end_to_end(tmp_path):
    folders = write_data_sets(tmp_path / "data")
    output = tmp_path / "base"
    command = [sys.executable, "examples/pretrain_text_base.py", "--output_dir", str(output)]
    command += [arg for name, folder in folders.items() for arg in (f"--{name}", str(folder))]
    command += ["--vocab_size", "400", "--num_epochs", "4", "--batch_size", "8"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    summary = json.loads((output / "text_pretraining.json").read_text())
    counts = {name: (entry["train"], entry["train_new"]) for name, entry in summary["data_sets"].items()}
    assert counts == {"mmsd": (24, 24), "mmsd2": (24, 0), "mvsa_single": (24, 24), "mvsa_multiple": (24, 24)}
    assert summary["train_texts"] == 3 * 24
    # the language model learnt: training loss down over epochs, every validation set's loss down
    losses = summary["epoch_train_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(summary["validation_loss"][name] < summary["validation_loss_initial"][name] for name in folders)

    # the tokenizer read the training texts only: their words are tokens, the validation-only word is not
    tokenizer = AutoProcessor.from_pretrained(output).tokenizer
    assert all(len(tokenizer.tokenize(word)) == 1 for word in WORDS)
    assert len(tokenizer.tokenize(VALIDATION_ONLY)) > 1

    # a stock LLaVA checkpoint: every base weight loads into the classifier (from_base_pretrained raises otherwise)
    model = CFMoEForMultimodalClassification.from_base_pretrained(str(output), num_labels=3)
    stock = AutoModelForImageTextToText.from_pretrained(output)
    assert model.config.base_config.text_config.vocab_size == len(tokenizer) == summary["vocabulary"]
    embeddings = model.mllm.get_input_embeddings().weight
    assert torch.equal(embeddings, stock.get_input_embeddings().weight)
