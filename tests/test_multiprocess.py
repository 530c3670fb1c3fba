"""Two training processes on CPU (DDP over gloo, started by `accelerate launch` with the committed config) reach
the weights and metrics of one process with the same global batch, with experts that get no tokens in a step."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
run_sarcasm = runpy.run_path(str(REPO / "examples" / "run_sarcasm.py"))["main"]  # the example's main(argv)
CONFIG = REPO / "examples" / "accelerate_configs" / "multi_cpu.yaml"
# Loss terms that are means over items, so that the average of two half-batch gradients is the full-batch one:
# no counterfactual rows (paired within a process's batch), no load-balancing term (a batch statistic), no router
# noise (drawn per process). Top-1 routing of 4 items over 4 experts leaves experts without tokens.
RUN = ["--num_train", "32", "--num_validation", "8", "--num_test", "8", "--max_steps", "4", "--logging_steps", "1",
       "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no", "--load_best_model_at_end", "False",
       "--seed", "3", "--use_cpu", "True", "--disable_tqdm", "True", "--report_to", "none",
       "--counterfactual_fraction", "0", "--factual_task_weight", "1", "--router_aux_loss_coef", "0",
       "--router_jitter", "0", "--num_visual_experts", "4", "--num_text_experts", "4",
       "--experts_top_k", "1"]  # fmt: skip


def free_port() -> int:
    """A TCP port nobody listens on, for the processes' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def history(run: Path) -> list[dict]:
    """The Trainer's log history of a finished run."""
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--main_process_port", str(free_port()), str(REPO / "examples" / "run_sarcasm.py"), *RUN,
               "--per_device_train_batch_size", "4", "--output_dir", str(two)]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    one_results = run_sarcasm([*RUN, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])

    two_results = json.loads((two / "all_results.json").read_text())
    # checkpoints are staged by both processes (one RNG state each) and published whole
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= {
        p.name for p in (two / "checkpoint-4").iterdir()
    }
    assert not (two / "_checkpoint-staging").exists()
    assert two_results["train"]["epoch"] == 1.0  # 2 processes x 4 items: 4 steps cover the 32 items once
    shares = [v for entry in history(two) for k, v in entry.items() if k.startswith("routing_visual_expert_")]
    assert 0.0 in shares  # in some step an expert received no token, and DDP went on
    expected, actual = load_file(tmp_path / "one" / "model.safetensors"), load_file(two / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected.keys():  # the context statistics too: every process counts every process's items
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # the total loss is averaged over the processes by the Trainer (the loss_<term> logs are rank 0's own)
    one_losses = [(e["step"], e["loss"]) for e in history(tmp_path / "one") if "loss" in e]
    two_losses = [(e["step"], e["loss"]) for e in history(two) if "loss" in e]
    assert [step for step, _ in two_losses] == [step for step, _ in one_losses] == [1, 2, 3, 4]
    assert [loss for _, loss in two_losses] == pytest.approx([loss for _, loss in one_losses], rel=1e-4)
    for split, metrics in one_results["eval"].items():
        assert two_results["eval"][split] == pytest.approx(metrics, nan_ok=True), split


@pytest.mark.parametrize(
    "name, kind, processes",
    [("multi_cpu", "MULTI_GPU", 2), ("ddp", "MULTI_GPU", 8), ("fsdp", "FSDP", 8), ("deepspeed_zero2", "DEEPSPEED", 8)],
)
def test_committed_accelerate_configs_are_valid(name, kind, processes, monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = REPO / "examples" / "accelerate_configs" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), str(REPO / "examples" / "run_sarcasm.py")])
    args, config, _ = _validate_launch_command(args)
    assert config.distributed_type == kind and config.num_processes == processes
    if kind == "DEEPSPEED":  # deepspeed is not installed here: check the fields its plugin reads
        assert config.deepspeed_config["zero_stage"] == 2
        assert {"gradient_accumulation_steps", "gradient_clipping"}.isdisjoint(config.deepspeed_config)  # "auto"
        return
    env = prepare_multi_gpu_env(args)  # the environment accelerate gives the torchrun workers
    if kind == "FSDP":
        for key, value in env.items():
            if key.startswith("FSDP_"):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints and final weights as safetensors
