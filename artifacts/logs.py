"""Log noise that is not an error, dropped where both sides start."""

from __future__ import annotations

import logging


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_optional_kernels() -> None:
    """bitsandbytes warns on every CPU start that an optional package (`kernels`, which would download a kernel
    from a model hub) is missing; its own CPU code runs instead, so the warning is no error of the user's."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("Failed to load CPU gemm_4bit_forward"))
