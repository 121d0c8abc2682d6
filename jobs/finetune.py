"""Fine-tune an RWKV6 on Ray Train.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/state/tiny.yaml
    python jobs/finetune.py --config jobs/configs/full/tiny.yaml --set optimizer.lr=1e-4

Set MLFLOW_TRACKING_URI for submitted jobs (the working dir is a temporary copy).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed

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
    except ValueError as e:  # JobConfigError names the key
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
