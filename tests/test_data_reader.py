"""ShardReader: streams, determinism, resume, batch concatenation, shard errors (no Ray)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from rwkv_ray.data import records
from rwkv_ray.data.reader import ShardReader
from rwkv_ray.data.records import CorruptShardError
from rwkv_ray.data.storage import ChecksumError

T = 8
N = 47  # in 6 shards of [8, 8, 8, 8, 8, 7]; shard i -> stream i % num_streams


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Example k has k + 1 in its last column (ids 1..47), left padding before it."""
    tokens = np.zeros((N, T), np.int64)
    tokens[:, -1] = np.arange(1, N + 1)
    tokens[:, -3:-1] = 7
    mask = np.zeros_like(tokens)
    mask[:, -1] = 1
    path = tmp_path_factory.mktemp("ds")
    manifest = records.write_dataset(path, tokens, mask, num_shards=6)
    assert [s["examples"] for s in manifest["shards"]] == [8, 8, 8, 8, 8, 7]
    return path, np.cumsum([0, 8, 8, 8, 8, 8, 7])


def _ids(batches):
    return [b["tokens"][:, -1].tolist() for b in batches]


def _reader(path, streams, num_streams=2, b=3, seed=0, **kw):
    return ShardReader(str(path), b, seed=seed, streams=streams, num_streams=num_streams, **kw)


def test_streams_are_disjoint_and_cover_their_shards(dataset):
    path, edges = dataset
    seen = {}
    for s in range(3):
        reader = _reader(path, [s], num_streams=3, b=1, shuffle_buffer=1000)
        # stream s = shards s, s + 3: 16, 16 and 15 examples -> min 15 steps of 1
        assert reader.steps_per_epoch == 15
        seen[s] = {i for batch in _ids(reader.batches(0)) for i in batch}
        own = {k + 1 for sh in (s, s + 3) for k in range(edges[sh], edges[sh + 1])}
        assert seen[s] <= own and len(seen[s]) == 15
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_steps_per_epoch_is_min_over_all_streams_drop_remainder(dataset):
    path, _ = dataset
    # num_streams=2: stream 0 = shards 0, 2, 4 (24 ex.), stream 1 = 1, 3, 5 (23 ex.)
    for streams in ([0], [1], [0, 1]):
        reader = _reader(path, streams, b=8)
        assert reader.steps_per_epoch == 2  # not 3, although stream 0 alone holds 3 batches
        batches = list(reader.batches(0))
        assert len(batches) == 2
        assert batches[0]["tokens"].shape == (8 * len(streams), T)
        assert batches[0]["tokens"].dtype == np.int32
        assert batches[0]["loss_mask"].dtype == np.float32
    assert _reader(path, [0], b=4).steps_per_epoch == 5


def test_deterministic_for_seed_and_epoch(dataset):
    path, _ = dataset
    a = _ids(_reader(path, [0, 1], seed=5).batches(epoch=2))
    assert a == _ids(_reader(path, [0, 1], seed=5).batches(epoch=2))
    assert a != _ids(_reader(path, [0, 1], seed=5).batches(epoch=3))
    assert a != _ids(_reader(path, [0, 1], seed=6).batches(epoch=2))
    # each epoch is a permutation without repeats
    flat = [i for batch in a for i in batch]
    assert len(flat) == len(set(flat)) == 2 * 7 * 3


def test_order_does_not_depend_on_the_global_random_seed(dataset):
    """Model init (keras.utils.set_random_seed) sets TensorFlow's global seed; the data order
    must stay a function of (seed, epoch) alone, and the global seed must be left as it was."""
    import keras
    import tensorflow as tf
    from tensorflow.python.eager import context

    path, _ = dataset
    before = _ids(_reader(path, [0, 1], seed=5).batches(epoch=1))
    keras.utils.set_random_seed(1234)
    try:
        after = _ids(_reader(path, [0, 1], seed=5).batches(epoch=1))
        assert context.global_seed() == 1234
    finally:
        tf.random.set_seed(None)
    assert after == before


def test_one_worker_two_streams_equals_two_workers(dataset):
    path, _ = dataset
    for epoch in (0, 1):
        both = list(_reader(path, [0, 1], seed=3).batches(epoch))
        w0 = list(_reader(path, [0], seed=3).batches(epoch))
        w1 = list(_reader(path, [1], seed=3).batches(epoch))
        assert len(both) == len(w0) == len(w1) == 7
        for g, x, y in zip(both, w0, w1, strict=True):
            for key in ("tokens", "loss_mask"):
                np.testing.assert_array_equal(g[key], np.concatenate([x[key], y[key]]))


def test_resume_at_step_is_the_tail_of_a_full_pass(dataset):
    path, _ = dataset
    reader = _reader(path, [0, 1], seed=1, shuffle_buffer=4)  # a partial shuffle, too
    full = list(reader.batches(epoch=1))
    for k in (0, 1, 4, 7):
        tail = list(reader.batches(epoch=1, start_step=k))
        assert len(tail) == len(full) - k
        for x, y in zip(tail, full[k:], strict=True):
            np.testing.assert_array_equal(x["tokens"], y["tokens"])
    with pytest.raises(ValueError, match="start_step"):
        list(reader.batches(1, start_step=8))
    it = reader.iterate(epoch=0, step=6)
    assert [next(it)[:2] for _ in range(3)] == [(0, 6), (1, 0), (1, 1)]


def test_loss_mask_stored_or_real_tokens(dataset, tmp_path):
    path, _ = dataset
    batch = next(_reader(path, [0]).batches(0))
    expect = np.zeros((3, T), np.float32)
    expect[:, -1] = 1
    np.testing.assert_array_equal(batch["loss_mask"], expect)
    tokens = np.array([[0, 0, 5, 6], [0, 1, 2, 3], [9, 9, 9, 9]])
    records.write_dataset(tmp_path, tokens, num_shards=1)
    batch = next(ShardReader(str(tmp_path), 3, 0, [0], 1, shuffle_buffer=1).batches(0))
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["loss_mask"], (tokens != 0).astype(np.float32))


def test_argument_errors(dataset, tmp_path):
    path, _ = dataset
    with pytest.raises(ValueError, match="6 shard.*fewer than num_streams=7"):
        _reader(path, [0], num_streams=7)
    with pytest.raises(ValueError, match="distinct ids"):
        _reader(path, [0, 0])
    with pytest.raises(ValueError, match="distinct ids"):
        _reader(path, [2])
    with pytest.raises(ValueError, match="fewer than batch_size_per_stream"):
        _reader(path, [0], b=24)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        _reader(tmp_path, [0])


def _corrupt_copy(src, dst, edit):
    shutil.copytree(src, dst)
    victim = dst / records.shard_name(3, 6)
    victim.write_bytes(edit(victim.read_bytes()))
    return victim


def _flip(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize("edit", [_flip, lambda d: d[:-9]], ids=["bitflip", "truncated"])
def test_corrupt_shard_is_named(dataset, tmp_path, edit):
    path, _ = dataset
    victim = _corrupt_copy(path, tmp_path / "ds", edit)
    with pytest.raises(ChecksumError, match=victim.name):  # checked before reading
        _reader(tmp_path / "ds", [1])
    _reader(tmp_path / "ds", [0])  # stream 0 does not hold the bad shard
    reader = _reader(tmp_path / "ds", [1], verify=False)
    with pytest.raises(CorruptShardError, match=victim.name) as e:  # tf.data DataLossError
        list(reader.batches(0))
    assert e.value.path == str(victim)


def test_shards_shorter_than_their_manifest_stop_the_epoch_with_an_error(tmp_path):
    """Counts in the manifest above what the (checksum-valid) shards hold: the stream that
    runs out raises, naming the step, instead of ending its epoch early (workers would then
    run different numbers of steps and stall each other)."""
    import hashlib
    import json

    out = tmp_path / "ds"
    records.write_dataset(out, np.arange(1, 49).reshape(12, 4), num_shards=2)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard, rows in zip(manifest["shards"], (4, 8), strict=True):
        path = out / shard["path"]
        records.write_shard(path, np.arange(1, rows * 4 + 1).reshape(rows, 4))
        data = path.read_bytes()
        shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), examples=12)
    (out / "manifest.json").write_text(json.dumps(manifest))
    reader = ShardReader(str(out), 2, seed=0, streams=[0], num_streams=2)
    assert reader.steps_per_epoch == 6
    got = []
    with pytest.raises(ValueError, match=r"streams \[0\] ran out after 2 of 6 batches"):
        for batch in reader.batches(0):
            got.append(batch)
    assert len(got) == 2
