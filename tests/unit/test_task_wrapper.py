"""task_wrapper / extras: config tree in the run dir, failure marker, tags enforced, W&B closed."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from rich.console import Console

from fashion_lightning.utils.config_check import ConfigError
from fashion_lightning.utils.task_wrapper import CONFIG_TREE, FAILURE_MARKER, config_tree, enforce_tags, task_wrapper
from hydra_helpers import make_cfg


def _cfg(tmp_path: Path, **extras):
    return OmegaConf.create({
        "task_name": "unit", "tags": ["t"], "paths": {"output_dir": str(tmp_path / "run")},
        "data": {"batch_size": 4, "root": "${paths.output_dir}"},
        "extras": {"enforce_tags": True, "print_config": False, "save_config": True, **extras},
    })  # fmt: skip


def test_config_tree_is_saved_resolved_and_the_task_runs(tmp_path):
    calls = []
    result = task_wrapper(lambda cfg, x: calls.append(x) or "done")(_cfg(tmp_path), 3)
    assert result == "done" and calls == [3]
    text = (tmp_path / "run" / CONFIG_TREE).read_text()
    assert "batch_size: 4" in text and f"root: {tmp_path / 'run'}" in text  # resolved
    assert text.index("data") < text.index("paths") < text.index("task_name")  # PRINT_ORDER first


def test_a_config_error_fails_before_anything_is_written(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.index_dir = "???"
    with pytest.raises(ConfigError, match="missing value for index_dir"):
        task_wrapper(lambda cfg: pytest.fail("the task must not run"))(cfg)
    assert not (tmp_path / "run").exists()  # no config tree, no FAILED marker: nothing ran
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(config_tree(cfg))
    text = console.export_text()
    assert "index_dir" in text and "???" in text  # the tree still renders a mandatory value


def test_failure_is_logged_marked_and_reraised(tmp_path, caplog):
    @task_wrapper
    def broken(cfg):
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="the disk is full"):
        broken(_cfg(tmp_path))
    marker = (tmp_path / "run" / FAILURE_MARKER).read_text()
    assert "RuntimeError: the disk is full" in marker and "Traceback" in marker
    assert any("broken failed" in r.getMessage() and str(tmp_path / "run") in r.getMessage() for r in caplog.records)


def test_success_writes_no_marker_and_wandb_run_is_finished_either_way(tmp_path, monkeypatch):
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(1))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    task_wrapper(lambda cfg: None)(_cfg(tmp_path))
    assert not (tmp_path / "run" / FAILURE_MARKER).exists()
    with pytest.raises(ValueError):
        task_wrapper(lambda cfg: (_ for _ in ()).throw(ValueError("x")))(_cfg(tmp_path))
    assert finished == [1, 1]  # closed after each job: a multirun's next job opens its own W&B run


def test_tags_default_in_a_single_run_and_are_refused_missing_in_a_multirun(tmp_path, cache_dir):
    cfg = make_cfg("train", tmp_path, cache_dir, ["tags=[]"])
    enforce_tags(cfg)
    assert list(cfg.tags) == ["train"]
    with pytest.raises(ValueError, match="list of non-empty strings"):
        enforce_tags(OmegaConf.create({"tags": "oops"}))
    hydra_cfg = HydraConfig.get()
    from hydra.types import RunMode

    monkey = OmegaConf.create(OmegaConf.to_container(hydra_cfg))
    monkey.mode = RunMode.MULTIRUN
    HydraConfig().cfg = OmegaConf.create({"hydra": monkey})  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="a multirun needs tags"):
            enforce_tags(OmegaConf.create({"tags": None, "task_name": "train"}))
    finally:
        HydraConfig().cfg = None  # type: ignore[assignment]


def test_every_app_is_wrapped():
    from fashion_lightning.apps import download, eda, eval, export, index, recommend, serve, train

    for fn in (train.train, eval.evaluate, index.build, eda.eda, recommend.recommend, download.download,
               export.export, serve.serve):  # fmt: skip
        assert getattr(fn, "__wrapped__", None) is not None, fn.__qualname__


def test_each_app_module_is_a_console_script_with_a_wrapped_task():
    """apps/ holds the entry points and nothing else: each module is a ``fashion-<name>`` script whose ``main``
    runs a task under task_wrapper (``main`` itself is Hydra's wrapper, so it does not count)."""
    import importlib
    import pkgutil

    import fashion_lightning.apps as apps

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (CI's)
    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    names = sorted(m.name for m in pkgutil.iter_modules(apps.__path__))
    assert sorted(scripts.values()) == sorted(f"fashion_lightning.apps.{name}:main" for name in names)
    for name in names:
        module = importlib.import_module(f"fashion_lightning.apps.{name}")
        tasks = [
            fn for key, fn in vars(module).items()
            if key != "main" and callable(fn) and getattr(fn, "__module__", None) == module.__name__
            and getattr(fn, "__wrapped__", None) is not None
        ]  # fmt: skip
        assert tasks and callable(module.main), name


def test_user_errors_are_one_line_on_stderr_and_exit_2(capsys):
    from fashion_lightning.utils.config_check import one_line_errors

    with pytest.raises(SystemExit) as exited, one_line_errors(FileNotFoundError, app="fashion-demo"):
        raise FileNotFoundError("no [bold]such[/bold] file\nsecond line")
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == ["fashion-demo: no [bold]such[/bold] file second line"]
    with pytest.raises(KeyError), one_line_errors(FileNotFoundError, app="fashion-demo"):  # a bug stays a traceback
        raise KeyError("x")
