"""The run scripts as a newcomer runs them from a shell: every bad input ends in one `run_sarcasm.py: error: ...` line
with exit code 2 within 30 s (the Hub unreachable included), and the main job prints nothing a user cannot act on.

The bad inputs run as separate processes forked from one that imported the script once (`ZYGOTE`): each has its own
command line, environment, working folder, stderr and exit code, without paying the 5-7 s of importing torch and
transformers per case. Environment variables read at import (`HF_ENDPOINT`: a closed port, so the Hub is unreachable
whatever the network) are set for all of them.

Every CF-MoE config knob has one declared flag (`ConfigArguments`), which keeps the config's value unless given.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import socket
import stat
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import LlavaForConditionalGeneration

from cfmoe.modeling_cfmoe import CFMoEConfig, configuration_cfmoe
from cfmoe.trainer import model_source
from cfmoe.trainer.arguments import CONFIG_FLAGS, SYNTHETIC_FIELDS, ConfigArguments, DataArguments
from cfmoe.trainer.data.tiny import build_tiny_model, tiny_base_config
from cfmoe.trainer.errors import UserInputError
from cfmoe.trainer.loading import data_record
from cfmoe.trainer.model_source import check_model_source

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_sarcasm.py"
LIMIT_S = 30  # a bad input ends within this, imports included
BAD_INPUTS = ["model folder missing", "model folder mistyped", "Hub id, Hub unreachable", "output_dir is a file",
              "misspelled flag", "abbreviated flag", "invalid choice", "training split of one class",
              "no image folder", "two processes without --use_cpu"]  # fmt: skip
# forks one process per case from one that imported the script: {case: {argv, env, cwd}} on stdin
ZYGOTE = r"""
import json, os, sys, time, traceback
started = time.perf_counter()
script, cases = sys.argv[1], json.loads(sys.stdin.read())
import runpy
main = runpy.run_path(script)["main"]
from cfmoe.trainer.errors import exit_on_user_error
results = {"import_seconds": time.perf_counter() - started}
for name, case in cases.items():
    begin = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            os.environ.update(case["env"])
            for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = [script, *case["argv"]]
            exit_on_user_error(main)  # what the script's `if __name__ == "__main__"` runs
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = None
    while time.perf_counter() - begin < 60 and status is None:
        done, waited = os.waitpid(pid, os.WNOHANG)
        status = os.waitstatus_to_exitcode(waited) if done else time.sleep(0.05)
    if status is None:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    results[name] = {"code": status, "seconds": time.perf_counter() - begin}
print(json.dumps(results))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mmsd_folder(folder: Path, labels: list[int], images: bool = True) -> Path:
    """A 4-item MMSD2.0 layout (`{train,valid,test}.json`, `images/`), the training split with `labels`."""
    folder.mkdir(parents=True)
    items = [{"image_id": str(i), "text": f"post number {i}", "label": i % 2} for i in range(4)]
    if images:
        (folder / "images").mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32)).save(folder / "images" / f"{i}.jpg")
    for split in ("valid", "test"):
        (folder / f"{split}.json").write_text(json.dumps(items))
    train = [{**item, "label": label} for item, label in zip(items, labels, strict=True)]
    (folder / "train.json").write_text(json.dumps(train))
    return folder


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """{case: (command line, environment, the message after `run_sarcasm.py: error: `)}, run in `tmp`."""
    (tmp / "outputs" / "tiny-base").mkdir(parents=True)
    (tmp / "outputs" / "tiny-base" / "config.json").write_text("{}")
    (tmp / "results.txt").write_text("not a folder")
    one_class = mmsd_folder(tmp / "one_class", labels=[0, 0, 0, 0])
    no_images = mmsd_folder(tmp / "no_images", labels=[0, 1, 0, 1], images=False)
    cases = {
        "model folder missing": (
            ["--model_name_or_path", str(tmp / "nowhere" / "model")],
            {},
            r"--model_name_or_path \S+/nowhere/model: folder not found \(\S+/nowhere does not exist\)",
        ),
        "model folder mistyped": (
            ["--model_name_or_path", "outputs/tiny-bse"],
            {},
            r"--model_name_or_path outputs/tiny-bse: folder not found; did you mean outputs/tiny-base\?",
        ),
        "Hub id, Hub unreachable": (
            ["--model_name_or_path", "someone/no-such-model"],
            {},
            r"--model_name_or_path someone/no-such-model: no such local folder; the Hub is unreachable \(.+\) and "
            r"it is not in the Hub cache: .*hf download someone/no-such-model\)",
        ),
        "output_dir is a file": (
            ["--output_dir", "results.txt/run"],
            {},
            r"--output_dir results\.txt/run: results\.txt is a file, not a folder; name another",
        ),
        "misspelled flag": (
            ["--learnig_rate", "1e-4"],
            {},
            r"unrecognized arguments: --learnig_rate \(did you mean --learning_rate\?\)",
        ),
        "abbreviated flag": (
            ["--num_train_epoch", "1"],
            {},
            r"unrecognized arguments: --num_train_epoch \(did you mean --num_train_epochs\?\)",
        ),
        "invalid choice": (["--recipe", "fast"], {}, r"argument --recipe: invalid choice: 'fast' .*"),
        "training split of one class": (
            ["--dataset", "mmsd2", "--data_dir", str(one_class)],
            {},
            r"the training split holds a single class \(4 items, all 'not_sarcastic'\): .*check its labels",
        ),
        "no image folder": (
            ["--dataset", "mmsd2", "--data_dir", str(no_images)],
            {},
            r"no image folder found \(looked for .*\); pass --image_dir .*",
        ),
    }
    if not torch.accelerator.is_available():  # with a GPU two processes without --use_cpu are a distributed run
        launched = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
        cases["two processes without --use_cpu"] = (
            [],
            launched,
            r"the launcher started 2 processes \(WORLD_SIZE=2\), but without a GPU .*: pass --use_cpu True .*",
        )
    return cases


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """Every `bad_inputs` case run by `ZYGOTE`: (cases, {case: code, seconds, stderr}, the zygote's own run)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cases = bad_inputs(tmp)
    plan = {}
    for index, (name, (argv, env, _)) in enumerate(cases.items()):
        plan[name] = {"argv": [*argv, *([] if "--output_dir" in argv else ["--output_dir", str(tmp / f"out{index}")])],
                      "env": env, "cwd": str(tmp), "stdout": str(tmp / f"{index}.out"),
                      "stderr": str(tmp / f"{index}.err")}  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "CFMOE_"))}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp / "hf_home"), "PYTHONPATH": str(REPO)}
    zygote = subprocess.run([sys.executable, "-c", ZYGOTE, str(SCRIPT)], input=json.dumps(plan), capture_output=True,
                            text=True, env=env, cwd=tmp, timeout=300)  # fmt: skip
    assert zygote.returncode == 0, zygote.stderr[-3000:]
    results = json.loads(zygote.stdout.strip().splitlines()[-1])
    for name, case in plan.items():
        results[name]["stderr"] = Path(case["stderr"]).read_text()
    return cases, results, zygote


def test_importing_the_script_prints_nothing(bad_input_runs):
    """No bitsandbytes kernel message (nor anything else) before the script's first line of output."""
    _, results, zygote = bad_input_runs
    assert zygote.stderr == ""
    assert results["import_seconds"] < LIMIT_S


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_ends_in_one_line_and_exit_code_2(bad_input_runs, case):
    cases, results, _ = bad_input_runs
    if case not in cases:
        pytest.skip("two processes without --use_cpu form a distributed run where there is a GPU")
    result, message = results[case], cases[case][2]
    assert result["code"] == 2, result["stderr"][-3000:]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"run_sarcasm\.py: error: {message}", lines[0]), lines
    assert results["import_seconds"] + result["seconds"] < LIMIT_S


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory) -> Path:
    """A stock tiny LLaVA checkpoint on disk, as `--model_name_or_path` takes a local base."""
    folder = tmp_path_factory.mktemp("tiny-base")
    _, processor = build_tiny_model("sarcasm")
    tokenizer = processor.tokenizer
    config = tiny_base_config("llava", vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_main_job_prints_only_what_a_user_can_act_on(llava_base, tmp_path):
    """The README's main job (accelerate launch, a local base, the tiny recipe), small: stderr stays empty (no
    bitsandbytes, pin_memory, transformers info lines or Hub invitation); the printed summary gives the majority
    class and the kept checkpoint; the folder's files share one mode; the card keeps the local path out of its
    metadata."""
    output = tmp_path / "cfmoe"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               "--model_name_or_path", str(llava_base), "--recipe", "tiny", "--freeze_vision_tower", "True",
               "--num_train", "32", "--num_validation", "16", "--num_test", "16", "--num_train_epochs", "2",
               "--per_device_train_batch_size", "16", "--logging_steps", "1", "--disable_tqdm", "True",
               "--output_dir", str(output)]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "CFMOE_"))}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert "[INFO|" not in result.stdout and "Warning" not in result.stdout and "huggingface.co" not in result.stdout
    assert re.search(r"majority class \('\w+' in training\), accuracy of always predicting it: test_iid \d\.\d{3}",
                     result.stdout)  # fmt: skip
    kept = re.search(r"kept checkpoint-(\d) \(step \d of 4\), the best on the validation split by", result.stdout)
    assert kept, result.stdout[-2000:]
    modes = {stat.S_IMODE(path.stat().st_mode) for path in output.rglob("*") if path.is_file()}
    assert len(modes) == 1, modes  # model.safetensors too (safetensors writes it 0600)
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model is None and card.data.pipeline_tag == "other"
    assert f"the local model `{llava_base}` (a folder, not a Hub repo)" in card.text
    assert f"- Weights: kept checkpoint-{kept[1]}" in card.text
    # the warm-up the run had (2 epochs of 2 steps: the first pass, capped at a quarter), not the flag's None
    assert "| `debias_warmup_ratio` | `0.25 (1 of 4 steps; default: the first pass over the data, at most" in card.text
    majority = json.loads((output / "all_results.json").read_text())["majority_class"]
    assert set(majority["accuracy"]) == {"test_iid", "test_ood", "test_neutral"}


def test_a_hub_id_offline_reads_the_cache_or_fails_at_once(monkeypatch):
    """HF_HUB_OFFLINE set: a repo not in the cache fails without a request; the Hub unreachable and the repo
    cached: the process goes offline, so that transformers reads the cache instead of retrying for minutes."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match=r"someone/gone: no such local folder, and not in the Hub cache \("):
        check_model_source("someone/gone")

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_source, "try_to_load_from_cache", lambda repo_id, filename: "/cache/config.json")
    monkeypatch.setattr(model_source.HfApi, "model_info", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model_source("someone/cached")
    assert huggingface_hub.constants.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_real_data_run_records_the_data_arguments_that_applied():
    record = data_record(DataArguments(dataset="mmsd2", data_dir="/data/MMSD2.0/data/text_json_final"), None)
    assert record["data_dir"] == "/data/MMSD2.0/data/text_json_final" and not set(SYNTHETIC_FIELDS) & set(record)


# `CFMoEConfig` arguments that are deliberately no flag: the base comes from --model_name_or_path, the modalities from
# --text_counterfactuals / --image_counterfactuals, the context sub-config from its fields' flags
NOT_FLAGS = {"self", "kwargs", "base_config", "counterfactual_modalities", "context_config"}


def config_knobs() -> set[str]:
    """The knobs a config flag may set: `CFMoEConfig`'s arguments (but `NOT_FLAGS`) and the fields of its
    `ContextConfig`, which the config also takes as its own keywords."""
    knobs = set(inspect.signature(CFMoEConfig.__init__).parameters) - NOT_FLAGS
    return knobs | set(configuration_cfmoe.CONTEXT_FIELDS)


def config_default(config: CFMoEConfig, name: str) -> str:
    """How a config flag's help states the default of the knob `name`: the value a default config holds (flat or in
    its context sub-config), a list comma separated (None where empty), a string setting quoted."""
    value = getattr(config, name) if hasattr(config, name) else getattr(config.context_config, name)
    if isinstance(value, list):
        value = ",".join(str(getattr(item, "value", item)) for item in value) or None
    value = value.value if isinstance(value, Enum) else value
    return repr(value) if isinstance(value, str) else str(value)


def test_every_config_knob_has_one_flag():
    """A config knob without a flag (or a flag without a knob) fails here: `CONFIG_FLAGS` are the config's knobs."""
    assert len(set(CONFIG_FLAGS)) == len(CONFIG_FLAGS)
    assert set(CONFIG_FLAGS) == config_knobs()


def test_a_config_flag_keeps_the_config_value_and_states_its_default():
    """Each flag defaults to None (the config's or the checkpoint's value kept), its help states the config's
    default, and a string setting takes the config's `CHOICES`."""
    config, hints = CFMoEConfig(), get_type_hints(ConfigArguments)
    for flag in dataclasses.fields(ConfigArguments):
        assert flag.default is None, flag.name
        assert f"(default: {config_default(config, flag.name)}; a CF-MoE checkpoint: its own)" in flag.metadata["help"]
        kind: Any = get_args(hints[flag.name])[0]  # X of `X | None`
        assert (get_origin(kind) is Literal) == (flag.name in configuration_cfmoe.CHOICES), flag.name
        if flag.name in configuration_cfmoe.CHOICES:
            assert get_args(kind) == tuple(configuration_cfmoe.CHOICES[flag.name])
