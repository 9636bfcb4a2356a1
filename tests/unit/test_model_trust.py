"""No string in a checkpoint or model artefact chooses code (issue 19, round two).

The first round checked ``_target_`` with a string-prefix test, and Hydra resolves dotted paths through
module attributes, so ``fashion_lightning.<module>.torch.load`` (and ``shutil``, ``os``, ``pathlib``)
was reachable. Now saved names are keys into ``models/registry.py`` and hyperparameters fit a typed spec.
These tests probe the design (attribute walks, abstract classes, cost bombs, fuzzing), not a list of names.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashion_lightning.models import registry
from fashion_lightning.models.artifact import CONFIG_FILE, WEIGHTS_FILE, load_artifact, save_artifact
from fashion_lightning.models.base import CLASS_KEY, CheckpointError, UnsafeCheckpointError, load_module
from fashion_lightning.models.clip_module import ClipFusionModule
from fashion_lightning.models.multitask_module import MultiTaskModule
from fashion_lightning.models.spec import SPECS

NET = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": "test_resnet",
       "pretrained": False, "image_size": [40, 32]}  # fmt: skip
VOCABS = {"articleType": ["Shirts", "Tshirts", "Jeans"], "gender": ["Men", "Women"]}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.01,
             "betas": [0.9, 0.99]}  # fmt: skip
PARAM_GROUPS = {"backbone_lr_ratio": 0.5}
SCHEDULER = {"_target_": "fashion_lightning.models.optim.warmup_cosine", "_partial_": True, "warmup_ratio": 0.1}

# attribute walks from a registered-looking prefix to the outside world: each reached real code before
ATTRIBUTE_WALKS = [
    "fashion_lightning.models.base.torch.load",
    "fashion_lightning.utils.atomic.shutil.rmtree",
    "fashion_lightning.data.catalog.os.system",
    "fashion_lightning.models.multitask.torch.hub.load",
    "fashion_lightning.retrieval.manifest.os.remove",
    "fashion_lightning.models.clip.json.loads",
    "fashion_lightning.models.multitask.MultiTaskNet.__init__.__globals__",
    "torch.optim.os.system",
    "torch.optim.Optimizer",
    "torch.optim.lr_scheduler.warnings.warn",
    "builtins.eval",
    "pathlib.Path.write_text",
]


@pytest.fixture(scope="module")
def module() -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(NET, VOCABS, optimizer=OPTIMIZER, scheduler=SCHEDULER, param_groups=PARAM_GROUPS).eval()


def _checkpoint(module: MultiTaskModule) -> dict:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": copy.deepcopy(dict(module.hparams))}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def _save(checkpoint: dict, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def no_imports(monkeypatch):
    """Records every importlib.import_module call: a refused file must not import anything."""
    calls: list[str] = []
    real = __import__("importlib").import_module
    monkeypatch.setattr("importlib.import_module", lambda name, *a: calls.append(name) or real(name, *a))
    return calls


@pytest.mark.parametrize("where", ["net", "optimizer", "scheduler"])
@pytest.mark.parametrize("target", ATTRIBUTE_WALKS)
def test_attribute_walk_targets_are_refused(module, tmp_path, where, target, no_imports):
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"][where] = {**(checkpoint["hyper_parameters"][where] or {}), "_target_": target}
    path = _save(checkpoint, tmp_path / "probe.ckpt")
    torch.load(path, weights_only=True)  # torch's own lazy imports happen here, not in the check below
    before = set(sys.modules)
    with pytest.raises(UnsafeCheckpointError, match=rf"probe\.ckpt.*{where}\._target_"):
        load_module(path)
    assert no_imports == [] and set(sys.modules) - before == set()


@pytest.mark.parametrize(
    "cls_path",
    [
        "fashion_lightning.models.base.FashionModule",  # abstract base: was a TypeError traceback
        "fashion_lightning.models.base.torch.nn.Module",
        "fashion_lightning.models.multitask_module.MultiTaskModule.__init__",
        "os.system",
        "fashion_lightning_evil.Module",
        12345,
    ],
)
def test_module_class_must_be_a_registered_family(module, tmp_path, cls_path):
    checkpoint = _checkpoint(module)
    checkpoint[CLASS_KEY] = cls_path
    with pytest.raises(UnsafeCheckpointError, match="not a registered model family"):
        load_module(_save(checkpoint, tmp_path / "cls.ckpt"))


def test_shared_reference_bomb_is_refused_quickly(module, tmp_path):
    """60 levels of a list holding the previous level twice: 2^60 paths, a small file."""
    bomb: list = []
    for _ in range(60):
        bomb = [bomb, bomb]
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"]["mixup"] = {"mixup_alpha": bomb}
    path = _save(checkpoint, tmp_path / "bomb.ckpt")
    assert path.stat().st_size < 5 * 2**20
    start = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match="bomb.ckpt: its hyperparameters (is nested|has more)"):
        load_module(path)
    assert time.perf_counter() - start < 5


def test_deeply_nested_targets_are_one_line(module, tmp_path):
    deep: dict = {"_target_": "os.system"}
    for _ in range(5000):
        deep = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": deep}
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"]["net"] = deep
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30_000)  # only to write the probe: pickle recurses
    try:
        path = _save(checkpoint, tmp_path / "deep.ckpt")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(UnsafeCheckpointError, match="nested more than") as err:
        load_module(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "net_change",
    [
        {"checkpoint_path": "/etc/passwd", "pretrained": True},  # reset on load: never read
        {"pretrained_cfg_overlay": "/etc/passwd"},  # a timm kwarg carrying a path
        {"backbone": "../../etc/passwd"},
        {"backbone": "hf-hub:evil/model"},
        {"__class__": 1},
    ],
)
def test_names_and_paths_reaching_timm_are_plain(module, tmp_path, net_change, monkeypatch):
    read: list[str] = []
    monkeypatch.setattr("timm.create_model", lambda *a, **k: read.append(str((a, k))) or pytest.fail("built"))
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"]["net"] = {**NET, **net_change}
    path = _save(checkpoint, tmp_path / "net.ckpt")
    if "checkpoint_path" in net_change:  # valid config: loads, and the file it names is never read
        monkeypatch.undo()
        loaded = load_module(path)
        assert loaded.hparams.net["checkpoint_path"] is None and loaded.hparams.net["pretrained"] is False
        return
    with pytest.raises(UnsafeCheckpointError, match="net"):
        load_module(path)
    assert read == []


def test_spec_fields_are_the_constructor_parameters():
    """A new hyperparameter must be declared in the typed spec to be saved and loaded."""
    for family, spec in SPECS.items():
        cls = registry.module_class(family)
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "class_weights"}
        assert set(spec.model_fields) == params, family
    assert registry.module_class("multitask") is MultiTaskModule and registry.module_class("clip") is ClipFusionModule


def test_artifact_round_trip_gives_the_same_outputs(module, tmp_path):
    folder = save_artifact(module, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_module(folder)
    images = torch.randint(0, 255, (3, 3, 80, 60), dtype=torch.uint8)
    assert torch.allclose(loaded.embed_images(images), module.embed_images(images))
    assert load_module(folder / CONFIG_FILE).vocabs.to_dict() == VOCABS
    with pytest.raises(FileExistsError):
        save_artifact(module, folder)  # never replaces what is there unless asked


# what a multi-task model.json / .ckpt said before image_size and model.param_groups (the names spec.RENAMED maps)
OLD_STYLE_HPARAMS = {
    "net": {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": "test_resnet",
            "pretrained": False, "input_size": [40, 32]},
    "vocabs": VOCABS,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 0.01,
                  "backbone_lr_ratio": 0.5, "layer_decay": None, "betas": [0.9, 0.99]},
    "scheduler": SCHEDULER,
}  # fmt: skip


def test_files_written_before_the_renames_still_load(module, tmp_path):
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"] = copy.deepcopy(OLD_STYLE_HPARAMS)
    loaded = load_module(_save(checkpoint, tmp_path / "old.ckpt"))
    assert loaded.hparams.net["image_size"] == (40, 32) and "input_size" not in loaded.hparams.net
    assert loaded.net.preprocess.image_size == (40, 32)
    assert loaded.hparams.param_groups == {"backbone_lr_ratio": 0.5, "layer_decay": None}
    assert "backbone_lr_ratio" not in loaded.hparams.optimizer and loaded.optim.rules == {"backbone_lr_ratio": 0.5}
    assert loaded.optim.optimizer["betas"] == [0.9, 0.99] and loaded.optim.scheduler["warmup_ratio"] == 0.1
    images = torch.randint(0, 255, (3, 3, 80, 60), dtype=torch.uint8)
    assert torch.equal(loaded.embed_images(images), module.embed_images(images))
    # the same in a model.json, which is also written back with the new names only
    folder = save_artifact(module, tmp_path / "model")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["hparams"] = copy.deepcopy(OLD_STYLE_HPARAMS)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    again = save_artifact(load_artifact(folder), tmp_path / "model2")
    hparams = json.loads((again / CONFIG_FILE).read_text())["hparams"]
    assert hparams["net"]["image_size"] == [40, 32] and hparams["param_groups"]["backbone_lr_ratio"] == 0.5
    assert not {"input_size", "backbone_lr_ratio", "layer_decay"} & (set(hparams["net"]) | set(hparams["optimizer"]))


def test_a_key_under_its_old_and_new_name_is_refused_in_one_line(module, tmp_path):
    checkpoint = _checkpoint(module)
    checkpoint["hyper_parameters"]["optimizer"]["backbone_lr_ratio"] = 0.2  # and param_groups says 0.5
    with pytest.raises(UnsafeCheckpointError, match=r"optimizer.backbone_lr_ratio \(an old name\)") as err:
        load_module(_save(checkpoint, tmp_path / "both.ckpt"))
    assert "\n" not in str(err.value)


def test_damaged_or_swapped_weights_are_one_line(module, tmp_path):
    folder = save_artifact(module, tmp_path / "model")
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_artifact(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["weights"]["sha256"] = __import__("hashlib").sha256(bytes(data)).hexdigest()  # editor re-hashed it
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    header_len = int.from_bytes(data[:8], "little")
    if len(data) // 2 > 8 + header_len:  # flipped a weight byte: loads, but it is the editor's model now
        load_artifact(folder)
    weights.write_bytes(b"\x00" * 16)
    config["weights"].update(bytes=16, sha256=__import__("hashlib").sha256(b"\x00" * 16).hexdigest())
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_artifact(folder)


# --- fuzzing ----------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)
KEYS = ["net", "vocabs", "task_weights", "label_smoothing", "optimizer", "scheduler", "param_groups",
        "freeze_backbone", "freeze_backbone_epochs", "ema", "mixup", "flip_tta", "compile", "unknown_key",
        "_target_"]  # fmt: skip
NET_KEYS = ["_target_", "backbone", "pretrained", "image_size", "input_size", "embed_dim", "dropout", "drop_rate", "x"]
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _assert_loads_or_refuses(path: Path, no_imports: list[str]) -> None:
    before, calls = set(sys.modules), len(no_imports)  # (hypothesis imports its own modules between examples)
    try:
        loaded = load_module(path)
    except CheckpointError as err:
        message = str(err)
        assert "\n" not in message and len(message) < 2000 and str(path.name) in message
    else:
        assert isinstance(loaded, (MultiTaskModule, ClipFusionModule))
    assert no_imports[calls:] == [] and not {
        m for m in set(sys.modules) - before if not m.startswith(("timm", "torch"))
    }


@FUZZ
@given(key=st.sampled_from(KEYS), net_key=st.sampled_from(NET_KEYS), value=JSON_VALUES, in_net=st.booleans())
def test_fuzzed_checkpoint_hparams_load_or_refuse_in_one_line(
    module, tmp_path, no_imports, key, net_key, value, in_net
):
    checkpoint = _checkpoint(module)
    if in_net:
        checkpoint["hyper_parameters"]["net"][net_key] = value
    else:
        checkpoint["hyper_parameters"][key] = value
    _assert_loads_or_refuses(_save(checkpoint, tmp_path / "fuzz.ckpt"), no_imports)


@FUZZ
@given(
    path=st.lists(st.sampled_from(["hparams", "net", "optimizer", "weights", "family", "format", "version", "x"]),
                  min_size=1, max_size=3),
    value=JSON_VALUES,
)  # fmt: skip
def test_fuzzed_model_json_loads_or_refuses_in_one_line(module, tmp_path_factory, no_imports, path, value):
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    save_artifact(module, folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[path[-1]] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    _assert_loads_or_refuses(folder / CONFIG_FILE, no_imports)


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzzed_model_json_bytes_are_refused_in_one_line(module, tmp_path_factory, no_imports, data):
    folder = tmp_path_factory.mktemp("bytes") / "model"
    save_artifact(module, folder)
    (folder / CONFIG_FILE).write_bytes(data)
    _assert_loads_or_refuses(folder / CONFIG_FILE, no_imports)
