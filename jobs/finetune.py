"""Fine-tune an RWKV6 on Ray Train.

    python jobs/finetune.py --config jobs/configs/full/tiny.yaml --set optimizer.lr=1e-4
    ray job submit --working-dir . -- python jobs/finetune.py --config CONFIG --set ...

Relative paths are taken from the directory the job starts in. A submitted job starts in
Ray's temporary copy of its working dir: give it absolute (or s3://) data and storage
paths and a tracking URI (mlflow.tracking_uri or MLFLOW_TRACKING_URI).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed

from rwkv_ray.cli import USER_ERRORS
from rwkv_ray.train.cli_commands import add_config_arguments, finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--address", default=None, help="Ray address (default: auto / local)")
    args = parser.parse_args(argv)
    if not args.config and not args.overrides:
        parser.error("--config (or --set) is required")
    try:
        finetune(args)
    except USER_ERRORS as e:  # a bad setting or path: one line, status 2
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
