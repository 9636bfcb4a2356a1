"""Hub weights: downloaded when online, one clear line when offline (downloads mocked, no network used)."""

from __future__ import annotations

import os

import huggingface_hub.constants as hub_constants
import pytest
import timm

from fashion_lightning.models import backbones
from fashion_lightning.models.hub import HubUnavailable, is_network_error
from fashion_lightning.models.offline_weights import offline_hub
from fashion_lightning.utils.app import quiet_runtime

real_create_model = timm.create_model


def _offline_error() -> Exception:
    """What huggingface_hub raises with no network: LocalEntryNotFoundError caused by a connect error."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as cause:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from cause
    except LocalEntryNotFoundError as err:
        return err


def test_apps_do_not_force_the_hub_offline(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    quiet_runtime()
    assert "HF_HUB_OFFLINE" not in os.environ


def test_offline_hub_is_local_and_restored(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hub_constants.HF_HUB_OFFLINE
    with offline_hub():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE == before


def test_online_timm_recipe_calls_the_hub_loader(monkeypatch) -> None:
    calls = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE))
        return real_create_model(name, pretrained=False, **kwargs)  # stands in for the downloaded weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(timm, "create_model", fake_create)
    quiet_runtime()
    model = backbones.create_backbone("resnet10t", pretrained=True)
    assert model.num_features > 0
    assert calls == [("resnet10t", True, None, False)]  # asked timm for hub weights, hub not forced offline


def test_offline_timm_recipe_fails_with_one_line_naming_alternatives(monkeypatch) -> None:
    def no_network(name, pretrained=False, **kwargs):
        if pretrained:
            raise _offline_error()
        return real_create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(HubUnavailable) as info:
        backbones.create_backbone("resnet10t", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "no network" in message and "resnet10t" in message
    assert "pretrained=offline" in message and "checkpoint_path=" in message


def test_non_network_errors_are_not_disguised(monkeypatch) -> None:
    def broken(name, pretrained=False, **kwargs):
        raise ValueError("bad kwarg")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ValueError, match="bad kwarg"):
        backbones.create_backbone("resnet10t", pretrained=True)
    assert is_network_error(_offline_error()) and not is_network_error(ValueError("x"))


def test_open_clip_hub_recipe_online_and_offline(monkeypatch) -> None:
    open_clip = pytest.importorskip("open_clip")
    from fashion_lightning.models.clip import ClipFusionNet

    calls = []
    real = open_clip.create_model

    def online(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, hub_constants.HF_HUB_OFFLINE))
        return real("clip-tiny", pretrained=None, **{**kwargs, "load_weights": False})

    monkeypatch.setattr(open_clip, "create_model", online)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name, **kw: open_clip.SimpleTokenizer(context_length=16))
    ClipFusionNet("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert calls and calls[0][:2] == ("ViT-B-32", "laion2b_s34b_b79k") and calls[0][2] is False

    def offline(name, pretrained=None, **kwargs):
        raise _offline_error()

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(HubUnavailable) as info:
        ClipFusionNet("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "\n" not in str(info.value) and "ViT-B-32" in str(info.value) and "pretrained=offline" in str(info.value)
