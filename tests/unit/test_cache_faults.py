"""One bad image never sinks a build; a killed build leaves no workers and no lasting debris (issue 8, items 4, 8)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from fashion_lightning.data.catalog import load_catalog
from fashion_lightning.data.image_cache import BUILDING_PREFIX, attach_images, build_image_cache, remove_stale_builds
from fashion_lightning.data.images import CORRUPT, TOO_LARGE, ImageDecodeError, open_image

BOMB, BAD_CRC, GOOD = 7001, 7002, 7003


def png(size_wh: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size_wh, 255).save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bomb_is_an_image_decode_error(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120x100 is then over 2x the limit
    with pytest.raises(ImageDecodeError, match="too large") as info:
        open_image(png((120, 100)))
    assert info.value.reason == TOO_LARGE
    with pytest.raises(ImageDecodeError) as info:
        open_image(b"GIF89a broken")
    assert info.value.reason == CORRUPT


def _bad_zip_catalog(tmp_path: Path, kit) -> Path:
    """A zip catalog with one over-limit PNG and one member whose bytes no longer match its CRC."""
    rows = [f"{i},Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Item {i}" for i in (BOMB, BAD_CRC, GOOD)]
    folder = kit.write(tmp_path / "cat", kit.header + "\n" + "\n".join(rows) + "\n",
                       {BAD_CRC: kit.jpeg(seed=2), GOOD: kit.jpeg(seed=3)})  # fmt: skip
    (folder / "images" / f"{BOMB}.png").write_bytes(png((120, 100)))
    archive = kit.zip(folder, tmp_path / "cat.zip")
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(f"images/{BAD_CRC}.jpg")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 500] ^= 0xFF  # flip one byte inside the stored JPEG: "Bad CRC-32"
    archive.write_bytes(bytes(data))
    return archive


def test_bomb_and_bad_crc_are_dropped_and_counted_by_reason(tmp_path: Path, kit, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    catalog = load_catalog(_bad_zip_catalog(tmp_path, kit))
    with pytest.raises(zipfile.BadZipFile):  # what used to abort the build
        catalog.source.image_bytes(BAD_CRC)
    cache = build_image_cache(catalog.source, tmp_path / "cache", num_workers=1)
    attached = attach_images(catalog, cache)
    assert attached.frame["id"].tolist() == [GOOD]
    report = attached.report.to_dict()
    assert report["dropped"][TOO_LARGE] == 1 and report["dropped_ids"][TOO_LARGE] == [BOMB]
    reason = "unreadable_image_file (bad zip member or read error)"
    assert report["dropped"][reason] == 1 and report["dropped_ids"][reason] == [BAD_CRC]
    assert "Bad CRC" in cache.failures[BAD_CRC]
    attached.report.save(tmp_path / "data_report.json")
    assert json.loads((tmp_path / "data_report.json").read_text())["dropped"][TOO_LARGE] == 1


def test_stale_build_folders_are_removed_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    def folder(name: str, pid: int | None, age_s: float = 0) -> Path:
        path = root / f"{BUILDING_PREFIX}{name}"
        path.mkdir()
        if pid is not None:
            (path / "owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        stamp = time.time() - age_s
        for p in (*path.iterdir(), path):
            os.utime(p, (stamp, stamp))
        return path

    killed = folder("killed", int(dead.stdout))
    live = folder("live", os.getpid())
    old = folder("old", None, age_s=7200)
    young = folder("young", None)
    removed = remove_stale_builds(root, timeout_s=3600)
    assert set(removed) == {killed, old} and live.exists() and young.exists()


SCRIPT = """
import os, sys, time
from pathlib import Path
import fashion_lightning.data.image_cache as ic
from fashion_lightning.data.source import CatalogSource
ic._CHUNK = 4
real = ic.to_native
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
ic.to_native = slow
ic.build_image_cache(CatalogSource(sys.argv[1]), sys.argv[2], num_workers=2)
"""


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_killed_build_leaves_no_workers_and_the_next_build_cleans_up(tmp_path: Path, synthetic_root: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), str(synthetic_root), str(cache)])
    deadline = time.time() + 60
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = _children(proc.pid) if proc.poll() is None else set()
    assert len(workers) >= 2, "the build never started its decode workers"
    assert list((cache / "images").glob(f"{BUILDING_PREFIX}*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "decode workers outlived their parent"
    building = list((cache / "images").glob(f"{BUILDING_PREFIX}*"))
    assert building  # what the kill left behind
    from fashion_lightning.data.source import CatalogSource

    built = build_image_cache(CatalogSource(synthetic_root), cache, num_workers=1)
    assert built.path.exists() and not list((cache / "images").glob(f"{BUILDING_PREFIX}*"))
