"""Where a job's relative paths point: the driver's working directory.

A job's local paths (`data.train`, `data.eval`, `model.path`, `checkpointing.storage_path`
and a sqlite tracking URI) are resolved once, on the driver, against the directory it runs
in, and reach the workers absolute. In a job started by `ray job submit --working-dir`,
that directory is Ray's temporary copy of the upload, which Ray deletes (and makes anew
for every change of the code) and which holds no file that .gitignore leaves out (out/,
runs/, mlflow.db): there a relative output path is refused, since the checkpoints and
runs written under it would be lost, and a relative input path must be in the upload.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from rwkv_ray.convert import WEIGHTS_FILE
from rwkv_ray.train.config import JobConfig, JobConfigError

# Set by Ray's job supervisor for the driver of a submitted job (Ray 2.x): the job's
# runtime_env, with its working_dir.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SQLITE = "sqlite:///"


def submitted_working_dir() -> str | None:
    """The working_dir of the `ray job submit` job this process drives, else None."""
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env")
    except (ValueError, AttributeError):
        return None
    return (runtime_env or {}).get("working_dir") or None


def is_local(path: str) -> bool:
    return "://" not in path  # s3://, gs://, file:// ... are left as given


def default_tracking_uri() -> str:
    """A sqlite store in the working directory: mlflow.db, artifacts beside it."""
    return f"{SQLITE}{Path.cwd() / 'mlflow.db'}"


def resolve_job_paths(config: JobConfig, workers_see_this_filesystem: bool = False) -> JobConfig:
    """`config` with its relative local paths made absolute (JobConfigError naming the
    key for an input that is not there or an output that would be lost).
    `workers_see_this_filesystem`: Ray runs on this machine alone, so an absolute input
    missing here is missing for the workers too (on a cluster the driver's node need not
    mount what the workers do, e.g. /models on GPU nodes only, so it is not checked)."""
    cwd, upload = Path.cwd(), submitted_working_dir()

    def where() -> str:
        if upload is None:
            return f"in {cwd}"
        return (
            f"in {cwd}, Ray's copy of this job's --working-dir upload (without what "
            ".gitignore leaves out, such as out/ and runs/)"
        )

    def input_path(key: str, path: str | None, needed: bool = True) -> str | None:
        if not path or not is_local(path):
            return path
        if Path(path).is_absolute():
            if needed and workers_see_this_filesystem and not Path(path).exists():
                raise JobConfigError(f"{key}: {path} does not exist")
            return path
        if needed and not (cwd / path).exists():
            hint = "" if upload is None else "; give an absolute path or an s3:// uri"
            raise JobConfigError(f"{key}: {path!r} does not exist {where()}{hint}")
        return str(cwd / path)

    def model_path(path: str | None) -> str | None:
        path = input_path("model.path", path)
        if not path or not is_local(path):
            return path
        # Pinned: base weights are not in the checkpoints, a restart or resubmission reloads
        # them from model.path, so a link that moves (runs/<name>/latest) must not.
        path = str(Path(path).resolve())
        weights = Path(path) / WEIGHTS_FILE
        if Path(path).is_dir() and not weights.exists():
            raise JobConfigError(
                f"model.path: {path} has no {WEIGHTS_FILE} (a converted model: "
                "`rwkv-ray convert`; an upload leaves *.h5 out: give the model's absolute path "
                "on the nodes)"
            )
        return path

    def output_path(key: str, path: str) -> str:
        if upload is not None:
            raise JobConfigError(
                f"{key}: {path!r} is relative, and this job runs {where()}, which Ray "
                "deletes: give an absolute path that every worker sees, or an s3:// uri"
            )
        return str(cwd / path)

    model = model_path(config.model.path)
    train = input_path("data.train", config.data.train)
    eval_ = input_path("data.eval", config.data.eval, needed=False)  # read by evaluate only
    storage = config.checkpointing.storage_path
    if is_local(storage) and not Path(storage).is_absolute():
        storage = output_path("checkpointing.storage_path", storage)
    uri = config.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if config.mlflow.enabled and uri is None:
        if upload is not None:
            raise JobConfigError(
                "mlflow.tracking_uri: not set (nor MLFLOW_TRACKING_URI), and the default "
                f"sqlite file would be {where()}, which Ray deletes: set either"
            )
        uri = default_tracking_uri()
    elif not config.mlflow.enabled:
        uri = config.mlflow.tracking_uri  # not used: left as given
    elif uri is not None and uri.startswith(SQLITE) and not Path(uri[len(SQLITE) :]).is_absolute():
        uri = SQLITE + output_path("mlflow.tracking_uri", uri[len(SQLITE) :])
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, path=model),
        data=dataclasses.replace(config.data, train=train, eval=eval_),
        checkpointing=dataclasses.replace(config.checkpointing, storage_path=storage),
        mlflow=dataclasses.replace(config.mlflow, tracking_uri=uri),
    )
