"""One results table (Markdown + JSON) from a device check's stages, run folders and benchmark rows.

python scripts/device_results.py --stages OUT/stages.jsonl --bench OUT/bench.jsonl --out OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

TASKS = ("articleType", "baseColour", "gender", "masterCategory", "season", "subCategory")
CLIP_KEYS = ("kagl/text_to_image/r@1", "kagl/text_to_image/r@10", "kagl/text_to_image/mrr",
             "kagl/category/mean/p@1", "kagl/category/mean/p@10")  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def device_name(accelerator: str) -> str:
    if accelerator == "gpu":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu (not visible)"
    return f"cpu ({platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerator", default="gpu")
    args = parser.parse_args()

    stages = read_jsonl(Path(args.stages))
    for stage in stages:  # attach each run's test metrics (metrics.json written by fashion-train)
        metrics_path = Path(stage.get("run_dir", "/nonexistent")) / "metrics.json"
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            stage["metrics"] = {
                k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, (int, float))
            }
    bench = read_jsonl(Path(args.bench))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_name(args.accelerator),
              "stages": stages, "bench": bench}  # fmt: skip
    Path(args.out, "results.json").write_text(json.dumps(result, indent=2))

    lines = [f"# device check: {result['device']}, {result['date']}", "", "## Multi-task recipes (test split)", "",
             "| run | status | " + " | ".join(TASKS) + " | img→img mAP@10 | wall s |",
             "|---" * (len(TASKS) + 4) + "|"]  # fmt: skip
    for s in stages:
        m = s.get("metrics", {})
        if s["stage"].startswith("clip"):
            continue
        cells = [f"{m[f'test/acc/{t}']:.3f}" if f"test/acc/{t}" in m else "–" for t in TASKS]
        mAP = f"{m['test/retrieval/map@10']:.3f}" if "test/retrieval/map@10" in m else "–"
        if s["stage"].startswith("bench"):
            continue
        lines.append(f"| {s['stage']} | {s['status']} | " + " | ".join(cells) + f" | {mAP} | {s.get('wall_s', '–')} |")
    lines += ["", "## CLIP (test split, Marqo KAGL protocol)", "",
              "| run | status | " + " | ".join(CLIP_KEYS) + " | wall s |",
              "|---" * (len(CLIP_KEYS) + 3) + "|"]  # fmt: skip
    for s in stages:
        if not s["stage"].startswith("clip"):
            continue
        m = s.get("metrics", {})
        cells = [f"{m[f'test/{k}']:.3f}" if f"test/{k}" in m else "–" for k in CLIP_KEYS]
        lines.append(f"| {s['stage']} | {s['status']} | " + " | ".join(cells) + f" | {s.get('wall_s', '–')} |")
    lines += ["", "## Training loop (scripts/bench_train.py)", "",
              "| model | loader alone img/s | bare PyTorch loop img/s | fashion-train loop img/s | overhead |",
              "|---|---|---|---|---|"]  # fmt: skip
    for b in bench:
        lines.append(f"| {b['backbone']} @{b['image_size'][0]}×{b['image_size'][1]}, batch {b['batch_size']} | "
                     f"{b['loader_img_s']:,.0f} | {b['bare_img_s']:,.0f} | {b['fashion_train_img_s']:,.0f} | "
                     f"{b['overhead_pct']:+.1f}% |")  # fmt: skip
    Path(args.out, "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
