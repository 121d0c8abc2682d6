"""Helpers for the training tests: tiny prepared datasets and job configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rwkv_ray.data.records import FORMAT_VERSION, MANIFEST, shard_name, write_shard
from rwkv_ray.data.storage import sha256_file

TINY_MODEL = {
    "vocab_size": 97,
    "num_layers": 2,
    "hidden_size": 64,
    "mix_lora_size": 8,
    "decay_lora_size": 8,
    "checkpoint_dtype": "float32",
}


def write_dataset(out: Path, tokens: np.ndarray, num_shards: int = 2, loss_mask=None) -> Path:
    """Rows of `tokens` [N,T] (left-padded) as a prepared dataset: shards + manifest."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, rows in enumerate(np.array_split(np.arange(len(tokens)), num_shards)):
        name = shard_name(i, num_shards)
        mask = None if loss_mask is None else loss_mask[rows]
        size = write_shard(out / name, tokens[rows].astype(np.int64), mask)
        shards.append(
            {"path": name, "examples": len(rows), "bytes": size, "sha256": sha256_file(out / name)}
        )
    manifest = {
        "format": FORMAT_VERSION,
        "seq_len": int(tokens.shape[1]),
        "padding": "left",
        "pad_id": 0,
        "features": ["text"] + (["loss_mask"] if loss_mask is not None else []),
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def pattern_tokens(rows: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A learnable toy language: each row counts up from a random start (mod vocab-1),
    left-padded by a random amount."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab - 1, rows)[:, None]
    tokens = 1 + (start + np.arange(seq_len)[None]) % (vocab - 1)
    pad = rng.integers(0, seq_len // 4, rows)
    tokens[np.arange(seq_len)[None] < pad[:, None]] = 0
    return tokens.astype(np.int64)


def job_dict(data_dir: Path, storage: Path | str, **sections) -> dict:
    """A tiny full-tuning job; `sections` override whole sections or top-level keys."""
    job = {
        "name": "tiny",
        "mode": "full",
        "model": {"config": dict(TINY_MODEL), "init_seed": 0},
        "data": {"train": str(data_dir), "batch_size_per_stream": 2, "num_streams": 2},
        "optimizer": {"lr": 3e-3, "clip_norm": 1.0},
        "schedule": {"max_steps": 6, "warmup_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpointing": {"storage_path": str(storage), "every_steps": 2},
        "mlflow": {"enabled": False},
        "debug": {"progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job
