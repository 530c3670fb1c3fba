"""Measuring the cost of a training configuration against `vanilla`: the model and batches of
`examples/benchmark_speed.py`, a runner that trains through `CFMoETrainer`, and the clocks, counters and memory
probes it reads."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cfmoe.modeling_cfmoe import CFMoEConfig, CFMoEForMultimodalClassification
from cfmoe.trainer.cfmoe_trainer import CFMoETrainer
from cfmoe.trainer.data.tiny import PATCH_SIZE, tiny_base_config
from cfmoe.trainer.loading import freeze_vision_tower
from cfmoe.trainer.training_args import CFMoETrainingArguments

PAD, BOS, IMAGE_TOKEN, VOCAB = 0, 1, 4, 320
CUE_TOKENS = (5, 6)  # one class hashtag per class, at the end of the text
FIRST_WORD = 7  # ordinary words are drawn from [FIRST_WORD, VOCAB)
CUE_TINTS = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.6]])  # one colour per class, added to every pixel
CUE_AGREEMENT = 0.95  # how often an item's cues name its label (the synthetic benchmark's rho_train)


@dataclass(frozen=True)
class Size:
    """`batch` items, each with `image_tokens` image tokens (a square patch grid) and up to `text_tokens`."""

    batch: int
    image_tokens: int
    text_tokens: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.image_tokens}"

    @property
    def image_size(self) -> int:
        return math.isqrt(self.image_tokens) * PATCH_SIZE


def parse_sizes(spec: str, text_ratio: float = 0.1) -> list[Size]:
    """`"8x64,4x576"` -> sizes with about `text_ratio` text tokens per image token (at least 4)."""
    sizes = []
    for item in spec.split(","):
        batch, tokens = (int(x) for x in item.strip().lower().split("x"))
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"image tokens must fill a square patch grid, got {tokens}")
        sizes.append(Size(batch, tokens, max(4, round(tokens * text_ratio))))
    return sizes


def build_model(size: Size, seed: int = 0) -> CFMoEForMultimodalClassification:
    """The tiny LLaVA of `cfmoe.trainer.data.tiny` (hidden 64, 2 layers) with images large enough for
    `size.image_tokens` patches, wrapped at the default CF-MoE configuration."""
    base = tiny_base_config(vocab_size=VOCAB, image_token_id=IMAGE_TOKEN, pad_token_id=PAD)
    base.vision_config.image_size = size.image_size
    base.text_config.max_position_embeddings = 2048
    torch.manual_seed(seed)
    return CFMoEForMultimodalClassification(CFMoEConfig(base_config=base.to_dict(), num_labels=2))


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
    work, image_token = Work(), model.image_token_id

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


class Runner:
    """One training configuration: a fresh model (same seed, so the same weights for every runner), its
    `CFMoETrainer` and the trainer's AdamW. Past the bias-only warm-up (`debias_warmup_ratio=0`), so a `cfmoe`
    step builds its counterfactual rows."""

    def __init__(self, name: str, size: Size, device: str, seed: int = 0, freeze_tower: bool = True, **training_args):
        self.name, self.device = name, torch.device(device)
        self.model = build_model(size, seed)
        if freeze_tower:
            freeze_vision_tower(self.model)
        self._output_dir = tempfile.TemporaryDirectory()
        args = CFMoETrainingArguments(
            output_dir=self._output_dir.name,
            report_to="none",
            use_cpu=device == "cpu",
            bf16=device == "cuda",  # the trainer's bf16 autocast
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
            self.model.update_context_statistics(
                batch["input_ids"], batch["labels"], batch["attention_mask"], batch["pixel_values"]
            )

    def count(self, phase: str, batch: dict[str, torch.Tensor]) -> Work:
        """The work of one `train_step` or `infer` on `batch`."""
        with count_work(self.model) as work:
            getattr(self, phase)(batch)
        return work

    def resident_bytes(self) -> int:
        """Bytes live between steps: weights, buffers, optimizer state (gradients are freed after each update)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.trainer.optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    def profile_train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Matmul FLOPs (torch profiler, from op shapes) and memory of one training step: `step_bytes`, the most it
        holds above what is live before it, and `peak_bytes`, that plus what is live (weights, optimizer state).
        CUDA: `torch.cuda.max_memory_allocated`. CPU: the profiler's record of every allocation and free of torch's
        allocator, in order (Python objects and the allocator's cached pages are not counted)."""
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
            return {"flops": flops, "step_bytes": peak - before, "peak_bytes": peak}
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
