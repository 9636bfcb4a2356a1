"""What every Hydra entry point shares: the packaged config location and run setup."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from fashion_lightning.utils.malloc import keep_freed_memory

CONFIG_PATH = "pkg://fashion_lightning.conf"
VERSION_BASE = "1.3"

log = logging.getLogger("fashion_lightning")


def quiet_runtime() -> None:
    """Sensible process defaults for CLI runs: glibc keeps freed memory, fewer noisy warnings.

    The HF hub is NOT forced offline here: ``pretrained=true`` recipes download on networked
    machines; the packaged offline weights set ``HF_HUB_OFFLINE`` themselves where they load.
    """
    keep_freed_memory()  # CPU runs: no mmap/munmap page-fault churn per batch (see utils/malloc.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is not writable.*")
    torch = sys.modules.get("torch")  # id/history queries never import torch (start-up time); model apps have
    if torch is not None:
        torch.set_float32_matmul_precision("high")
