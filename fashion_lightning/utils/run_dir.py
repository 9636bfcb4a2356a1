"""One run per run dir, and resume that continues where it stopped.

Two runs writing into one folder mix their vocab.json, splits.csv and metrics.json with the
other's checkpoints (different label spaces side by side). :func:`claim_run_dir` refuses a run
dir that already holds another run's artefacts, unless the run resumes from a checkpoint inside it.

The claim itself is a file created exclusively (``O_CREAT | O_EXCL``), so of two runs started at the
same instant in one folder exactly one gets it; the other is refused, naming the owner. A claim whose
owner died (``kill -9``: same host, pid gone) is taken over, under a lock on the folder so that two
runs doing that at once still end with one owner. The app releases its claim when it ends.

Resuming continues in the checkpoint's own run dir (:func:`run_dir_of`), so Lightning's
ModelCheckpoint keeps its best-model tracking (it resets it when the dir changes); see
:mod:`fashion_lightning.callbacks.epoch_seed` for why the resumed run then equals the uninterrupted one.
Imports nothing heavy: every app's task wrapper calls :func:`claim_run_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fashion_lightning.utils.atomic import HOST, pid_alive
from fashion_lightning.utils.cluster import earlier_incarnation, slurm_incarnation
from fashion_lightning.utils.config_check import ConfigError

# what a train / eval / eda run leaves in its run dir (Hydra's own .hydra/ and <task>.log are not artefacts)
ARTEFACTS = ("metrics.json", "vocab.json", "splits.csv", "data_report.json", "checkpoints")
CHECKPOINT_DIR = "checkpoints"
CLAIM_FILE = ".run-claim.json"
CLAIM_WRITE_GRACE_S = 10.0  # an unreadable claim younger than this is still being written: its owner lives
_CLAIM_TRIES = 3

#: what to do instead, by app (``task_name``): only fashion-train resumes from a checkpoint
NEW_RUN = "start a new run (leave hydra.run.dir at its default: each run gets its own folder)"
HINTS = {
    "train": f"{NEW_RUN}, or resume from a checkpoint inside it with ckpt_path=<run dir>/checkpoints/last.ckpt",
    "eval": f"{NEW_RUN}, or evaluate a checkpoint inside it (ckpt_path=<run dir>/checkpoints/<name>.ckpt)",
    "index": f"{NEW_RUN}; the index folder itself goes to <run dir>/index, or wherever index_dir=... names",
}


class RunDirError(ConfigError):
    """The run dir already holds another run's artefacts, or another run is using it."""


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """The run dir a checkpoint was written into (``<run>/checkpoints/x.ckpt`` beside vocab.json), else None."""
    ckpt = Path(ckpt_path).expanduser().resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name == CHECKPOINT_DIR and ((run / "vocab.json").exists() or (run / ".hydra").is_dir()):
        return run
    return None


@dataclass
class RunClaim:
    """This process's claim on a run dir; :meth:`release` removes it (only if it is still ours)."""

    path: Path
    token: str

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if _read_claim(self.path)[0].get("token") == self.token:
                self.path.unlink()


def claim_run_dir(output_dir: str | Path, resume_from: str | Path | None = None, app: str | None = None) -> RunClaim:
    """Claim ``output_dir`` for this run, refusing it when another live run holds it or it holds another
    run's artefacts (allowed: an empty or fresh Hydra run dir, or resuming from a checkpoint inside it).

    ``app`` (the config's ``task_name``) picks the advice in the refusal. Nothing is left in the folder
    when it is refused.
    """
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    claim = _acquire(out, app)
    found = [name for name in ARTEFACTS if (out / name).exists()]
    if not found or (resume_from is not None and out in Path(resume_from).expanduser().resolve().parents):
        return claim
    claim.release()
    raise RunDirError(
        f"run dir {out} already holds another run's artefacts ({', '.join(found)}); {HINTS.get(app or '', NEW_RUN)}"
    )


def _acquire(out: Path, app: str | None) -> RunClaim:
    path = out / CLAIM_FILE
    token = uuid.uuid4().hex
    record = {
        "app": app,
        "host": HOST,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "token": token,
        "slurm": slurm_incarnation(),  # a requeued job takes over its own earlier claim (even from another node)
    }
    for _ in range(_CLAIM_TRIES):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner, raw = _read_claim(path)
            if raw is None:  # released between our open and read: try again
                continue
            if _owner_alive(owner, path):
                raise RunDirError(_in_use(out, owner)) from None
            _remove_stale(out, path, raw)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record))
            fh.flush()
            os.fsync(fh.fileno())
        return RunClaim(path, token)
    raise RunDirError(f"run dir {out}: another run keeps claiming it; {NEW_RUN}")


def _read_claim(path: Path) -> tuple[dict[str, Any], bytes | None]:
    """The claim's record ({} if unreadable) and raw bytes (None if the file is gone)."""
    try:
        raw = path.read_bytes()[:4096]
    except FileNotFoundError:
        return {}, None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}, raw
    return (record if isinstance(record, dict) else {}), raw


def _owner_alive(owner: dict[str, Any], path: Path) -> bool:
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):  # half-written, or not ours: judge by age
        try:
            return time.time() - path.stat().st_mtime < CLAIM_WRITE_GRACE_S
        except FileNotFoundError:
            return False
    if earlier_incarnation(owner.get("slurm")):
        return False
    if host != HOST:
        return True  # another machine's process: cannot tell, so it is in use
    if pid == os.getpid():  # this process: in use while the claiming thread is another live thread
        thread = owner.get("thread")
        return thread != threading.get_ident() and thread in {t.ident for t in threading.enumerate()}
    return pid_alive(pid)


def _remove_stale(out: Path, path: Path, raw: bytes) -> None:
    """Remove a dead owner's claim, if it is still the one we judged (under a lock on the folder)."""
    with _folder_lock(out), contextlib.suppress(FileNotFoundError):
        if path.read_bytes()[:4096] == raw:
            path.unlink()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder (the kernel drops it if we die); a no-op where there is none."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _in_use(out: Path, owner: dict[str, Any]) -> str:
    if not owner:
        return f"run dir {out} is being claimed by another run right now; {NEW_RUN}"
    app, pid, host = (str(owner.get(k) or "")[:40] for k in ("app", "pid", "host"))
    who = f"{app or 'another run'} (pid {pid} on {host}"
    since = f", since {str(owner['started'])[:40]})" if isinstance(owner.get("started"), str) else ")"
    remote = f"; if no run uses it any more, delete {out / CLAIM_FILE}" if owner.get("host") != HOST else ""
    return f"run dir {out} is in use by {who}{since}; {NEW_RUN}{remote}"
