"""`rwkv-ray`: the command line. Each subcommand is a thin call into the package."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import yaml

from rwkv_ray.data.cli_commands import add_prepare_command
from rwkv_ray.serve.cli_commands import add_serve_command
from rwkv_ray.train.cli_commands import add_finetune_command

# Commands whose module is imported only when the command is chosen, as
# name -> (module, function registering the full parser, its line in `rwkv-ray --help`).
# Importing anything under rwkv_ray.generation loads Keras and JAX (~6 s on 2 cores), which
# `rwkv-ray --help` and the other commands do not need. The line must match the module's own.
LAZY_COMMANDS = {
    "generate": (
        "rwkv_ray.generation.cli_commands",
        "add_generate_command",
        "stream a continuation of a prompt",
    ),
}

EPILOG = """examples:
  rwkv-ray convert RWKV-x060-World-1B6.pth models/1b6      # .pth -> config.json + weights
  rwkv-ray export models/1b6 out.pth --dtype bfloat16       # back to the official layout
  rwkv-ray info models/1b6                                  # sizes, parameter count
  rwkv-ray prepare --help                                   # corpus -> TFRecord shards
  rwkv-ray finetune --config jobs/configs/full/tiny.yaml    # fine-tune on Ray
  rwkv-ray generate --model models/1b6 --prompt "Hello"     # stream a continuation
  rwkv-ray serve --model models/1b6 --states-dir states    # HTTP API on a local Ray Serve
  rwkv-ray demo                                             # the whole service, locally
"""


# The user's own mistakes (a bad path or setting, a file that is not a checkpoint, a broken
# YAML config): one line, exit status 2, no traceback (here and in jobs/).
USER_ERRORS = (OSError, ValueError, pickle.UnpicklingError, yaml.YAMLError)


class _Stages:
    """One stderr line per stage of a long command, with the seconds since the start
    (a 1.6B checkpoint is gigabytes: reading and writing it takes a while)."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.started:5.1f} s] {what}", file=sys.stderr, flush=True)


def _size(path) -> str:
    return f"{os.path.getsize(path) / 2**30:.2f} GiB" if os.path.isfile(path) else "a directory"


def _convert(args) -> None:
    from rwkv_ray.convert import load_pth_model, save_model

    stage = _Stages()
    stage(f"reading {args.checkpoint} ({_size(args.checkpoint)})")
    model = load_pth_model(args.checkpoint)
    stage(f"writing {args.out_dir}")
    out = save_model(model, args.out_dir)
    stage("done")
    print(f"wrote {out / 'config.json'} and {out / 'model.weights.h5'}")


def _export(args) -> None:
    from rwkv_ray.convert import export_checkpoint, load_model

    stage = _Stages()
    stage(f"reading {args.model} ({_size(args.model)})")
    model = load_model(args.model)
    stage(f"writing {args.out}")
    path = export_checkpoint(model, args.out, dtype=args.dtype)
    stage("done")
    print(f"wrote {path}")


def _info(args) -> None:
    from rwkv_ray.convert import load_model, official_weight_table

    model = load_model(args.model)
    info = model.config.to_dict()
    info["num_heads"] = model.config.num_heads
    # The checkpoint's weights: not the initial states (zeros unless tuned; not weights).
    weights = [w.variable for w in official_weight_table(model) if not w.optional]
    info["parameters"] = int(sum(math.prod(w.shape) for w in weights))
    print(json.dumps(info, indent=2))


def _demo(args) -> None:
    from rwkv_ray.train.demo import run_demo

    run_demo(Path(args.out_dir), full_steps=args.full_steps, state_steps=args.state_steps)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the top-level parser has no other options)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `rwkv-ray` parser; the subparser of `command` is complete even if it is lazy."""
    parser = argparse.ArgumentParser(
        prog="rwkv-ray",
        description="Fine-tune and serve RWKV6 (x060, Finch) models on Ray, in Keras 3 on JAX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="official .pth -> converted model directory")
    p.add_argument("checkpoint", help="official RWKV6 .pth (read without executing code)")
    p.add_argument("out_dir", help="directory to write config.json and model.weights.h5 to")
    p.set_defaults(func=_convert)

    p = sub.add_parser("export", help="model (directory or .pth) -> official-layout .pth")
    p.add_argument("model", help="converted model directory (or a .pth)")
    p.add_argument("out", help="path of the .pth to write")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="tensor dtype (default: the dtype of the checkpoint the model came from)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("info", help="print a model's config and parameter count")
    p.add_argument("model", help="converted model directory or .pth")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "demo",
        help="the service end to end on a local Ray: prepare, full-tune, state-tune, MLflow, "
        "generate (a tiny model, a few minutes on 2 cores)",
    )
    p.add_argument("--out-dir", default="out/demo", help="where the demo writes its files")
    p.add_argument("--full-steps", type=int, default=150, help="full fine-tuning steps")
    p.add_argument("--state-steps", type=int, default=60, help="state-tuning steps")
    p.set_defaults(func=_demo)
    add_prepare_command(sub)
    add_finetune_command(sub)
    for name, (module, register, help_line) in LAZY_COMMANDS.items():
        if name == command:
            getattr(importlib.import_module(module), register)(sub)
        else:
            sub.add_parser(name, help=help_line)  # only listed: chosen, it is built in full
    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen_command(argv)).parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"rwkv-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
