"""`rwkv-ray finetune` and `rwkv-ray evaluate`: argument parsing shared with jobs/*.py."""

from __future__ import annotations

import argparse
import json


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="job YAML (see jobs/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting by its dotted key, e.g. --set optimizer.lr=1e-4 (repeatable)",
    )


def finetune(args: argparse.Namespace) -> None:
    import ray

    from rwkv_ray.train.config import load_job_config
    from rwkv_ray.train.trainer import run_job

    config = load_job_config(args.config, args.overrides)  # a bad key fails here, by name
    if not ray.is_initialized():
        ray.init(address=args.address)
    result = run_job(config)
    print(f"finished {config.name}: {json.dumps(result.metrics, default=str)}")
    if result.checkpoint is not None:
        print(f"final checkpoint (with export/): {result.checkpoint.path}")


def evaluate(args: argparse.Namespace) -> None:
    from rwkv_ray.train.config import load_job_config
    from rwkv_ray.train.evaluate import evaluate_job

    config = load_job_config(args.config, args.overrides)
    report = evaluate_job(config, args.tuned, args.data, args.max_batches)
    print(json.dumps(report, indent=2))


def add_finetune_command(subparsers) -> None:
    """Register `finetune` and `evaluate` on the `rwkv-ray` command line."""
    p = subparsers.add_parser("finetune", help="fine-tune on Ray Train (full or state tuning)")
    add_config_arguments(p)
    p.add_argument("--address", default=None, help="Ray address (default: auto / local)")
    p.set_defaults(func=finetune)
    p = subparsers.add_parser("evaluate", help="held-out perplexity: base vs tuned")
    add_config_arguments(p)
    p.add_argument("--tuned", default=None, help="export folder (default: the latest run's)")
    p.add_argument("--data", default=None, help="held-out dataset (default: data.eval)")
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="score at most this many batches of the held-out set (default: all of it)",
    )
    p.set_defaults(func=evaluate)
