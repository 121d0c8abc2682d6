"""Held-out perplexity of a fine-tuning job: base model vs the tuned result.

python jobs/evaluate.py --config jobs/configs/state/tiny.yaml [--tuned path/to/export]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed

from rwkv_ray.cli import USER_ERRORS
from rwkv_ray.train.cli_commands import add_config_arguments, evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--tuned", default=None, help="export folder (default: latest run's)")
    parser.add_argument("--data", default=None, help="held-out dataset (default: data.eval)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="score at most this many batches of the held-out set (default: all of it)",
    )
    args = parser.parse_args(argv)
    try:
        evaluate(args)
    except USER_ERRORS as e:  # a bad setting or path: one line, status 2
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
