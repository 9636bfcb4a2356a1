"""Where this process runs on a cluster: its rank, its job, and a run-dir name every rank agrees on.

Under ``srun`` (SLURM) and ``torchrun`` each rank starts the Hydra app itself. With the default
``${now:...}`` run dir every rank would then stamp its own folder (the microseconds differ): one run,
N folders, and checkpoints in only one of them. The ``fl.run_name`` resolver gives all ranks of one
launch the same name, derived from what the launcher hands every rank (SLURM's job and step id,
torchrun's rendezvous id), and the ``fl.rank_zero`` / ``fl.rank_suffix`` resolvers keep ranks > 0 from
writing Hydra's ``.hydra/`` and the rank-0 log (as Lightning's own DDP launcher does with
``hydra.output_subdir=null``). Jobs of a multirun (submitit, Ray) already share their sweep subdir.

:func:`job_record` is what a run's ``metrics.json`` (and so the sweep summary) says about the job that
ran it: the launcher, the cluster's job id, host and pid. Imports nothing heavy (the package's
``__init__`` registers the resolvers).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import OmegaConf

#: Lightning's order (``lightning.fabric.utilities.rank_zero._get_rank``): SLURM_PROCID is set in any
#: srun task, also when SLURM does not manage the processes, so the launchers' own variables come first
RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
#: job names Lightning treats as an interactive SLURM shell (it then does not use SLURM's ranks)
SLURM_INTERACTIVE = ("bash", "interactive")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def env_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as its launcher's environment says (0 when none does)."""
    env = os.environ if env is None else env
    for key in RANK_KEYS:
        value = env.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def _slurm_ranks(env: Mapping[str, str]) -> bool:
    """Several srun tasks of one step that Lightning's SLURMEnvironment will wire into one DDP run."""
    return (
        "SLURM_JOB_ID" in env
        and _int(env.get("SLURM_NTASKS")) > 1
        and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE
    )


def _int(value: str | None) -> int:
    return int(value) if value is not None and value.strip().isdigit() else 0


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)[:64]


def shared_run_name(default: str, env: Mapping[str, str] | None = None) -> str:
    """``${fl.run_name:${now:...}}``: ``default`` (the timestamp), unless this process is one of several
    ranks that srun or torchrun started; then a name all of them compute alike:

    * srun: ``slurm-<job id>.<step id>`` (a requeued job keeps its id, so it finds its folder again);
    * torchrun: ``torchrun-<rendezvous id>`` (``--standalone`` makes one up; give ``--rdzv-id`` across
      nodes), else, on one node, ``torchrun-<host>-<agent pid>`` (the agent is every worker's parent).
    """
    env = os.environ if env is None else env
    if _slurm_ranks(env):
        step = env.get("SLURM_STEP_ID")
        return _safe(f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step else ""))
    if "TORCHELASTIC_RUN_ID" in env and _int(env.get("WORLD_SIZE")) > 1:
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id and run_id != "none":
            return _safe(f"torchrun-{run_id}")
        return _safe(f"torchrun-{socket.gethostname()}-{os.getppid()}")
    return default


def slurm_incarnation(env: Mapping[str, str] | None = None) -> str | None:
    """``<job>.<step>#<restarts>`` inside a SLURM job, else None. A requeued job keeps its id (and so its
    run dir) and counts ``SLURM_RESTART_COUNT`` up: a claim from the same job and step with another
    count was left by this job's earlier, dead run (SLURM runs one job id in one place at a time)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{job}.{env.get('SLURM_STEP_ID', '')}#{env.get('SLURM_RESTART_COUNT') or 0}"


def earlier_incarnation(owner: Any, env: Mapping[str, str] | None = None) -> bool:
    """Whether a claim's ``slurm`` record is this SLURM job's and step's, from before a requeue."""
    mine = slurm_incarnation(env)
    if not isinstance(owner, str) or mine is None or owner == mine:
        return False
    return owner.split("#", 1)[0] == mine.split("#", 1)[0]


def rank_zero(value: Any) -> Any:
    """``${fl.rank_zero:.hydra}``: the value on rank 0, None on other ranks (``hydra.output_subdir``)."""
    return value if env_rank() == 0 else None


def rank_suffix() -> str:
    """``${fl.rank_suffix:}``: "" on rank 0, ``.rank<N>`` elsewhere (per-rank log file names)."""
    rank = env_rank()
    return "" if rank == 0 else f".rank{rank}"


def gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """``${fl.gpus_per_node:${trainer.accelerator},${trainer.devices}}``: GPUs a launcher asks for per
    node: the trainer's device count unless it trains on the CPU (then none: None leaves it out)."""
    if str(accelerator).lower() == "cpu":
        return None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    raise ValueError(
        f"trainer.devices={devices!r}: a cluster launcher needs a device count per node; "
        "set trainer.devices=N or hydra.launcher.gpus_per_node=N"
    )


def job_record(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``job/*`` entries for a run's metrics.json: which launcher ran it, the cluster's job id, where."""
    env = os.environ if env is None else env
    record: dict[str, Any] = {"job/host": socket.gethostname(), "job/pid": os.getpid()}
    if "SLURM_JOB_ID" in env:
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        record["job/launcher"] = "slurm"
        record["job/id"] = f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
    elif "SUBMITIT_LOCAL_JOB_ID" in env:
        record["job/launcher"] = "submitit_local"
        record["job/id"] = env["SUBMITIT_LOCAL_JOB_ID"]
    elif "TORCHELASTIC_RUN_ID" in env:
        record["job/launcher"] = "torchrun"
        record["job/id"] = env["TORCHELASTIC_RUN_ID"]
    elif (ray_job := _ray_job()) is not None:
        record["job/launcher"] = "ray"
        record["job/id"] = ray_job
    else:
        record["job/launcher"] = "local"
    world = _int(env.get("SLURM_NTASKS")) or _int(env.get("WORLD_SIZE"))
    if world > 1:
        record["job/world_size"] = world
    return record


def _ray_job() -> str | None:
    """The Ray task id when this process is a Ray worker (the ray launcher's jobs are Ray tasks)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray here: only a process Ray started has it loaded
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        task = context.get_task_id()
        return str(task or context.get_job_id())
    except Exception:  # a driver, not a worker, or an older Ray: no task to name
        return None


def register_resolvers() -> None:
    """Register the ``fl.*`` resolvers above (idempotent; never cached: a
    multirun job's config is resolved again in the job's own process, with that process's rank)."""
    resolvers: dict[str, Callable[..., Any]] = {
        "fl.run_name": shared_run_name,
        "fl.rank_zero": rank_zero,
        "fl.rank_suffix": rank_suffix,
        "fl.gpus_per_node": gpus_per_node,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
