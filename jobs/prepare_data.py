"""Prepare a dataset on the Ray cluster: text -> tokenized, left-padded TFRecord shards.

    ray job submit --working-dir . -- python jobs/prepare_data.py \
        data/demo_corpus.jsonl --out s3://bucket/datasets/demo --seq-len 128 --num-shards 4
    python jobs/prepare_data.py data/demo_corpus.jsonl --out out/demo   # local Ray

Same arguments as `rwkv-ray prepare` (see rwkv_ray/data/cli_commands.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (working_dir)

from rwkv_ray.cli import USER_ERRORS  # noqa: E402
from rwkv_ray.data.cli_commands import add_prepare_arguments, run_prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prepare_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_prepare(args)
    except USER_ERRORS as e:  # a bad setting or path: one line, status 2
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
