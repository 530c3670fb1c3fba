"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on CF-MoE.

The common test modules ship in the transformers source distribution, not in the wheel. Download the sdist of the
installed version once (docs/hf_compatibility.md); this file then runs offline and is skipped, with the command to
run, when the sdist is not there. The sdist lacks three helper modules the common modules import (export and
generation mixins, common config kwargs): they are replaced by empty stand-ins, so the export and generation tests
are not part of this run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import pytest
import transformers

from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification

SDIST_DIR = Path(os.environ.get("TRANSFORMERS_SDIST_DIR", Path.home() / ".cache" / "cfmoe" / "sdist"))
SDIST = SDIST_DIR / f"transformers-{transformers.__version__}.tar.gz"
PACKAGE = "transformers_sdist_tests"
FETCH = (
    f"pip download --no-deps --no-binary :all: transformers=={transformers.__version__} -d {SDIST_DIR}"
    " && pip install parameterized"
)

if not SDIST.is_file():
    pytest.skip(f"the transformers sdist is not at {SDIST}; fetch it with: {FETCH}", allow_module_level=True)
pytest.importorskip("parameterized", reason=f"the common tests need parameterized; run: {FETCH}")


def _import_common_tests() -> tuple[type, type, types.ModuleType]:
    """`ModelTesterMixin`, `ConfigTester` and the common modeling module, from the sdist's `tests/` folder."""
    tests_dir = SDIST_DIR / f"transformers-{transformers.__version__}" / "tests"
    if not (tests_dir / "test_modeling_common.py").is_file():
        with tarfile.open(SDIST) as archive:
            prefix = f"transformers-{transformers.__version__}/tests/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name.count("/") == 2]
            archive.extractall(SDIST_DIR, members=members, filter="data")
        (tests_dir / "__init__.py").touch()  # the common config tests import this folder's `__init__.py`
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    stand_ins = {
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "utils.test_configuration_utils": {"config_common_kwargs": {}},
    }
    sys.modules[PACKAGE] = package
    for name, attributes in stand_ins.items():
        parent, _, child = name.partition(".")
        sys.modules.setdefault(f"{PACKAGE}.{parent}", types.ModuleType(f"{PACKAGE}.{parent}"))
        module = types.ModuleType(f"{PACKAGE}.{name}")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module
    loaded = {}
    for name in ("test_configuration_common", "test_modeling_common"):
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", tests_dir / f"{name}.py")
        loaded[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded[name]
        spec.loader.exec_module(loaded[name])
    common = loaded["test_modeling_common"]
    return common.ModelTesterMixin, loaded["test_configuration_common"].ConfigTester, common


ModelTesterMixin, ConfigTester, _common = _import_common_tests()
import torch  # noqa: E402
from parameterized import parameterized  # noqa: E402
from transformers import LlavaConfig  # noqa: E402


class CFMoEModelTester:
    """Tiny llama + CLIP base (as in transformers' LLaVA tests): batch 3, 16 image tokens per row."""

    def __init__(self, parent: unittest.TestCase, seq_length: int = 7):
        self.parent = parent
        self.text_config = {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 1,
        }
        self.vision_config = {
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 32,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "initializer_range": 0.02,
        }
        self.image_token_index = 0
        self.text_only = False  # rows without image placeholders (for mixin tests that pass input_ids alone)
        self.pad_token_id = 1
        self.batch_size = 3
        self.num_labels = 3
        self.is_training = True
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.num_image_tokens = (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2
        self.seq_length = seq_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> CFMoEConfig:
        base = LlavaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_index=self.vocab_size - 1 if self.text_only else self.image_token_index,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            image_seq_length=self.num_image_tokens,
        )
        return CFMoEConfig(base_config=base.to_dict(), num_labels=self.num_labels, router_jitter=0.0)

    def prepare_config_and_inputs_for_common(self) -> tuple[CFMoEConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        size = self.vision_config["image_size"]
        pixel_values = _common.floats_tensor([self.batch_size, 3, size, size])
        input_ids = _common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 2
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        if self.text_only:
            return config, {"input_ids": input_ids, "attention_mask": attention_mask}
        input_ids[:, : self.num_image_tokens] = self.image_token_index
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


NOT_APPLICABLE = {
    "test_reverse_loading_mapping": "CF-MoE saves its in-memory key layout on purpose (raw state-dict loads)",
    "test_can_init_all_missing_weights": "custom-code models initialise missing weights through transformers' "
    "remote-code path",
    "test_training_gradient_checkpointing": "branch-only heads (text-only, image-only) have no gradient without "
    "counterfactuals",
    "test_training_gradient_checkpointing_use_reentrant_false": "as test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_true": "as test_training_gradient_checkpointing",
    "test_correct_missing_keys": "a CF-MoE config wraps the base's config: a bare base checkpoint (`model.base_model`) "
    "loads through `from_base_pretrained`, not `from_pretrained`",
}


class CFMoEModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CFMoEForMultimodalClassification,)
    _is_composite = True

    def setUp(self):
        self.model_tester = CFMoEModelTester(self)
        self.config_tester = ConfigTester(self, config_class=CFMoEConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """The mixin adds labels for built-in classification classes only: one class id per item here too."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_sdpa_can_dispatch_composite_models(self):
        """The mixin looks for the towers on `model.base_model`; CF-MoE holds them in the wrapped base (`mllm`)."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as folder:
            CFMoEForMultimodalClassification(config).save_pretrained(folder)
            for requested in ("sdpa", "eager"):
                model = CFMoEForMultimodalClassification.from_pretrained(folder, attn_implementation=requested)
                for tower in (model.mllm.language_model, model.mllm.vision_tower):
                    self.assertEqual(tower.config._attn_implementation, requested)

    @parameterized.expand(_common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_sdpa_inference(
        self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
    ):
        """On text-only rows: the mixin passes `input_ids` alone (no `pixel_values`) and pads the batch with random
        ids in [0, 5), and CF-MoE refuses image placeholders without images; the image token is moved out of reach."""
        self.model_tester.text_only = True
        _common._test_eager_matches_sdpa_inference(
            self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
        )


for _name, _reason in NOT_APPLICABLE.items():
    setattr(CFMoEModelTest, _name, unittest.skip(f"not applicable: {_reason}")(lambda self: None))
