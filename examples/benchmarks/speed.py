"""Measuring the cost of a training configuration against `vanilla`: the batches of `examples/benchmark_speed.py`
(its models: `benchmarks.shapes`), a runner that trains through `CFMoETrainer`, and the clocks, counters and
memory probes it reads."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from benchmarks.shapes import BOS, IMAGE_TOKEN, PAD, SHAPES, VOCAB, Size, build_model, lora_model
from cfmoe.modeling_cfmoe import CFMoEForMultimodalClassification
from cfmoe.trainer.cfmoe_trainer import CFMoETrainer
from cfmoe.trainer.loading import freeze_vision_tower
from cfmoe.trainer.training_args import CFMoETrainingArguments

CUE_TOKENS = (5, 6)  # one class hashtag per class, at the end of the text
FIRST_WORD = 7  # ordinary words are drawn from [FIRST_WORD, VOCAB)
CUE_TINTS = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.6]])  # one colour per class, added to every pixel
CUE_AGREEMENT = 0.95  # how often an item's cues name its label (the synthetic benchmark's rho_train)


def make_batch(size: Size, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`<s> <image>*N words <class hashtag> <pad>...` rows (text lengths 75-100% of `size.text_tokens`, right
    padding) and images with a class tint, both cues naming the label with probability `CUE_AGREEMENT`, as in the
    synthetic benchmark: the counterfactual rows find real context to swap."""
    batch, n_image = size.batch, size.image_tokens
    labels = torch.randint(0, 2, (batch,), generator=generator)
    cue = torch.where(torch.rand(batch, generator=generator) < CUE_AGREEMENT, labels, 1 - labels)
    lengths = torch.linspace(size.text_tokens, math.ceil(0.75 * size.text_tokens), batch).round().long()
    input_ids = torch.full((batch, 1 + n_image + size.text_tokens), PAD)
    input_ids[:, 0], input_ids[:, 1 : 1 + n_image] = BOS, IMAGE_TOKEN
    for row, length in enumerate(lengths.tolist()):
        words = torch.randint(FIRST_WORD, VOCAB, (length - 1,), generator=generator)
        input_ids[row, 1 + n_image : n_image + length] = words
        input_ids[row, n_image + length] = CUE_TOKENS[int(cue[row])]
    pixels = torch.randn(batch, 3, size.image_size, size.image_size, generator=generator) * 0.5
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD).long(),
        "pixel_values": pixels + CUE_TINTS[cue][:, :, None, None],
        "labels": labels,
    }


@dataclass
class LMCall:
    """One language-model call: its rows, their (padded) length, the attended tokens, and whether image token ids
    were among its inputs (None when it was given embeddings)."""

    rows: int
    length: int
    attended: int
    image_ids: bool | None


@dataclass
class Work:
    """What one call computed: the images of each vision-tower call and each language-model call."""

    vision_calls: list[int] = field(default_factory=list)
    lm_calls: list[LMCall] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.vision_calls)

    @property
    def lm_tokens(self) -> int:
        return sum(call.rows * call.length for call in self.lm_calls)


@contextmanager
def count_work(model: CFMoEForMultimodalClassification) -> Iterator[Work]:
    """Count the vision tower's images and the language model's calls with forward pre-hooks (removed on exit)."""
    work, image_token = Work(), model.config.base_config.image_token_id

    def on_vision(module, args, kwargs):
        work.vision_calls.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    def on_lm(module, args, kwargs):
        ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs["attention_mask"]
        rows, length = (ids if ids is not None else embeds).shape[:2]
        image_ids = None if ids is None else bool((ids == image_token).any())
        work.lm_calls.append(LMCall(rows, length, int(mask.sum()), image_ids))

    handles = [
        model.vision_tower.register_forward_pre_hook(on_vision, with_kwargs=True),
        model.language_model.register_forward_pre_hook(on_lm, with_kwargs=True),
    ]
    try:
        yield work
    finally:
        for handle in handles:
            handle.remove()


# the methods of the model's row builder (`model.rows`) behind the no-gradient token- and pixel-space work of a step:
# the statistics update the trainer makes before each training forward, and the context strength the forward computes
CONTEXT_CALLS = {"context_statistics": "update", "context_strength": "strength"}


@contextmanager
def read_calls(core: CFMoEForMultimodalClassification, read: Callable[[], float]) -> Iterator[dict[str, float]]:
    """While open, how much `read()` (a clock, a FLOP count) grows during the calls of each `CONTEXT_CALLS` method
    of `core.rows` (`core`: the CF-MoE model, not its PEFT wrapper), by part name."""
    spent = dict.fromkeys(CONTEXT_CALLS, 0.0)

    def wrap(part: str, method: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = read()
            try:
                return method(*args, **kwargs)
            finally:
                spent[part] += read() - start

        return wrapper

    for part, name in CONTEXT_CALLS.items():
        setattr(core.rows, name, wrap(part, getattr(core.rows, name)))  # an instance attribute shadows the method
    try:
        yield spent
    finally:
        for name in CONTEXT_CALLS.values():
            delattr(core.rows, name)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP formulas (`FlopCounterMode`'s: matmuls, convolutions, CUDA's fused attention; from op shapes) and
# CPU's fused attention, which they lack
FLOP_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_attention_flops),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_cpu_attention_backward_flops),
}


def _grad_tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]


class PartFlops(TorchDispatchMode):
    """The FLOPs of the ops dispatched (`FLOP_FORMULAS`; composite ops decomposed first, as `FlopCounterMode`) by
    the part that runs them, `flops`: a part of `count_flops` while active, else `rest`."""

    def __init__(self, parts: list[str]):
        super().__init__()
        self.flops = dict.fromkeys([*parts, "rest"], 0)
        self.active: list[str] = []
        self.handles: list = []

    def total(self) -> int:
        return sum(self.flops.values())

    def leave(self, part: str) -> None:
        if part in self.active:
            del self.active[len(self.active) - 1 - self.active[::-1].index(part)]

    def forward_starts(self, part: str, module, args, kwargs) -> None:
        self.active.append(part)
        if inputs := _grad_tensors((args, kwargs)):  # its backward ends with the gradients of all its inputs
            self.handles.append(register_multi_grad_hook(inputs, lambda grads: self.leave(part)))

    def forward_ends(self, part: str, module, args, kwargs, output) -> None:
        self.leave(part)
        if outputs := _grad_tensors(output):  # its backward starts with the gradient of any of its outputs
            self.handles.append(register_multi_grad_hook(outputs, lambda grad: self.active.append(part), mode="any"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.active[-1] if self.active else "rest"] += formula(*args, **kwargs, out_val=out)
        return out


@contextmanager
def count_flops(parts: dict[str, torch.nn.Module]) -> Iterator[PartFlops]:
    """While open, the FLOPs of the ops run, by part (`PartFlops`): each of `parts` (name -> module) in its forward
    (module hooks) and in its backward (from the gradient of any of its outputs to those of all its inputs:
    gradient hooks, as `FlopCounterMode`'s module tracker, which misses keyword inputs such as the language
    model's `inputs_embeds`), the rest apart."""
    counter = PartFlops(list(parts))
    for part, module in parts.items():
        counter.handles += [
            module.register_forward_pre_hook(partial(counter.forward_starts, part), with_kwargs=True),
            module.register_forward_hook(partial(counter.forward_ends, part), with_kwargs=True),
        ]
    try:
        with counter:
            yield counter
    finally:
        for handle in counter.handles:
            handle.remove()


def model_parts(core: CFMoEForMultimodalClassification) -> dict[str, torch.nn.Module]:
    return {"vision_tower": core.vision_tower, "language_model": core.language_model}


def lm_to_tower_forward(shape: str, size: Size) -> float:
    """How many FLOPs the language model's forward over `size.batch` rows of 1 + image + text tokens takes per FLOP
    of the vision tower's forward over their images (the 25 of 1 : 25), counted on the meta device (shapes only)."""
    dtype = SHAPES[shape].dtype or torch.float32
    model = build_model(size, shape=shape, device="meta", dtype=dtype)
    rows, length = size.batch, 1 + size.image_tokens + size.text_tokens
    with torch.device("meta"), torch.no_grad(), count_flops(model_parts(model)) as counter:
        model.vision_tower(torch.empty(rows, 3, size.image_size, size.image_size, dtype=dtype))
        model.language_model(inputs_embeds=torch.empty(rows, length, model.config.hidden_size, dtype=dtype))
    return counter.flops["language_model"] / counter.flops["vision_tower"]


class Runner:
    """One training configuration: a fresh `shape` model (`benchmarks.shapes.build_model`; same seed, so the same
    weights for every runner) in `dtype`, LoRA on its language model's attention when `lora`, its `CFMoETrainer`
    and the trainer's AdamW; bf16 autocast on CUDA or with bf16 weights. Past the bias-only warm-up
    (`debias_warmup_ratio=0`), so a `cfmoe` step builds its counterfactual rows."""

    def __init__(
        self,
        name: str,
        size: Size,
        device: str,
        seed: int = 0,
        freeze_tower: bool = True,
        shape: str = "tiny",
        lora: bool = False,
        dtype: torch.dtype | None = None,
        **training_args,
    ):
        self.name, self.device = name, torch.device(device)
        self.core = build_model(size, seed, shape, device, dtype)  # the CF-MoE model, under `self.model`'s LoRA
        self.model = lora_model(self.core) if lora else self.core
        if freeze_tower:
            freeze_vision_tower(self.model)
        self._output_dir = tempfile.TemporaryDirectory()
        args = CFMoETrainingArguments(
            output_dir=self._output_dir.name,
            report_to="none",
            use_cpu=device == "cpu",
            bf16=device == "cuda" or dtype == torch.bfloat16,  # the trainer's bf16 autocast
            debias_warmup_ratio=0.0,
            **training_args,
        )
        self.trainer = CFMoETrainer(model=self.model, args=args)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop otherwise

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """`Trainer.training_step` (`compute_loss`, backward, the NaN guard), gradient clipping, the AdamW update."""
        trainer = self.trainer
        trainer.training_step(self.model, batch)
        trainer.accelerator.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        self.model.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer(self, batch: dict[str, torch.Tensor]) -> None:
        """A prediction at the config's inference mode (`fused`: one pass), as `model(**inputs)` and the pipeline."""
        self.model.eval()
        with self.trainer.autocast_smart_context_manager():
            self.model(**{k: v for k, v in batch.items() if k != "labels"})

    def fill_context_statistics(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """The label statistics the bias-only warm-up leaves behind (the trainer counts every training batch)."""
        for batch in batches:
            self.model.rows.update(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["pixel_values"])

    def count(self, phase: str, batch: dict[str, torch.Tensor]) -> tuple[Work, dict[str, float]]:
        """The work of one `train_step` or `infer` on `batch`, and the seconds of its `CONTEXT_CALLS` (the clock)."""
        with count_work(self.model) as work, read_calls(self.core, clock(self.device)) as seconds:
            getattr(self, phase)(batch)
        return work, seconds

    def flops(self, phase: str, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """FLOPs of one `train_step` or `infer` (`count_flops`: matmuls, convolutions and attention, from op shapes;
        forward and backward) by part: `vision_tower` and `language_model`, `CONTEXT_CALLS` (the model's calls),
        `rest` (projector, experts, heads, counterfactual edits), `total`."""
        with count_flops(model_parts(self.core)) as counter, read_calls(self.core, counter.total) as calls:
            getattr(self, phase)(batch)
        context = {part: int(flops) for part, flops in calls.items()}  # counted in `rest`
        rest = counter.flops["rest"] - sum(context.values())
        return {**counter.flops, **context, "rest": rest, "total": counter.total()}

    def resident_bytes(self) -> int:
        """Bytes live between steps: weights, buffers, optimizer state (gradients are freed after each update)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.trainer.optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def profile_train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Matmul FLOPs (torch profiler, from op shapes) and memory of one training step: `step_bytes`, the most it
        holds above what is live before it, and `peak_bytes`, that plus what this runner keeps live (weights,
        optimizer state; not the other runners'). CUDA: `torch.cuda.max_memory_allocated`. CPU: the profiler's
        record of every allocation and free of torch's allocator, in order (Python objects and the allocator's cached
        pages are not counted)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda, with_flops=True) as prof:
            self.train_step(batch)
        flops = int(sum(event.flops for event in prof.key_averages()))
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {"flops": flops, "step_bytes": peak - before, "peak_bytes": peak - before + self.resident_bytes()}
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
        )
        live = step = 0
        for event in events:
            live += event.nbytes()
            step = max(step, live)
        return {"flops": flops, "step_bytes": step, "peak_bytes": step + self.resident_bytes()}

    def count_host_syncs(self, batch: dict[str, torch.Tensor]) -> int:
        """CUDA: the operations of one training step that make the host wait for the device
        (`torch.cuda.set_sync_debug_mode`)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)


def probe(runner: Runner, batch: dict[str, torch.Tensor]) -> dict:
    """The counts of `runner`'s steps on `batch`: work and context seconds of a training step and of an inference,
    profiler FLOPs and memory, FLOPs by part (training step and inference), host syncs on CUDA."""
    train, context_seconds = runner.count("train_step", batch)
    inference, _ = runner.count("infer", batch)
    return {
        "train": train,
        "context_seconds": context_seconds,
        "inference": inference,
        **runner.profile_train_step(batch),
        "train_flops": runner.flops("train_step", batch),
        "inference_flops": runner.flops("infer", batch),
        "host_syncs": runner.count_host_syncs(batch) if runner.device.type == "cuda" else None,
    }


def parameters(runner: Runner) -> dict[str, float]:
    """Millions of parameters: the vision tower's, the language model's, all, and those trained."""
    core, model = runner.core, runner.model
    return {
        "vision_tower": sum(p.numel() for p in core.vision_tower.parameters()) / 1e6,
        "language_model": sum(p.numel() for p in core.language_model.parameters()) / 1e6,
        "total": sum(p.numel() for p in model.parameters()) / 1e6,
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }


def clock(device: torch.device) -> Callable[[], float]:
    """The headline clock: process CPU time on CPU (one thread: steady on a shared machine, where wall time swings
    with the other jobs), wall time on CUDA (after a synchronize)."""
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    return time.process_time


def time_interleaved(
    runners: list[Runner], phase: str, batches: list[dict[str, torch.Tensor]]
) -> dict[str, list[float]]:
    """Seconds of `phase` per batch for each runner; every batch runs through all runners back to back, the order
    alternating, so that a slow moment of the machine hits them alike."""
    read = clock(runners[0].device)
    times: dict[str, list[float]] = {runner.name: [] for runner in runners}
    for index, batch in enumerate(batches):
        for runner in runners if index % 2 == 0 else runners[::-1]:
            start = read()
            getattr(runner, phase)(batch)
            times[runner.name].append(read() - start)
    return times


def compare(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """`name` against `reference`: the ratio of the medians, and the median and quartiles of the per-batch ratios."""
    ratios = [a / b for a, b in zip(times[name], times[reference], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "ratio": statistics.median(times[name]) / statistics.median(times[reference]),
        "paired_median": statistics.median(ratios),
        "paired_q1": q1,
        "paired_q3": q3,
    }
