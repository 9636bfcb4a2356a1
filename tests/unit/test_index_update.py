"""Living catalog end to end: a real model, yesterday's index, today's catalog (new, changed, retired items).

An update must embed only what changed and equal a full rebuild of today's catalog (same rows, vectors and
answers), on FAISS (a new folder naming its parent) and on Qdrant local mode (in place); and refuse, in one
line with exit status 2 and nothing written, what it cannot do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("qdrant_client")

from fashion_lightning.apps.index import build  # noqa: E402
from fashion_lightning.retrieval import Recommender, load_index  # noqa: E402
from hydra_helpers import make_cfg, train_and_index  # noqa: E402

pytestmark = pytest.mark.slow
ITEMS = 160
QUIET = ["data.num_workers=0", "+trainer.enable_progress_bar=false"]


def _today(catalog: Path, out: Path, index_items: pd.DataFrame) -> SimpleNamespace:
    """Yesterday's catalog with 2 retired items, 2 recoloured, 2 new photos and 2 new items."""
    shutil.copytree(catalog, out)
    lines = (out / "styles.csv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    by_id = {int(r.split(",", 1)[0]): i for i, r in enumerate(rows) if r.count(",") == 9}
    clean = [i for i in index_items["id"].tolist() if i in by_id]
    retired, recoloured, rephotographed = clean[:2], clean[2:4], clean[4:6]
    for item in recoloured:
        fields = rows[by_id[item]].split(",")
        fields[5] = "Red" if fields[5] != "Red" else "Blue"
        rows[by_id[item]] = ",".join(fields)
    for item, donor in zip(rephotographed, clean[10:12]):
        shutil.copyfile(out / "images" / f"{donor}.jpg", out / "images" / f"{item}.jpg")
    added = []
    for offset, donor in enumerate(clean[12:14], start=1):
        new_id = max(by_id) + offset
        fields = rows[by_id[donor]].split(",")
        rows.append(",".join([str(new_id), *fields[1:]]))
        shutil.copyfile(out / "images" / f"{clean[20 + offset]}.jpg", out / "images" / f"{new_id}.jpg")
        added.append(new_id)
    rows = [r for i, r in enumerate(rows) if i not in {by_id[x] for x in retired}]
    (out / "styles.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return SimpleNamespace(root=out, retired=retired, changed=recoloured + rephotographed, added=added)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("living")
    parent = train_and_index(root, ITEMS, epochs=1)
    manifest = json.loads((parent / "manifest.json").read_text())
    today = _today(Path(manifest["model"]["catalog"]), root / "today", pd.read_csv(parent / "items.csv"))
    model = root / "train" / "model"
    cache = root / "cache"
    full = build(make_cfg("index", root / "full", cache, [f"ckpt_path={model}", f"data.root={today.root}", *QUIET]))
    return SimpleNamespace(root=root, parent=parent, today=today, model=model, cache=cache, full=full)


def _index(world, name: str, overrides: list[str]) -> Path:
    return build(make_cfg("index", world.root / name, world.cache, [*overrides, *QUIET]))


def _same_answers(a: Recommender, b: Recommender, ids) -> None:
    for item in ids:
        for filters in (None, {"gender": "Women"}):
            ra, rb = a.recommend(item_id=item, k=10, filters=filters), b.recommend(item_id=item, k=10, filters=filters)
            assert ra.ids == rb.ids
            np.testing.assert_allclose([r.score for r in ra.results], [r.score for r in rb.results], atol=1e-5)


def test_faiss_update_embeds_only_changes_and_equals_a_full_rebuild(world):
    today = world.today
    out = _index(world, "upd", [f"index.update_from={world.parent}", f"data.root={today.root}"])
    manifest = json.loads((out / "manifest.json").read_text())
    parent = manifest["parent"]
    assert parent["path"] == str(world.parent.resolve()) and parent["retired"] == 2
    assert parent["embedded"] == len(today.changed) + len(today.added)  # 4 changed + 2 new, nothing else
    updated, full = load_index(out), load_index(world.full)
    assert updated.ids.tolist() == full.ids.tolist()
    assert not set(today.retired) & set(updated.ids.tolist()) and set(today.added) <= set(updated.ids.tolist())
    np.testing.assert_allclose(updated.vectors(), full.vectors(), atol=1e-5)
    pd.testing.assert_frame_equal(updated.items, full.items)
    rec, ref = Recommender(updated), Recommender(full)
    _same_answers(rec, ref, [*today.changed, *today.added, int(full.ids[50])])
    assert rec.recommend(item_id=today.added[0], k=3).timings["index_version"] == updated.version


def test_qdrant_update_in_place_equals_a_full_rebuild(world):
    store = world.root / "qdrant-store"
    qdrant = [f"index.qdrant.path={store}", "index.qdrant.collection=shop"]
    first = _index(
        world, "q0", [f"ckpt_path={world.model}", f"data.num_items={ITEMS}", "index.backend=qdrant", *qdrant]
    )
    with Recommender.from_dir(first, allow_qdrant_local=True) as q0:
        _same_answers(q0, Recommender.from_dir(world.parent), load_index(world.parent).ids[:3].tolist())
    out = _index(world, "q1", [f"index.update_from={first}", f"data.root={world.today.root}", *qdrant])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["index"]["collection"] == "shop" and manifest["parent"]["embedded"] == 6
    with Recommender.from_dir(out, allow_qdrant_local=True) as q1:
        assert q1.index.store.count() == load_index(world.full).n  # retired points deleted, new ones in
        _same_answers(q1, Recommender.from_dir(world.full), [*world.today.added, *world.today.changed])


def _cli(world, name: str, overrides: list[str]) -> tuple[int, str]:
    """Exit status and output (the apps log their one-line error through Hydra's logging, to stdout)."""
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(world.cache)}
    run = [
        sys.executable,
        "-m",
        "fashion_lightning.apps.index",
        *overrides,
        *QUIET,
        f"hydra.run.dir={world.root / name}",
    ]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _one_line_error(output: str, words: str) -> bool:
    """The refusal is a one-line message (the run's failure log and the app's exit both print it), no traceback."""
    return "Traceback" not in output and any(
        words in line and "Error" not in line[-20:] for line in output.splitlines()
    )


def test_refusals_are_one_line_exit_2_and_write_nothing(world, tmp_path):
    import torch

    from fashion_lightning.models.artifact import save_artifact
    from fashion_lightning.models.base import load_module

    other = load_module(world.model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other_model = save_artifact(other, tmp_path / "other" / "model")
    out = tmp_path / "never"
    today = f"data.root={world.today.root}"
    refused = [f"index.update_from={world.parent}", f"ckpt_path={other_model}", today, f"index_dir={out}"]
    code, output = _cli(world, "r1", refused)
    assert code == 2 and _one_line_error(output, "was built by another model")
    unreachable = Path(shutil.copytree(world.parent, tmp_path / "remote"))
    data = json.loads((unreachable / "manifest.json").read_text())
    data["index"] = {"backend": "qdrant", "type": "qdrant", "collection": "shop", "url": "http://127.0.0.1:9"}
    (unreachable / "manifest.json").write_text(json.dumps(data))
    code, output = _cli(world, "r2", [f"index.update_from={unreachable}", today, f"index_dir={out}"])
    assert code == 2 and _one_line_error(output, "http://127.0.0.1:9 is unreachable")
    store = world.root / "qdrant-store"
    code, output = _cli(world, "r3", [f"ckpt_path={other_model}", "index.backend=qdrant", f"index.qdrant.path={store}",
                                      "index.qdrant.collection=shop", f"index_dir={out}"])  # fmt: skip
    assert code == 2 and _one_line_error(output, "points made by another model")
    assert not out.exists() and not list(tmp_path.glob(".updating-*"))
