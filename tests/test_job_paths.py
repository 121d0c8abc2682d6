"""A job's relative paths: taken from the driver's working directory, absolute for the
workers; refused where they would be lost (a `ray job submit --working-dir` job runs in
Ray's temporary copy of the upload) or where an input is not there. Also the `latest` link
to a run's final checkpoint, and the job scripts' one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_ray.train.config import JobConfig, JobConfigError
from rwkv_ray.train.job_paths import RAY_JOB_CONFIG_ENV, resolve_job_paths, submitted_working_dir
from rwkv_ray.train.trainer import link_latest

REPO = Path(__file__).resolve().parents[1]


def job(**sections) -> JobConfig:
    values = {"name": "paths", "model": {"config": {"vocab_size": 64, "num_layers": 1}}}
    values.update(sections)
    return JobConfig.from_dict(values)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data" / "train").mkdir(parents=True)
    return tmp_path


def submitted(monkeypatch) -> None:
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env}))


def test_relative_paths_become_absolute_from_the_working_directory(in_tmp):
    config = resolve_job_paths(job(data={"train": "data/train"}))
    assert config.data.train == str(in_tmp / "data" / "train")
    assert config.checkpointing.storage_path == str(in_tmp / "runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{in_tmp / 'mlflow.db'}"
    # Absolute paths and URIs are passed as given (they may exist on the workers only).
    given = job(
        data={"train": "s3://bucket/train", "eval": "/elsewhere/eval"},
        checkpointing={"storage_path": "/shared/runs"},
        mlflow={"tracking_uri": "http://mlflow:5000"},
    )
    same = resolve_job_paths(given)
    assert (same.data, same.checkpointing, same.mlflow) == (
        given.data,
        given.checkpointing,
        given.mlflow,
    )
    relative_sqlite = job(data={"train": "data/train"}, mlflow={"tracking_uri": "sqlite:///t.db"})
    assert resolve_job_paths(relative_sqlite).mlflow.tracking_uri == f"sqlite:///{in_tmp / 't.db'}"


def test_a_missing_input_is_named(in_tmp):
    with pytest.raises(JobConfigError, match=r"data.train: 'out/train' does not exist in \S+$"):
        resolve_job_paths(job(data={"train": "out/train"}))
    with pytest.raises(JobConfigError, match=r"model.path: 'runs/x/latest/export/model' does no"):
        resolve_job_paths(job(model={"path": "runs/x/latest/export/model"}, data={"train": "a"}))
    # Absolute: refused where Ray runs on this machine alone (the workers see its files);
    # on a cluster the driver's node need not mount what the workers do.
    missing = str(in_tmp / "nope")
    for section, key in (("data", "train"), ("model", "path")):
        given = (
            job(**{section: {key: missing}})
            if section == "data"
            else job(model={"path": missing}, data={"train": "data/train"})
        )
        with pytest.raises(JobConfigError, match=rf"{section}.{key}: {missing} does not exist$"):
            resolve_job_paths(given, workers_see_this_filesystem=True)
        resolve_job_paths(given)  # a cluster: left to the workers
    # data.eval is read by evaluate only: training goes ahead without it (made absolute).
    config = resolve_job_paths(job(data={"train": "data/train", "eval": "out/eval"}))
    assert config.data.eval == str(in_tmp / "out" / "eval")


def test_model_path_is_pinned_through_links_and_needs_its_weights(in_tmp):
    """A state run of runs/<name>/latest/export/model keeps the checkpoint it started from:
    a restart or resubmission reloads the base weights from model.path."""
    first = in_tmp / "runs" / "full" / "checkpoint_1" / "export" / "model"
    first.mkdir(parents=True)
    (first / "model.weights.h5").write_bytes(b"")
    (in_tmp / "runs" / "full" / "latest").symlink_to("checkpoint_1")
    given = {"path": "runs/full/latest/export/model"}
    config = resolve_job_paths(job(model=given, data={"train": "data/train"}))
    assert config.model.path == str(first)
    (first / "model.weights.h5").unlink()  # e.g. an upload that left *.h5 out
    with pytest.raises(JobConfigError, match=r"model.path: .* has no model.weights.h5"):
        resolve_job_paths(job(model=given, data={"train": "data/train"}))


def test_a_submitted_job_refuses_outputs_ray_would_delete(in_tmp, monkeypatch):
    submitted(monkeypatch)
    assert submitted_working_dir() == "gcs://_ray_pkg_0123abcd.zip"
    with pytest.raises(JobConfigError, match=r"checkpointing.storage_path: 'runs' is relative"):
        resolve_job_paths(job(data={"train": "data/train"}))
    absolute_storage = {"storage_path": str(in_tmp / "runs")}
    with pytest.raises(JobConfigError, match=r"mlflow.tracking_uri: not set"):
        resolve_job_paths(job(data={"train": "data/train"}, checkpointing=absolute_storage))
    with pytest.raises(JobConfigError, match=r"'out/train' does not exist in .*\.gitignore.*uri$"):
        resolve_job_paths(job(data={"train": "out/train"}, checkpointing=absolute_storage))
    # With MLflow off, absolute storage and data in the upload, the job goes ahead.
    config = resolve_job_paths(
        job(data={"train": "data/train"}, checkpointing=absolute_storage, mlflow={"enabled": False})
    )
    assert config.data.train == str(in_tmp / "data" / "train")
    # MLflow off: its URI is not used, so not checked (a relative sqlite one included).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    off = job(
        data={"train": "data/train"}, checkpointing=absolute_storage, mlflow={"enabled": False}
    )
    assert resolve_job_paths(off).mlflow.tracking_uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    config = resolve_job_paths(job(data={"train": "data/train"}, checkpointing=absolute_storage))
    assert config.mlflow.tracking_uri == "http://mlflow:5000"


def test_latest_links_the_final_checkpoint(in_tmp):
    config = resolve_job_paths(job(data={"train": "data/train"}))
    run = in_tmp / "runs" / "paths"
    for stamp in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        (run / f"checkpoint_{stamp}" / "export").mkdir(parents=True)
        link_latest(config, str(run / f"checkpoint_{stamp}"))
        assert (run / "latest").resolve() == run / f"checkpoint_{stamp}"
        assert (run / "latest" / "export").is_dir()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    link_latest(job(checkpointing={"storage_path": "s3://b/runs"}), "s3://b/runs/paths/c")


@pytest.mark.parametrize("script", ["finetune.py", "evaluate.py"])
def test_job_scripts_report_a_bad_config_in_one_line(script, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    for config, message in ((tmp_path / "none.yaml", "No such file"), (broken, "")):
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs" / script), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith(f"{script[:-3]}: error: ") and message in done.stderr
