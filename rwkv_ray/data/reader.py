"""The training-worker reader: tf.data over a prepared dataset's shards, batches as numpy.

No Ray in here: each Ray Train worker builds its own reader.

Streams. Shard ``i`` belongs to logical stream ``i % num_streams`` (stream ``s`` reads shards
``s, s + num_streams, ...``: disjoint). A worker of rank ``r`` in a world of ``W`` normally
reads ``streams=[r]`` with ``num_streams=W``; a worker may read several streams, whose
batches are concatenated along the batch axis in the order given. So one worker reading
``streams=[0, 1]`` gets exactly the global batch that two workers reading ``[0]`` and
``[1]`` get together, and a run can change its worker count without changing its data.

Order. Each stream's order is a function of ``(seed, epoch, stream)`` only: its shard files
are permuted, then its records pass through a seeded shuffle buffer of ``shuffle_buffer``
examples (>= the stream's size = a full permutation). ``batches(epoch, start_step)`` skips
the first ``start_step * batch_size_per_stream`` records of that order (reading, not
parsing, them), so a resumed run sees exactly the tail of an uninterrupted epoch.

Epoch length. ``steps_per_epoch = min over ALL num_streams streams of (examples //
batch_size_per_stream)``: every worker runs the same number of steps whichever streams it
reads; the remainder of each stream is dropped (a different part in every epoch).

Integrity. ``s3://`` shards are downloaded with boto3 into a local cache; every shard read
is checked against the manifest's sha256 first (``verify=True``). A corrupt or truncated
shard that gets past that (``verify=False``) fails in tf.data with DataLossError, which is
re-raised as :class:`CorruptShardError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rwkv_ray.data import storage
from rwkv_ray.data.records import (
    FORMAT_VERSION,
    LOSS_MASK_KEY,
    MANIFEST,
    TEXT_KEY,
    CorruptShardError,
)
from rwkv_ray.data.storage import S3Options

Batch = dict[str, np.ndarray]


def load_manifest(dataset_uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared dataset (local directory or ``s3://`` prefix)."""
    uri = storage.join(dataset_uri, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(uri, s3))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no {MANIFEST} at {dataset_uri}: not a prepared dataset (run `rwkv-ray prepare`)"
        ) from e
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{uri}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    return manifest


def _tf():
    import tensorflow as tf

    try:  # a full TensorFlow must not take GPU memory away from JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialized
    return tf


# TensorFlow derives a shuffle's seeds from (global seed, op seed) when the op is built; with
# no global seed set it uses this constant. Pinning it while the op is built makes the order a
# function of (seed, epoch, stream) alone, whatever else set TF's global seed in the process
# (keras.utils.set_random_seed does, for model init).
TF_DEFAULT_GLOBAL_SEED = 87654321


@contextlib.contextmanager
def _tf_global_seed(tf, seed: int):
    from tensorflow.python.eager import context  # the only getter of the global seed

    previous = context.global_seed()
    tf.random.set_seed(seed)
    try:
        yield
    finally:
        tf.random.set_seed(previous)


class ShardReader:
    """Numpy batches ``{'tokens': int32 [b, T], 'loss_mask': float32 [b, T]}`` of some
    streams of a dataset, ``b = batch_size_per_stream * len(streams)``.

    ``loss_mask`` is the stored mask when the dataset has one, else 1 on every real
    (non-pad) token; it marks target tokens (the trainer predicts token t from t - 1).

    Example:
        reader = ShardReader("s3://bucket/ds", 8, seed=0, streams=[rank], num_streams=world)
        for step, batch in enumerate(reader.batches(epoch, start_step), start=start_step):
            ...
    """

    def __init__(
        self,
        dataset_uri: str,
        batch_size_per_stream: int,
        seed: int,
        streams: Sequence[int],
        num_streams: int,
        cache_dir: str | os.PathLike | None = None,
        *,
        shuffle_buffer: int = 10_000,
        verify: bool = True,
        s3_endpoint_url: str | None = None,
    ) -> None:
        self.dataset_uri = str(dataset_uri)
        self.batch_size_per_stream = int(batch_size_per_stream)
        self.seed = int(seed)
        self.streams = [int(s) for s in streams]
        self.num_streams = int(num_streams)
        self.shuffle_buffer = int(shuffle_buffer)
        self._s3 = S3Options(endpoint_url=s3_endpoint_url).resolved()
        self.manifest = load_manifest(self.dataset_uri, self._s3)
        self._check_args()
        shards = self.manifest["shards"]
        self.stream_shards = {
            s: shards[s :: self.num_streams] for s in range(self.num_streams)
        }  # all streams: steps_per_epoch is a min over all of them
        self.steps_per_epoch = min(
            sum(sh["examples"] for sh in self.stream_shards[s]) // self.batch_size_per_stream
            for s in range(self.num_streams)
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.dataset_uri}: a stream holds fewer than batch_size_per_stream="
                f"{self.batch_size_per_stream} examples (use fewer streams or a smaller batch)"
            )
        self._local = {s: self._fetch(self.stream_shards[s], cache_dir, verify) for s in streams}

    def _check_args(self) -> None:
        n = len(self.manifest["shards"])
        if self.batch_size_per_stream < 1:
            raise ValueError(
                f"batch_size_per_stream must be >= 1, got {self.batch_size_per_stream}"
            )
        if self.num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {self.num_streams}")
        if n < self.num_streams:
            raise ValueError(
                f"{self.dataset_uri} has {n} shard(s), fewer than num_streams="
                f"{self.num_streams}: every stream needs a shard (prepare with num_shards >= "
                f"{self.num_streams})"
            )
        bad = [s for s in self.streams if not 0 <= s < self.num_streams]
        if not self.streams or bad or len(set(self.streams)) != len(self.streams):
            raise ValueError(
                f"streams must be distinct ids in [0, {self.num_streams}), got {self.streams}"
            )

    def _fetch(self, shards: list[dict], cache_dir, verify: bool) -> list[str]:
        out = []
        for shard in shards:
            uri = storage.join(self.dataset_uri, shard["path"])
            sha = shard["sha256"] if verify else None
            out.append(str(storage.fetch(uri, sha, cache_dir, self._s3)))
        return out

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def has_loss_mask(self) -> bool:
        return LOSS_MASK_KEY in self.manifest["features"]

    @property
    def batch_size(self) -> int:
        """Rows of each batch: ``batch_size_per_stream * len(streams)``."""
        return self.batch_size_per_stream * len(self.streams)

    def stream_seed(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(stream)])

    def _stream_dataset(self, stream: int, epoch: int, start_step: int):
        tf = _tf()
        files = self._local[stream]
        rng = self.stream_seed(epoch, stream)
        ds = tf.data.TFRecordDataset([files[i] for i in rng.permutation(len(files))])
        if self.shuffle_buffer > 1:
            seed = int(rng.integers(2**62))
            with _tf_global_seed(tf, TF_DEFAULT_GLOBAL_SEED):
                ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        b = self.batch_size_per_stream
        ds = ds.skip(start_step * b).take((self.steps_per_epoch - start_step) * b)
        return ds.batch(b, drop_remainder=True).map(self._parse_fn())

    def _parse_fn(self):
        tf = _tf()
        features = {TEXT_KEY: tf.io.FixedLenFeature([self.seq_len], tf.int64)}
        if self.has_loss_mask:
            features[LOSS_MASK_KEY] = tf.io.FixedLenFeature([self.seq_len], tf.int64)

        def parse(serialized):
            ex = tf.io.parse_example(serialized, features)
            tokens = tf.cast(ex[TEXT_KEY], tf.int32)
            mask = ex[LOSS_MASK_KEY] if self.has_loss_mask else tokens != 0
            return tokens, tf.cast(mask, tf.float32)

        return parse

    def batches(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` on (``steps_per_epoch -
        start_step`` of them)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        tf = _tf()
        parts = tuple(self._stream_dataset(s, epoch, start_step) for s in self.streams)
        ds = tf.data.Dataset.zip(parts).prefetch(2)
        it = iter(ds.as_numpy_iterator())
        for step in range(start_step, self.steps_per_epoch):
            try:
                per_stream = next(it)
            except StopIteration:  # the shards hold fewer examples than the manifest says
                raise ValueError(
                    f"streams {list(self.streams)} ran out after {step} of "
                    f"{self.steps_per_epoch} batches of epoch {epoch}: the shards hold fewer "
                    "examples than their manifest counts (prepare the dataset again)"
                ) from None
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                raise self._corrupt_error(e) from e
            yield {
                "tokens": np.concatenate([p[0] for p in per_stream]),
                "loss_mask": np.concatenate([p[1] for p in per_stream]),
            }

    def iterate(self, epoch: int = 0, step: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """``(epoch, step, batch)`` from a position on, across epochs, without end."""
        while True:
            for i, batch in enumerate(self.batches(epoch, step), start=step):
                yield epoch, i, batch
            epoch, step = epoch + 1, 0

    def _corrupt_error(self, error: Exception) -> CorruptShardError:
        """Find which of this reader's files is bad (only on the error path)."""
        tf = _tf()
        files = [f for s in self.streams for f in self._local[s]]
        parse = self._parse_fn()
        for path in files:
            try:
                for _ in tf.data.TFRecordDataset(path).batch(256).map(parse):
                    pass
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                return CorruptShardError(path, e.message)
        return CorruptShardError(", ".join(files), getattr(error, "message", str(error)))
