"""The TFRecord example format of rwkv_ray datasets, written and read without TensorFlow.

One record = one serialized ``tf.train.Example`` with

- ``text``: int64 ``[seq_len]`` token ids, **left-padded** with 0 (as in the seed; id 0 is
  never produced by the World tokenizer, so ``text != 0`` is the real-token mask);
- ``loss_mask`` (optional): int64 ``[seq_len]``, 1 where a token is a training target
  (the response tokens of a prompt/response pair), 0 elsewhere (prompt and padding).

A shard is a TFRecord file: per record ``uint64 length | uint32 masked_crc32c(length) |
data | uint32 masked_crc32c(data)`` (little endian). TensorFlow reads these files with
``tf.data.TFRecordDataset`` + ``tf.io.parse_example``; this module encodes (and, for tools
and tests, decodes) them in numpy, so the Ray Data prepare workers never import TensorFlow
(~10 s and ~0.5 GB per process). The CRC32C is computed for a whole batch of records at
once, one byte position per numpy step.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TEXT_KEY = "text"
LOSS_MASK_KEY = "loss_mask"
PAD_ID = 0
MANIFEST = "manifest.json"
FORMAT_VERSION = "rwkv_ray.tfrecord.v1"


def shard_name(index: int, count: int) -> str:
    """``shard-00003-of-00008.tfrecord``: the name of shard ``index`` of ``count``."""
    return f"shard-{index:05d}-of-{count:05d}.tfrecord"


class CorruptShardError(RuntimeError):
    """A shard file is corrupt or truncated; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, detail: str) -> None:
        self.path = str(path)
        super().__init__(f"corrupt or truncated TFRecord shard {self.path}: {detail}")


# ---- CRC32C (Castagnoli), batched -----------------------------------------------------


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()
_MASK_DELTA = np.uint32(0xA282EAD8)


def crc32c_batch(chunks: list[bytes]) -> np.ndarray:
    """CRC32C of each byte string, as uint32 ``[len(chunks)]``.

    Rows are sorted by length so that step ``j`` only touches the rows longer than ``j``.
    """
    n = len(chunks)
    if n == 0:
        return np.zeros(0, np.uint32)
    lens = np.fromiter((len(c) for c in chunks), np.int64, n)
    order = np.argsort(-lens, kind="stable")
    slens = lens[order]
    buf = np.zeros((n, int(slens[0])), np.uint8)
    for row, i in enumerate(order):
        buf[row, : slens[row]] = np.frombuffer(chunks[i], np.uint8)
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    active = n
    for j in range(buf.shape[1]):
        while slens[active - 1] <= j:
            active -= 1
        c = crc[:active]
        crc[:active] = _CRC_TABLE[(c ^ buf[:active, j]) & 0xFF] ^ (c >> 8)
    out = np.empty(n, np.uint32)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def masked_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masked CRC: ``rotr(crc, 15) + 0xa282ead8`` (mod 2**32)."""
    crc = crc.astype(np.uint32)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA).astype(np.uint32)


# ---- protobuf encoding of tf.train.Example ----------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _packed_varints(values: np.ndarray) -> list[bytes]:
    """Packed protobuf varints of each row of a non-negative int array ``[B, T]``."""
    v = values.astype(np.uint64)
    groups = max(1, (int(v.max(initial=0)).bit_length() + 6) // 7)
    shifts = np.arange(groups, dtype=np.uint64) * np.uint64(7)
    parts = (v[..., None] >> shifts) & np.uint64(0x7F)  # [B, T, G]
    nbytes = np.ones(v.shape, np.int64)
    for g in range(1, groups):
        nbytes += v >= np.uint64(1 << (7 * g))
    g_idx = np.arange(groups)
    parts |= np.where(g_idx < nbytes[..., None] - 1, np.uint64(0x80), np.uint64(0))
    flat = parts[g_idx < nbytes[..., None]].astype(np.uint8).tobytes()
    ends = np.cumsum(nbytes.sum(axis=1))
    starts = np.concatenate([[0], ends[:-1]])
    return [flat[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def _feature_entry(key: bytes, packed: bytes) -> bytes:
    int64_list = b"\x0a" + _varint(len(packed)) + packed  # Int64List.value (packed)
    feature = b"\x1a" + _varint(len(int64_list)) + int64_list  # Feature.int64_list
    entry = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(feature)) + feature
    return b"\x0a" + _varint(len(entry)) + entry  # Features.feature (map entry)


def encode_examples(tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> list[bytes]:
    """Serialized ``tf.train.Example`` of each row of ``tokens`` (``[B, T]`` ids >= 0).

    ``loss_mask`` (``[B, T]`` of 0/1), when given, is stored as the ``loss_mask`` feature.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} {tokens.shape}")
    if tokens.size and tokens.min() < 0:
        raise ValueError(f"token ids must be >= 0, got {int(tokens.min())}")
    cols = [(TEXT_KEY.encode(), _packed_varints(tokens))]
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask shape {loss_mask.shape} != tokens {tokens.shape}")
        if loss_mask.size and not np.isin(loss_mask, (0, 1)).all():
            raise ValueError("loss_mask must hold only 0 and 1")
        cols.append((LOSS_MASK_KEY.encode(), _packed_varints(loss_mask)))
    out = []
    for i in range(tokens.shape[0]):
        features = b"".join(_feature_entry(key, rows[i]) for key, rows in cols)
        out.append(b"\x0a" + _varint(len(features)) + features)  # Example.features
    return out


def frame_each(payloads: list[bytes]) -> list[bytes]:
    """Each payload with its TFRecord framing (length, CRCs); concatenated they form a shard."""
    if not payloads:
        return []
    heads = [struct.pack("<Q", len(p)) for p in payloads]
    head_crc = masked_crc(crc32c_batch(heads)).tolist()
    data_crc = masked_crc(crc32c_batch(payloads)).tolist()
    return [
        b"".join((head, struct.pack("<I", hc), p, struct.pack("<I", dc)))
        for head, hc, p, dc in zip(heads, head_crc, payloads, data_crc, strict=True)
    ]


def frame_records(payloads: list[bytes]) -> bytes:
    """TFRecord framing of ``payloads`` (the bytes of a shard holding them, in order)."""
    return b"".join(frame_each(payloads))


# ---- decoding (tools and tests; training reads through tf.data) ------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("length-delimited field runs past the message")
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _decode_packed(buf: bytes) -> np.ndarray:
    b = np.frombuffer(buf, np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    if b[-1] & 0x80:
        raise ValueError("truncated packed varint")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos = np.arange(b.size) - np.repeat(starts, ends - starts + 1)
    contrib = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * pos.astype(np.uint64))
    return np.add.reduceat(contrib, starts).astype(np.int64)


def _int64_list(feature: bytes) -> np.ndarray:
    for field, _, value in _fields(feature):
        if field != 3:
            raise ValueError(f"feature is not an int64_list (field {field})")
        chunks = []
        for f, wire, v in _fields(value):
            if f == 1:
                chunks.append(_decode_packed(v) if wire == 2 else np.array([v], np.int64))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return np.zeros(0, np.int64)


def decode_example(payload: bytes) -> dict[str, np.ndarray]:
    """Int64 features of a serialized ``tf.train.Example`` as ``{name: int64 array}``."""
    out: dict[str, np.ndarray] = {}
    for field, _, features in _fields(payload):
        if field != 1:
            continue
        for f, _, entry in _fields(features):
            if f != 1:
                continue
            kv = {k: v for k, _, v in _fields(entry)}
            out[kv.get(1, b"").decode()] = _int64_list(kv.get(2, b""))
    return out


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Payloads of a TFRecord file, checking both CRCs; bad data raises CorruptShardError."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise CorruptShardError(path, f"truncated record header at byte {pos}")
        (n,) = struct.unpack_from("<Q", data, pos)
        (hcrc,) = struct.unpack_from("<I", data, pos + 8)
        if int(masked_crc(crc32c_batch([data[pos : pos + 8]]))[0]) != hcrc:
            raise CorruptShardError(path, f"bad length checksum at byte {pos}")
        end = pos + 12 + n + 4
        if end > len(data):
            raise CorruptShardError(path, f"truncated record at byte {pos}")
        payload = data[pos + 12 : pos + 12 + n]
        (dcrc,) = struct.unpack_from("<I", data, end - 4)
        if int(masked_crc(crc32c_batch([payload]))[0]) != dcrc:
            raise CorruptShardError(path, f"bad data checksum in record at byte {pos}")
        yield payload
        pos = end


def read_shard(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All examples of a shard as ``{'text': int64 [N, T], 'loss_mask': ...}`` (numpy)."""
    rows = [decode_example(p) for p in iter_records(path)]
    if not rows:
        return {}
    try:
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    except (KeyError, ValueError) as e:
        raise CorruptShardError(path, f"examples of differing features or lengths: {e}") from e


def write_shard(
    path: str | os.PathLike, tokens: np.ndarray, loss_mask: np.ndarray | None = None
) -> int:
    """Write the rows of ``tokens`` (and ``loss_mask``) as one shard; returns its byte size."""
    data = frame_records(encode_examples(tokens, loss_mask))
    Path(path).write_bytes(data)
    return len(data)


# ---- datasets: shards + manifest --------------------------------------------------------


def build_manifest(
    seq_len: int,
    shards: list[dict[str, Any]],
    *,
    with_mask: bool,
    tokenizer: dict[str, Any] | None = None,
    inputs: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``manifest.json`` of a dataset; each shard dict holds ``path`` (relative to the
    dataset), ``examples``, ``tokens`` (real), ``loss_tokens``, ``truncated``, ``bytes``,
    ``sha256``. ``totals`` sums them (plus ``empty``: skipped rows, from ``config`` runs)."""
    keys = ("examples", "tokens", "loss_tokens", "truncated", "bytes")
    totals = {k: sum(int(s[k]) for s in shards) for k in keys}
    return {
        "format": FORMAT_VERSION,
        "seq_len": int(seq_len),
        "padding": "left",
        "pad_id": PAD_ID,
        "truncation": "keep_beginning",
        "features": [TEXT_KEY, *([LOSS_MASK_KEY] if with_mask else [])],
        "tokenizer": tokenizer,
        "inputs": list(inputs or []),
        "shards": shards,
        "totals": {**totals, "shards": len(shards)},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": config,
    }


def write_dataset(
    out_dir: str | os.PathLike,
    tokens: np.ndarray,
    loss_mask: np.ndarray | None = None,
    num_shards: int = 1,
) -> dict[str, Any]:
    """Write already left-padded rows ``[N, T]`` as a local dataset of ``num_shards``
    contiguous shards + manifest, without Ray (tests, tools, tiny synthetic data)."""
    tokens = np.asarray(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, rows in enumerate(np.array_split(np.arange(len(tokens)), num_shards)):
        mask = None if loss_mask is None else np.asarray(loss_mask)[rows]
        data = frame_records(encode_examples(tokens[rows], mask))
        name = shard_name(i, num_shards)
        (out / name).write_bytes(data)
        real = int(np.count_nonzero(tokens[rows]))
        shards.append(
            {
                "path": name,
                "examples": len(rows),
                "tokens": real,
                "loss_tokens": real if mask is None else int(mask.sum()),
                "truncated": 0,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = build_manifest(tokens.shape[1], shards, with_mask=loss_mask is not None)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
