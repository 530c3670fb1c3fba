"""Shared fixtures: the tiny offline model, its processor and a small synthetic batch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfmoe.trainer.data.tiny import build_tiny_model

torch.set_num_threads(1)
# the research harness behind the benchmark scripts (`examples/benchmarks`), imported as the scripts import it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

# prepended to scripts run in a subprocess that must not import our packages (remote-code checks)
BLOCK_OUR_PACKAGES = """
import builtins
_real_import = builtins.__import__
def _guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("cfmoe", "modeling_cfmoe", "trainer"):
        raise ImportError(f"{name} must not be importable here")
    return _real_import(name, *args, **kwargs)
builtins.__import__ = _guarded
"""
# tests run beside other work on 2 cores; more threads only thrash


TINY_MODEL = {"router_jitter": 0.0, "counterfactual_fraction": 0.25}


@pytest.fixture(scope="session")
def tiny_model_and_processor():
    """One tiny model for the tests that only read it; a test that changes a model builds its own
    (`make_tiny_model`)."""
    return build_tiny_model("sarcasm", seed=0, **TINY_MODEL)


@pytest.fixture
def make_tiny_model():
    """A fresh tiny model with the session model's weights and settings, some config values changed."""
    return lambda **config: build_tiny_model("sarcasm", seed=0, **{**TINY_MODEL, **config})[0]


@pytest.fixture
def tiny_model(tiny_model_and_processor):
    model = tiny_model_and_processor[0]
    model.eval()
    return model


@pytest.fixture(scope="session")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


def random_images(n: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def tiny_batch(processor):
    texts = [
        "<image>\nwe love the rainy monday",
        "<image>\nwhat a day",
        "<image>\nthe train is late again",
        "<image>\nsunny",
    ]
    batch = processor(images=random_images(4), text=texts, return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    return dict(batch)
