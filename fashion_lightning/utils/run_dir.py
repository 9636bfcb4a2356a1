"""One run per run dir, and resume that continues where it stopped.

Two runs writing into one folder mix their vocab.json, splits.csv and metrics.json with the
other's checkpoints (different label spaces side by side). :func:`claim_run_dir` refuses a run
dir that already holds another run's artefacts, unless the run resumes from a checkpoint inside it.

Resuming continues in the checkpoint's own run dir (:func:`run_dir_of`), so Lightning's
ModelCheckpoint keeps its best-model tracking (it resets it when the dir changes); see
:mod:`fashion_lightning.utils.epoch_seed` for why the resumed run then equals the uninterrupted one.
Imports nothing heavy: every app's task wrapper calls :func:`claim_run_dir`.
"""

from __future__ import annotations

from pathlib import Path

from fashion_lightning.utils.config_check import ConfigError

# what a train / eval / eda run leaves in its run dir (Hydra's own .hydra/ and <task>.log are not artefacts)
ARTEFACTS = ("metrics.json", "vocab.json", "splits.csv", "data_report.json", "checkpoints")
CHECKPOINT_DIR = "checkpoints"


class RunDirError(ConfigError):
    """The run dir already holds another run's artefacts."""


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """The run dir a checkpoint was written into (``<run>/checkpoints/x.ckpt`` beside vocab.json), else None."""
    ckpt = Path(ckpt_path).expanduser().resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name == CHECKPOINT_DIR and ((run / "vocab.json").exists() or (run / ".hydra").is_dir()):
        return run
    return None


def claim_run_dir(output_dir: str | Path, resume_from: str | Path | None = None) -> None:
    """Refuse to start in ``output_dir`` when it holds another run's artefacts.

    Allowed: an empty or fresh Hydra run dir, or resuming from a checkpoint that lives inside it.
    """
    out = Path(output_dir).expanduser().resolve()
    found = [name for name in ARTEFACTS if (out / name).exists()]
    if not found:
        return
    if resume_from is not None and out in Path(resume_from).expanduser().resolve().parents:
        return
    raise RunDirError(
        f"run dir {out} already holds another run's artefacts ({', '.join(found)}); use a new run dir "
        "(the default hydra.run.dir gives each run its own), or resume from a checkpoint inside it with ckpt_path=..."
    )
