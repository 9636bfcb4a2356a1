"""What every app does around its task, as lightning-hydra-template's ``task_wrapper`` and ``extras``.

``@task_wrapper`` on an app's task function ``f(cfg)``:

* checks the config first (:func:`~fashion_lightning.utils.config_check.check_config`: missing
  values, wrong types), so a bad command line fails before anything is written or loaded;
* applies the process-wide settings of ``cfg.runtime`` once (:func:`~fashion_lightning.utils.runtime.apply_runtime`:
  allocator, matmul precision, threads, warning filters);
* then runs :func:`extras`: the resolved config tree saved as ``config_tree.txt`` in the run dir
  (and printed with rich), tags enforced, warnings silenced on request;
* on failure, logs the exception and the run dir, and writes ``FAILED.txt`` (exception + traceback)
  into the run dir, so a failed job of a sweep is visible without reading its log; then re-raises;
* always closes a W&B run that is still open (``wandb.finish()``): without it, every job of
  ``-m ... logger=wandb`` would log into the first job's run.

The config group ``extras`` (``conf/extras/``) switches the parts on and off.
"""

from __future__ import annotations

import functools
import io
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from lightning_utilities.core.rank_zero import rank_zero_only  # lightning sets .rank; light to import
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from fashion_lightning.utils.atomic import atomic_write_text
from fashion_lightning.utils.cluster import env_rank
from fashion_lightning.utils.config_check import check_config
from fashion_lightning.utils.run_dir import claim_run_dir
from fashion_lightning.utils.runtime import apply_runtime

log = logging.getLogger("fashion_lightning")

FAILURE_MARKER = "FAILED.txt"
CONFIG_TREE = "config_tree.txt"
#: top-level nodes printed first (the rest follow in config order)
PRINT_ORDER: tuple[str, ...] = ("data", "model", "callbacks", "logger", "trainer", "paths", "extras")

R = TypeVar("R")


def _output_dir(cfg: DictConfig) -> Path | None:
    try:
        out = cfg.paths.output_dir
    except Exception:  # no paths node, or not inside a Hydra run: nowhere to write
        return None
    return Path(out) if out else None


def _rank() -> int:
    """This process's global rank: Lightning's once it is imported, else the launcher's environment
    (RANK, LOCAL_RANK, SLURM_PROCID: an srun task > 0 neither claims nor writes the shared run dir)."""
    rank = getattr(rank_zero_only, "rank", None)
    return int(rank) if rank is not None else env_rank()


def _rank_suffix() -> str:
    rank = _rank()
    return "" if rank == 0 else f".rank{rank}"


def task_wrapper(task: Callable[..., R]) -> Callable[..., R]:
    """Wrap an app's task ``task(cfg, ...)``: extras before, failure marker + log on error, W&B closed after."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig, *args: Any, **kwargs: Any) -> R:
        check_config(cfg)  # before the try: a config error has no run to mark as failed
        if cfg.get("runtime") is not None:  # process-wide settings: here, once, for every app
            apply_runtime(cfg.runtime)
        out = _output_dir(cfg)
        claim = None
        if out is not None and _rank() == 0:  # nor a run dir another run holds: nothing is written into it
            claim = claim_run_dir(out, cfg.get("ckpt_path"), app=cfg.get("task_name"))  # DDP ranks > 0 share it
        try:
            extras(cfg)
            return task(cfg, *args, **kwargs)
        except BaseException as err:
            if isinstance(err, SystemExit) and not err.code:
                raise
            out = _output_dir(cfg)
            log.error("%s failed: %s: %s (run dir: %s)", task.__name__, type(err).__name__, err, out)
            if out is not None:
                _write_failure(out, task.__name__, err)
            raise
        finally:
            close_loggers()
            if claim is not None:
                claim.release()

    return wrapped


def _write_failure(out: Path, name: str, err: BaseException) -> None:
    text = (
        f"{name} failed at {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S UTC}\n"
        f"{type(err).__name__}: {err}\n\n" + "".join(traceback.format_exception(err))
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{Path(FAILURE_MARKER).stem}{_rank_suffix()}.txt", text)
    except OSError as write_err:  # the run dir itself may be the problem; the log line above still says it
        log.warning("could not write the failure marker into %s: %s", out, write_err)


def close_loggers() -> None:
    """Finish an open W&B run (only if wandb was imported: importing it here would cost seconds)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.info("closing the W&B run")
        wandb.finish()


def extras(cfg: DictConfig) -> None:
    """Apply ``cfg.extras``: ``ignore_warnings``, ``enforce_tags``, ``print_config``/``save_config``."""
    opts = cfg.get("extras")
    if not opts:
        return
    if opts.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if opts.get("enforce_tags"):
        enforce_tags(cfg)
    if opts.get("print_config") or opts.get("save_config"):
        print_config_tree(cfg, print_it=bool(opts.get("print_config")), save=bool(opts.get("save_config")))


def enforce_tags(cfg: DictConfig) -> None:
    """Every run carries tags (they name W&B runs and sweep rows). Non-interactive, unlike the template's
    prompt: a multirun without tags is refused; a single run gets ``[<task_name>]`` (logged)."""
    tags = cfg.get("tags")
    if tags:
        if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}; e.g. tags=[baseline,resnet18]")
        return
    if _is_multirun():
        raise ValueError("a multirun needs tags: add e.g. 'tags=[lr_sweep]' to the command line")
    default = [str(cfg.get("task_name") or "run")]
    log.info("no tags given: tagging this run %s (set e.g. tags=[baseline])", default)
    with open_dict(cfg):
        cfg.tags = default


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def config_tree(cfg: DictConfig, order: Sequence[str] = PRINT_ORDER) -> Tree:
    """The config as a rich tree, one branch per top-level node, resolved where it can be."""
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for name in fields:
        branch = tree.add(str(name), style="dim", guide_style="dim")
        text = _branch_text(cfg, str(name))
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    return tree


def _branch_text(cfg: DictConfig, name: str) -> str:
    """One node as resolved YAML; unresolved where it cannot be resolved yet (the app reports that itself)."""
    try:
        value = cfg[name]
    except Exception:  # a mandatory value (???) or a broken interpolation
        return str(cfg._get_node(name))
    if not isinstance(value, (DictConfig, ListConfig)):
        return str(value)
    try:
        return OmegaConf.to_yaml(value, resolve=True)
    except Exception:
        return OmegaConf.to_yaml(value, resolve=False)


def print_config_tree(cfg: DictConfig, print_it: bool = True, save: bool = True) -> Path | None:
    """Print the resolved config tree with rich and save it as ``config_tree.txt`` in the run dir (rank 0)."""
    if _rank() != 0:
        return None
    tree = config_tree(cfg)
    if print_it:
        Console().print(tree)
    out = _output_dir(cfg)
    if not save or out is None:
        return None
    recorder = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    recorder.print(tree)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / CONFIG_TREE, recorder.export_text())
