"""Data: prepare tokenized TFRecord shards on Ray Data, read them in training workers.

    from rwkv_ray.data.prepare import prepare  # (not re-exported: it would shadow the module)
    prepare(PrepareConfig(inputs=["corpus.jsonl"], output="s3://bucket/ds", seq_len=512))
    reader = ShardReader("s3://bucket/ds", 8, seed=0, streams=[rank], num_streams=world)

Importing this package imports neither Ray nor TensorFlow (each is imported where used).
"""

from rwkv_ray.data.config import PrepareConfig, PrepareConfigError
from rwkv_ray.data.reader import ShardReader, load_manifest
from rwkv_ray.data.records import CorruptShardError
from rwkv_ray.data.storage import ChecksumError, S3Options

__all__ = [
    "ChecksumError",
    "CorruptShardError",
    "PrepareConfig",
    "PrepareConfigError",
    "S3Options",
    "ShardReader",
    "load_manifest",
]
