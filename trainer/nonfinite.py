"""The NaN / inf guard of a training step: a non-finite loss term stops training before the update
(`nan_policy="raise"`, naming the term) or drops that optimizer step's update (`"skip"`, logged and counted)."""

from __future__ import annotations

import logging

import torch

from cfmoe.modeling_cfmoe.configuration_cfmoe import Choice


class NanPolicy(Choice):
    """What a NaN/inf loss term in training does: stop before the update, drop the update, or nothing (no check)."""

    RAISE = "raise"
    SKIP = "skip"
    IGNORE = "ignore"


logger = logging.getLogger(__name__)


class NonFiniteGuardMixin:
    """For a `Trainer` whose `compute_loss` calls `_record_nonfinite(terms)` and whose args have `nan_policy`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._nonfinite: list[tuple[tuple[str, ...], torch.Tensor]] = []  # this optimizer step's NaN/inf flags
        self._nonfinite_skipped = 0
        if getattr(self.args, "nan_policy", None) == NanPolicy.SKIP and self.is_deepspeed_enabled:
            raise ValueError("nan_policy='skip' cannot undo DeepSpeed's fused backward and step; use 'raise'")

    def _record_nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        """Flag the loss terms of this micro-step that are NaN or inf, on device (no host sync here)."""
        if self.args.nan_policy != NanPolicy.IGNORE and terms:
            values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
            self._nonfinite.append((tuple(terms), ~values.isfinite()))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's forward/backward; before each optimizer update, [`_guard_nonfinite`]."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.nan_policy != NanPolicy.IGNORE and self.accelerator.sync_gradients:
            self._guard_nonfinite(model)
        return loss

    def _guard_nonfinite(self, model) -> None:
        """If a loss term of this optimizer step's micro-batches was NaN/inf on any process: raise before the
        update (`nan_policy="raise"`, naming the terms), or drop the gradients so that the optimizer leaves every
        weight and its state untouched (`"skip"`; logged and counted as `nonfinite_skipped_steps`).

        Cost: one host sync per optimizer step (a 1-element all-reduce first with several processes). The Trainer
        already syncs on the loss after every backward (`logging_nan_inf_filter`), so this adds no stall there.
        """
        entries, self._nonfinite = self._nonfinite, []
        flags = torch.cat([bad for _, bad in entries]) if entries else torch.zeros(1, dtype=torch.bool)
        count = flags.sum()
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count.to(self.args.device), reduction="sum")
        if int(count) == 0:
            return
        names = [name for term_names, _ in entries for name in term_names]
        bad = sorted({f"loss_{name}" for name, flag in zip(names, flags.tolist(), strict=True) if flag})
        where = ", ".join(bad) if bad else "a loss term on another process"
        step = self.state.global_step + 1
        if self.args.nan_policy == NanPolicy.RAISE:
            raise FloatingPointError(
                f"optimizer step {step}: {where} is NaN or inf; training stopped before the update, so the weights "
                "are intact. Lower the learning rate or that term's weight, check this step's inputs, prefer bf16 to "
                "fp16, or pass --nan_policy skip to drop such updates"
            )
        model.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient: no update, no state change
        self._nonfinite_skipped += 1
        logger.warning(
            "optimizer step %d: %s is NaN or inf; update skipped (%d so far)", step, where, self._nonfinite_skipped
        )
