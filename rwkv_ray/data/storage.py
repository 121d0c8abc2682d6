"""Local paths and ``s3://`` URIs: list, read, write, upload, download into a checked cache.

TensorFlow no longer has an ``s3://`` filesystem, so S3 goes through boto3 (and, for Ray
Data's readers, a pyarrow ``S3FileSystem`` built from the same settings). The endpoint comes
from :class:`S3Options` (``endpoint_url=None`` -> env ``AWS_ENDPOINT_URL`` -> AWS), which
is how tests point everything at a local moto server. Credentials are never passed around:
boto3 and pyarrow find them in the process's environment / AWS config as usual.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

_CHUNK = 1 << 20


@dataclass(frozen=True)
class S3Options:
    """Where S3 is. ``None`` fields fall back to the environment (``AWS_ENDPOINT_URL``,
    ``AWS_DEFAULT_REGION``) when :meth:`resolved` runs on the driver, so the values shipped
    to Ray workers are explicit."""

    endpoint_url: str | None = None
    region: str | None = None

    def resolved(self) -> S3Options:
        return S3Options(
            endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=self.region or os.environ.get("AWS_DEFAULT_REGION") or None,
        )


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def s3_client(options: S3Options | None = None):
    import boto3

    opts = (options or S3Options()).resolved()
    return boto3.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region)


def pyarrow_filesystem(uri: str, options: S3Options | None = None):
    """A pyarrow filesystem for Ray Data readers (``None`` for local paths)."""
    if not is_s3(uri):
        return None
    from pyarrow import fs

    opts = (options or S3Options()).resolved()
    kwargs: dict = {"region": opts.region or "us-east-1"}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or opts.endpoint_url
        kwargs["scheme"] = parsed.scheme or "https"
    return fs.S3FileSystem(**kwargs)


def list_files(uri: str, options: S3Options | None = None) -> list[str]:
    """Files at ``uri`` (a file, or every file under a directory / prefix), sorted."""
    if not is_s3(uri):
        path = Path(uri)
        if path.is_file():
            return [str(path)]
        if path.is_dir():
            return sorted(str(p) for p in path.rglob("*") if p.is_file())
        return []
    bucket, key = split_s3(uri)
    client = s3_client(options)
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
    out: list[str] = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    try:
        for page in pages:
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if (k == key or k.startswith(prefix)) and not k.endswith("/"):
                    out.append(f"s3://{bucket}/{k}")
    except client.exceptions.NoSuchBucket as e:
        raise FileNotFoundError(f"no such bucket: s3://{bucket} ({uri})") from e
    return sorted(out)


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    try:
        return s3_client(options).get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:  # botocore's NoSuchKey / ClientError
        raise FileNotFoundError(f"cannot read {uri}: {e}") from e


def write_bytes(uri: str, data: bytes, options: S3Options | None = None) -> None:
    """Write ``data`` to ``uri``; local writes are atomic (temp file + rename)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upload_file(local: str | os.PathLike, uri: str, options: S3Options | None = None) -> None:
    """Copy a local file to ``uri`` (S3 upload, or a local copy)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).upload_file(str(local), bucket, key)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, uri)


def move(src: str, dst: str, options: S3Options | None = None) -> None:
    """Rename within one store (S3: server-side copy + delete)."""
    if is_s3(src) != is_s3(dst):
        raise ValueError(f"cannot move between stores: {src} -> {dst}")
    if not is_s3(src):
        os.replace(src, dst)
        return
    (sb, sk), (db, dk) = split_s3(src), split_s3(dst)
    client = s3_client(options)
    client.copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk})
    client.delete_object(Bucket=sb, Key=sk)


def delete(uri: str, options: S3Options | None = None) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(options).delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the manifest's; ``path`` names the file."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path = path
        super().__init__(
            f"checksum mismatch for {path}: manifest sha256 {expected}, file sha256 {actual} "
            "(corrupt or truncated shard; re-run prepare or delete the cached copy)"
        )


def default_cache_dir() -> Path:
    base = os.environ.get("RWKV_RAY_CACHE") or Path.home() / ".cache" / "rwkv_ray"
    return Path(base) / "datasets"


def cache_path(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``s3://bucket/key`` lives in the local cache (``<cache>/bucket/key``)."""
    bucket, key = split_s3(uri)
    return Path(cache_dir or default_cache_dir()) / bucket / key


def fetch(
    uri: str,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    options: S3Options | None = None,
) -> Path:
    """Local path of ``uri``: S3 objects are downloaded into the cache (reused when the
    cached copy's sha256 matches); with ``sha256`` the result is verified, else raises
    :class:`ChecksumError`. Local paths are returned as they are (verified likewise)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        if sha256 is not None and (actual := sha256_file(path)) != sha256:
            raise ChecksumError(str(path), sha256, actual)
        return path
    local = cache_path(uri, cache_dir)
    if local.is_file() and (sha256 is None or sha256_file(local) == sha256):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
    bucket, key = split_s3(uri)
    try:
        s3_client(options).download_file(bucket, key, str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"cannot download {uri}: {e}") from e
    if sha256 is not None and (actual := sha256_file(tmp)) != sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(uri, sha256, actual)
    os.replace(tmp, local)
    return local
