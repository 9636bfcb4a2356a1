"""Sweeps through cluster launchers and DDP ranks under SLURM / torchrun: one run dir per job, not per rank.

The fast tests check the pieces (rank and job from the environment, the shared run-dir name, the launcher
configs, task_wrapper on a rank > 0). The slow ones run the real thing on this machine: a 2-trial Optuna
sweep through submitit's local executor (both trials at once, as separate processes), a 2-job grid
through Ray in local mode, and a 2-rank DDP fashion-train with the environment srun gives its tasks.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from lightning_utilities.core.rank_zero import rank_zero_only

from fashion_lightning.utils import cluster
from fashion_lightning.utils.run_dir import CLAIM_FILE, claim_run_dir
from fashion_lightning.utils.task_wrapper import CONFIG_TREE, task_wrapper
from hydra_helpers import make_cfg

HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
HAS_RAY = HAS_SUBMITIT and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None
NEEDS_SUBMITIT = pytest.mark.skipif(
    not HAS_SUBMITIT, reason='the [cluster] extra is not installed (pip install -e ".[cluster]")'
)
NEEDS_RAY = pytest.mark.skipif(not HAS_RAY, reason='hydra-ray-launcher is not installed (pip install -e ".[cluster]")')

TINY = [
    "model.net.backbone=test_resnet",
    "model.net.image_size=[40,32]",
    "data.num_items=200",
    "data.num_workers=0",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "fashion-train"}
CLUSTER_ENV = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "JSM_NAMESPACE_RANK")


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's rank/job variables (pytest may run under one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_ENV)}
    return {**env, **extra}


# -- rank, job and run-dir name from the launcher's environment ---------------------------------
@pytest.mark.parametrize(
    ("env", "rank"),
    [({}, 0), ({"SLURM_PROCID": "3"}, 3), ({"LOCAL_RANK": "1", "SLURM_PROCID": "5"}, 1), ({"RANK": "7"}, 7)],
)
def test_rank_from_the_environment_in_lightnings_order(env, rank):
    assert cluster.env_rank(env) == rank


def test_ranks_of_one_srun_step_share_a_run_name_that_names_the_job():
    default = "2026-12-07_10-00-00-000001"
    assert cluster.shared_run_name(default, {**SLURM, "SLURM_PROCID": "0"}) == "slurm-4242.0"
    assert cluster.shared_run_name(default, {**SLURM, "SLURM_PROCID": "1"}) == "slurm-4242.0"
    assert cluster.shared_run_name(default, {**SLURM, "SLURM_STEP_ID": "3"}) == "slurm-4242.3"
    # one task (an sbatch job, a submitit job) or an interactive shell: each launch its own timestamp
    assert cluster.shared_run_name(default, {**SLURM, "SLURM_NTASKS": "1"}) == default
    assert cluster.shared_run_name(default, {**SLURM, "SLURM_JOB_NAME": "interactive"}) == default
    assert cluster.shared_run_name(default, {}) == default


def test_torchrun_ranks_share_a_run_name():
    default = "2026-12-07_10-00-00-000001"
    standalone = {"TORCHELASTIC_RUN_ID": "5f1c/../x", "WORLD_SIZE": "4"}
    assert cluster.shared_run_name(default, standalone) == "torchrun-5f1c_.._x"  # never a path
    no_id = cluster.shared_run_name(default, {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2"})
    assert no_id == f"torchrun-{socket.gethostname()}-{os.getppid()}"[:64]  # the agent: every worker's parent
    assert cluster.shared_run_name(default, {"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "1"}) == default


def test_job_record_names_the_cluster_job():
    array = cluster.job_record({**SLURM, "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"})
    assert array["job/launcher"] == "slurm" and array["job/id"] == "4240_2" and array["job/world_size"] == 2
    assert cluster.job_record({"SUBMITIT_LOCAL_JOB_ID": "999"})["job/id"] == "999"
    plain = cluster.job_record({})
    assert plain == {"job/host": socket.gethostname(), "job/pid": os.getpid(), "job/launcher": "local"}


def test_gpus_per_node_follows_the_trainer():
    assert cluster.gpus_per_node("cpu", 1) is None
    assert cluster.gpus_per_node("gpu", 4) == 4
    assert cluster.gpus_per_node("auto", [0, 1]) == 2
    with pytest.raises(ValueError, match="trainer.devices=N"):
        cluster.gpus_per_node("gpu", "auto")


# -- configs ---------------------------------------------------------------------------------
def _compose(tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_srun_ranks_compose_one_run_dir_and_only_rank_zero_writes_hydra_files(tmp_path, monkeypatch):
    dirs, subdirs = [], []
    for rank in ("0", "1"):
        for key, value in {**SLURM, "SLURM_PROCID": rank}.items():
            monkeypatch.setenv(key, value)
        hydra = _compose(tmp_path, []).hydra
        dirs.append(hydra.run.dir)
        subdirs.append(hydra.output_subdir)
        assert cluster.rank_suffix() == ("" if rank == "0" else ".rank1")  # the log file: train.rank1.log
    assert dirs[0] == dirs[1] and dirs[0].endswith("/train/runs/slurm-4242.0")
    assert subdirs == [".hydra", None]


def test_a_plain_launch_keeps_its_timestamped_run_dir(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith(CLUSTER_ENV)]:
        monkeypatch.delenv(key)
    hydra = _compose(tmp_path, []).hydra
    assert re.search(r"/train/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}$", hydra.run.dir)
    assert hydra.output_subdir == ".hydra"


@NEEDS_SUBMITIT
def test_slurm_launcher_asks_for_one_task_per_device_on_every_node(tmp_path):
    launcher = _compose(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                                   "hydra.launcher.partition=gpu"]).hydra.launcher  # fmt: skip
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.cpus_per_task > 0
    cpu = _compose(tmp_path, ["hydra/launcher=slurm"]).hydra.launcher
    assert (cpu.nodes, cpu.tasks_per_node, cpu.gpus_per_node) == (1, 1, None)  # trainer=cpu: no GPUs asked
    local = _compose(tmp_path, ["hydra/launcher=local", "trainer=gpu"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 1


@NEEDS_RAY
def test_ray_launcher_is_local_by_default_and_one_process_per_job(tmp_path):
    ray = _compose(tmp_path, ["hydra/launcher=ray_cluster", "trainer=gpu"]).hydra.launcher.ray
    assert ray.init.address is None
    assert ray.remote.max_calls == 1 and ray.remote.num_gpus == 1


@NEEDS_SUBMITIT
@pytest.mark.parametrize("app", ["eval", "index", "eda"])
def test_every_hydra_app_takes_the_launchers(tmp_path, app):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        launcher = compose(app, overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher.tasks_per_node == 1 and launcher.gpus_per_node is None  # resolves with or without a trainer


@NEEDS_SUBMITIT
def test_a_parallel_launcher_fed_one_trial_at_a_time_warns(tmp_path, caplog):
    from fashion_lightning.utils.hydra_callbacks import SweepSummary

    def warned(overrides: list[str]) -> bool:
        caplog.clear()
        SweepSummary().on_multirun_start(_compose(tmp_path, ["hparams_search=multitask_optuna", *overrides]))
        return "hydra.sweeper.n_jobs=1" in caplog.text

    assert warned(["hydra/launcher=local"])
    assert not warned(["hydra/launcher=local", "hydra.sweeper.n_jobs=2"])
    assert not warned([])  # Hydra's basic launcher runs one job at a time anyway


def _sweep_with_three_jobs(sweep: Path) -> None:
    for job, left in (("0", "metrics.json"), ("1", "FAILED.rank1.txt"), ("2", None)):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        if left == "metrics.json":
            (sweep / job / left).write_text(json.dumps({"val/acc": 0.5, "job/id": "4240_0"}))
        elif left:
            (sweep / job / left).write_text("RuntimeError: NCCL timeout")
    (sweep / ".submitit").mkdir()  # submitit's own folder is not a job


def test_sweep_summary_holds_failed_and_unfinished_jobs(tmp_path):
    from omegaconf import OmegaConf

    from fashion_lightning.utils.hydra_callbacks import SweepSummary

    _sweep_with_three_jobs(tmp_path)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep_summary.csv").open())}
    assert {job: r["status"] for job, r in rows.items()} == {"0": "done", "1": "failed", "2": "no result"}
    assert rows["0"]["job/id"] == "4240_0" and rows["2"]["overrides"] == "seed=2"


@pytest.mark.parametrize(("mode", "rank", "written"), [("MULTIRUN", "0", True), ("MULTIRUN", "1", False),
                                                       ("RUN", "0", False)])  # fmt: skip
def test_each_job_end_refreshes_the_summary_on_rank_zero(tmp_path, monkeypatch, mode, rank, written):
    """A job that raises ends the sweep before on_multirun_end: the jobs' own refreshes leave a summary."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from fashion_lightning.utils.hydra_callbacks import SweepSummary

    _sweep_with_three_jobs(tmp_path)
    monkeypatch.setenv("SLURM_PROCID", rank)
    for key in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    config = OmegaConf.create({"hydra": {"mode": RunMode[mode], "sweep": {"dir": str(tmp_path)}}})
    SweepSummary().on_job_end(config, job_return=None)
    assert (tmp_path / "sweep_summary.csv").exists() == written
    if written:
        assert len(list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))) == 3


def test_a_requeued_slurm_job_takes_over_its_own_claim_from_another_node(tmp_path, monkeypatch):
    from fashion_lightning.utils.run_dir import RunDirError

    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)

    def claimed_over(slurm: str) -> bool:
        (tmp_path / CLAIM_FILE).write_text(json.dumps({"app": "train", "host": "node-a", "pid": 77, "slurm": slurm}))
        try:
            claim = claim_run_dir(tmp_path, app="train")
        except RunDirError as err:
            assert "in use by train (pid 77 on node-a" in str(err)
            return False
        assert json.loads((tmp_path / CLAIM_FILE).read_text())["slurm"] == "4242.0#1"
        claim.release()
        return True

    assert claimed_over("4242.0#0")  # this job before its requeue (killed with the node): dead
    assert not claimed_over("4242.0#1")  # this very run on another node: live
    assert not claimed_over("4242.1#0")  # another step of the job
    assert not claimed_over("4243.0#0")  # another job


# -- task_wrapper on a rank > 0 ------------------------------------------------------------------
@pytest.mark.parametrize("source", ["lightning", "srun environment"])
def test_a_nonzero_rank_neither_claims_nor_writes_the_run_dir(tmp_path, cache_dir, monkeypatch, source):
    run = tmp_path / "run"
    cfg = make_cfg("train", run, cache_dir, [])
    holder = claim_run_dir(run, app="train")  # rank 0 holds the run dir
    if source == "lightning":
        monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    else:  # before Lightning is set up: the environment srun gives task 1
        monkeypatch.delattr(rank_zero_only, "rank", raising=False)
        monkeypatch.setenv("SLURM_PROCID", "1")
    seen = []

    @task_wrapper
    def task(cfg):
        seen.append(sorted(p.name for p in run.iterdir()))
        return 1

    try:
        assert task(cfg) == 1  # not refused although rank 0 holds the claim
        assert seen == [[CLAIM_FILE]]  # nothing of its own in the run dir while it runs ...
        assert json.loads((run / CLAIM_FILE).read_text())["token"] == holder.token  # ... and rank 0's claim kept
        assert not (run / CONFIG_TREE).exists()
    finally:
        holder.release()


# -- real multiruns --------------------------------------------------------------------------
def _multirun(tmp_path: Path, args: list[str], returncode: int = 0) -> Path:
    env = _clean_env(FASHION_LIGHTNING_CACHE=str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fashion_lightning.apps.train", "-m", *args, *TINY, "tags=[launch]",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == returncode, result.stderr[-4000:]
    return sweep


def _log_span(log: Path) -> tuple[datetime, datetime]:
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", log.read_text(), flags=re.M)
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return first, last


def _check_jobs(sweep: Path, launcher: str) -> list[dict]:
    """Both jobs ran, each in its own process and run dir, and the summary holds both."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    for job, m in zip(jobs, metrics):
        assert "val/acc/articleType" in m and (job / "checkpoints" / "last.ckpt").exists()
        assert (job / "model" / "model.safetensors").exists() and not (job / "FAILED.txt").exists()
        assert m["job/launcher"] == launcher and m["job/host"] == socket.gethostname()
    pids = {m["job/pid"] for m in metrics}
    assert len(pids) == 2 and os.getpid() not in pids  # separate processes, not this one
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    assert {r["status"] for r in rows} == {"done"}
    assert {int(r["job/pid"]) for r in rows} == pids
    return metrics


@pytest.mark.slow
@NEEDS_SUBMITIT
def test_optuna_trials_run_at_once_through_submitit_local(tmp_path):
    sweep = _multirun(tmp_path, ["hydra/launcher=local", "hparams_search=multitask_optuna",
                                 "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"])  # fmt: skip
    metrics = _check_jobs(sweep, "submitit_local")
    assert len({m["job/id"] for m in metrics}) == 2  # two submitit jobs
    assert (sweep / "optimization_results.yaml").exists()
    (a_start, a_end), (b_start, b_end) = (_log_span(sweep / job / "train.log") for job in ("0", "1"))
    assert a_start < b_end and b_start < a_end  # one batch of n_jobs=2: the trials overlapped in time
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.slow
@NEEDS_SUBMITIT
def test_a_failing_job_ends_the_sweep_but_the_summary_holds_both_jobs(tmp_path):
    """Hydra's sweepers stop at a failed job before on_multirun_end; the jobs' own refreshes leave the summary."""
    sweep = _multirun(tmp_path, ["hydra/launcher=local", "model.optimizer.lr=0.01,-1.0"], returncode=1)
    rows = {r["job"]: r for r in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert {job: r["status"] for job, r in rows.items()} == {"0": "done", "1": "failed"}
    assert "Invalid learning rate" in (sweep / "1" / "FAILED.txt").read_text()
    assert rows["0"]["job/launcher"] == "submitit_local" and float(rows["0"]["val/acc/articleType"]) >= 0


@pytest.mark.slow
@NEEDS_RAY
def test_grid_runs_as_ray_tasks_in_local_mode(tmp_path):
    sweep = _multirun(tmp_path, ["hydra/launcher=ray_cluster", "seed=1,2"])
    _check_jobs(sweep, "ray")


@pytest.mark.slow
def test_ddp_ranks_started_like_srun_tasks_share_one_run_dir(tmp_path):
    """Two fashion-train processes with the environment srun gives the tasks of one step: Lightning's
    SLURMEnvironment makes them one DDP run (gloo on the CPU), in one run dir that only rank 0 claims."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {**SLURM, "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PL_DISABLE_FORK": "1"}  # fmt: skip
    args = [sys.executable, "-m", "fashion_lightning.apps.train", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.devices=2",
            f"paths.log_dir={tmp_path / 'out'}", *TINY]  # fmt: skip
    logs = [tmp_path / f"rank{r}.out" for r in (0, 1)]
    procs = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=_clean_env(
                **common, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), FASHION_LIGHTNING_CACHE=str(tmp_path / "cache")
            ),
        )  # fmt: skip
        for r, log in enumerate(logs)
    ]
    for p in procs:
        p.wait(timeout=600)
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    runs = list((tmp_path / "out" / "train" / "runs").iterdir())
    assert [r.name for r in runs] == ["slurm-4242.0"]  # one run dir for the job, not one per rank
    run = runs[0]
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["job/launcher"] == "slurm" and metrics["job/id"] == "4242" and metrics["job/world_size"] == 2
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "model" / "model.json").exists()
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (run / "train.log").exists() and (run / "train.rank1.log").exists()
    assert not (run / CLAIM_FILE).exists()  # released at the end
    assert not list(run.glob("FAILED*"))


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_dir(tmp_path):
    """``torchrun --standalone --nproc-per-node=2 -m fashion_lightning.apps.train trainer=ddp``: Lightning's
    TorchElasticEnvironment, one run dir named by the rendezvous id, written by rank 0."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "fashion_lightning.apps.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "trainer.sync_batchnorm=false", "trainer.devices=2", f"paths.log_dir={tmp_path / 'out'}",
            *TINY]  # fmt: skip
    env = _clean_env(FASHION_LIGHTNING_CACHE=str(tmp_path / "cache"), PL_DISABLE_FORK="1")
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp_path / "out" / "train" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["job/launcher"] == "torchrun" and runs[0].name == f"torchrun-{metrics['job/id']}"
    assert metrics["job/world_size"] == 2 and (runs[0] / "checkpoints" / "last.ckpt").exists()
    assert (runs[0] / "train.rank1.log").exists() and (runs[0] / ".hydra" / "config.yaml").exists()
