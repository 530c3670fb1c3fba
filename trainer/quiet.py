"""Messages of our dependencies that no user can act on, dropped before anything imports those dependencies."""

from __future__ import annotations

import logging

# bitsandbytes (0.50) logs this at import on CPUs with AVX512-BF16 when its optional `kernels-community` 4-bit
# kernel cannot be fetched (not installed, not trusted, or offline); transformers' Trainer imports peft, which
# imports bitsandbytes, so every command printed it. The 4-bit path we use does not need that kernel
# (`cfmoe.trainer.adapters` keeps 4-bit layers off bitsandbytes' CPU fast path).
DROPPED = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


class _DropPrefix(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_dependency_noise() -> None:
    """Attaches the `DROPPED` filters to their loggers (which need not exist yet)."""
    for name, prefix in DROPPED.items():
        logging.getLogger(name).addFilter(_DropPrefix(prefix))
