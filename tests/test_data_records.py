"""The TFRecord example format: our numpy encoder against TensorFlow, and shard errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkv_ray.data import records
from rwkv_ray.data.records import CorruptShardError


def _rows(n=7, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 65536, size=(n, t))
    lengths = rng.integers(0, t + 1, size=n)
    for i, length in enumerate(lengths):
        tokens[i, : t - length] = 0  # left padding
    mask = ((rng.random((n, t)) < 0.5) & (tokens != 0)).astype(np.int64)
    return tokens, mask


def test_crc32c_known_value():
    # The CRC-32C check value (RFC 3720) and an empty string.
    got = records.crc32c_batch([b"123456789", b"", b"a" * 1000])
    assert got[0] == 0xE3069283 and got[1] == 0


def test_round_trip_numpy(tmp_path):
    tokens, mask = _rows()
    tokens[0, -1] = 2**40 + 5  # a 6-byte varint still round trips
    path = tmp_path / "s.tfrecord"
    records.write_shard(path, tokens, mask)
    back = records.read_shard(path)
    np.testing.assert_array_equal(back["text"], tokens)
    np.testing.assert_array_equal(back["loss_mask"], mask)
    records.write_shard(path, tokens)
    assert set(records.read_shard(path)) == {"text"}


def test_bytes_equal_tensorflow_and_tf_reads_them(tmp_path):
    import tensorflow as tf

    tokens, mask = _rows(n=5, t=12)
    ours = records.encode_examples(tokens)
    for row, payload in zip(tokens, ours, strict=True):
        ex = tf.train.Example(
            features=tf.train.Features(
                feature={"text": tf.train.Feature(int64_list=tf.train.Int64List(value=row))}
            )
        )
        assert payload == ex.SerializeToString()
    path = tmp_path / "s.tfrecord"
    records.write_shard(path, tokens, mask)
    spec = {k: tf.io.FixedLenFeature([12], tf.int64) for k in ("text", "loss_mask")}
    got = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(str(path))]
    np.testing.assert_array_equal(np.stack([g["text"].numpy() for g in got]), tokens)
    np.testing.assert_array_equal(np.stack([g["loss_mask"].numpy() for g in got]), mask)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="must be >= 0"):
        records.encode_examples(np.array([[1, -2]]))
    with pytest.raises(ValueError, match="int array"):
        records.encode_examples(np.array([1, 2]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        records.encode_examples(np.array([[1, 2]]), np.array([[1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        records.encode_examples(np.array([[1, 2]]), np.array([[1]]))


def test_corrupt_shard_names_the_file(tmp_path):
    tokens, _ = _rows()
    path = tmp_path / "shard-00000-of-00001.tfrecord"
    size = records.write_shard(path, tokens)
    data = bytearray(path.read_bytes())
    data[size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-00000-of-00001.tfrecord.*checksum"):
        records.read_shard(path)


def test_truncated_shard_names_the_file(tmp_path):
    tokens, _ = _rows()
    path = tmp_path / "shard-00000-of-00001.tfrecord"
    size = records.write_shard(path, tokens)
    path.write_bytes(path.read_bytes()[: size - 7])
    with pytest.raises(CorruptShardError, match=r"shard-00000-of-00001.tfrecord.*truncated") as e:
        records.read_shard(path)
    assert e.value.path == str(path)


def test_write_dataset_manifest(tmp_path):
    tokens, mask = _rows(n=10)
    manifest = records.write_dataset(tmp_path, tokens, mask, num_shards=3)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert [s["examples"] for s in manifest["shards"]] == [4, 3, 3]
    assert manifest["totals"]["tokens"] == int(np.count_nonzero(tokens))
    assert manifest["totals"]["loss_tokens"] == int(mask.sum())
    assert manifest["features"] == ["text", "loss_mask"]
    back = np.concatenate(
        [records.read_shard(tmp_path / s["path"])["text"] for s in manifest["shards"]]
    )
    np.testing.assert_array_equal(back, tokens)
