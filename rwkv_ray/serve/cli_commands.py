"""`rwkv-ray serve`: run the Serve application on a local Ray, for development.

rwkv-ray serve --model models/1b6 --port 8000 --states-dir states
curl -s localhost:8000/v1/generate -d '{"prompt": "The Eiffel tower is in", "max_tokens": 16}'

For a cluster, deploy infra/serve/serve_config.yaml with `serve deploy` instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="converted model directory or .pth")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--states-dir", help="directory of tuned state files (NAME.npz)")
    parser.add_argument("--model-name", help="the id in /v1/models (default: the file stem)")
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--dtype", help="Keras dtype policy, e.g. bfloat16")
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="requests decoded together (1 = serial)"
    )
    parser.add_argument("--steps-per-call", type=int, default=4, help="decode steps per call")
    parser.add_argument("--mlflow-tracking-uri", help="where `state: runs:/...` states are found")


def check_paths(args) -> None:
    """--model and --states-dir checked here, before Ray starts: in a replica a bad path is a
    deployment failure, half a minute and a long traceback later."""
    from rwkv_ray.convert import CONFIG_FILE, WEIGHTS_FILE

    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"--model {args.model}: no such file or directory")
    if model.is_dir():
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (model / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--model {args.model}: no {' or '.join(missing)} there (a converted model "
                "directory, from `rwkv-ray convert`, or an official .pth)"
            )
    if args.states_dir and not Path(args.states_dir).is_dir():
        raise FileNotFoundError(f"--states-dir {args.states_dir}: not a directory")


def run_serve(args) -> None:
    check_paths(args)
    import ray
    from ray import serve

    from rwkv_ray.serve.app import app_builder

    # Replicas import rwkv_ray from this checkout even when it is not installed.
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}})
    serve.start(http_options={"host": args.host, "port": args.port})
    app_args = {
        "model": str(Path(args.model).resolve()),
        "num_replicas": args.num_replicas,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "max_batch_size": args.max_batch_size,
        "steps_per_call": args.steps_per_call,
    }
    if args.states_dir:
        app_args["states_dir"] = str(Path(args.states_dir).resolve())
    for key in ("model_name", "dtype", "mlflow_tracking_uri"):
        if getattr(args, key):
            app_args[key] = getattr(args, key)
    if not args.mlflow_tracking_uri:
        from rwkv_ray.train.tracking import tracking_uri

        # Resolved here: a replica's working directory is not this one (./mlflow.db).
        app_args["mlflow_tracking_uri"] = tracking_uri()
    print(f"serving {args.model} on http://{args.host}:{args.port} (Ctrl-C stops)")
    try:
        serve.run(app_builder(app_args), blocking=True)
    except KeyboardInterrupt:
        serve.shutdown()
        print("stopped")


def add_serve_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve generation over HTTP (Ray Serve)")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
