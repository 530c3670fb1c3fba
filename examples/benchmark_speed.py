"""Speed and memory of counterfactual training: `cfmoe` against `vanilla` fine-tuning of the same model.

    python examples/benchmark_speed.py --output_dir out/speed                 # CPU, default sizes
    python examples/benchmark_speed.py --output_dir out/speed --device cuda   # GPU, bf16 autocast

Both methods train the same `CFMoEForMultimodalClassification` (same weights, batch and sequence) with the
trainer's own `compute_loss`: `vanilla` is one forward without counterfactuals and a plain CE, `cfmoe` is the
forward with `return_counterfactuals=True` and the full objective (bias-conflict upweighting on). The step is
timed in a loop of our own (`compute_loss` + backward + gradient clipping + optimizer step), no dataloader.
The methods are measured interleaved, after warm-up, and reported as medians with the interquartile range.

Clocks. Wall time and process CPU time are both recorded. On CPU the default is 1 torch thread and the CPU
clock: on a machine shared with other jobs, wall time (and CPU time with several threads, whose workers
spin while waiting) swings by 2-10x, while one thread's CPU time stays within about 10%. On a dedicated
machine pass `--threads N --clock wall`. Matmul FLOPs of one step (torch profiler) are a third, noise-free
measure of cost. On CUDA the default is the wall clock, and host-device syncs of one step are counted.

Token mix: LLaVA-like, image tokens ~10x the text tokens (LLaVA-1.5: 576 image tokens, a tweet ~40).
Sizes `BxN`: batch B, N image tokens per image (the vision tower emits N patches; its CLS is dropped).

Peak memory. CUDA: `torch.cuda.max_memory_allocated` after a reset, for one step. CPU: `ru_maxrss` is
monotonic per process and the glibc heap keeps freed pages, so RSS cannot isolate one step; instead the
torch profiler (`profile_memory=True`) records every allocation and free of torch's CPU allocator, in order,
and the step's peak is the running maximum of their sum on top of what is live when the step starts
(weights, buffers, optimizer state, the batch). Allocations outside torch (Python objects) are not counted.

Also measured, as patches inside this script (the model is not changed): the proposed compaction of the
core-masked rows to their kept tokens (`compact_sparse_rows`, same outputs; docs/cost.md) and the bare base
(both MoE sites as the identity), the reference for what the experts themselves cost.

Writes `speed.json` (per size: `train_step_ratio`, `inference_ratio`, `peak_memory_ratio`, cfmoe / vanilla,
and the raw numbers) and `speed.md` (the tables), plus the cost of each counterfactual type at one size.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification  # noqa: E402
from modeling_cfmoe.counterfactual import drop_image_tokens  # noqa: E402
from modeling_cfmoe.moe import DebiasingMoE  # noqa: E402
from trainer.trainer import CFMoETrainer  # noqa: E402
from trainer.training_args import CFMoETrainingArguments  # noqa: E402

IMAGE_TOKEN_ID, PAD_ID, BOS_ID = 3, 0, 1
CLOCKS = ("wall", "cpu")
TARGETS = {"train_step_ratio": 1.5, "inference_ratio": 1.05, "peak_memory_ratio": 1.5}


# ------------------------------------------------------------------------------------------------ model and data
@dataclass(frozen=True)
class Size:
    """A benchmark size: `batch` items, `image_tokens` per image, `text_tokens` (the longest text)."""

    batch: int
    image_tokens: int
    text_tokens: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.image_tokens}"

    @property
    def seq_len(self) -> int:
        return 1 + self.image_tokens + self.text_tokens  # <s> <image>*N text


def parse_sizes(spec: str, text_ratio: float) -> list[Size]:
    """`"4x64,8x144"` -> sizes with `text_tokens = round(image_tokens * text_ratio)`."""
    sizes = []
    for item in spec.split(","):
        batch, tokens = (int(x) for x in item.lower().split("x"))
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"image tokens must be a square (a patch grid), got {tokens}")
        sizes.append(Size(batch, tokens, max(4, round(tokens * text_ratio))))
    return sizes


def base_config(args: argparse.Namespace, image_tokens: int) -> LlavaConfig:
    """A small LLaVA (Llama decoder, CLIP vision tower) whose tower emits `image_tokens` patches."""
    text = dict(
        model_type="llama",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64,
        max_position_embeddings=2048,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=2,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=args.vision_hidden_size,
        intermediate_size=4 * args.vision_hidden_size,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden_size // 64),
        image_size=args.patch_size * math.isqrt(image_tokens),
        patch_size=args.patch_size,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_model(args: argparse.Namespace, size: Size, **config_kwargs) -> CFMoEForMultimodalClassification:
    """The CF-MoE classifier at its default configuration (plus `config_kwargs`), seeded: same weights each call."""
    config = CFMoEConfig(base_config=base_config(args, size.image_tokens).to_dict(), num_labels=2, **config_kwargs)
    torch.manual_seed(args.seed)
    return CFMoEForMultimodalClassification(config)


def make_batch(size: Size, model: CFMoEForMultimodalClassification, seed: int) -> dict[str, torch.Tensor]:
    """Random `<s> <image>*N text <pad>...` rows (text lengths 75-100% of the longest), images, labels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.base_config.text_config.vocab_size
    vision = model.config.base_config.vision_config
    input_ids = torch.full((size.batch, size.seq_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row in range(size.batch):
        n_text = int(torch.randint(size.text_tokens - size.text_tokens // 4, size.text_tokens + 1, (), generator=gen))
        length = 1 + size.image_tokens + n_text
        input_ids[row, 0] = BOS_ID
        input_ids[row, 1 : 1 + size.image_tokens] = IMAGE_TOKEN_ID
        input_ids[row, 1 + size.image_tokens : length] = torch.randint(10, vocab, (n_text,), generator=gen)
        attention_mask[row, :length] = 1
    pixel_values = torch.randn(size.batch, 3, vision.image_size, vision.image_size, generator=gen)
    labels = torch.randint(0, 2, (size.batch,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


# ------------------------------------------------------------------------------------------------ variants
@contextmanager
def patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Temporarily replace `module.forward` (hooks still fire: `nn.Module.__call__` looks the attribute up)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def stub_text_branch(model: CFMoEForMultimodalClassification) -> None:
    """Variant: the text-only branch's language-model call returns zeros, so the step keeps the image-only
    branch, the prior and every loss term but not the text-only LM pass (isolates the image-only branch)."""
    original = model._branches
    lm = model.mllm.language_model

    def zeros_lm(input_ids=None, attention_mask=None, **kwargs):
        shape = (*input_ids.shape, model.config.hidden_size)
        return BaseModelOutputWithPast(last_hidden_state=torch.zeros(shape, device=input_ids.device))

    def branches(*args, **kwargs):
        with patched_forward(lm, zeros_lm):
            return original(*args, **kwargs)

    model._branches = branches


def compact(
    embeds: torch.Tensor, mask: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' attended tokens left-aligned at `width` (default: the most kept), with their original positions.

    embeds `(rows, length, dim)`, mask `(rows, length)` bool -> embeds `(rows, width, dim)`, mask `(rows, width)`
    bool, position ids `(rows, width)`.
    """
    kept = mask.sum(1)
    width = int(kept.max()) if width is None else width
    target = mask.long().cumsum(1) - 1
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    out = embeds.new_zeros(mask.shape[0], width, embeds.shape[-1])
    out[rows[mask], target[mask]] = embeds[mask]
    position_ids = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    position_ids[rows[mask], target[mask]] = positions[mask]
    return out, torch.arange(width, device=mask.device) < kept.unsqueeze(1), position_ids


def split_sparse_rows(attention_mask: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the dense rows and of the rows attending to at most `threshold` of the width."""
    mask = attention_mask.bool()
    sparse = mask.sum(1) <= threshold * mask.shape[1]
    return (~sparse).nonzero()[:, 0], sparse.nonzero()[:, 0]


def compact_sparse_rows(model: CFMoEForMultimodalClassification, threshold: float = 0.5) -> None:
    """Variant (a proposed model change, emulated): rows of a language-model call that attend to at most
    `threshold` of the width (the core-masked rows: their core is masked out, ~`context_fraction` of the
    tokens stay) run in a separate call on their kept tokens only, left-aligned, with their original
    position ids. RoPE attention depends only on relative positions and masked keys contribute nothing, so
    the hidden states at the kept positions are the same; the compute drops from the full width to the kept
    tokens. Every other row is unchanged. Costs one more language-model call (see `merge_short_rows`)."""
    lm = model.mllm.language_model
    original = lm.forward

    def forward(input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs):
        if inputs_embeds is None or attention_mask is None:
            return original(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        dense_rows, sparse_rows = split_sparse_rows(attention_mask, threshold)
        if len(sparse_rows) == 0:
            return original(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        hidden = inputs_embeds.new_zeros(inputs_embeds.shape)
        if len(dense_rows):
            out = original(inputs_embeds=inputs_embeds[dense_rows], attention_mask=attention_mask[dense_rows])
            hidden[dense_rows] = out.last_hidden_state.to(hidden.dtype)
        row_mask = attention_mask[sparse_rows].bool()
        embeds, compact_mask, position_ids = compact(inputs_embeds[sparse_rows], row_mask)
        out = original(inputs_embeds=embeds, attention_mask=compact_mask.long(), position_ids=position_ids)
        sparse_hidden = hidden.new_zeros(len(sparse_rows), *hidden.shape[1:])
        sparse_hidden[row_mask] = out.last_hidden_state[compact_mask].to(hidden.dtype)
        return BaseModelOutputWithPast(last_hidden_state=hidden.index_copy(0, sparse_rows, sparse_hidden))

    lm.forward = forward


def merge_short_rows(model: CFMoEForMultimodalClassification, threshold: float = 0.5) -> None:
    """Variant (the proposed model change, emulated): as `compact_sparse_rows`, but the compacted core-masked
    rows share the short call of the text-only rows (padded to the longer of the two), so a step keeps two
    language-model calls: the full-length rows (factual + context-swapped) and the short rows (core-masked
    kept tokens + text-only). The text-only rows are built here exactly as `_branches` builds them, and their
    hidden states are handed back when `_branches` makes its call."""
    lm, base = model.mllm.language_model, model.mllm.config
    original = lm.forward
    state: dict = {}

    def capture(module, args, kwargs):
        state.clear()
        state["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
        state["attention_mask"] = kwargs.get("attention_mask")

    def forward(input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs):
        if inputs_embeds is None:  # the text-only call of `_branches`: computed already, in the short call
            cached = state.pop("text_hidden", None)
            if cached is not None and cached.shape[:2] == input_ids.shape:
                return BaseModelOutputWithPast(last_hidden_state=cached)
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        dense_rows, sparse_rows = split_sparse_rows(attention_mask, threshold)
        if len(sparse_rows) == 0:
            return original(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        ids = state["input_ids"]
        full_mask = state["attention_mask"] if state["attention_mask"] is not None else torch.ones_like(ids)
        pad = base.text_config.pad_token_id
        text_ids, text_mask = drop_image_tokens(ids, full_mask, base.image_token_id, 0 if pad is None else pad)
        row_mask = attention_mask[sparse_rows].bool()
        width = max(int(row_mask.sum(1).max()), text_ids.shape[1])
        embeds, compact_mask, position_ids = compact(inputs_embeds[sparse_rows], row_mask, width)
        text_embeds = lm.embed_tokens(text_ids).to(embeds.dtype)
        pad_cols = width - text_ids.shape[1]
        short = original(
            inputs_embeds=torch.cat([embeds, nn.functional.pad(text_embeds, (0, 0, 0, pad_cols))]),
            attention_mask=torch.cat([compact_mask.long(), nn.functional.pad(text_mask.long(), (0, pad_cols))]),
            position_ids=torch.cat([position_ids, torch.arange(width, device=ids.device).expand(len(text_ids), -1)]),
        ).last_hidden_state
        state["text_hidden"] = short[len(sparse_rows) :, : text_ids.shape[1]]
        hidden = inputs_embeds.new_zeros(inputs_embeds.shape)
        hidden[dense_rows] = original(
            inputs_embeds=inputs_embeds[dense_rows], attention_mask=attention_mask[dense_rows]
        ).last_hidden_state.to(hidden.dtype)
        sparse_hidden = hidden.new_zeros(len(sparse_rows), *hidden.shape[1:])
        sparse_hidden[row_mask] = short[: len(sparse_rows)][compact_mask].to(hidden.dtype)
        return BaseModelOutputWithPast(last_hidden_state=hidden.index_copy(0, sparse_rows, sparse_hidden))

    model.register_forward_pre_hook(capture, with_kwargs=True)
    lm.forward = forward


def bare_base(model: CFMoEForMultimodalClassification) -> None:
    """Reference variant: both MoE sites are the identity (no expert computation), i.e. the base + a head."""
    for module in model.modules():
        if isinstance(module, DebiasingMoE):
            module.forward = lambda hidden, token_gates: hidden


VARIANTS: dict[str, Callable[[CFMoEForMultimodalClassification], None]] = {
    "stub_text_branch": stub_text_branch,
    "compact_sparse_rows": compact_sparse_rows,
    "merge_short_rows": merge_short_rows,
    "bare_base": bare_base,
}


# ------------------------------------------------------------------------------------------------ counting
@dataclass
class Budget:
    """What one training step computed: vision-tower images and language-model rows x width per call."""

    images: int = 0
    lm_calls: list[tuple[int, int]] = field(default_factory=list)

    @property
    def lm_tokens(self) -> int:
        return sum(rows * width for rows, width in self.lm_calls)


@contextmanager
def count_budget(model: CFMoEForMultimodalClassification) -> Iterator[Budget]:
    """Counts vision-tower images and the (rows, width) each decoder pass computes (hook on the first decoder
    layer, so that a language-model call split in several passes counts each pass at its own width)."""
    budget = Budget()

    def on_vision(module, args, kwargs):
        budget.images += (args[0] if args else kwargs["pixel_values"]).shape[0]

    def on_layer(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        budget.lm_calls.append((hidden.shape[0], hidden.shape[1]))

    handles = [
        model.mllm.vision_tower.register_forward_pre_hook(on_vision, with_kwargs=True),
        model.mllm.language_model.layers[0].register_forward_pre_hook(on_layer, with_kwargs=True),
    ]
    try:
        yield budget
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ runner
class Runner:
    """One configuration: a model, its `CFMoETrainer` (for `compute_loss`), an optimizer and a fixed batch."""

    def __init__(
        self,
        name: str,
        method: str,
        size: Size,
        cli: argparse.Namespace,
        workdir: str,
        variant: str | None = None,
        **overrides,
    ):
        self.name, self.method, self.size, self.device = name, method, size, torch.device(cli.device)
        self.model = build_model(cli, size).to(self.device)
        if variant:
            VARIANTS[variant](self.model)
        targs = CFMoETrainingArguments(
            output_dir=os.path.join(workdir, name),
            method=method,
            report_to="none",
            use_cpu=cli.device == "cpu",
            bf16=cli.device == "cuda",
            **overrides,
        )
        self.trainer = CFMoETrainer(model=self.model, args=targs)
        # the full objective: past the debiasing warm-up, so bias-conflict upweighting is on
        self.trainer.state.max_steps = 1000
        self.trainer.state.global_step = 1000
        self.optimizer = self.trainer.create_optimizer()
        batch = make_batch(size, self.model, cli.seed + 1)
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.inference_inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cli.device == "cuda" else nullcontext()
        )  # what Trainer's bf16=True does
        self.max_grad_norm = targs.max_grad_norm

    def train_step(self) -> None:
        """compute_loss + backward + clip + optimizer step, as in `Trainer.training_step` and the inner loop."""
        self.model.train()
        with self.autocast:
            loss = self.trainer.compute_loss(self.model, self.batch)
        loss.backward()
        guard = getattr(self.trainer, "_guard_nonfinite", None)  # the trainer's per-update NaN/inf check, if any
        if guard is not None and getattr(self.trainer.args, "nan_policy", "ignore") != "ignore":
            guard(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer(self) -> None:
        """One prediction at the config's default inference mode (`fused`: one pass, no branches)."""
        self.model.eval()
        with self.autocast:
            self.model(**self.inference_inputs)

    def count_host_syncs(self) -> int | None:
        """CUDA only: synchronizing operations in one training step (`torch.cuda.set_sync_debug_mode`)."""
        if self.device.type != "cuda":
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.train_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    def budget(self) -> Budget:
        with count_budget(self.model) as budget:
            self.train_step()
        return budget

    def resident_bytes(self) -> int:
        """Bytes live between steps: weights, buffers, optimizer state, the batch."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.batch.values()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def profile_step(self, fn: Callable[[], None]) -> dict[str, int]:
        """Matmul/conv FLOPs (torch profiler, from op shapes: deterministic) and peak bytes of `fn` on top of
        what was live before it (see the module docstring)."""
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda, with_flops=True) as prof:
            fn()
        flops = sum(event.flops for event in prof.key_averages())
        if cuda:
            torch.cuda.synchronize()
            return {"flops": flops, "peak_bytes": torch.cuda.max_memory_allocated() - start}
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        return {"flops": flops, "peak_bytes": peak}


def timed(runner: Runner, fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn`."""
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()  # for the clock only; the step itself has no host sync for logging
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_times(
    runners: list[Runner], phase: str, warmup: int, repeats: int, min_seconds: float = 0.0
) -> dict[str, dict[str, list[float]]]:
    """Warm up every runner, then time them interleaved (the order rotates each repeat) so that a slow
    moment of the machine hits all configurations alike. At least `repeats` rounds; more (up to 5x) when a
    round is short, until the rounds take `min_seconds`. Returns `{clock: {runner: [seconds]}}`."""
    times: dict[str, dict[str, list[float]]] = {clock: {r.name: [] for r in runners} for clock in CLOCKS}
    round_seconds = 0.0
    for runner in runners:
        for _ in range(warmup):
            round_seconds += timed(runner, getattr(runner, phase))[0] / max(warmup, 1)
    if round_seconds > 0:
        repeats = min(5 * repeats, max(repeats, math.ceil(min_seconds / round_seconds)))
    for repeat in range(repeats):
        shift = repeat % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            for clock, seconds in zip(CLOCKS, timed(runner, getattr(runner, phase)), strict=True):
                times[clock][runner.name].append(seconds)
    return times


def summary(values: list[float]) -> dict[str, float]:
    """Median, interquartile range, extremes."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def timing(times: dict[str, dict[str, list[float]]], name: str) -> dict[str, dict[str, float]]:
    return {clock: summary(times[clock][name]) for clock in CLOCKS}


def ratios(times: dict[str, dict[str, list[float]]], num: str, den: str) -> dict[str, dict]:
    """Per clock: the ratio of the medians, and the median [IQR] of the per-repeat ratios (each repeat times
    both configurations back to back, so a slow moment of the machine cancels out)."""
    out = {}
    for clock in CLOCKS:
        a, b = times[clock][num], times[clock][den]
        paired = summary([x / y for x, y in zip(a, b, strict=True)])
        out[clock] = {
            "ratio": statistics.median(a) / statistics.median(b),
            "paired": paired,
            "ratio_of_min": min(a) / min(b),  # contention only adds time: the least disturbed runs
        }
    return out


# ------------------------------------------------------------------------------------------------ benchmark
def compare(result: dict, train: dict, infer: dict, name: str, ref: str, clock: str) -> dict:
    """Ratios `name / ref` of the measurements in `result`: time (headline clock, both clocks), memory, FLOPs."""
    num, den = result[name], result[ref]
    train_ratios, infer_ratios = ratios(train, name, ref), ratios(infer, name, ref)
    return {
        "train_step_ratio": train_ratios[clock]["ratio"],
        "inference_ratio": infer_ratios[clock]["ratio"],
        "peak_memory_ratio": num["peak_memory_bytes"] / den["peak_memory_bytes"],
        "step_memory_ratio": num["step_peak_bytes"] / den["step_peak_bytes"],
        "train_flop_ratio": num["train_step_flops"] / den["train_step_flops"],
        "inference_flop_ratio": num["inference_flops"] / den["inference_flops"],
        "lm_token_ratio": num["lm_tokens"] / den["lm_tokens"],
        "train": train_ratios,
        "inference": infer_ratios,
    }


BOTH_TYPES = "context_swapped,core_masked"


def fine_grained(cli: argparse.Namespace) -> dict:
    """Training-argument overrides that switch the fine-grained counterfactuals on: both types, `--cf_fraction`."""
    return {"counterfactual_fraction": cli.cf_fraction, "counterfactual_types": BOTH_TYPES}


def is_default(overrides: dict) -> bool:
    """Whether these overrides leave the model at its default counterfactual configuration."""
    defaults = CFMoEConfig()
    fraction = overrides.get("counterfactual_fraction", defaults.counterfactual_fraction)
    types = overrides.get("counterfactual_types", ",".join(defaults.counterfactual_types)).split(",")
    if fraction != defaults.counterfactual_fraction:
        return False
    return fraction == 0 or sorted(types) == sorted(defaults.counterfactual_types)


def run_size(size: Size, cli: argparse.Namespace, workdir: str) -> dict:
    """At one size: cfmoe at its default configuration vs vanilla; the fine-grained counterfactuals on
    (`--cf_fraction`, both types), as they are and with the proposed compaction of the core-masked rows."""
    print(f"size {size.name} (+{size.text_tokens} text tokens)", flush=True)
    fine = fine_grained(cli)
    runners = [Runner("vanilla", "vanilla", size, cli, workdir), Runner("cfmoe", "cfmoe", size, cli, workdir)]
    if not is_default(fine):
        runners.append(Runner("cfmoe_fine", "cfmoe", size, cli, workdir, **fine))
    runners.append(Runner("cfmoe_fine_compact", "cfmoe", size, cli, workdir, "compact_sparse_rows", **fine))
    train = measure_times(runners, "train_step", cli.warmup, cli.repeats, cli.min_seconds)
    infer = measure_times(runners, "infer", cli.warmup, cli.repeats, cli.min_seconds)
    result: dict = {
        "batch": size.batch,
        "image_tokens": size.image_tokens,
        "text_tokens": size.text_tokens,
        "rounds": {"train": len(train["cpu"]["vanilla"]), "inference": len(infer["cpu"]["vanilla"])},
    }
    for runner in runners:
        budget = runner.budget()
        step = runner.profile_step(runner.train_step)
        resident = runner.resident_bytes()
        result[runner.name] = {
            "train_step_s": timing(train, runner.name),
            "inference_s": timing(infer, runner.name),
            "train_step_flops": step["flops"],
            "inference_flops": runner.profile_step(runner.infer)["flops"],
            "resident_bytes": resident,
            "step_peak_bytes": step["peak_bytes"],
            "peak_memory_bytes": resident + step["peak_bytes"],
            "vision_images_per_step": budget.images,
            "lm_passes": budget.lm_calls,
            "lm_tokens": budget.lm_tokens,
            "host_syncs_per_step": runner.count_host_syncs(),
        }
    result.update(compare(result, train, infer, "cfmoe", "vanilla", cli.clock))
    fine_name = "cfmoe_fine" if "cfmoe_fine" in result else "cfmoe"
    result["fine_grained"] = compare(result, train, infer, fine_name, "vanilla", cli.clock)
    result["fine_grained_compact"] = compare(result, train, infer, "cfmoe_fine_compact", "vanilla", cli.clock)
    print(
        f"  default: train x{result['train_step_ratio']:.3f}  inference x{result['inference_ratio']:.3f}  "
        f"peak memory x{result['peak_memory_ratio']:.3f}  (FLOPs x{result['train_flop_ratio']:.3f}, LM tokens "
        f"x{result['lm_token_ratio']:.3f}, {cli.clock} clock); fine-grained on: train "
        f"x{result['fine_grained']['train_step_ratio']:.3f}, compacted x"
        f"{result['fine_grained_compact']['train_step_ratio']:.3f}",
        flush=True,
    )
    return result


def variant_equivalence(size: Size, cli: argparse.Namespace) -> dict[str, float]:
    """Max |difference| of the fused, text-only and counterfactual logits of one training forward with each
    proposed variant against the model as it is (fine-grained counterfactuals on, same seeds, a non-trivial
    core/context split)."""
    keys = ("fused_logits", "text_only_logits", "counterfactual_logits")
    outputs = {}
    for variant in (None, "compact_sparse_rows", "merge_short_rows"):
        fine = {"counterfactual_fraction": cli.cf_fraction, "counterfactual_types": BOTH_TYPES.split(",")}
        model = build_model(cli, size, **fine).to(cli.device).train()
        if variant:
            VARIANTS[variant](model)
        table = model.token_direct_effect  # random direct effects: a non-trivial core/context split
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(cli.seed)))
        inputs = {k: v.to(cli.device) for k, v in make_batch(size, model, cli.seed + 1).items() if k != "labels"}
        torch.manual_seed(cli.seed)
        with torch.no_grad():
            out = model(**inputs, return_counterfactuals=True)
        outputs[variant] = torch.cat([out[key].float().flatten() for key in keys])
    return {name: float((outputs[name] - outputs[None]).abs().max()) for name in outputs if name}


def breakdown_configs(cli: argparse.Namespace) -> list[tuple[str, str, str, str | None, dict]]:
    """(name, description, method, variant, training-argument overrides) of the per-type table."""
    f, none = cli.cf_fraction, {"counterfactual_fraction": 0.0}
    return [
        ("vanilla", "fused forward, plain CE", "vanilla", None, {}),
        ("image_only", "+ image-only branch, prior, bias/aux losses (text-only pass stubbed out)", "cfmoe",
         "stub_text_branch", none),
        ("branches", "+ text-only branch: every branch, no fine-grained counterfactual", "cfmoe", None, none),
        ("context_swapped", f"branches + context-swapped rows, fraction {f}", "cfmoe", None,
         {"counterfactual_fraction": f, "counterfactual_types": "context_swapped"}),
        ("core_masked", f"branches + core-masked rows, fraction {f}", "cfmoe", None,
         {"counterfactual_fraction": f, "counterfactual_types": "core_masked"}),
        ("both", f"branches + both types, fraction {f}", "cfmoe", None, fine_grained(cli)),
        ("both_compact", "both, core-masked rows on their kept tokens, own call (proposed)", "cfmoe",
         "compact_sparse_rows", fine_grained(cli)),
        ("both_merged", "both, compacted core-masked rows in the text-only call (alternative)", "cfmoe",
         "merge_short_rows", fine_grained(cli)),
        (f"both_{f / 2:g}", f"both types, fraction {f / 2:g}", "cfmoe", None,
         {"counterfactual_fraction": f / 2, "counterfactual_types": BOTH_TYPES}),
        ("both_1", "both types on every row (fraction 1)", "cfmoe", None,
         {"counterfactual_fraction": 1.0, "counterfactual_types": BOTH_TYPES}),
        ("bare_base", "reference: vanilla with both MoE sites as the identity", "vanilla", "bare_base", {}),
    ]  # fmt: skip


def run_breakdown(size: Size, cli: argparse.Namespace, workdir: str) -> dict:
    """Step-time ratio vs vanilla of each counterfactual type, toggled one at a time, at one size."""
    print(f"cost of each counterfactual type at {size.name}", flush=True)
    configs = breakdown_configs(cli)
    runners = [Runner(name, method, size, cli, workdir, variant, **kw) for name, _, method, variant, kw in configs]
    train = measure_times(runners, "train_step", cli.warmup, cli.repeats, cli.min_seconds)
    vanilla_tokens = runners[0].budget().lm_tokens
    vanilla_step = runners[0].profile_step(runners[0].train_step)
    rows = []
    for (name, description, method, variant, overrides), runner in zip(configs, runners, strict=True):
        budget = runner.budget()
        step = runner.profile_step(runner.train_step)
        rows.append(
            {
                "name": name,
                "description": description,
                "is_default": method == "cfmoe" and variant is None and is_default(overrides),
                "train_step_s": timing(train, name),
                "train": ratios(train, name, "vanilla"),
                "train_step_ratio": ratios(train, name, "vanilla")[cli.clock]["ratio"],
                "lm_passes": budget.lm_calls,
                "lm_token_ratio": budget.lm_tokens / vanilla_tokens,
                "flop_ratio": step["flops"] / vanilla_step["flops"],
                "step_memory_ratio": step["peak_bytes"] / vanilla_step["peak_bytes"],
                "vision_images_per_step": budget.images,
            }
        )
        row = rows[-1]
        print(
            f"  {name:16s} x{row['train_step_ratio']:.3f} (FLOPs x{row['flop_ratio']:.3f}, "
            f"LM tokens x{row['lm_token_ratio']:.3f})",
            flush=True,
        )
    parts = {
        "image-only branch (+ prior, bias and aux losses)": ("image_only", None),
        "text-only branch": ("branches", "image_only"),
        "context-swapped rows": ("context_swapped", "branches"),
        "core-masked rows": ("core_masked", "branches"),
        "core-masked rows, compacted (proposed)": ("both_compact", "context_swapped"),
        "core-masked rows, compacted into the text-only call": ("both_merged", "context_swapped"),
    }
    by_name = {row["name"]: row for row in rows}
    marginal = {
        part: {
            key: by_name[with_part][key] - (by_name[without][key] if without else 1.0)
            for key in ("train_step_ratio", "flop_ratio", "lm_token_ratio")
        }
        for part, (with_part, without) in parts.items()
    }
    diffs = variant_equivalence(size, cli)
    print(f"  proposed variants vs the model: max |logit difference| {diffs}", flush=True)
    return {"size": size.name, "rows": rows, "marginal": marginal, "variant_max_abs_diff": diffs}


# ------------------------------------------------------------------------------------------------ report
def fmt_ms(s: dict[str, float]) -> str:
    return f"{1000 * s['median']:.0f} [{1000 * s['q1']:.0f}-{1000 * s['q3']:.0f}]"


def fmt_ratio(r: dict) -> str:
    p = r["paired"]
    return f"**{r['ratio']:.3f}** ({p['median']:.3f} [{p['q1']:.3f}-{p['q3']:.3f}])"


def markdown(report: dict) -> str:
    """The tables of `speed.md`."""
    clock = report["clock"]
    other = next(c for c in CLOCKS if c != clock)
    f = report["fine_grained_fraction"]
    default = (
        f"fraction {report['default_counterfactual_fraction']}, types "
        f"{', '.join(report['default_counterfactual_types'])}"
    )
    lines = [
        "# cfmoe vs vanilla: training step, inference, peak memory",
        "",
        f"Device: {report['device']}, {report['dtype']}, {report['threads']} torch threads; load average "
        f"{report['load_average_start'][0]:.1f} at start, {report['load_average_end'][0]:.1f} at end. "
        f"Model: {report['model']}. Default configuration: {default}.",
        "",
        f"Warm-up {report['warmup']}, at least {report['repeats']} interleaved rounds (per size: [train/inference "
        f"rounds]). Times: {clock} clock, median [interquartile range] in ms. Ratios: cfmoe / vanilla, ratio of "
        f"medians (median [IQR] of the per-round paired ratios); the {other}-clock ratio beside it. Memory: peak "
        "of one training step including weights, gradients, optimizer state and batch (in brackets: the ratio "
        "of the step's own allocations).",
        "",
        "## cfmoe at its default configuration",
        "",
        f"| B x (N img + T txt) | step vanilla | step cfmoe | train ratio | {other} | infer vanilla | infer cfmoe "
        f"| inference ratio | {other} | peak MiB van / cf | peak memory ratio | FLOPs ratio | LM tokens ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sizes"]:
        van, cf = s["vanilla"], s["cfmoe"]
        lines.append(
            f"| {s['batch']} x ({s['image_tokens']} + {s['text_tokens']}) [{s['rounds']['train']}/"
            f"{s['rounds']['inference']}] | {fmt_ms(van['train_step_s'][clock])} | "
            f"{fmt_ms(cf['train_step_s'][clock])} | {fmt_ratio(s['train'][clock])} | "
            f"{s['train'][other]['ratio']:.3f} | {fmt_ms(van['inference_s'][clock])} | "
            f"{fmt_ms(cf['inference_s'][clock])} | {fmt_ratio(s['inference'][clock])} | "
            f"{s['inference'][other]['ratio']:.3f} | {van['peak_memory_bytes'] / 2**20:.0f} / "
            f"{cf['peak_memory_bytes'] / 2**20:.0f} | **{s['peak_memory_ratio']:.3f}** ({s['step_memory_ratio']:.3f}) "
            f"| {s['train_flop_ratio']:.3f} | {s['lm_token_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Targets: train <= {TARGETS['train_step_ratio']}, inference <= {TARGETS['inference_ratio']}, "
        f"peak memory <= {TARGETS['peak_memory_ratio']}: **{'met' if report['targets_met'] else 'NOT met'}** "
        f"({'; '.join(report['failures']) or 'at every size'}).",
        "",
        f"## Fine-grained counterfactuals on (fraction {f}, both types): as they are, and with the core-masked "
        "rows compacted to their kept tokens (proposed, same outputs)",
        "",
        "| B x N | train ratio | inference | peak memory | FLOPs | LM tokens | compacted: train ratio | inference "
        "| peak memory | FLOPs | LM tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sizes"]:
        cells = []
        for key in ("fine_grained", "fine_grained_compact"):
            r = s[key]
            cells.append(
                f"{fmt_ratio(r['train'][clock])} | {r['inference_ratio']:.3f} | {r['peak_memory_ratio']:.3f} | "
                f"{r['train_flop_ratio']:.3f} | {r['lm_token_ratio']:.3f}"
            )
        lines.append(f"| {s['batch']} x {s['image_tokens']} | {cells[0]} | {cells[1]} |")
    for key, label in (("fine_grained", "as they are"), ("fine_grained_compact", "compacted")):
        failures = report[f"{key}_failures"]
        lines.append(
            f"\nTargets with the fine-grained counterfactuals on, {label}: "
            f"**{'met' if not failures else 'NOT met'}** ({'; '.join(failures) or 'at every size'})."
        )
    if report["sizes"] and report["sizes"][0]["vanilla"]["host_syncs_per_step"] is not None:
        lines += [
            "",
            "Host-device syncs per training step: "
            + ", ".join(
                f"{s['batch']}x{s['image_tokens']}: vanilla {s['vanilla']['host_syncs_per_step']}, "
                f"cfmoe {s['cfmoe']['host_syncs_per_step']}, fine-grained "
                f"{s['cfmoe_fine_compact']['host_syncs_per_step']} (compacted)"
                for s in report["sizes"]
            )
            + ".",
        ]
    breakdown = report.get("breakdown")
    if breakdown:
        lines += [
            "",
            f"## Cost of each counterfactual type ({breakdown['size']}, {clock} clock)",
            "",
            f"| configuration | step ms | step ratio | {other} | FLOPs | LM tokens | step mem | LM passes (rows x L) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in breakdown["rows"]:
            passes = " + ".join(f"{a}x{b}" for a, b in row["lm_passes"])
            name = f"`{row['name']}`" + (" (**= default**)" if row["is_default"] else "")
            lines.append(
                f"| {name}: {row['description']} | {fmt_ms(row['train_step_s'][clock])} | "
                f"{fmt_ratio(row['train'][clock])} | {row['train'][other]['ratio']:.3f} | {row['flop_ratio']:.3f} | "
                f"{row['lm_token_ratio']:.3f} | {row['step_memory_ratio']:.3f} | {passes} |"
            )
        lines += [
            "",
            "The proposed variants give the same fused, text-only and counterfactual logits as the model (max "
            "|difference|: "
            + ", ".join(f"{name} {diff:.1e}" for name, diff in breakdown["variant_max_abs_diff"].items())
            + ").",
            "",
            "Marginal cost of each part, in points of the ratio over vanilla (all ratios vs vanilla's step):",
            "",
            "| part | step time | FLOPs | LM tokens |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {part} | {m['train_step_ratio']:+.3f} | {m['flop_ratio']:+.3f} | {m['lm_token_ratio']:+.3f} |"
            for part, m in breakdown["marginal"].items()
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="8x64,8x144,8x256,4x576", help="batch x image tokens, comma separated")
    parser.add_argument("--text_ratio", type=float, default=0.1, help="text tokens per image token")
    parser.add_argument("--breakdown_size", default="8x144", help="size of the per-type table ('' to skip)")
    parser.add_argument(
        "--cf_fraction",
        type=float,
        default=0.25,
        help="counterfactual_fraction of the configurations with the fine-grained counterfactuals on",
    )
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=688)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--vision_hidden_size", type=int, default=128)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds at least (each round times every config)")
    parser.add_argument(
        "--min_seconds", type=float, default=20.0, help="more rounds (up to 5x --repeats) until they take this long"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, for a stable CPU clock)"
    )
    parser.add_argument(
        "--clock",
        default=None,
        choices=CLOCKS,
        help="clock of the headline ratios (default: process CPU time on CPU, which other jobs on a shared "
        "machine barely disturb at 1 thread; wall time on CUDA). Both clocks are always recorded.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" else "wall"
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sizes = parse_sizes(cli.sizes, cli.text_ratio)
    defaults = CFMoEConfig()
    report: dict = {
        "device": torch.cuda.get_device_name() if cli.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": "bf16 autocast" if cli.device == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "clock": cli.clock,
        "load_average_start": os.getloadavg(),
        "model": f"Llama decoder {cli.num_layers}x{cli.hidden_size} (ffn {cli.intermediate_size}), CLIP tower "
        f"{cli.vision_layers}x{cli.vision_hidden_size}, patch {cli.patch_size}",
        "warmup": cli.warmup,
        "repeats": cli.repeats,
        "default_counterfactual_fraction": defaults.counterfactual_fraction,
        "default_counterfactual_types": defaults.counterfactual_types,
        "fine_grained_fraction": cli.cf_fraction,
        "targets": TARGETS,
        "sizes": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        print(f"sizes {', '.join(s.name for s in sizes)} on {report['device']}", flush=True)
        for size in sizes:
            report["sizes"].append(run_size(size, cli, workdir))
            gc.collect()
        if cli.breakdown_size:
            (size,) = parse_sizes(cli.breakdown_size, cli.text_ratio)
            report["breakdown"] = run_breakdown(size, cli, workdir)
    report["failures"] = [
        f"{s['batch']}x{s['image_tokens']} {key} {s[key]:.3f}"
        for s in report["sizes"]
        for key, limit in TARGETS.items()
        if s[key] > limit
    ]
    report["targets_met"] = not report["failures"]
    for variant in ("fine_grained", "fine_grained_compact"):
        report[f"{variant}_failures"] = [
            f"{s['batch']}x{s['image_tokens']} {key} {s[variant][key]:.3f}"
            for s in report["sizes"]
            for key, limit in TARGETS.items()
            if s[variant][key] > limit
        ]
    report["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - start
    (output_dir / "speed.json").write_text(json.dumps(report, indent=2))
    (output_dir / "speed.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {output_dir / 'speed.json'} and {output_dir / 'speed.md'} in {report['seconds']:.0f}s")
    return report


if __name__ == "__main__":
    main()
