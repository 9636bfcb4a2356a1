"""System vs user CPU time of fashion-train and fashion-index, with and without glibc keeping freed memory.

Each app runs as its own process under ``/usr/bin/time -v`` twice: ``FASHION_LIGHTNING_MALLOC=default``
(glibc's defaults: big tensors mmap'ed and munmap'ed every batch) and the shipped setting
(``utils/malloc.py``). Reports user / system seconds, sys/user, minor page faults, peak RSS, wall.
Goal: system <= 10% of user for both apps.

    python scripts/bench_memory.py --root ../shared/data/fashion-product-images-small-dev.zip --max-items 400
    python scripts/bench_memory.py            # synthetic catalog (tiny model: little churn to see)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FIELDS = {
    "user_s": r"User time \(seconds\): ([\d.]+)",
    "sys_s": r"System time \(seconds\): ([\d.]+)",
    "minor_faults": r"Minor \(reclaiming a frame\) page faults: (\d+)",
    "max_rss_mb": r"Maximum resident set size \(kbytes\): (\d+)",
    "wall": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)",
}


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` under /usr/bin/time -v; parse its report (raises with the tail of stderr on failure)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, float] = {}
    for key, pattern in FIELDS.items():
        value = re.search(pattern, proc.stderr).group(1)
        if key == "wall":
            parts = [float(p) for p in value.split(":")]
            out[key] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
        else:
            out[key] = float(value) / (1024 if key == "max_rss_mb" else 1)
    out["sys_per_user"] = out["sys_s"] / max(out["user_s"], 1e-9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="Kaggle folder/zip (default: synthetic catalog)")
    parser.add_argument("--max-items", type=int, default=400)
    parser.add_argument("--experiment", default="clip_offline_finetune", help="the recipe fashion-train runs (1 epoch)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    data = [f"data.max_items={args.max_items}", f"data.eval_batch_size={args.eval_batch_size}", "data.num_workers=0"]
    data += [f"data.root={args.root}"] if args.root else []
    rows = []
    for setting in ("default", "keep"):
        env = {**os.environ, "FASHION_LIGHTNING_MALLOC": setting}
        run = work / f"train_{setting}"
        train = [str(bin_dir / "fashion-train"), f"experiment={args.experiment}", *data, "trainer.max_epochs=1",
                 "logger=csv", "callbacks.rich_progress_bar=null", "callbacks.evaluation.plot_every_n_val_epochs=0",
                 f"hydra.run.dir={run}"]  # fmt: skip
        if not args.root:
            train = [a for a in train if not a.startswith("experiment=")] + ["experiment=demo"]
        rows.append({"app": "fashion-train", "malloc": setting, **timed(train, env)})
        ckpt = next(run.glob("checkpoints/*.ckpt"))
        index = [
            str(bin_dir / "fashion-index"),
            f"ckpt_path={ckpt}",
            *data,
            f"hydra.run.dir={work / f'index_{setting}'}",
        ]
        rows.append({"app": "fashion-index", "malloc": setting, **timed(index, env)})

    print("| app | malloc | user s | sys s | sys/user | minor faults | peak RSS MB | wall s |\n" + "|---" * 8 + "|")
    for r in rows:
        print(f"| {r['app']} | {r['malloc']} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['sys_per_user']:.2f} | "
              f"{int(r['minor_faults']):,} | {r['max_rss_mb']:.0f} | {r['wall']:.1f} |")  # fmt: skip
    for app in ("fashion-train", "fashion-index"):
        keep = next(r for r in rows if r["app"] == app and r["malloc"] == "keep")
        print(f"{app}: sys/user {keep['sys_per_user']:.2f} (goal <= 0.10)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
