"""Loading a checkpoint never runs code from it (issue 8, item 1)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from fashion_lightning.models.base import CLASS_KEY, UnsafeCheckpointError, load_module, read_checkpoint
from fashion_lightning.models.multitask_module import MultiTaskModule

MULTITASK = "fashion_lightning.models.multitask_module.MultiTaskModule"
NET = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": "test_resnet", "pretrained": False,
       "image_size": [40, 32]}  # fmt: skip
VOCABS = {"articleType": ["Shirts", "Tshirts"], "gender": ["Men", "Women"]}


class Payload:
    """Pickles as a call to os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def real_checkpoint(path: Path) -> Path:
    """A genuine (tiny) multi-task checkpoint, written the way Lightning writes one."""
    L.seed_everything(0, verbose=False)
    module = MultiTaskModule(NET, VOCABS)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": L.__version__, "epoch": 0, "global_step": 0}  # fmt: skip
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def test_genuine_checkpoint_loads_with_weights_only(tmp_path) -> None:
    ckpt = real_checkpoint(tmp_path / "ok.ckpt")
    assert read_checkpoint(ckpt)[CLASS_KEY] == MULTITASK
    module = load_module(str(ckpt))
    assert isinstance(module, MultiTaskModule) and module.vocabs.to_dict() == VOCABS and not module.training


def test_reduce_payload_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    checkpoint = torch.load(real_checkpoint(tmp_path / "ok.ckpt"), weights_only=True)
    checkpoint["hyper_parameters"]["label_smoothing"] = Payload(marker)
    torch.save(checkpoint, ckpt)
    for load in (read_checkpoint, load_module):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*system"):
            load(str(ckpt))
    assert not marker.exists()


def test_module_class_outside_the_package_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "os.ckpt"
    torch.save({CLASS_KEY: "os.system", "state_dict": {}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match=r"os\.ckpt.*'os\.system' is not a registered model family"):
        load_module(str(ckpt))


def test_package_lookalike_class_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "lookalike.ckpt"
    torch.save({CLASS_KEY: "fashion_lightning_evil.Module", "hyper_parameters": {}}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="not a registered model family"):
        read_checkpoint(ckpt)


def test_package_object_that_is_not_a_module_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "fn.ckpt"
    torch.save({CLASS_KEY: "fashion_lightning.utils.atomic.atomic_write_text", "hyper_parameters": {}}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="not a registered model family"):
        load_module(str(ckpt))


def test_hparams_target_outside_the_package_is_refused(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    checkpoint = torch.load(real_checkpoint(tmp_path / "ok.ckpt"), weights_only=True)
    checkpoint["hyper_parameters"]["net"] = {**NET, "_target_": "os.system", "command": f"touch {marker}"}
    ckpt = tmp_path / "target.ckpt"
    torch.save(checkpoint, ckpt)
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name, *a: imported.append(name))
    with pytest.raises(UnsafeCheckpointError, match=r"target\.ckpt.*net\._target_"):
        load_module(str(ckpt))
    assert not marker.exists() and imported == []  # refused before importing anything


def test_nested_target_is_checked_too(tmp_path) -> None:
    checkpoint = torch.load(real_checkpoint(tmp_path / "ok.ckpt"), weights_only=True)
    checkpoint["hyper_parameters"]["extra"] = [{"deep": {"_target_": "subprocess.run"}}]
    torch.save(checkpoint, tmp_path / "nested.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="extra"):  # unknown keys are refused by the typed spec
        read_checkpoint(tmp_path / "nested.ckpt")


def test_damaged_and_missing_checkpoints_give_one_line_errors(tmp_path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*bad\.ckpt"):
        load_module(str(bad))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_module(str(tmp_path / "absent.ckpt"))
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a fashion-lightning checkpoint"):
        load_module(str(tmp_path / "plain.ckpt"))


@pytest.mark.parametrize("app", ["train", "eval", "index"])
def test_apps_refuse_a_hostile_checkpoint_before_loading_data(app, tmp_path) -> None:
    from hydra_helpers import make_cfg

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({CLASS_KEY: MULTITASK, "hyper_parameters": {"vocabs": Payload(marker)}}, ckpt)
    cfg = make_cfg(app, tmp_path / "run", tmp_path / "cache", [f"ckpt_path={ckpt}"])
    run = {"train": "fashion_lightning.apps.train:train", "eval": "fashion_lightning.apps.eval:evaluate",
           "index": "fashion_lightning.apps.index:build"}[app]  # fmt: skip
    module, _, name = run.partition(":")
    import importlib

    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt"):
        getattr(importlib.import_module(module), name)(cfg)
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_torch_optimizer_targets_are_allowed_lookalikes_are_not(tmp_path) -> None:
    checkpoint = torch.load(real_checkpoint(tmp_path / "ok.ckpt"), weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    checkpoint["hyper_parameters"]["scheduler"] = {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1}
    torch.save(checkpoint, tmp_path / "sgd.ckpt")
    read_checkpoint(tmp_path / "sgd.ckpt")
    bad = (
        "torch.optim.Optimizer.__init__",
        "torch.optim.os.system",
        "torch.load",
        "torch.optim.lr_scheduler.warnings.warn",
    )
    for target in bad:
        checkpoint["hyper_parameters"]["optimizer"] = {"_target_": target}
        torch.save(checkpoint, tmp_path / "bad.ckpt")
        with pytest.raises(UnsafeCheckpointError, match="_target_"):
            read_checkpoint(tmp_path / "bad.ckpt")
