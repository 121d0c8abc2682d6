"""`rwkv-ray prepare` and `jobs/prepare_data.py`: the same arguments, one implementation.

rwkv-ray prepare data/demo_corpus.jsonl --out out/demo --seq-len 128 --num-shards 4
rwkv-ray prepare --config prepare.yaml --set seq_len=1024   # YAML settings + overrides
"""

from __future__ import annotations

import argparse
import json

import yaml

from rwkv_ray.data.config import FORMATS, PrepareConfig, PrepareConfigError

# argparse dest -> PrepareConfig field, for the flags that map one to one.
_FLAGS = {
    "out": "output",
    "seq_len": "seq_len",
    "num_shards": "num_shards",
    "format": "format",
    "text_field": "text_field",
    "prompt_field": "prompt_field",
    "response_field": "response_field",
    "vocab": "vocab_path",
    "rows_per_task": "rows_per_task",
    "s3_endpoint_url": "s3_endpoint_url",
}


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="jsonl / txt / parquet files or dirs (or s3://)")
    parser.add_argument("--out", help="dataset directory to write (local or s3://bucket/prefix)")
    parser.add_argument("--config", help="YAML file of PrepareConfig settings")
    parser.add_argument("--seq-len", type=int, help="tokens per example (default 512)")
    parser.add_argument("--num-shards", type=int, help="TFRecord shards (default 8)")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: by suffix)")
    parser.add_argument("--text-field", help="column of plain text (default 'text')")
    parser.add_argument("--prompt-field", help="prompt column (default 'prompt')")
    parser.add_argument("--response-field", help="response column (default 'response')")
    parser.add_argument("--vocab", help="World vocab file (default: the shipped one)")
    parser.add_argument("--rows-per-task", type=int, help="rows tokenized per Ray task")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint (default env AWS_ENDPOINT_URL)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data progress")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """YAML (``--config``), then flags, then ``--set key=value`` (YAML-parsed values)."""
    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise PrepareConfigError(f"{args.config}: expected a mapping of settings")
    if args.inputs:
        values["inputs"] = list(args.inputs)
    for dest, field in _FLAGS.items():
        if getattr(args, dest) is not None:
            values[field] = getattr(args, dest)
    if args.overwrite:
        values["overwrite"] = True
    if args.no_progress:
        values["progress"] = False
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PrepareConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    return PrepareConfig.from_dict(values)


def run_prepare(args: argparse.Namespace) -> dict:
    from rwkv_ray.data.prepare import prepare

    cfg = config_from_args(args)
    try:
        manifest = prepare(cfg)
    except FileExistsError as e:
        raise ValueError(str(e)) from e
    print(json.dumps({"output": cfg.output, **manifest["totals"]}, indent=2))
    return manifest


def add_prepare_command(subparsers) -> argparse.ArgumentParser:
    """Register ``prepare`` on the ``rwkv-ray`` subcommand parsers."""
    p = subparsers.add_parser(
        "prepare", help="text (jsonl/txt/parquet) -> tokenized TFRecord shards, on Ray Data"
    )
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)
    return p
