"""prepare on a local Ray: jsonl / text / parquet -> shards + manifest, checked exactly."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwkv_ray.data import records
from rwkv_ray.data.config import PrepareConfig, PrepareConfigError
from rwkv_ray.data.prepare import prepare
from rwkv_ray.tokenizer import WorldTokenizer

T = 24


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok():
    return WorldTokenizer()


def _expected(tok, rows):
    """Left-padded tokens and masks of the non-empty rows, truncated keeping the start."""
    tokens, masks, truncated = [], [], 0
    for row in rows:
        if "text" in row:
            ids, mask = tok.encode(row["text"]), None
        else:
            p, r = tok.encode(row["prompt"]), tok.encode(row["response"])
            ids, mask = p + r, [0] * len(p) + [1] * len(r)
        truncated += len(ids) > T
        ids = ids[:T]
        if not ids:
            continue
        mask = [1] * len(ids) if mask is None else mask[:T]
        tokens.append([0] * (T - len(ids)) + ids)
        masks.append([0] * (T - len(ids)) + mask)
    return np.array(tokens), np.array(masks), truncated


def _read_all(out, manifest):
    names = [s["path"] for s in manifest["shards"]]
    n = len(names)
    assert names == [f"shard-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    parts = []
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
        part = records.read_shard(out / shard["path"])
        assert shard["examples"] == len(part["text"])
        assert shard["tokens"] == int(np.count_nonzero(part["text"]))
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_jsonl_with_prompt_response_and_loss_mask(tmp_path, tok):
    rows = [{"text": f"Fact {i}: the number {i} comes after {i - 1}."} for i in range(20)]
    rows += [{"prompt": f"Q: {i} plus {i}?\nA:", "response": f" {2 * i}.\n\n"} for i in range(8)]
    rows += [{"text": "a long line " * 20}, {"text": ""}]  # truncated; empty (skipped)
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ds"
    cfg = PrepareConfig(inputs=[str(src)], output=str(out), seq_len=T, num_shards=3)
    manifest = prepare(cfg)

    tokens, masks, truncated = _expected(tok, rows)
    got = _read_all(out, manifest)
    np.testing.assert_array_equal(got["text"], tokens)  # input order is kept
    np.testing.assert_array_equal(got["loss_mask"], masks)
    assert manifest["features"] == ["text", "loss_mask"]
    empty_at = rows.index({"text": ""})  # rows split 10/10/10 in order; the empty one skipped
    assert [s["examples"] for s in manifest["shards"]] == [
        10 - (10 * i <= empty_at < 10 * i + 10) for i in range(3)
    ]
    totals = manifest["totals"]
    assert totals["examples"] == 29 and totals["empty"] == 1 and totals["truncated"] == truncated
    assert truncated == 1
    assert totals["tokens"] == int(np.count_nonzero(tokens))
    assert totals["loss_tokens"] == int(masks.sum()) < totals["tokens"]
    assert manifest["seq_len"] == T and manifest["tokenizer"]["vocab_size"] == 65536

    with pytest.raises(FileExistsError, match="overwrite"):
        prepare(cfg)
    again = prepare(PrepareConfig(**{**cfg.to_dict(), "overwrite": True}))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_rows_with_nothing_to_learn_from_are_skipped_and_counted_empty():
    """A response cut off entirely by truncation, an empty response, a row with no text
    field: no record, counted as empty, none of their tokens in the counts (they were kept
    with zero loss tokens, or stopped the whole job); a block of such rows only is fine."""
    from rwkv_ray.data.prepare import encode_batch

    settings = dict(seq_len=8, text_field="text", prompt_field="prompt",
                    response_field="response", vocab_path=None)  # fmt: skip
    rows = pa.table({"prompt": ["word " * 20, "Q: hi\nA:", "Q"], "response": [" x", "", " yes"]})
    out = encode_batch(rows, settings, with_mask=True).to_pydict()
    assert out["empty"] == [True, True, False]
    assert [len(r) > 0 for r in out["record"]] == [False, False, True]
    assert out["tokens"][:2] == [0, 0] and out["loss_tokens"] == [0, 0, 1]
    assert out["truncated"] == [False, False, False]
    only_skipped = encode_batch(rows.slice(0, 2), settings, with_mask=True).to_pydict()
    assert only_skipped["empty"] == [True, True] and only_skipped["record"] == [b"", b""]
    texts = pa.table({"text": ["hello", None, ""], "id": [1, 2, 3]})
    out = encode_batch(texts, settings, with_mask=False).to_pydict()
    assert out["empty"] == [False, True, True] and out["tokens"][1:] == [0, 0]
    with pytest.raises(ValueError, match="field 'text' holds text that is not UTF-8"):
        raw = pa.array([b"ok", b"bad \xff"], pa.binary()).view(pa.string())  # as a jsonl reads
        encode_batch(pa.table({"text": raw}), settings, with_mask=False)


def _job_main():
    """`main` of jobs/prepare_data.py (the same arguments as `rwkv-ray prepare`)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_text_lines_through_the_job_script(tmp_path, tok, capsys):
    main = _job_main()

    lines = [f"Line number {i} of a plain text file." for i in range(11)]
    src = tmp_path / "in.txt"
    src.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # blank line dropped
    out = tmp_path / "ds"
    argv = [str(src), "--out", str(out), "--seq-len", str(T), "--num-shards", "2"]
    assert main([*argv, "--no-progress"]) == 0
    assert '"examples": 11' in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    got = _read_all(out, manifest)
    tokens, _, _ = _expected(tok, [{"text": line} for line in lines])
    np.testing.assert_array_equal(got["text"], tokens)
    assert "loss_mask" not in got and manifest["features"] == ["text"]
    assert manifest["totals"]["loss_tokens"] == manifest["totals"]["tokens"]
    assert main(argv) == 2  # exists, no --overwrite: a clear error, exit 2
    assert "overwrite" in capsys.readouterr().err


def test_parquet_directory(tmp_path, tok):
    texts = [f"Parquet row {i} says hello {'world ' * (i % 4)}".strip() for i in range(14)]
    src = tmp_path / "pq"
    src.mkdir()
    for j, part in enumerate((texts[:6], texts[6:])):  # extra columns are ignored
        table = pa.table({"id": list(range(len(part))), "text": part})
        pq.write_table(table, src / f"part-{j}.parquet")
    manifest = prepare({"inputs": [str(src)], "output": str(tmp_path / "ds"), "seq_len": T,
                        "num_shards": 4})  # fmt: skip
    got = _read_all(tmp_path / "ds", manifest)
    np.testing.assert_array_equal(got["text"], _expected(tok, [{"text": t} for t in texts])[0])
    assert manifest["totals"]["examples"] == 14 and len(manifest["shards"]) == 4


def test_fewer_rows_than_shards(tmp_path, tok, capsys):
    """2 rows, 8 shards: 2 shards of one example each (Ray's empty blocks carry no columns:
    the write stage failed on them with KeyError 'Field "record" does not exist')."""
    src = tmp_path / "two.jsonl"
    src.write_text('{"text": "hello there"}\n{"text": "second row"}\n')
    manifest = prepare({"inputs": [str(src)], "output": str(tmp_path / "ds"), "seq_len": T,
                        "num_shards": 8})  # fmt: skip
    assert manifest["totals"]["examples"] == 2 and len(manifest["shards"]) == 2
    got = _read_all(tmp_path / "ds", manifest)
    rows = [{"text": "hello there"}, {"text": "second row"}]
    np.testing.assert_array_equal(got["text"], _expected(tok, rows)[0])
    assert "2 examples fill only 2 of 8 shards" in capsys.readouterr().out


def test_clear_errors(tmp_path):
    out = str(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare({"inputs": [str(tmp_path / "nope.jsonl")], "output": out})
    with pytest.raises(PrepareConfigError, match=r"unknown prepare setting\(s\) \['seqlen'\]"):
        prepare({"inputs": ["x.jsonl"], "output": out, "seqlen": 8})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "a typo in the field name"}\n')
    with pytest.raises(PrepareConfigError, match=r"columns \['txt'\].*'text'"):
        prepare({"inputs": [str(bad)], "output": out})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no (rows|examples) in the input"):
        prepare({"inputs": [str(empty)], "output": out, "progress": False})
    with pytest.raises(PrepareConfigError, match="format"):
        prepare({"inputs": [str(tmp_path / "x.csv")], "output": out, "format": "csv"})


@pytest.mark.parametrize(
    "lines, message",
    [
        ('{"text": "ok"}\n{"text": "unterminated}\n',
         "bad.jsonl:2: invalid JSON (Unterminated string starting at: column 10)"),
        ('{"text": 5}\n{"text": "ok"}\n',
         "bad.jsonl:1: field 'text' is a number, expected a string"),
        ('{"id": 1, "text": "a"}\n\n{"id": "x", "text": "b"}\n',  # blank lines count
         "bad.jsonl:3: field 'id' is a string, but a number on line 1"),
    ],
)  # fmt: skip
def test_a_bad_jsonl_line_is_named_on_one_line(tmp_path, monkeypatch, capsys, lines, message):
    """A line that pyarrow's reader refuses used to fail with Ray's remote traceback as the
    message, and a misleading one: "Extra data: line 2" whatever the problem."""
    from rwkv_ray import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text(lines)
    argv = ["prepare", "bad.jsonl", "--out", "ds", "--seq-len", "16", "--no-progress"]
    assert cli.main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "prepare: error:" in ln]
    assert errors == [f"rwkv-ray prepare: error: {message}"]


def test_a_failed_task_on_s3_input_gives_its_cause_on_one_line():
    """No scan of s3:// inputs: the cause Ray wrapped, without its traceback; a cause that is
    no user error (a bug) keeps the task error as it is."""
    from ray.exceptions import RayTaskError

    from rwkv_ray.data.prepare import _input_error

    cfg = PrepareConfig(inputs=["s3://bucket/raw/a.jsonl"], output="out")
    by_format = {"jsonl": list(cfg.inputs)}
    traceback = "Traceback (most recent call last):\n  File ...\nJSONDecodeError: Extra data"
    cause = json.JSONDecodeError("Extra data", '{"a": 1}\n{"a": 2}', 9)
    error = RayTaskError("ReadArrowJSON", traceback, cause).as_instanceof_cause()
    assert str(_input_error(cfg, by_format, error)) == (
        "a Ray task failed on ['s3://bucket/raw/a.jsonl']: "
        "JSONDecodeError: Extra data: line 2 column 1 (char 9)"
    )
    bug = RayTaskError("MapBatches", traceback, KeyError("record")).as_instanceof_cause()
    assert _input_error(cfg, by_format, bug) is None


def test_the_line_scan_of_a_failed_read(tmp_path):
    """Lines that are not objects or not UTF-8 are named; a .json file holding one JSON array
    is left alone: Ray reads it whole, and "line 1: invalid JSON" would mislead."""
    from rwkv_ray.data.prepare import _first_bad_line

    cfg = PrepareConfig(inputs=["x.json"], output="out")
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps([{"text": "a"}, {"text": 5}], indent=1))
    assert _first_bad_line(cfg, str(doc)) is None
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{}\n[{"text": "a"}]\n')
    assert _first_bad_line(cfg, str(rows)) == f"{rows}:2: expected a JSON object, got an array"
    rows.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    assert (
        _first_bad_line(cfg, str(rows))
        == f"{rows}:2: not UTF-8 text (invalid start byte at byte 14)"
    )


def test_errors_name_the_flag_and_the_setting(tmp_path, capsys):
    """The same settings come from flags or a YAML file: an error names both spellings."""
    import argparse

    from rwkv_ray import cli
    from rwkv_ray.data.cli_commands import add_prepare_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    with pytest.raises(
        PrepareConfigError, match=r"^missing required setting\(s\): --out \(output\)$"
    ):
        config_from_args(parser.parse_args(["x.jsonl"]))
    with pytest.raises(
        PrepareConfigError,
        match=r"^missing required setting\(s\): input paths \(inputs\), --out \(output\)$",
    ):
        PrepareConfig.from_dict({})
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert cli.main(["prepare", str(src), "--out", str(out)]) == 2  # refused before Ray runs
    assert capsys.readouterr().err == (
        f"rwkv-ray prepare: error: {out / 'manifest.json'} exists: "
        "pass --overwrite (or overwrite: true) to replace it\n"
    )


@pytest.mark.parametrize(
    "key, value",
    [("overwrite", "false"), ("progress", "no"), ("inputs", 5), ("output", 123), ("vocab_path", 7)],
)
def test_settings_of_the_wrong_type_are_refused_by_name(key, value):
    """A quoted "false" is truthy: `overwrite: "false"` used to delete the dataset."""
    values = {"inputs": ["x.jsonl"], "output": "out", key: value}
    with pytest.raises(PrepareConfigError, match=f"^{key}: "):
        PrepareConfig.from_dict(values)


def test_arguments_yaml_flags_and_set(tmp_path):
    import argparse

    from rwkv_ray.data.cli_commands import add_prepare_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    yaml_path = tmp_path / "prep.yaml"
    yaml_path.write_text("inputs: [a.jsonl]\noutput: out\nseq_len: 64\nnum_shards: 2\n")
    args = parser.parse_args(
        ["--config", str(yaml_path), "--seq-len", "128", "--set", "num_shards=5"]
    )
    cfg = config_from_args(args)
    assert (cfg.inputs, cfg.output, cfg.seq_len, cfg.num_shards) == (("a.jsonl",), "out", 128, 5)
    with pytest.raises(PrepareConfigError, match=r"\['num_shard'\]"):
        config_from_args(parser.parse_args(["--config", str(yaml_path), "--set", "num_shard=5"]))
    with pytest.raises(PrepareConfigError, match="seq_len: must be an int >= 1"):
        config_from_args(parser.parse_args(["x.jsonl", "--out", "o", "--seq-len", "0"]))
