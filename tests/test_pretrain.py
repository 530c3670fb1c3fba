"""Perception pretraining of the tiny base (`benchmarks.pretrain`) and `examples/make_tiny_model.py --pretrain`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.pretrain import (
    PERCEPTION_TARGETS,
    PretrainConfig,
    perception_data,
    perception_targets,
    pretrain_perception,
    target_names,
)
from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification
from cfmoe.trainer.data.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = PretrainConfig(num_train=64, num_validation=32, num_epochs=3, batch_size=16, cue_setting="all_forms")


@pytest.fixture(scope="module")
def pretrained():
    return pretrain_perception(TINY, progress=False)


def test_targets_are_class_ids_of_cue_random_clean_data():
    train, _ = perception_data(PretrainConfig(num_train=200, num_validation=0, seed=3))
    names = target_names(PretrainConfig())
    targets = perception_targets(train, names)
    assert set(targets) == {*PERCEPTION_TARGETS, "marker"} == set(names)  # sarcasm: the markers are perceived
    assert target_names(PretrainConfig(task="sentiment")) == PERCEPTION_TARGETS
    assert 0.2 < targets["marker"].float().mean() < 0.3  # a quarter of the items hold one
    assert set(targets["text_polarity"].tolist()) == {0, 2} and set(targets["image_cue"].tolist()) == {0, 1}
    assert train["label"] == train["clean_label"]  # no label noise
    agree = sum(t == y for t, y in zip(train["text_cue"], train["label"], strict=True)) / len(train)
    assert 0.35 < agree < 0.65  # rho 0.5: the cues do not predict the label
    assert len(set(train["text_form"])) > 5 and len(set(train["image_form"])) > 3  # every family, per item


def test_pretraining_learns_and_is_deterministic(pretrained):
    mllm, _, summary = pretrained
    losses = summary["epoch_train_loss"]
    assert len(losses) == TINY.num_epochs and losses[-1] < losses[0]
    assert set(summary["validation_accuracy"]) == {*target_names(TINY), "mean"}
    fresh = build_tiny_model(seed=TINY.seed)[0].mllm.state_dict()
    trained = mllm.state_dict()
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        assert any(not torch.equal(fresh[k], trained[k]) for k in trained if k.startswith(name)), name
    again = pretrain_perception(PretrainConfig(**{**TINY.__dict__, "num_epochs": 1}), progress=False)[0].state_dict()
    once = pretrain_perception(PretrainConfig(**{**TINY.__dict__, "num_epochs": 1}), progress=False)[0].state_dict()
    assert all(torch.equal(again[k], once[k]) for k in once)


def test_make_tiny_model_pretrain_writes_a_loadable_base(tmp_path):
    command = [sys.executable, str(ROOT / "examples/make_tiny_model.py"), "--output_dir", str(tmp_path), "--pretrain"]
    command += ["True", "--pretrain_epochs", "1", "--pretrain_num_train", "32", "--pretrain_num_validation", "16"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "validation accuracy: text_polarity" in done.stdout
    summary = json.loads((tmp_path / "pretraining.json").read_text())
    assert summary["config"]["num_train"] == 32 and summary["config"]["cue_setting"] == "all_forms"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"

    model = CFMoEForMultimodalClassification.from_base_pretrained(str(tmp_path), id2label={0: "no", 1: "yes"})
    fresh = build_tiny_model(seed=0)[0].mllm.state_dict()
    loaded = model.mllm.state_dict()
    assert any(not torch.equal(fresh[k], loaded[k]) for k in loaded)  # the pretrained weights, not a fresh init
