"""Training checkpoints: params, optimizer state, data position and RNG, written atomically.

A checkpoint is a directory with two files:
  train_state.npz  trainable/<i>, optimizer/<i> (float32/int arrays), rng (uint32 key)
  meta.json        format, global_step, epoch, batch (data position: the next reader batch
                   of `epoch`), the variable paths (checked on load), the job config
The frozen base weights are not stored: they come back from `model.path` (or the seeded
official init). Written by rank 0 only (the caller decides); read by every worker.

Atomicity: locally the files go to a temporary sibling directory that is renamed into
place; on s3:// (boto3) meta.json is uploaded last and a checkpoint without it does not
exist for `read_checkpoint`/`latest_checkpoint`. Under Ray Train the directory is handed to
`ray.train.report`, which persists it to the run's storage (local or s3://) in its own way:
a copy cut off there can hold a meta.json beside a missing or partial train_state.npz, so
`read_newest` falls back to the newest checkpoint that reads whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = 1
STATE_FILE = "train_state.npz"
META_FILE = "meta.json"
PREFIX = "checkpoint_"


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory whose files are missing, cut short or unreadable."""


@dataclasses.dataclass
class TrainCheckpoint:
    trainable: list[np.ndarray]
    optimizer: list[np.ndarray]
    rng: np.ndarray
    global_step: int  # optimizer steps done
    epoch: int  # data position: the epoch being read ...
    batch: int  # ... and the next reader batch in it
    trainable_paths: list[str]
    optimizer_paths: list[str]
    config: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the MLflow run id

    def check_fits(self, trainable_paths: list[str], optimizer_paths: list[str]) -> None:
        for what, saved, now in (
            ("trainable variables", self.trainable_paths, trainable_paths),
            ("optimizer variables", self.optimizer_paths, optimizer_paths),
        ):
            if saved != now:
                missing = sorted(set(now) - set(saved))[:5]
                extra = sorted(set(saved) - set(now))[:5]
                raise ValueError(
                    f"checkpoint does not fit this job: its {what} differ "
                    f"({len(saved)} saved, {len(now)} now; missing {missing}, extra {extra})"
                )


# ---- local directories ---------------------------------------------------------------------
# np.savez keeps numpy's own dtypes only: a bfloat16 array (ml_dtypes) comes back from np.load
# as raw bytes (dtype V2). Such arrays are stored as unsigned ints of their width beside a
# `dtype:<name>` entry naming the type, and viewed back on reading.
_DTYPE_KEY = "dtype:"


def _portable(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.isbuiltin == 2:  # a dtype registered by another library (ml_dtypes)
            out[_DTYPE_KEY + name] = np.asarray(a.dtype.name)
            a = a.view(f"u{a.dtype.itemsize}")
        out[name] = a
    return out


def _array(npz, name: str) -> np.ndarray:
    a = npz[name]
    if _DTYPE_KEY + name in npz.files:
        a = a.view(getattr(ml_dtypes, str(npz[_DTYPE_KEY + name])))
    return a


def _write_files(ckpt: TrainCheckpoint, directory: Path) -> None:
    arrays = {f"trainable/{i}": a for i, a in enumerate(ckpt.trainable)}
    arrays.update({f"optimizer/{i}": a for i, a in enumerate(ckpt.optimizer)})
    arrays["rng"] = np.asarray(ckpt.rng)
    with open(directory / STATE_FILE, "wb") as f:
        np.savez(f, **_portable(arrays))
    meta = dataclasses.asdict(ckpt)
    for key in ("trainable", "optimizer", "rng"):
        meta.pop(key)
    meta["format"] = FORMAT
    (directory / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def write_local(ckpt: TrainCheckpoint, directory: str | os.PathLike) -> Path:
    """Write into `directory` atomically (temporary sibling + rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_files(ckpt, tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_local(directory: str | os.PathLike) -> TrainCheckpoint:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # a copy cut off mid-file
        raise IncompleteCheckpointError(f"{directory} is not a complete checkpoint ({e})") from e
    if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
        raise ValueError(f"{meta_path}: unsupported checkpoint format")
    try:
        with np.load(directory / STATE_FILE) as npz:
            trainable = [_array(npz, f"trainable/{i}") for i in range(len(meta["trainable_paths"]))]
            optimizer = [_array(npz, f"optimizer/{i}") for i in range(len(meta["optimizer_paths"]))]
            rng = _array(npz, "rng")
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        raise IncompleteCheckpointError(
            f"{directory} is not a complete checkpoint ({STATE_FILE}: {e})"
        ) from e
    return TrainCheckpoint(trainable=trainable, optimizer=optimizer, rng=rng, **meta)


# ---- local or s3:// ------------------------------------------------------------------------
def s3_client(endpoint_url: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// uri: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def write_checkpoint(
    ckpt: TrainCheckpoint, uri: str | os.PathLike, endpoint_url: str | None = None
) -> str:
    """Write to a local directory or to s3://bucket/prefix (meta.json last)."""
    uri = str(uri)
    if not uri.startswith("s3://"):
        return str(write_local(ckpt, uri))
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        _write_files(ckpt, Path(tmp))
        for name in (STATE_FILE, META_FILE):  # meta.json marks the checkpoint complete
            client.upload_file(str(Path(tmp) / name), bucket, f"{prefix}/{name}")
    return uri


def read_checkpoint(uri: str | os.PathLike, endpoint_url: str | None = None) -> TrainCheckpoint:
    uri = str(uri)
    if not uri.startswith("s3://"):
        return read_local(uri)
    bucket, prefix = split_s3(uri)
    client = s3_client(endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (META_FILE, STATE_FILE):
            try:
                client.download_file(bucket, f"{prefix}/{name}", str(Path(tmp) / name))
            except Exception as e:
                raise FileNotFoundError(f"{uri} is not a complete checkpoint: {e}") from e
        return read_local(tmp)


def checkpoint_name(global_step: int) -> str:
    return f"{PREFIX}{global_step:08d}"


def _complete_names(root: str, endpoint_url: str | None) -> list[str]:
    """Sub-directories of `root` that hold a meta.json (any name: ours or Ray's)."""
    if root.startswith("s3://"):
        bucket, prefix = split_s3(root)
        pages = s3_client(endpoint_url).get_paginator("list_objects_v2")
        return [
            obj["Key"][len(prefix) + 1 :].split("/")[0]
            for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for obj in page.get("Contents", [])
            if obj["Key"].count("/") == prefix.count("/") + 2 and obj["Key"].endswith(META_FILE)
        ]
    path = Path(root)
    return [p.parent.name for p in path.glob(f"*/{META_FILE}")] if path.is_dir() else []


def read_meta(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    if not uri.startswith("s3://"):
        return json.loads((Path(uri) / META_FILE).read_text(encoding="utf-8"))
    bucket, prefix = split_s3(uri)
    body = s3_client(endpoint_url).get_object(Bucket=bucket, Key=f"{prefix}/{META_FILE}")["Body"]
    return json.loads(body.read())


def checkpoints_newest_first(
    root: str | os.PathLike, endpoint_url: str | None = None
) -> list[tuple[int, str]]:
    """(global_step, uri) of the checkpoints with a readable meta.json under `root`."""
    root = str(root).rstrip("/")
    found = []
    for name in _complete_names(root, endpoint_url):
        uri = f"{root}/{name}"
        try:
            found.append((int(read_meta(uri, endpoint_url)["global_step"]), uri))
        except (OSError, ValueError, KeyError):
            continue  # not one of ours, or unreadable
    return sorted(found, reverse=True)


def latest_checkpoint(root: str | os.PathLike, endpoint_url: str | None = None) -> str | None:
    """The checkpoint with the highest global_step under `root` (by its meta.json), or None."""
    found = checkpoints_newest_first(root, endpoint_url)
    return found[0][1] if found else None


def read_newest(
    root: str | os.PathLike, endpoint_url: str | None = None, newer_than: int = -1
) -> TrainCheckpoint | None:
    """The newest checkpoint under `root` past step `newer_than` that reads whole, or None;
    each one skipped (cut short, files missing) is named on stderr."""
    for step, uri in checkpoints_newest_first(root, endpoint_url):
        if step <= newer_than:
            return None
        try:
            return read_checkpoint(uri, endpoint_url)
        except (IncompleteCheckpointError, FileNotFoundError) as e:
            print(f"skipping checkpoint {uri}: {e}", file=sys.stderr)
    return None
