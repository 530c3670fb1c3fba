"""Model card and Hub upload, offline: `HfApi` is replaced by a fake that records the commit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

import cfmoe.modeling_cfmoe as modeling_cfmoe
from cfmoe.modeling_cfmoe.pipeline_cfmoe import TASK, save_pipeline
from cfmoe.trainer import hub
from cfmoe.trainer.hub import complete_hub_folder, method_settings_from_config, push_folder_to_hub, write_model_card

EVAL = {
    "test_iid": {"accuracy": 0.9125, "macro_f1": 0.9, "worst_group_accuracy": 0.75},
    "test_ood": {"accuracy": 0.8125, "macro_f1": 0.8, "worst_group_accuracy": float("nan")},
}
REMOTE_CODE = {p.name for p in Path(modeling_cfmoe.__file__).parent.glob("*.py")} - {"__init__.py"}


class FakeHfApi:
    """Records `create_repo` and the files `upload_folder` would commit (same pattern filtering as the real one)."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, *, folder_path, repo_id, commit_message, ignore_patterns=None, **kwargs):
        paths = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        files = set(filter_repo_objects(paths, ignore_patterns=[*(ignore_patterns or []), ".git/*"]))
        self.calls.append(("upload_folder", repo_id, files, {f: (Path(folder_path) / f).read_bytes() for f in files}))
        return "commit-info"


def _card(folder: Path, model) -> None:
    write_model_card(
        folder,
        base_model=None,
        dataset_name="Synthetic spurious sarcasm",
        method_settings={**method_settings_from_config(model.config), "contrast_loss_weight": 0.1},
        eval_results=EVAL,
        routing_shares={"routing_visual_expert_0": 0.625, "routing_visual_expert_1": 0.375, "text": [0.5, 0.5]},
        repo_id="someone/cfmoe-tiny",
        synthetic=True,
    )


def test_model_card_metadata_round_trips_and_body(tiny_model, tmp_path):
    _card(tmp_path, tiny_model)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.model_name == "cfmoe-tiny"
    assert {
        "multimodal",
        "debiasing",
        "sarcasm-detection",
        "mixture-of-experts",
        "counterfactual",
        "custom_code",
    } <= set(card.data.tags)
    parsed = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = {(s, m): v for s, metrics in EVAL.items() for m, v in metrics.items() if v == v}  # NaN left out
    assert parsed == expected
    text = card.text
    assert "| test_iid | 0.9125 | 0.9000 | 0.7500 |" in text and "| test_ood | 0.8125 | 0.8000 | n/a |" in text
    assert "| visual | 0.6250 | 0.3750 |" in text and "`num_visual_experts` | `1`" in text
    assert "not MMSD2.0" in text and "2509.15361" in text and "@inproceedings" in text
    assert 'pipeline(model="someone/cfmoe-tiny", trust_remote_code=True)' in text
    assert "Loading the model and running it on tensors needs `torch` and `transformers` only" in text
    assert "`pillow`" in text and 'AutoProcessor.from_pretrained("someone/cfmoe-tiny", trust_remote_code=True)' in text


def test_push_completes_the_folder_and_uploads_our_card(tiny_model, processor, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    tiny_model.save_pretrained(folder)  # no pipeline file, no handler, no custom_pipelines yet
    processor.save_pretrained(folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (folder / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="README.md written by cfmoe.trainer.hub.write_model_card"):
        complete_hub_folder(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# generic card\n")
    with pytest.raises(ValueError, match="README.md"):
        complete_hub_folder(folder)
    _card(folder, tiny_model)

    FakeHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    assert push_folder_to_hub(folder, "someone/cfmoe-tiny", private=True) == "commit-info"
    (_, repo, private, exist_ok), (_, _, files, contents) = FakeHfApi.calls
    assert (repo, private, exist_ok) == ("someone/cfmoe-tiny", True, True)
    assert REMOTE_CODE | {"handler.py", "pipeline_cfmoe.py", "preprocessing.py", "model.safetensors"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "README.md"} <= files
    assert not any(f.startswith("checkpoint-") or f.endswith(".bin") for f in files)
    assert contents["handler.py"] == (Path(modeling_cfmoe.__file__).parent / "handler.py").read_bytes()
    config = json.loads(contents["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_cfmoe.CFMoEForMultimodalClassification"
    (tmp_path / "pushed.md").write_bytes(contents["README.md"])
    assert len(ModelCard.load(tmp_path / "pushed.md").data.eval_results) == 5

    # the entry added here is the one Pipeline.save_pretrained writes (test_pipeline loads that one remotely)
    save_pipeline(copy.deepcopy(tiny_model), processor, tmp_path / "reference")  # sets config.custom_pipelines
    reference = json.loads((tmp_path / "reference" / "config.json").read_text())["custom_pipelines"]
    assert config["custom_pipelines"] == reference and TASK in reference


def test_push_refuses_a_folder_without_model_or_processor(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    folder = r"not a complete CF-MoE model folder; missing: config.json with auto_map"  # what, not "cannot be pushed"
    with pytest.raises(ValueError, match=rf"{folder}.*model\.safetensors.*processor files"):
        complete_hub_folder(tmp_path)


def test_card_of_a_local_base_with_placeholder_images(tmp_path):
    """A local base stays out of the metadata (Hub ids only) and is named in the text; a setting holding a newline
    stays in its table cell; a run without real images says so; no generative pipeline tag for a classifier."""
    base = tmp_path / "outputs" / "tiny-base"
    base.mkdir(parents=True)
    settings = {"prompt_template": "{image}\n{text}", "debias_warmup_ratio": "0.125 (125 of 1,000 steps)"}
    write_model_card(tmp_path / "run", base_model=str(base), dataset_name="mmsd2", method_settings=settings,
                     eval_results=EVAL, kept_checkpoint="kept checkpoint-250 (step 250 of 1,000)",
                     placeholder_image=str(tmp_path / "grey.jpg"))  # fmt: skip
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.base_model is None and card.data.pipeline_tag == "other"
    assert f"- Base model: the local model `{base}` (a folder, not a Hub repo)" in card.text
    assert "| `prompt_template` | `{image}\\n{text}` |\n| `debias_warmup_ratio` | `0.125 (125 of" in card.text
    assert "- Images: **no real image was used**" in card.text and "`grey.jpg`" in card.text
    assert "> No real image was used" in card.text
    assert "- Weights: kept checkpoint-250 (step 250 of 1,000)" in card.text

    write_model_card(tmp_path / "hub", base_model="llava-hf/llava-1.5-7b-hf", dataset_name="mmsd2",
                     method_settings={}, eval_results=EVAL)  # fmt: skip
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf" and "No real image" not in card.text
