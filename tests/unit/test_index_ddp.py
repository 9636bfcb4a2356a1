"""Simulated multi-device indexing on the CPU: 2 processes (DDP, gloo) write shards that rank 0 merges.

The worker script is launched as a subprocess because Lightning's DDP launcher re-runs the script per
rank. The merged folder must equal the single-process build, and a rerun after a crash must embed only
the items whose shards are missing or damaged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_lightning.retrieval import IndexParams, build_index, load_index
from fashion_lightning.retrieval.predict_writer import (
    SHARD_DIR,
    complete_shards,
    completed_ids,
)

pytestmark = pytest.mark.slow
N, D = 203, 8  # odd: the distributed sampler pads rank 1 with a repeat

WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import lightning as L
    import numpy as np
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, Subset
    from fashion_lightning.retrieval import IndexParams
    from fashion_lightning.retrieval.predict_writer import IndexPredictionWriter, completed_ids

    out, kind, crash = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "crash"
    data = np.load(out.parent / "data.npz")
    catalog = pd.DataFrame({"id": data["ids"], "name": [f"item {i}" for i in data["ids"]]})

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(catalog)
        def __getitem__(self, i):
            return {"id": int(data["ids"][i]), "x": torch.from_numpy(data["vectors"][i])}

    class Embed(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            with open(out.parent / f"predicted-rank{self.global_rank}.txt", "a") as fh:
                fh.write(f"{len(batch['id'])}\\n")
            return {"id": batch["id"], "embedding": batch["x"], "image_embedding": batch["x"][:, :4]}

    class CrashBeforeMerge(IndexPredictionWriter):
        def merge(self):
            raise SystemExit(3)

    todo = np.flatnonzero(~np.isin(data["ids"], completed_ids(out)))  # what fashion-index does on a rerun
    writer = (CrashBeforeMerge if crash else IndexPredictionWriter)(
        out, catalog, {"embedding_name": "ddp-test"}, IndexParams(kind, nlist=4), shard_rows=24)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[writer])
    trainer.predict(Embed(), DataLoader(Subset(Items(), todo.tolist()), batch_size=10), return_predictions=False)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, out: Path, kind: str, crash: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(script), str(out), kind, "crash" if crash else "ok"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300)  # fmt: skip


def _data(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, D)).astype(np.float32)
    ids = rng.permutation(10_000)[:N].astype(np.int64)  # catalog order is not id order
    np.savez(tmp_path / "data.npz", vectors=vectors, ids=ids)
    return vectors, ids


def _single_process(tmp_path: Path, vectors, ids, kind: str):
    meta = pd.DataFrame({"id": ids, "name": [f"item {i}" for i in ids]})
    return build_index(
        vectors,
        meta,
        tmp_path / f"single-{kind}",
        {"embedding_name": "ddp-test"},
        extra_vectors={"image_embedding": vectors[:, :4]},
        params=IndexParams(kind, nlist=4),
    )


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_two_process_shards_merge_into_the_single_process_index(tmp_path, kind):
    vectors, ids = _data(tmp_path)
    out = tmp_path / "ddp"
    done = _run(tmp_path, out, kind)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_index(out)
    single = _single_process(tmp_path, vectors, ids, kind)
    assert merged.manifest.files == single.files  # byte-identical vectors, items and parts
    assert not (out / SHARD_DIR).exists()
    per_rank = [sum(map(int, (tmp_path / f"predicted-rank{r}.txt").read_text().split())) for r in (0, 1)]
    assert sum(per_rank) == N and min(per_rank) > 0  # both ranks embedded, each item once


def test_rerun_after_a_crash_embeds_only_missing_or_damaged_shards(tmp_path):
    vectors, ids = _data(tmp_path)
    out = tmp_path / "ddp"
    crashed = _run(tmp_path, out, "flat", crash=True)
    assert crashed.returncode != 0 and not (out / "manifest.json").exists()
    shards = complete_shards(out)
    assert len(shards) >= 8 and sum(s["count"] for s in shards) == N  # 24-row (+ a batch) shards from both ranks
    damaged = shards[0]
    path = damaged["dir"] / damaged["files_by_key"]["embedding"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the sha256 catches it
    path.write_bytes(bytes(data))
    remaining = N - len(completed_ids(out))
    assert 0 < remaining <= damaged["count"]
    for r in (0, 1):
        (tmp_path / f"predicted-rank{r}.txt").unlink()
    rerun = _run(tmp_path, out, "flat")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    embedded = sum(sum(map(int, (tmp_path / f"predicted-rank{r}.txt").read_text().split())) for r in (0, 1))
    assert remaining <= embedded <= remaining + 1  # only the damaged shard's items (+ one padded repeat)
    assert load_index(out).manifest.files == _single_process(tmp_path, vectors, ids, "flat").files
