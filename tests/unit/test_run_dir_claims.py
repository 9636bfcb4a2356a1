"""Races and leftovers (issue 19, item 6): atomic run-dir claims, stale claims and temp files, per-app advice."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fashion_lightning.utils.atomic import HOST, TMP_PREFIX, atomic_path, atomic_write_text, remove_dead_temps
from fashion_lightning.utils.run_dir import CLAIM_FILE, RunDirError, claim_run_dir
from fashion_lightning.utils.task_wrapper import task_wrapper


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_threads_racing_for_one_run_dir_one_wins(tmp_path):
    """Fails on old main: both threads passed the check (the claim was a look, not a create)."""
    for attempt in range(20):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        start, done = threading.Barrier(4), threading.Barrier(4)
        outcomes: list[str] = []
        threads = [threading.Thread(target=_claim_in_thread, args=(run, start, done, outcomes)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("won") == 1, outcomes
        assert all("in use by index" in o or "being claimed" in o for o in outcomes if o != "won"), outcomes


def _claim_in_thread(run: Path, start: threading.Barrier, done: threading.Barrier, outcomes: list[str]) -> None:
    start.wait()
    try:
        claim_run_dir(run, app="index")
        outcomes.append("won")
    except RunDirError as err:
        outcomes.append(str(err))
    done.wait()  # the winner's run is still going while the others try (a finished thread's claim is stale)


def _claim_in_child(run: str, start, done, results) -> None:
    start.wait()
    try:
        claim_run_dir(run, app="index")
        results.put("won")
    except RunDirError as err:
        results.put(str(err))
    done.wait(30)  # hold the claim (stay alive) until every process has tried


def test_processes_racing_for_one_run_dir_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 4
    start, done, results = ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(tmp_path), start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    done.set()
    for p in procs:
        p.join(30)
    assert outcomes.count("won") == 1, outcomes
    assert all("is in use by index (pid" in o or "being claimed" in o for o in outcomes if o != "won")
    # the winner was killed (exited without releasing): its claim is stale and the next run takes it over
    owner = json.loads((tmp_path / CLAIM_FILE).read_text())
    assert owner["host"] == HOST and owner["pid"] in {p.pid for p in procs}
    claim = claim_run_dir(tmp_path, app="index")
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["pid"] == os.getpid()
    claim.release()
    assert not (tmp_path / CLAIM_FILE).exists()


def test_live_and_foreign_claims_are_refused_dead_ones_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / CLAIM_FILE).write_text(json.dumps({"app": "train", "host": HOST, "pid": live.pid}))
        with pytest.raises(RunDirError, match=rf"in use by train \(pid {live.pid} on {HOST}\); start a new run"):
            claim_run_dir(tmp_path)
    finally:
        live.kill()
        live.wait()
    (tmp_path / CLAIM_FILE).write_text(json.dumps({"app": "train", "host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match=rf"if no run uses it any more, delete .*{CLAIM_FILE}"):
        claim_run_dir(tmp_path)
    (tmp_path / CLAIM_FILE).write_text(json.dumps({"app": "train", "host": HOST, "pid": _dead_pid()}))
    claim_run_dir(tmp_path).release()  # a killed run's claim is taken over
    (tmp_path / CLAIM_FILE).write_text("")  # killed between create and write: young means being written
    with pytest.raises(RunDirError, match="being claimed"):
        claim_run_dir(tmp_path)
    os.utime(tmp_path / CLAIM_FILE, (0, 0))  # ... old means abandoned
    claim_run_dir(tmp_path).release()


def test_apps_release_their_claim_and_refusals_leave_nothing(tmp_path):
    from omegaconf import OmegaConf

    seen = []

    @task_wrapper
    def task(cfg):
        seen.append(json.loads((tmp_path / CLAIM_FILE).read_text())["app"])
        return 1

    cfg = OmegaConf.create({"task_name": "index", "paths": {"output_dir": str(tmp_path)}, "extras": None})
    assert task(cfg) == 1 and task(cfg) == 1  # sequential runs: each claims, and releases at the end
    assert seen == ["index", "index"] and not (tmp_path / CLAIM_FILE).exists()
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError) as refused:
        task(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert "ckpt_path" not in str(refused.value) and "index_dir=" in str(refused.value)


@pytest.mark.parametrize(
    ("app", "advice"),
    [("train", "ckpt_path=<run dir>/checkpoints/last.ckpt"), ("index", "index_dir="), ("recommend", "start a new run")],
)
def test_refusal_advice_fits_the_app(tmp_path, app, advice):
    """Fails on old main: every app was told to resume with ckpt_path=..., which fashion-index cannot."""
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(RunDirError) as refused:
        claim_run_dir(tmp_path, app=app)
    message = str(refused.value)
    assert advice in message and "\n" not in message
    assert ("ckpt_path" in message) == (app == "train")


def test_a_rerun_removes_dead_writers_temps_only(tmp_path):
    """Fails on old main: a killed build's .tmp-* files stayed forever (their names did not say whose)."""
    dead, live = _dead_pid(), os.getpid()
    leftovers = [
        tmp_path / f"{TMP_PREFIX}items.csv.{HOST}-{dead}.k2j3h4g5.csv",
        tmp_path / f"{TMP_PREFIX}parts.npz.{HOST}-{dead}.abc_123.npz",
    ]
    kept = [
        tmp_path / f"{TMP_PREFIX}vectors.faiss.{HOST}-{live}.x1y2z3.faiss",  # a live writer's (ours)
        tmp_path / f"{TMP_PREFIX}vectors.faiss.otherhost-{dead}.x1y2z3.faiss",  # another machine's
        tmp_path / f"{TMP_PREFIX}items.csv.abcdefgh.csv",  # old-style name: whose is unknown
        tmp_path / "notes.tmp-items.csv",  # the user's
        tmp_path / f"my{TMP_PREFIX}items.csv.{HOST}-{dead}.aaaa.csv",
    ]
    for path in leftovers + kept:
        path.write_text("x")
    atomic_write_text(tmp_path / "manifest.json", "{}")  # the rerun's first write into the folder sweeps it
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in kept)
    assert remove_dead_temps(tmp_path) == []


def test_temp_names_carry_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "vectors.faiss") as tmp:
        assert tmp.name.startswith(f"{TMP_PREFIX}vectors.faiss.{HOST}-{os.getpid()}.") and tmp.suffix == ".faiss"
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]


def test_killed_index_build_leaves_temps_that_the_rerun_removes(tmp_path):
    """End to end: a build process killed mid-write leaves a temp; the rerun's index folder is clean."""
    import numpy as np
    import pandas as pd

    from fashion_lightning.retrieval import build_index, load_index

    code = (
        "import os, sys\n"
        "from fashion_lightning.utils.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    index = tmp_path / "idx"
    proc = subprocess.run([sys.executable, "-c", code, str(index / "items.csv")], check=False)
    assert proc.returncode == -9
    assert [p.name.startswith(f"{TMP_PREFIX}items.csv.{HOST}-") for p in index.iterdir()] == [True]
    vectors = np.eye(4, dtype=np.float32)
    meta = pd.DataFrame({"id": np.arange(4), "name": list("abcd")})
    build_index(vectors, meta, index, {"checkpoint": None, "embedding_name": "x", "module_class": "None"})
    assert sorted(p.name for p in index.iterdir()) == ["items.csv", "manifest.json", "vectors.faiss"]
    assert load_index(index).n == 4


def test_dead_writers_scratch_folders_and_spills_are_removed_by_the_rerun(tmp_path):
    """A killed fashion-index left its scratch model copy (a folder) and the IVF float spill: the rerun removes
    both, while a live writer's scratch folder and the user's folders stay."""
    import numpy as np
    import pandas as pd

    from fashion_lightning.retrieval import IndexParams, build_index, load_index
    from fashion_lightning.utils.atomic import temp_prefix

    dead = _dead_pid()
    scratch = tmp_path / f"{TMP_PREFIX}model.{HOST}-{dead}.ab12cd34"
    (scratch / "model").mkdir(parents=True)
    (scratch / "model" / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f"{temp_prefix('model')}zz99"
    live.mkdir()
    mine = tmp_path / "my-notes"
    mine.mkdir()
    spill = tmp_path / ".vectors.f32.partial"
    spill.write_bytes(b"\0" * 4096)
    assert remove_dead_temps(tmp_path) == [scratch]
    assert live.exists() and mine.exists()
    vectors = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    meta = pd.DataFrame({"id": np.arange(300, dtype=np.int64), "articleType": ["Shirts"] * 300})
    build_index(vectors, meta, tmp_path, {"checkpoint": None}, params=IndexParams("flat"))
    assert not spill.exists()
    assert load_index(tmp_path).n == 300
