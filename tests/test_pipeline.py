"""The custom pipeline (scores, effects, batching) and the Endpoints handler, in process and as remote code."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_OUR_PACKAGES, random_images
from transformers import AutoProcessor, LlavaNextImageProcessorPil, LlavaNextProcessor

import cfmoe.modeling_cfmoe as modeling_cfmoe
from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification
from cfmoe.modeling_cfmoe.handler import EndpointHandler
from cfmoe.modeling_cfmoe.pipeline_cfmoe import MultimodalDebiasedClassificationPipeline, save_pipeline
from cfmoe.modeling_cfmoe.preprocessing import BadExampleError, encode_examples
from cfmoe.trainer.data.tiny import tiny_base_config

TEXTS = ["we love the rainy monday", "what a day", "the train is late again and again and again"]
EFFECT_KEYS = {"TE", "NDE_T", "NDE_V", "TIE"}


@pytest.fixture
def pipe(tiny_model, processor):
    return MultimodalDebiasedClassificationPipeline(model=tiny_model, processor=processor, device=-1)


def _items(n: int = 3) -> list[dict]:
    return [{"image": image, "text": text} for image, text in zip(random_images(n, seed=3), TEXTS, strict=False)]


def _assert_same(got: list[dict], want: list[dict], tolerance: float) -> None:
    """Same labels in the same order, scores (and effects, when there) within `tolerance`."""
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], abs=tolerance)
        assert g.get("effects") == pytest.approx(w.get("effects"), abs=tolerance)


def _b64(image) -> str:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_scores_are_the_model_softmax_sorted_with_effects(pipe, tiny_model, processor):
    item = _items(1)[0]
    inputs = encode_examples(processor, [item["image"]], [item["text"]], tiny_model.config.prompt_template)
    with torch.no_grad():
        out = tiny_model(**inputs, counterfactuals="effects")
    probs = out.logits.softmax(-1)[0]
    result = pipe(item, return_effects=True)
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
    for entry in result:
        index = tiny_model.config.label2id[entry["label"]]
        assert entry["score"] == pytest.approx(probs[index].item(), abs=1e-6)
        effects = entry["effects"]
        assert set(effects) == EFFECT_KEYS
        assert effects["TIE"] == pytest.approx(out.indirect_effect[0, index].item(), abs=1e-6)
        assert effects["TE"] == pytest.approx(effects["NDE_T"] + effects["NDE_V"] + effects["TIE"], abs=1e-5)
    top = pipe(item, top_k=1)
    assert top == [{"label": result[0]["label"], "score": result[0]["score"]}]


def test_batched_calls_match_items_alone(pipe, tmp_path):
    items = _items()
    items[1]["image"].save(tmp_path / "b.png")
    items[1] = {"image": str(tmp_path / "b.png"), "text": items[1]["text"]}  # a path works like an image
    alone = [pipe(item, return_effects=True) for item in items]
    for got, want in zip(pipe(items, batch_size=3, return_effects=True), alone, strict=True):  # padded batch
        _assert_same(got, want, 1e-5)
    assert pipe(items, return_effects=True) == alone  # a list with the default batch_size of 1


def test_anyres_batches_pad_image_tiles(processor):
    """LLaVA-NeXT: images of other aspect ratios give other tile counts; batching pads tiles, scores unchanged."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [32, 64]]
    )
    tokenizer = processor.tokenizer
    next_processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    base = tiny_base_config("llava_next", len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), 0)
    torch.manual_seed(0)
    model = CFMoEForMultimodalClassification(CFMoEConfig(base_config=base.to_dict(), num_labels=2)).eval()
    pipe = MultimodalDebiasedClassificationPipeline(model=model, processor=next_processor, device=-1)
    wide, square = random_images(1, seed=5, size=64)[0].resize((64, 32)), random_images(1, seed=6)[0]
    items = [{"image": wide, "text": TEXTS[0]}, {"image": square, "text": TEXTS[2]}]
    assert [pipe.preprocess(item)["pixel_values"].shape[1] for item in items] == [3, 2]
    batched = pipe(items, batch_size=2)
    for got, item in zip(batched, items, strict=True):
        _assert_same(got, pipe(item), 1e-5)


def test_bad_inputs_raise_clear_errors(pipe):
    image = _items(1)[0]["image"]
    with pytest.raises(BadExampleError, match="URLs are not fetched"):
        pipe({"image": "https://example.com/a.jpg", "text": "hi"})
    with pytest.raises(BadExampleError, match="text is empty"):
        pipe({"image": image, "text": "   "})
    with pytest.raises(BadExampleError, match="must be a dict"):
        pipe("just a text")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        pipe({"image": image, "text": "hi"}, top_k=0)


@pytest.fixture(scope="module")
def saved_pipeline(tiny_model_and_processor, tmp_path_factory) -> Path:
    """What the Hub repo holds: model, processor, pipeline code and `handler.py` at the root."""
    folder = tmp_path_factory.mktemp("hub") / "cfmoe-tiny"
    model = copy.deepcopy(tiny_model_and_processor[0]).eval()  # saving sets config.custom_pipelines
    save_pipeline(model, tiny_model_and_processor[1], folder)
    shutil.copyfile(Path(modeling_cfmoe.__file__).parent / "handler.py", folder / "handler.py")
    return folder


def test_handler_decodes_base64_and_lists(pipe):
    handler = EndpointHandler.__new__(EndpointHandler)  # loading from a folder: see the remote-code test below
    handler.pipeline = pipe
    items = _items(2)
    request = {"inputs": [{"image": _b64(i["image"]), "text": i["text"]} for i in items], "parameters": {"top_k": 1}}
    assert handler(request) == [pipe(item, top_k=1) for item in items]
    single = {"inputs": {"image": "data:image/png;base64," + _b64(items[0]["image"]), "text": items[0]["text"]}}
    assert handler(single) == pipe(items[0])
    with pytest.raises(ValueError, match="input 0: image is not a base64-encoded image"):
        handler({"inputs": {"image": "not base64!", "text": "hi"}})
    with pytest.raises(ValueError, match='needs "inputs"'):
        handler({"image": "", "text": "hi"})


REMOTE_PIPELINE = BLOCK_OUR_PACKAGES + textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    folder, request = sys.argv[1], json.loads(open(sys.argv[2]).read())
    pipe = pipeline(model=folder, trust_remote_code=True)
    assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
    assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
    by_pipeline = pipe({"image": request["path"], "text": request["text"]}, return_effects=True)
    sys.path.insert(0, folder)
    from handler import EndpointHandler
    by_handler = EndpointHandler(folder)({"inputs": [request["item"]], "parameters": {"return_effects": True}})
    json.dump({"pipeline": by_pipeline, "handler": by_handler}, open(sys.argv[3], "w"))
    """
)


def test_saved_pipeline_and_handler_run_without_our_packages(saved_pipeline, pipe, tmp_path):
    item = _items(1)[0]
    item["image"].save(tmp_path / "image.png")
    request = {
        "path": str(tmp_path / "image.png"),
        "text": item["text"],
        "item": {**item, "image": _b64(item["image"])},
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "remote.py").write_text(REMOTE_PIPELINE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "remote.py", str(saved_pipeline), "request.json", "out.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already registered" not in result.stderr  # the pipeline module is loaded twice, registered once
    out = json.loads((tmp_path / "out.json").read_text())
    expected = pipe(item, return_effects=True)
    for got in (out["pipeline"], out["handler"][0]):
        _assert_same(got, expected, 1e-6)


REMOTE_TINY_PIPELINE = BLOCK_OUR_PACKAGES + textwrap.dedent(
    """
    import json, sys
    from transformers import AutoProcessor, pipeline
    pipe = pipeline(model=sys.argv[1], trust_remote_code=True)
    assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
    json.dump(pipe({"image": sys.argv[2], "text": "what a lovely monday"}, return_effects=True), open(sys.argv[3], "w"))
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)  # as the model card says
    assert type(processor).__module__ == "transformers.models.llava.processing_llava", type(processor).__module__
    """
)


def test_make_tiny_model_folder_is_pipeline_ready_without_our_packages(tmp_path):
    """Any save_pretrained (here the tiny-model script's) carries `custom_pipelines` and the pipeline code."""
    script = Path(__file__).resolve().parents[1] / "examples" / "make_tiny_model.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    made = subprocess.run(
        [sys.executable, str(script), "--output_dir", str(tmp_path / "tiny")], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert (
        "multimodal-debiased-classification"
        in json.loads((tmp_path / "tiny" / "config.json").read_text())["custom_pipelines"]
    )
    random_images(1, seed=4)[0].save(tmp_path / "image.png")
    (tmp_path / "remote.py").write_text(REMOTE_TINY_PIPELINE)
    result = subprocess.run(
        [sys.executable, "remote.py", str(tmp_path / "tiny"), str(tmp_path / "image.png"), "out.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr and "model of type" not in result.stderr
    model = CFMoEForMultimodalClassification.from_pretrained(tmp_path / "tiny").eval()
    local = MultimodalDebiasedClassificationPipeline(
        model=model, processor=AutoProcessor.from_pretrained(tmp_path / "tiny"), device=-1
    )
    expected = local({"image": str(tmp_path / "image.png"), "text": "what a lovely monday"}, return_effects=True)
    _assert_same(json.loads((tmp_path / "out.json").read_text()), expected, 1e-6)
