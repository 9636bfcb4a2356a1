"""What every Hydra entry point shares: the packaged config location and run setup."""

from __future__ import annotations

import logging
import os
import sys
import warnings

CONFIG_PATH = "pkg://fashion_lightning.conf"
VERSION_BASE = "1.3"

log = logging.getLogger("fashion_lightning")


def quiet_runtime() -> None:
    """Sensible process defaults for CLI runs: offline HF hub, fewer noisy warnings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is not writable.*")
    torch = sys.modules.get("torch")  # id/history queries never import torch (start-up time); model apps have
    if torch is not None:
        torch.set_float32_matmul_precision("high")
