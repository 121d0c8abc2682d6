"""S3 through a local moto server on loopback: prepare s3:// -> s3:// and read back via
the local cache (boto3 downloads, sha256 checks)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rwkv_ray.data import records, storage
from rwkv_ray.data.prepare import prepare
from rwkv_ray.data.reader import ShardReader
from rwkv_ray.data.storage import ChecksumError, S3Options
from rwkv_ray.tokenizer import WorldTokenizer

T = 16


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    storage.s3_client(S3Options(s3_endpoint)).create_bucket(Bucket="bucket")
    return s3_endpoint


@pytest.fixture(scope="module", autouse=True)
def ray_local(endpoint):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_storage_round_trip(endpoint, tmp_path):
    s3 = S3Options(endpoint)
    storage.write_bytes("s3://bucket/misc/a.bin", b"hello", s3)
    storage.write_bytes("s3://bucket/misc/sub/b.bin", b"world", s3)
    assert storage.list_files("s3://bucket/misc", s3) == [
        "s3://bucket/misc/a.bin",
        "s3://bucket/misc/sub/b.bin",
    ]
    assert storage.list_files("s3://bucket/mis", s3) == []  # a prefix is not a directory
    sha = hashlib.sha256(b"hello").hexdigest()
    local = storage.fetch("s3://bucket/misc/a.bin", sha, tmp_path, s3)
    assert local == tmp_path / "bucket" / "misc" / "a.bin" and local.read_bytes() == b"hello"
    with pytest.raises(ChecksumError, match="s3://bucket/misc/sub/b.bin"):
        storage.fetch("s3://bucket/misc/sub/b.bin", sha, tmp_path, s3)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.list_files("s3://no-such-bucket/x", s3)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):  # before any Ray work
        prepare(
            {"inputs": [str(src)], "output": "s3://no-such-bucket/ds", "s3_endpoint_url": endpoint}
        )
    with pytest.raises(FileNotFoundError, match="s3://bucket/raw/missing.jsonl"):
        prepare({"inputs": ["s3://bucket/raw/missing.jsonl"], "output": "s3://bucket/x",
                 "s3_endpoint_url": endpoint})  # fmt: skip


def test_prepare_to_s3_and_read_back_through_the_cache(endpoint, tmp_path):
    s3 = S3Options(endpoint)
    rows = [{"prompt": f"Q{i}: colour of item {i}?", "response": f" red {i}"} for i in range(12)]
    rows += [{"text": f"Item {i} is a blue box."} for i in range(12, 30)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    storage.write_bytes("s3://bucket/raw/corpus.jsonl", body, s3)
    manifest = prepare(
        {
            "inputs": ["s3://bucket/raw/corpus.jsonl"],
            "output": "s3://bucket/ds",
            "seq_len": T,
            "num_shards": 2,
            "s3_endpoint_url": endpoint,
            "progress": False,
        }
    )
    names = [s["path"] for s in manifest["shards"]]
    assert storage.list_files("s3://bucket/ds", s3) == sorted(
        f"s3://bucket/ds/{n}" for n in [*names, "manifest.json"]
    )  # no staging leftovers
    assert manifest["totals"]["examples"] == 30 and manifest["features"][-1] == "loss_mask"

    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "s3_endpoint_url": endpoint, "shuffle_buffer": 1}
    reader = ShardReader("s3://bucket/ds", 5, seed=0, streams=[0, 1], num_streams=2, **kw)
    assert reader.steps_per_epoch == 3
    got = list(reader.batches(0))
    tok = WorldTokenizer()
    for shard in manifest["shards"]:
        cached = cache / "bucket" / "ds" / shard["path"]
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == shard["sha256"]
    # No shuffle: stream s reads shard s in order; batch i = rows 5i.. of shard 0, then 1.
    first = records.read_shard(cache / "bucket" / "ds" / names[0])
    np.testing.assert_array_equal(got[0]["tokens"][:5], first["text"][:5])
    p, r = tok.encode(rows[0]["prompt"]), tok.encode(rows[0]["response"])
    assert got[0]["tokens"][0, T - len(p) - len(r) :].tolist() == p + r
    assert got[0]["loss_mask"][0].sum() == len(r)

    # A damaged cached copy is detected by its checksum and downloaded again.
    victim = cache / "bucket" / "ds" / names[1]
    victim.write_bytes(b"garbage")
    again = ShardReader("s3://bucket/ds", 5, seed=0, streams=[1], num_streams=2, **kw)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == manifest["shards"][1]["sha256"]
    np.testing.assert_array_equal(next(again.batches(0))["tokens"], got[0]["tokens"][5:])
