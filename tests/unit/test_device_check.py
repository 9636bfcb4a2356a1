"""The device check end to end in its CPU smoke mode (synthetic catalog), and the bundle's size check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_smoke_writes_one_results_table(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "FASHION_LIGHTNING_CACHE": str(cache_dir)}
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    stages = {s["stage"]: s for s in result["stages"]}
    assert {"kaggle_gpu", "kaggle_gpu_switches", "bench_train", "clip_gpu"} <= set(stages)
    for name in ("kaggle_gpu", "kaggle_gpu_switches", "clip_gpu"):
        assert stages[name]["status"] == "rc=0", (name, (out / "logs.txt").read_text()[-3000:])
        assert "test/acc/articleType" in stages[name]["metrics"]
    assert "test/kagl/text_to_image/r@10" in stages["clip_gpu"]["metrics"]
    assert result["bench"] and result["bench"][0]["fashion_train_img_s"] > 0
    table = (out / "results.md").read_text()
    assert "| kaggle_gpu | rc=0 |" in table and "loader alone" in table
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # what a device run may send back


def test_pack_bundle_smoke_checks_the_tree_size() -> None:
    proc = subprocess.run([sys.executable, "scripts/pack_device_bundle.py", "--smoke", "--out", "/nonexistent-bundle"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert 0 < report["working tree"] < 64 and report["limit MiB"] == 64
