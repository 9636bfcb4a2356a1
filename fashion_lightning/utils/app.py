"""What every Hydra entry point shares: the packaged config location and run setup."""

from __future__ import annotations

import logging

from fashion_lightning.utils.runtime import apply_runtime

CONFIG_PATH = "pkg://fashion_lightning.conf"
VERSION_BASE = "1.3"

log = logging.getLogger("fashion_lightning")


def quiet_runtime() -> None:
    """The shipped ``conf/runtime/default.yaml`` applied to this process, for code that runs without an app.

    The apps apply their own ``runtime`` config through the task wrapper. The HF hub is NOT forced
    offline: ``pretrained=true`` recipes download on networked machines; the packaged offline weights set
    ``HF_HUB_OFFLINE`` themselves where they load.
    """
    apply_runtime(None)
