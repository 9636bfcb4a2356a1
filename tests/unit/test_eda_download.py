"""fashion-eda (report files, tables, the Hydra app) and fashion-download (kagglehub mocked)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import kagglehub
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from rich.console import Console

from fashion_lightning.data import fetch as download_module
from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.fetch import DEFAULT_HANDLE, DownloadError, download_dataset, next_commands
from fashion_lightning.data.profile import REPORT_NAME, markdown_table, missing_values, run_eda, split_distribution
from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- eda ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eda_result(synthetic_dm_kwargs: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("eda")
    dm = FashionDataModule(**synthetic_dm_kwargs, output_dir=str(out))
    attributes = ["masterCategory", "articleType", "season", "year", "nonsense"]
    return run_eda(dm, out, attributes, top_n=8, title="Synthetic")


def test_eda_writes_report_plots_and_tables(eda_result):
    out = eda_result.output_dir
    assert eda_result.report_path == out / REPORT_NAME
    for name in ("data_report.json", "splits.csv", "vocab.json"):  # written by the datamodule
        assert (out / name).is_file(), name
    expected = {f"dist_{a}" for a in ("masterCategory", "articleType", "season", "year")}
    expected |= {"gender_x_articleType", "season_x_gender", "split_articleType", "split_masterCategory"}
    assert set(eda_result.plots) == expected  # the unknown attribute is skipped, not a crash
    for path in eda_result.plots.values():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.parent == out / "plots"
    assert {p.name for p in (out / "tables").iterdir()} >= {
        "missing_values.csv",
        "split_sizes.csv",
        "season_x_gender.csv",
    }
    article = pd.read_csv(out / "tables" / "dist_articleType.csv", index_col=0)
    assert article["count"].sum() == eda_result.data_report.rows_kept
    heat = pd.read_csv(out / "tables" / "gender_x_articleType.csv", index_col=0)
    assert heat.shape[1] == 8  # top_n articleTypes


def test_eda_markdown_has_cleaning_counts_and_links(eda_result, synthetic_report):
    md = eda_result.report_path.read_text()
    report = eda_result.data_report
    assert f"{report.rows_read:,} rows read, {report.rows_kept:,} kept" in md
    assert "| name_with_1_extra_commas | 1 |" in md and "| name_with_2_extra_commas | 1 |" in md
    for reason, count in report.dropped.items():
        assert f"| {reason} | {count} |" in md
    assert f"| missing_image | 1 | {synthetic_report.missing_image_ids[0]} |" in md
    for key, path in eda_result.plots.items():
        assert f"]({path.relative_to(eda_result.output_dir).as_posix()})" in md, key
    for heading in ("## Missing values", "## gender x articleType", "## season x gender", "## Splits"):
        assert heading in md


def test_missing_table_counts_the_raw_csv(eda_result, synthetic_report):
    missing = eda_result.missing
    for column, ids in synthetic_report.blank_fields.items():
        assert missing.loc[column, "blank"] == len(ids), column
    assert missing.loc["id", "missing"] == 0 and missing.loc["gender", "missing"] == 0
    sizes = eda_result.split_sizes["items"]
    assert sizes.sum() == eda_result.data_report.rows_kept


def test_missing_values_counts_blank_and_na_literals():
    raw = pd.DataFrame({"usage": ["Casual", "", "NA", " ", None], "year": ["2012", "2011", "", "2010", "2012"]})
    table = missing_values(raw)
    assert table.loc["usage"].to_dict() == {"blank": 3, "NA_literal": 1, "missing": 4, "percent": 80.0}
    assert table.loc["year", "missing"] == 1


def test_split_distribution_shares_and_rest_row():
    frames = {
        "train": pd.DataFrame({"articleType": ["a"] * 6 + ["b"] * 3 + ["c"]}),
        "val": pd.DataFrame({"articleType": ["a", "b"]}),
        "test": pd.DataFrame({"articleType": ["a"] * 3 + ["b", "c"]}),
    }
    table = split_distribution(frames, "articleType", top_n=2)
    assert table.index.tolist() == ["a", "b", "(rest)"]
    assert table["train"].tolist() == [6, 3, 1] and table["val"].tolist() == [1, 1, 0]
    assert table["test %"].tolist() == [60.0, 20.0, 20.0]
    md = markdown_table(table)
    assert md.splitlines()[0] == "| articleType | train | val | test | train % | val % | test % |"
    assert "| a | 6 | 1 | 3 | 60.00 | 50.00 | 60.00 |" in md


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_module(config_module="fashion_lightning.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def test_eda_app_runs_on_synthetic_and_on_a_kaggle_folder(cache_dir: Path, synthetic_root: Path, tmp_path: Path):
    from fashion_lightning.apps.eda import eda

    common = [
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        "data.decode_workers=1",
        "top_n=5",
        "attributes=[gender]",
    ]
    synthetic = _compose("eda", [*common, f"paths.output_dir={tmp_path / 'syn'}", "data.num_items=200"])
    result = eda(synthetic)
    assert result.report_path == tmp_path / "syn" / REPORT_NAME and result.report_path.is_file()
    # the generated folder is a Kaggle-layout catalog: data=kaggle data.root=<it> takes the same path as real data
    kaggle = _compose(
        "eda", [*common, f"paths.output_dir={tmp_path / 'kag'}", "data=kaggle", f"data.root={synthetic_root}"]
    )
    result = eda(kaggle)
    assert (tmp_path / "kag" / REPORT_NAME).is_file() and result.data_report.source == str(synthetic_root)
    assert json.loads((tmp_path / "kag" / "data_report.json").read_text())["rows_read"] == 200


# -- download -----------------------------------------------------------------------------------
@pytest.fixture
def fake_kaggle(monkeypatch: pytest.MonkeyPatch, synthetic_root: Path) -> list:
    """kagglehub.dataset_download replaced by a stub returning the synthetic catalog folder."""
    calls = []

    def fake(handle: str, path: str | None = None, *, force_download: bool = False, output_dir=None) -> str:
        calls.append((handle, force_download))
        return str(synthetic_root)

    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    return calls


def test_download_returns_a_loadable_catalog(fake_kaggle: list, synthetic_root: Path):
    root = download_dataset()
    assert root == synthetic_root and fake_kaggle == [(DEFAULT_HANDLE, False)]
    assert CatalogSource(root).image_ids
    assert next_commands(root)[0] == f"fashion-eda data=kaggle data.root={root}"


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_download_into_a_target_dir(fake_kaggle: list, synthetic_root: Path, tmp_path: Path, mode: str):
    target = tmp_path / "data" / "fashion-small"
    root = download_dataset(target_dir=target, mode=mode)
    assert root == target and target.is_symlink() == (mode == "link")
    assert CatalogSource(target).image_ids == CatalogSource(synthetic_root).image_ids
    assert (target / "styles.csv").read_bytes() == (synthetic_root / "styles.csv").read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    # a second call finds the catalog in place and does not download again; force does
    assert download_dataset(target_dir=target, mode=mode) == target and len(fake_kaggle) == 1
    download_dataset(target_dir=target, mode=mode, force=True)
    assert fake_kaggle[-1] == (DEFAULT_HANDLE, True) and CatalogSource(target).image_ids


def test_download_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(DownloadError) as info:
        download_dataset("someone/some-data")
    message = str(info.value)
    assert "someone/some-data" in message and "ConnectionError" in message
    assert "credentials" in message and "data.root=" in message


def test_download_that_is_not_a_catalog_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "readme.txt").write_text("nothing here")
    monkeypatch.setattr(kagglehub, "dataset_download", lambda *a, **k: str(tmp_path / "dl"))
    with pytest.raises(CatalogNotFoundError, match="not a Kaggle-layout catalog"):
        download_dataset()
    with pytest.raises(FileExistsError, match="not empty"):  # never overwrite an unrelated folder
        download_dataset(target_dir=tmp_path / "dl")
    with pytest.raises(ValueError, match="mode"):
        download_dataset(mode="move")


def test_download_app_prints_the_next_command(fake_kaggle: list, tmp_path: Path):
    from fashion_lightning.apps.download import download

    cfg = _compose("download", [f"paths.output_dir={tmp_path / 'run'}", f"target_dir={tmp_path / 'data'}", "mode=link"])
    buffer = io.StringIO()
    root = download(cfg, console=Console(file=buffer, width=200))
    assert root == tmp_path / "data"
    assert f"fashion-train data=kaggle data.root={root}" in buffer.getvalue()
    assert json.loads((tmp_path / "run" / "download.json").read_text())["root"] == str(root)
    assert download_module.DEFAULT_HANDLE == cfg.handle


# -- download never deletes user data (issue 8, item 2) ---------------------------------------
def test_download_never_replaces_a_users_file(fake_kaggle: list, tmp_path: Path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    with pytest.raises(FileExistsError, match="a file"):
        download_dataset(target_dir=target)
    assert target.read_text() == "my notes" and fake_kaggle == []


def test_download_fills_an_empty_folder(fake_kaggle: list, tmp_path: Path):
    target = tmp_path / "empty"
    target.mkdir()
    assert download_dataset(target_dir=target) == target and CatalogSource(target).image_ids


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_download_force_moves_the_old_target_aside(fake_kaggle: list, tmp_path: Path, mode: str, caplog):
    target = tmp_path / "data"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="force=true to move it aside"):
        download_dataset(target_dir=target, mode=mode)
    with caplog.at_level("WARNING"):
        assert download_dataset(target_dir=target, mode=mode, force=True) == target
    assert CatalogSource(target).image_ids
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("data.old-")]
    assert len(aside) == 1 and (aside[0] / "mine.txt").read_text() == "keep me"
    assert str(aside[0]) in caplog.text  # said so
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_copy_leaves_the_target_alone(fake_kaggle: list, tmp_path: Path, monkeypatch):
    target = tmp_path / "data"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(download_module.shutil, "copytree", full_disk)
    with pytest.raises(OSError, match="No space"):
        download_dataset(target_dir=target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_download_app_exits_2_with_one_line_like_every_app(tmp_path: Path):
    """A user error (no network, bad credentials) is exit 2 and one line, as in the other six apps (was 1)."""
    import subprocess
    import sys

    code = (
        "import kagglehub, sys\n"
        "def offline(*a, **k): raise ConnectionError(\"Failed to resolve 'api.kaggle.com'\")\n"
        "kagglehub.dataset_download = offline\n"
        "from fashion_lightning.apps.download import main\n"
        f"sys.argv = ['fashion-download', 'hydra.run.dir={tmp_path / 'run'}']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "ConnectionError" in done.stderr + done.stdout
