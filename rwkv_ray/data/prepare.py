"""Prepare a dataset on Ray Data: text -> World tokens -> left-padded TFRecord shards.

    read (jsonl / text / parquet, local or s3://)
      -> repartition(rows_per_task)            small blocks: tokenization spreads out
      -> map_batches(_encode_batch)            tokenize, truncate, left-pad, encode + frame
      -> repartition(num_shards)               one block per shard, in input order
      -> write_datasink(_ShardSink)            each task writes one shard (local or boto3)
      -> driver: rename parts to shard-00000-of-000NN.tfrecord, write manifest.json

Every example is ``seq_len`` tokens: a longer text is **truncated keeping its beginning**
(the end is dropped; counted as ``truncated`` in the manifest), a shorter one is left-padded
with 0. Rows with a ``prompt`` and ``response`` are encoded as prompt tokens followed by
response tokens (no separator is added: put it in the data) and get a ``loss_mask`` of 1 on
the response tokens; when the input has those columns every record carries a ``loss_mask``
(plain-text rows: 1 on every real token). Rows that leave nothing to learn from are skipped
and counted as ``empty``: no text (an empty or null field, or none of the fields), or a
response that is empty or that truncation cut off entirely. Order is preserved, so the same
inputs give byte-identical shards.
The driver never loops over examples; all work runs in Ray tasks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rwkv_ray.data import records, storage
from rwkv_ray.data.config import SUFFIX_FORMATS, PrepareConfig, PrepareConfigError
from rwkv_ray.data.records import MANIFEST
from rwkv_ray.data.storage import S3Options

STAGING = "_staging"
STAT_KEYS = ("examples", "tokens", "loss_tokens", "truncated", "empty")


# ---- inputs ---------------------------------------------------------------------------


def resolve_inputs(cfg: PrepareConfig, s3: S3Options) -> dict[str, list[str]]:
    """Input files grouped by format; missing inputs and empty directories raise. In a
    directory, hidden files (``.x``, ``_x``) and, with ``format: auto``, files of unknown
    suffix are skipped."""
    by_format: dict[str, list[str]] = {}
    for uri in cfg.inputs:
        files = storage.list_files(uri, s3)
        if not files:
            raise FileNotFoundError(f"input not found (or an empty directory): {uri}")
        if files != [uri] and files != [str(Path(uri))]:  # a directory / prefix
            files = [f for f in files if not Path(f).name.startswith((".", "_"))]
            if cfg.format == "auto":
                files = [f for f in files if f.endswith(tuple(SUFFIX_FORMATS))]
            if not files:
                raise FileNotFoundError(f"no {sorted(SUFFIX_FORMATS)} files under {uri}")
        for f in files:
            by_format.setdefault(cfg.input_format(f), []).append(f)
    return by_format


def read_inputs(cfg: PrepareConfig, by_format: Mapping[str, list[str]], s3: S3Options):
    """One Ray dataset over all inputs (text files give a ``text_field`` column)."""
    import ray.data

    parts = []
    for fmt, all_files in sorted(by_format.items()):
        for remote in (False, True):  # one filesystem per read
            files = [f for f in all_files if storage.is_s3(f) == remote]
            if not files:
                continue
            fs = storage.pyarrow_filesystem(files[0], s3)
            if fmt == "jsonl":
                # pyarrow's reader takes newline-delimited JSON as it is; `lines=True` goes
                # through pandas, which turns strings like " 4" into numbers.
                ds = ray.data.read_json(files, filesystem=fs, file_extensions=None)
            elif fmt == "parquet":
                ds = ray.data.read_parquet(files, filesystem=fs, file_extensions=None)
            else:
                ds = ray.data.read_text(files, filesystem=fs, file_extensions=None)
                if cfg.text_field != "text":
                    ds = ds.rename_columns({"text": cfg.text_field})
            parts.append(ds)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _input_error(
    cfg: PrepareConfig, by_format: Mapping[str, list[str]], error
) -> ValueError | None:
    """A one-line error for a Ray task that failed on the input, or None (not an input
    problem: the task error stands, traceback and all).

    A failed read says little: Ray's fallback parser reports "Extra data: line 2" for any bad
    line of a jsonl file and hides pyarrow's reason. So the local jsonl inputs are scanned
    here, only after a failure (the fast path stays as it is), for the line to name.
    """
    from ray.exceptions import RayTaskError

    cause = error
    while isinstance(cause, RayTaskError) and cause.cause is not None:
        cause = cause.cause
    local = [f for f in by_format.get("jsonl", []) if not storage.is_s3(f)]
    for path in local:
        problem = _first_bad_line(cfg, path)
        if problem is not None:
            return ValueError(problem)
    if not isinstance(cause, ValueError | OSError):  # a user error, as the CLI counts them
        return None
    lines = str(cause).strip().splitlines()  # Ray appends notes on retries to the message
    message = lines[0] if lines else ""
    return ValueError(f"a Ray task failed on {list(cfg.inputs)}: {type(cause).__name__}: {message}")


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object", type(None): "null"}  # fmt: skip


def _first_bad_line(cfg: PrepareConfig, path: str) -> str | None:
    """``path:line: problem`` for the first line of a jsonl file that is not a JSON object,
    has a text field that is not a string, or changes the JSON type of a field (pyarrow's
    reader gives each field one type); None when every line is fine or the file is one JSON
    array."""
    text_fields = (cfg.text_field, cfg.prompt_field, cfg.response_field)
    first_seen: dict[str, tuple[str, int]] = {}  # field -> (its JSON type, first line)
    first_row = True
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():  # the reader skips blank lines
                continue
            if first_row and line.lstrip().startswith(b"["):
                return None  # a JSON array (a .json file): Ray's fallback reads it whole
            first_row = False
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # a string ends at its line
            except UnicodeDecodeError as e:
                return f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                return f"{path}:{n}: invalid JSON ({e.msg}: column {e.colno})"
            if not isinstance(row, dict):
                return f"{path}:{n}: expected a JSON object, got {_JSON_TYPES[type(row)]}"
            for key, value in row.items():
                if value is None:  # null fits any type
                    continue
                kind = _JSON_TYPES[type(value)]
                if key in text_fields and not isinstance(value, str):
                    return f"{path}:{n}: field {key!r} is {kind}, expected a string"
                seen, at = first_seen.setdefault(key, (kind, n))
                if kind != seen:
                    return f"{path}:{n}: field {key!r} is {kind}, but {seen} on line {at}"
    return None


def detect_loss_mask(cfg: PrepareConfig, columns: Iterable[str]) -> bool:
    """Whether records get a ``loss_mask``; raises when no usable column is present."""
    columns = list(columns)
    has_pr = cfg.prompt_field in columns and cfg.response_field in columns
    if not has_pr and cfg.text_field not in columns:
        raise PrepareConfigError(
            f"input has columns {columns}: expected a {cfg.text_field!r} column or "
            f"{cfg.prompt_field!r} + {cfg.response_field!r} columns "
            "(set text_field / prompt_field / response_field to use other names)"
        )
    return has_pr


# ---- the map stage (runs in Ray tasks) --------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab_path: str | None):
    from rwkv_ray.tokenizer import WorldTokenizer

    return WorldTokenizer(vocab_path)


def _column(table, name: str) -> list | None:
    if name not in table.column_names:
        return None
    try:
        values = table.column(name).to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"field {name!r} holds text that is not UTF-8 ({e})") from e
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise PrepareConfigError(f"field {name!r} must hold strings, got {type(bad).__name__}")
    return values


def tokenize_rows(table, settings: Mapping[str, Any], with_mask: bool):
    """Token ids and loss masks (``None`` = every token) of each row of an arrow table."""
    tok = _tokenizer(settings["vocab_path"])
    texts = _column(table, settings["text_field"])
    prompts = _column(table, settings["prompt_field"])
    responses = _column(table, settings["response_field"])
    ids: list[list[int]] = []
    masks: list[list[int] | None] = []
    for i in range(table.num_rows):
        text = texts[i] if texts is not None else None
        prompt = prompts[i] if prompts is not None else None
        response = responses[i] if responses is not None else None
        if text is not None and prompt is None and response is None:
            ids.append(tok.encode(text))
            masks.append(None)
        elif text is None and prompt is None and response is None:  # a row with no text
            ids.append([])
            masks.append(None)
        elif text is None and prompt is not None and response is not None and with_mask:
            p, r = tok.encode(prompt), tok.encode(response)
            ids.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
        else:
            fields = {"text": text, "prompt": prompt, "response": response}
            given = [k for k, v in fields.items() if v is not None]
            raise PrepareConfigError(
                f"a row has fields {given} (columns {table.column_names}): each row needs "
                f"either {settings['text_field']!r} or {settings['prompt_field']!r} + "
                f"{settings['response_field']!r}"
            )
    return ids, masks


def encode_batch(table, settings: Mapping[str, Any], with_mask: bool):
    """Arrow table of framed TFRecord records + per-row stats, from a table of text rows."""
    import pyarrow as pa

    ids, masks = tokenize_rows(table, settings, with_mask)
    n, seq_len = len(ids), settings["seq_len"]
    tokens = np.zeros((n, seq_len), np.int64)
    loss = np.zeros((n, seq_len), np.int64)
    lengths = np.zeros(n, np.int64)
    truncated = np.zeros(n, bool)
    for i, (row, mask) in enumerate(zip(ids, masks, strict=True)):
        truncated[i] = len(row) > seq_len
        row = row[:seq_len]  # keep the beginning
        lengths[i] = len(row)
        if row:
            tokens[i, seq_len - len(row) :] = row
            loss[i, seq_len - len(row) :] = 1 if mask is None else mask[:seq_len]
    keep = (loss.sum(axis=1) > 0) if with_mask else lengths > 0  # something to learn from
    payloads = []  # a batch of skipped rows only has no record to encode
    if keep.any():
        payloads = records.encode_examples(tokens[keep], loss[keep] if with_mask else None)
    framed = iter(records.frame_each(payloads))
    out = [next(framed) if k else b"" for k in keep.tolist()]
    return pa.table(
        {
            "record": pa.array(out, pa.large_binary()),  # the counts: written examples only
            "tokens": np.where(keep, lengths, 0),
            "loss_tokens": np.where(keep, loss.sum(axis=1) if with_mask else lengths, 0),
            "truncated": truncated & keep,
            "empty": ~keep,
        }
    )


# ---- the write stage -------------------------------------------------------------------


def _sink_class():
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class ShardSink(Datasink):
        """Each write task streams its blocks into one part file and reports its stats."""

        def __init__(self, staging: str, s3: S3Options) -> None:
            self.staging, self.s3 = staging, s3
            self.results: list[dict] = []

        def write(self, blocks, ctx) -> dict:
            stats = dict.fromkeys(STAT_KEYS, 0)
            digest = hashlib.sha256()
            name = f"part-{ctx.task_idx:05d}.tfrecord"
            fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
            with os.fdopen(fd, "wb") as f:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    if table.num_rows == 0:  # more shards than rows: Ray's empty blocks
                        continue  # carry no columns
                    for rec in table.column("record").to_pylist():
                        if rec:
                            f.write(rec)
                            digest.update(rec)
                    for key in STAT_KEYS[1:]:
                        stats[key] += int(np.sum(table.column(key).to_numpy()))
                    stats["examples"] += table.num_rows
            stats["examples"] -= stats["empty"]
            stats.update(task=ctx.task_idx, bytes=os.path.getsize(tmp), sha256=digest.hexdigest())
            stats["staged"] = storage.join(self.staging, name)
            if storage.is_s3(self.staging):
                storage.upload_file(tmp, stats["staged"], self.s3)
                os.unlink(tmp)
            else:
                Path(self.staging).mkdir(parents=True, exist_ok=True)
                shutil.move(tmp, stats["staged"])
            return stats

        def on_write_complete(self, write_result) -> None:
            self.results = list(write_result.write_returns)

    return ShardSink


# ---- the driver ------------------------------------------------------------------------


def prepare(config: PrepareConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run the pipeline (on the current Ray cluster; started locally if none) and return
    the manifest it wrote to ``<output>/manifest.json``."""
    cfg = config if isinstance(config, PrepareConfig) else PrepareConfig.from_dict(config)
    s3 = S3Options(cfg.s3_endpoint_url).resolved()
    by_format = resolve_inputs(cfg, s3)
    _clear_output(cfg, s3)
    import ray.data
    from ray.exceptions import RayTaskError

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True  # same inputs -> identical shards
    ctx.enable_progress_bars = cfg.progress
    try:
        results, with_mask = _run_pipeline(cfg, by_format, s3)
    except RayTaskError as e:
        error = _input_error(cfg, by_format, e)
        if error is None:
            raise
        raise error from e
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    return _finalize(cfg, results, with_mask, s3)


def _run_pipeline(cfg: PrepareConfig, by_format: Mapping[str, list[str]], s3: S3Options):
    ds = read_inputs(cfg, by_format, s3)
    schema = ds.schema()
    if schema is None:
        raise ValueError(f"no rows in the input {list(cfg.inputs)}")
    with_mask = detect_loss_mask(cfg, schema.names)
    settings = {
        key: getattr(cfg, key)
        for key in ("seq_len", "text_field", "prompt_field", "response_field", "vocab_path")
    }
    ds = ds.repartition(target_num_rows_per_block=cfg.rows_per_task)
    ds = ds.map_batches(
        encode_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"settings": settings, "with_mask": with_mask},
    )
    ds = ds.repartition(cfg.num_shards)
    sink = _sink_class()(storage.join(cfg.output, STAGING), s3)
    ds.write_datasink(sink)
    return sink.results, with_mask


def _clear_output(cfg: PrepareConfig, s3: S3Options) -> None:
    """Refuse to replace a finished dataset unless ``overwrite``; drop leftovers of an
    interrupted run (shards, staging parts) either way."""
    existing = storage.list_files(cfg.output, s3) if _exists(cfg.output, s3) else []
    manifest = storage.join(cfg.output, MANIFEST)
    if manifest in existing and not cfg.overwrite:
        raise FileExistsError(
            f"{manifest} exists: pass --overwrite (or overwrite: true) to replace it"
        )
    for uri in existing:
        name = uri.rsplit("/", 1)[-1]
        staged = f"/{STAGING}/" in uri.replace(os.sep, "/")
        if staged or name == MANIFEST or (name.startswith("shard-") and ".tfrecord" in name):
            storage.delete(uri, s3)


def _exists(uri: str, s3: S3Options) -> bool:
    """Whether ``uri`` holds anything; a missing S3 bucket raises (a clear early error)."""
    if not storage.is_s3(uri):
        return Path(uri).exists()
    return bool(storage.list_files(uri, s3))


def _finalize(cfg: PrepareConfig, results: list[dict], with_mask: bool, s3: S3Options) -> dict:
    results = sorted(results, key=lambda r: r["task"])
    totals = {key: sum(r[key] for r in results) for key in STAT_KEYS}
    parts = [r for r in results if r["examples"] > 0]
    for r in results:
        if r["examples"] == 0:
            storage.delete(r["staged"], s3)
    if not parts:
        _remove_staging(cfg)
        raise ValueError(f"no examples in the input {list(cfg.inputs)} ({totals['empty']} empty)")
    shards = []
    for i, r in enumerate(parts):
        name = records.shard_name(i, len(parts))
        storage.move(r["staged"], storage.join(cfg.output, name), s3)
        shards.append({"path": name, **{k: r[k] for k in (*STAT_KEYS[:4], "bytes", "sha256")}})
    _remove_staging(cfg)
    manifest = records.build_manifest(
        cfg.seq_len,
        shards,
        with_mask=with_mask,
        tokenizer=_tokenizer_info(cfg.vocab_path),
        inputs=list(cfg.inputs),
        config=cfg.to_dict(),
    )
    manifest["totals"]["empty"] = totals["empty"]
    storage.write_bytes(storage.join(cfg.output, MANIFEST), _dumps(manifest), s3)
    if len(parts) < cfg.num_shards:
        n = totals["examples"]
        print(f"note: {n} examples fill only {len(parts)} of {cfg.num_shards} shards")
    return manifest


def _remove_staging(cfg: PrepareConfig) -> None:
    if not storage.is_s3(cfg.output):
        shutil.rmtree(Path(cfg.output, STAGING), ignore_errors=True)


def _tokenizer_info(vocab_path: str | None) -> dict[str, Any]:
    tok = _tokenizer(vocab_path)
    return {
        "name": "rwkv-world",
        "vocab": tok.vocab_path.name,
        "vocab_sha256": storage.sha256_file(tok.vocab_path),
        "vocab_size": tok.vocab_size,
    }


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
