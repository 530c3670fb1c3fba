"""The run scripts: defaults that depend on what is trained, a truthful `--help`, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import LlavaForConditionalGeneration
from transformers.utils import is_torch_bf16_gpu_available

from cfmoe.trainer.arguments import CheckpointTrainingArguments, TinyTrainingArguments, parse_args
from cfmoe.trainer.data.synthetic import HASHTAGS
from cfmoe.trainer.data.tiny import build_tiny_model, tiny_base_config
from cfmoe.trainer.errors import UserInputError, exit_on_user_error
from cfmoe.trainer.loading import load_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY_RUN = ["--num_train", "32", "--num_validation", "16", "--num_test", "16", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "False", "--report_to", "none", "--disable_tqdm", "True"]  # fmt: skip


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory) -> Path:
    """A stock (non-CF-MoE) tiny LLaVA checkpoint on disk, as `--model_name_or_path` takes one."""
    folder = tmp_path_factory.mktemp("llava")
    _, processor = build_tiny_model("sarcasm")
    tokenizer = processor.tokenizer
    config = tiny_base_config(
        "llava",
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _values(args, names: str) -> dict:
    return {name: getattr(args, name) for name in names.split()}


TRAINING = "num_train_epochs per_device_train_batch_size gradient_accumulation_steps learning_rate weight_decay " \
    "warmup_steps activation_checkpointing bf16 dataloader_num_workers"  # fmt: skip


def test_tiny_default_keeps_the_tiny_recipe(tmp_path):
    model_args, data_args, args = parse_args([])
    assert type(args) is TinyTrainingArguments and model_args.model_name_or_path is None
    assert _values(args, TRAINING) == dict(
        num_train_epochs=8.0, per_device_train_batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-3,
        weight_decay=0.01, warmup_steps=0.05, activation_checkpointing=False, bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    assert args.per_device_eval_batch_size == 128 and args.lr_scheduler_type == "cosine"
    assert (args.eval_strategy, args.save_strategy, args.load_best_model_at_end) == ("epoch", "epoch", True)
    assert args.metric_for_best_model == "counterfactual_macro_f1" and args.output_dir == "outputs/cfmoe"  # cfmoe's
    vanilla = parse_args(["--method", "vanilla"])[2]
    assert vanilla.metric_for_best_model == "inferred_worst_group_accuracy"  # the label-free default of the others
    assert (model_args.lora_r, model_args.lora_alpha, model_args.freeze_vision_tower) == (16, 32, False)
    assert (data_args.dataset, data_args.cue_setting) == ("synthetic", "tint_hashtag")


def test_a_checkpoint_gets_the_llava_recipe_and_every_value_can_be_overridden(llava_folder, tmp_path):
    path = ["--model_name_or_path", str(llava_folder), "--output_dir", str(tmp_path)]
    model_args, _, args = parse_args(path)
    assert type(args) is CheckpointTrainingArguments
    recipe = dict(
        num_train_epochs=1.0, per_device_train_batch_size=8, gradient_accumulation_steps=16, learning_rate=2e-5,
        weight_decay=0.0, warmup_steps=0.03, activation_checkpointing=True, bf16=is_torch_bf16_gpu_available(),
        dataloader_num_workers=4,
    )  # fmt: skip
    assert _values(args, TRAINING) == recipe
    assert (args.lr_scheduler_type, args.eval_strategy, args.eval_steps, args.save_steps) == (
        "cosine",
        "steps",
        0.1,
        0.1,
    )
    assert (model_args.lora_r, model_args.lora_alpha, model_args.dtype) == (128, 256, "float32")
    assert model_args.freeze_vision_tower  # LLaVA-1.5 fine-tunes with the vision tower frozen

    model_args, _, lora = parse_args([*path, "--use_lora", "True"])
    assert _values(lora, TRAINING) == {**recipe, "learning_rate": 2e-4}

    model_args, _, overridden = parse_args([*path, "--learning_rate", "1e-5", "--no_activation_checkpointing",
                                            "--lora_r", "8"])  # fmt: skip
    assert (overridden.learning_rate, overridden.activation_checkpointing, model_args.lora_r) == (1e-5, False, 8)

    model_args, _, small = parse_args([*path, "--recipe", "tiny"])  # a small local base: the tiny budget
    assert type(small) is TinyTrainingArguments and model_args.lora_r == 16


def test_a_checkpoint_trains_with_its_vision_tower_frozen_unless_asked(llava_folder, tmp_path):
    for flags, tower_trained in (([], False), (["--freeze_vision_tower", "False"], True)):
        model_args, _, _ = parse_args(["--model_name_or_path", str(llava_folder), *flags])
        model, _ = load_model("sarcasm", model_args, {0: "not_sarcastic", 1: "sarcastic"}, seed=0)
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert any(".vision_tower." in name for name in trainable) == tower_trained
        assert any(".language_model." in name for name in trainable)
    with pytest.raises(ValueError, match="pass --freeze_vision_tower False"):
        parse_args(["--model_name_or_path", str(llava_folder), "--lora_include_vision", "True"])


def _option_help(text: str, option: str) -> str:
    """The help of `--option`, whitespace normalised."""
    text = " ".join(text.split())
    return re.search(rf"--{option} {option.upper()} .*? \(default: [^)]*\)", text)[0]


def _groups(text: str) -> list[str]:
    """The titles of a help's groups, each checked to have a one-line description."""
    groups = re.findall(r"^(\w[\w ]*):\n  (.*)$", text, re.M)
    assert all(not line.startswith("-") for title, line in groups[1:])
    return [title for title, _ in groups]


def test_help_lists_the_common_options_first_with_the_defaults_that_run(llava_folder, capsys, monkeypatch):
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(EXAMPLES / "run_sarcasm.py"), "--help"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]  # no bitsandbytes line
    assert _option_help(result.stdout, "learning_rate").endswith("(default: 0.001)")
    assert _option_help(result.stdout, "num_train_epochs").endswith("(default: 8.0)")
    assert _option_help(result.stdout, "per_device_train_batch_size").endswith("(default: 32)")
    assert "llava recipe (a --model_name_or_path): 2e-05 (0.0002 with --use_lora)" in _option_help(
        result.stdout, "learning_rate"
    )
    # what a run sets first, in the order it is set; the rest behind --help_all
    assert _groups(result.stdout) == ["options", "data", "model", "method", "training"]
    first = ("dataset", "model_name_or_path", "method", "output_dir")
    order = [result.stdout.index(f"\n  --{name} ") for name in first]
    assert order == sorted(order)
    assert len(result.stdout.splitlines()) < 130 and "--help_all lists them all" in result.stdout
    assert "--lora_r" not in result.stdout and "--adam_beta1" not in result.stdout
    assert len(result.stdout.split("\n\n", 1)[0].splitlines()) == 1  # a one-line usage, not every option
    assert "  --no_" not in result.stdout and "--model-name-or-path" not in result.stdout  # each option once

    monkeypatch.setenv("COLUMNS", "400")  # no line breaks (argparse would break CF-MoE at its hyphen)
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", str(llava_folder), "--use_lora", "True", "--help_all"])
    text = capsys.readouterr().out
    assert _groups(text) == ["options", "data", "model", "method", "training", "model config", "more training"]
    assert _option_help(text, "learning_rate").endswith("(default: 0.0002)")
    assert _option_help(text, "gradient_accumulation_steps").endswith("(default: 16)")
    assert _option_help(text, "lora_r").endswith("(default: 128)")
    assert "--adam_beta1" in text and "  --no_" not in text
    # a config value shows one default, the config's; a pair sharing the config's description says which is which
    experts = _option_help(text, "num_visual_experts")
    assert experts.startswith("--num_visual_experts NUM_VISUAL_EXPERTS visual side (--num_text_experts sets the")
    assert experts.endswith("(default: 1; a CF-MoE checkpoint: its own)") and experts.count("default:") == 1
    assert _option_help(text, "num_text_experts").startswith("--num_text_experts NUM_TEXT_EXPERTS text side")


def test_run_sentiment_is_run_sarcasm_with_another_task():
    def body(name: str) -> str:
        text = (EXAMPLES / name).read_text()
        return text[text.index("from __future__") :].replace(f'TASK = "{name[4:-3]}"', "TASK = ...")

    assert body("run_sarcasm.py") == body("run_sentiment.py")


def test_tiny_run_writes_results_and_prints_the_split_table(tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLES / "run_sarcasm.py"))["main"]
    results = main([*TINY_RUN, "--output_dir", str(tmp_path), "--cue_setting", "mixed", "--method", "vanilla"])
    saved = json.loads((tmp_path / "all_results.json").read_text())
    assert {"eval", "train", "method", "seed", "data"} <= saved.keys() and saved["data"]["cue_setting"] == "mixed"
    assert set(saved["eval"]) == {"test_iid", "test_ood", "test_neutral"} == set(results["eval"])
    assert json.loads((tmp_path / "eval_results.json").read_text()) == saved["eval"]
    assert "train_runtime" in json.loads((tmp_path / "train_results.json").read_text())
    table = capsys.readouterr().out
    assert "method vanilla on synthetic sarcasm benchmark, cues mixed" in table
    assert re.search(r"test_ood( +(\d\.\d{3}|nan)){4}\n", table)  # accuracy, macro F1, worst group, cue reliance
    assert "robust accuracy min(iid, ood):" in table


def test_cfmoe_run_writes_a_context_audit_naming_the_cue_and_not_a_protected_word(tmp_path):
    """The planted hashtags are listed as context in `context_report.json` (after the warm-up and at the end), a
    protected one is not, and the model card summarises the audit."""
    main = runpy.run_path(str(EXAMPLES / "run_sarcasm.py"))["main"]
    argv = ["--num_train", "800", "--num_validation", "16", "--num_test", "16", "--num_train_epochs", "1"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False"]
    argv += ["--report_to", "none", "--disable_tqdm", "True", "--protected_words", "#sure"]
    main([*argv, "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "context_report.json").read_text())
    assert set(report) == {"after_warmup", "end"} and (tmp_path / "context_report.png").is_file()
    end = report["end"]
    context = {entry["text"].strip() for entry in end["tokens"]["context"]}
    hashtags = {tag for tags in HASHTAGS["sarcasm"] for tag in tags}
    assert len(context & hashtags) >= 8 and "#sure" not in context  # planted cues in, the protected one out
    assert {entry["text"].strip() for entry in end["tokens"]["protected"]} == {"#sure"}
    assert end["rows_with_text_context"] > 0.5 and end["items_counted"] == 800  # every item counted once
    card = (tmp_path / "README.md").read_text()
    assert "## Context audit" in card and f"`{end['tokens']['context'][0]['text'].strip()}`" in card


def _mmsd_folder(folder: Path, mutate=None) -> Path:
    """A 4-item MMSD layout (`{train,valid,test}.json`, `images/`); `mutate(folder)` breaks it."""
    (folder / "images").mkdir(parents=True)
    items = [{"image_id": str(i), "text": f"post number {i}", "label": i % 2} for i in range(4)]
    for i in range(4):
        Image.new("RGB", (32, 32)).save(folder / "images" / f"{i}.jpg")
    for split in ("train", "valid", "test"):
        (folder / f"{split}.json").write_text(json.dumps(items))
    if mutate is not None:
        mutate(folder)
    return folder


def _bad_label(folder: Path) -> None:
    items = json.loads((folder / "train.json").read_text())
    items[1]["label"] = "yes"
    (folder / "train.json").write_text(json.dumps(items))


MMSD = "--dataset mmsd --data_dir {data}"
BAD_INPUTS = {  # the data folder's defect (None: no folder), the command line, the message
    "missing data dir": (None, "--dataset mmsd --data_dir {tmp}/nowhere", r"nowhere: no MMSD data found"),
    "malformed JSON": (
        lambda folder: (folder / "train.json").write_text('[{"image_id": "0", text: 1}]'),
        MMSD,
        r"train\.json: malformed JSON at line 1",
    ),
    'label "yes"': (_bad_label, MMSD, r"label 'yes' is not one of \[0, 1\]; .*--skip_bad_examples True"),
    "missing image": (
        lambda folder: (folder / "images" / "2.jpg").unlink(),
        MMSD,
        r"images/2\.jpg of item '2' not found; .*--skip_bad_examples True",
    ),
    "corrupt image (collator)": (
        lambda folder: (folder / "images" / "1.jpg").write_bytes(b"not an image"),
        f"{MMSD} --max_steps 1 --per_device_train_batch_size 4 --eval_strategy no --save_strategy no "
        "--load_best_model_at_end False",
        r"item 1: image .*1\.jpg cannot be decoded",
    ),
    "unknown method": (None, "--method nonsense", r"--method must be one of vanilla, .*got 'nonsense'"),
    "negative learning rate": (None, "--learning_rate -1", r"--learning_rate must be > 0, got -1\.0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_the_script_with_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    defect, flags, message = BAD_INPUTS[case]
    data = _mmsd_folder(tmp_path / "data", defect) if defect else None
    argv = [*flags.format(tmp=tmp_path, data=data).split(), "--output_dir", str(tmp_path / "out")]
    main = runpy.run_path(str(EXAMPLES / "run_sarcasm.py"))["main"]
    monkeypatch.setattr(sys, "argv", ["run_sarcasm.py", *argv])
    monkeypatch.delenv("CFMOE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(main)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"run_sarcasm\.py: error: .*{message}.*", err[-1]), err[-3:]


def test_the_command_line_prints_no_traceback_unless_asked(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CFMOE_TRACEBACK", None)
    command = [sys.executable, str(EXAMPLES / "run_sarcasm.py"), "--learning_rate", "-1", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "run_sarcasm.py: error: --learning_rate must be > 0, got -1.0"
    result = subprocess.run(command, capture_output=True, text=True, env={**env, "CFMOE_TRACEBACK": "1"}, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr and "UserValueError" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be > 0 (or give --max_steps), got 0.0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be >= 0, got -0.1"),
        (["--bias_loss_weight", "-1"], "--bias_loss_weight must be >= 0, got -1.0"),
        (["--contrast_temperature", "0"], "--contrast_temperature must be > 0, got 0.0"),
        (["--max_weight", "0.5"], "--max_weight must be >= 1 (item weights start at 1), got 0.5"),
        (["--debias_warmup_ratio", "1.5"], "--debias_warmup_ratio must be in [0, 1], got 1.5"),
        (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1.0"),
        (["--counterfactual_fraction", "2"], "--counterfactual_fraction must be in [0, 1], got 2.0"),
        (["--num_visual_experts", "0"], "--num_visual_experts must be >= 1, got 0"),
        (["--experts_top_k", "2"], "--experts_top_k=2 must lie in [1, min(num_visual_experts, num_text_experts)]"),
        (["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
        (["--num_train", "0"], "--num_train must be >= 1, got 0"),
        (["--num_test", "-1"], "--num_test must be >= 1, got -1"),
        (["--label_noise", "1.5"], "--label_noise must lie in [0, 1], got 1.5"),
        (["--rho_train", "-0.5"], "--rho_train must lie in [0, 1], got -0.5"),
        (["--cue_setting", "glitter"], "unknown --cue_setting 'glitter'"),
        (["--max_length", "0"], "--max_length must be >= 1, got 0"),
    ],
)
def test_numeric_arguments_are_checked_when_parsed(flags, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        parse_args(flags)


def test_checks_that_depend_on_a_checkpoint_wait_for_it(llava_folder):
    path = ["--model_name_or_path", str(llava_folder)]
    assert parse_args([*path, "--experts_top_k", "2"])[0].experts_top_k == 2  # the checkpoint's experts bound it
    assert parse_args(["--num_train_epochs", "0", "--max_steps", "3"])[2].max_steps == 3


def test_config_flags_given_become_the_config_keywords():
    """Only the config values given reach the config (`tests/test_command_line.py` checks the flags against the
    config's arguments); a string setting takes the config's `CHOICES`."""
    assert parse_args(["--pooling", "last", "--router_temperature", "2"])[0].config_kwargs() == {
        "pooling": "last",
        "router_temperature": 2.0,
    }
    with pytest.raises(UserInputError, match="argument --pooling: invalid choice: 'max'"):  # the config's CHOICES
        parse_args(["--pooling", "max"])
