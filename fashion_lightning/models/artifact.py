"""The model artefact others load: weights in safetensors plus a typed JSON config, nothing executable.

A Lightning ``.ckpt`` is a pickle: fine for resuming one's own training, but the wrong thing to hand to a
service or to download. An artefact is a folder::

    model/
      model.json          format, family, validated hyperparameters (models/spec.py), the weights' size + sha256
      model.safetensors   the state dict (safetensors: a JSON header and raw tensors, no pickle)

Loading parses ``model.json`` with the bounded reader, validates it against the family's typed spec, looks the
family up in the registry, builds the module for inference (no pretrained weights fetched), checks the
weights file against the recorded size + sha256 and fills the module strictly. No step can run code from
the files, whatever they hold. fashion-train writes ``<run>/model/``; fashion-index copies it into the
index folder; ``load_module`` (models/base.py) accepts it wherever a checkpoint is accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashion_lightning.utils.atomic import atomic_dir, temp_prefix
from fashion_lightning.utils.bounded import Limits, load_json_or

if TYPE_CHECKING:  # the file names above are read by torch-free code (index manifests); torch loads lazily
    import torch

    from fashion_lightning.models.base import FashionModule

FORMAT = "fashion-lightning-model"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
ARTIFACT_DIR = "model"  # its name inside a run folder and an index folder
FILES = (CONFIG_FILE, WEIGHTS_FILE)
CONFIG_LIMITS = Limits(max_depth=12, max_nodes=200_000, max_string=4096, max_bytes=8 * 2**20)


def is_artifact(path: str | Path) -> bool:
    """True for an artefact folder or its ``model.json`` (anything else is treated as a .ckpt)."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_FILE).is_file()) or (path.name == CONFIG_FILE and path.is_file())


def artifact_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == CONFIG_FILE and not path.is_dir() else path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(module: FashionModule, folder: str | Path, replace: bool = False) -> Path:
    """Write ``module`` as an artefact folder, atomically (a crash leaves no folder that looks valid).

    The hyperparameters are validated on the way out exactly as they will be on the way in, so a model
    that could not be loaded is never written. An existing folder is refused unless ``replace`` (a resumed
    run refreshing its own ``model/``): then the new folder is complete before the old one is moved away.
    """
    folder = Path(folder)
    if replace and folder.exists():
        fresh = save_artifact(module, folder.with_name(f".tmp-new-{folder.name}-{os.getpid()}"))
        old = folder.with_name(f".tmp-old-{folder.name}-{os.getpid()}")
        os.rename(folder, old)
        os.rename(fresh, folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder
    from safetensors.torch import save_model

    from fashion_lightning.models import registry
    from fashion_lightning.models.base import checked_hparams, plain

    family = registry.family_of(module)
    hparams = checked_hparams(family, plain(dict(module.hparams)), f"the {family} module's config")
    with atomic_dir(folder, prefix=".tmp-model-") as tmp:
        weights = tmp / WEIGHTS_FILE
        save_model(module, str(weights), metadata={"format": FORMAT, "family": family})
        config = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "family": family,
            "embedding_name": module.embedding_name,
            "tasks": list(module.vocabs.tasks),
            "hparams": hparams,
            "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": _sha256(weights)},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=list) + "\n", encoding="utf-8")
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """``model.json`` parsed with limits and checked (format, version, family, typed hyperparameters)."""
    from fashion_lightning.models import registry
    from fashion_lightning.models.base import CheckpointError, UnsafeCheckpointError, checked_hparams

    folder = artifact_dir(path)
    config_path = folder / CONFIG_FILE
    config = load_json_or(
        config_path,
        CONFIG_LIMITS,
        missing=lambda: CheckpointError(f"{config_path}: missing, so {folder} is not a model artefact"),
        refused=lambda why: UnsafeCheckpointError(f"refusing to load {config_path}: {why}"),
    )
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a {FORMAT} config")
    if config.get("version") != FORMAT_VERSION:
        version = str(config.get("version"))[:20]
        raise CheckpointError(f"{config_path}: format version {version}, this release reads {FORMAT_VERSION}")
    family = config.get("family")
    if family not in registry.families():
        raise UnsafeCheckpointError(
            f"refusing to load {config_path}: family {str(family)[:100]!r} is not one of {registry.families()}"
        )
    weights = config.get("weights")
    if (
        not isinstance(weights, dict)
        or weights.get("file") != WEIGHTS_FILE
        or not isinstance(weights.get("bytes"), int)
        or not isinstance(weights.get("sha256"), str)
    ):
        raise CheckpointError(f"{config_path}: no valid record of {WEIGHTS_FILE} (file, bytes, sha256)")
    config["hparams"] = checked_hparams(family, config.get("hparams"), config_path)
    return config


def artifact_identity(path: str | Path) -> str:
    """The sha256 of the artefact's weights, as its ``model.json`` records it (what "same model" means)."""
    return str(read_config(path)["weights"]["sha256"])


def model_identity(
    source: str | Path, module: FashionModule | None = None, scratch_dir: str | Path | None = None
) -> str:
    """The weights' sha256 an artefact of this model records (what indexes and exports call its identity): read
    from ``source`` when it is an artefact, else from the artefact its .ckpt gives (``module``, loaded from
    ``source`` when not given), written aside in ``scratch_dir`` (default: the system temp) and removed."""
    if is_artifact(source):
        return artifact_identity(source)
    if module is None:
        from fashion_lightning.models.base import load_module

        module = load_module(source)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(ARTIFACT_DIR), dir=scratch_dir) as scratch:
        return artifact_identity(save_artifact(module, Path(scratch) / ARTIFACT_DIR))


def verify_weights(path: str | Path, config: dict[str, Any] | None = None) -> Path:
    """The weights file, after checking its size and sha256 against ``model.json``."""
    from fashion_lightning.models.base import CheckpointError

    folder = artifact_dir(path)
    config = config or read_config(folder)
    weights, record = folder / WEIGHTS_FILE, config["weights"]
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if weights.stat().st_size != record["bytes"]:
        raise CheckpointError(f"{weights}: {weights.stat().st_size} bytes, {CONFIG_FILE} records {record['bytes']}")
    if _sha256(weights) != record["sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match {CONFIG_FILE} (the file is damaged or was replaced)")
    return weights


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> FashionModule:
    """The module an artefact describes, in eval mode (see module doc for every check on the way)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from fashion_lightning.models.base import CheckpointError, build_module

    folder = artifact_dir(path)
    config = read_config(folder)
    weights = verify_weights(folder, config)
    module = build_module(config["family"], config["hparams"], folder / CONFIG_FILE)
    try:
        load_model(module, str(weights), strict=True)
    except (SafetensorError, RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"{weights}: {str(err).splitlines()[0][:300]}") from None
    return module.to(map_location).eval()


def copy_artifact(source: str | Path, folder: str | Path) -> Path:
    """Copy an artefact (after checking it loads: config valid, weights match) into ``folder``, atomically."""
    source = artifact_dir(source)
    config = read_config(source)
    verify_weights(source, config)
    folder = Path(folder)
    with atomic_dir(folder, prefix=".tmp-model-") as tmp:
        for name in FILES:
            shutil.copyfile(source / name, tmp / name)
    return folder
