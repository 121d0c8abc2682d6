"""XLA's memory plan of a training step on an H100, compiled without a GPU.

    PYTHONPATH=. /tmp/gpuaot/bin/python benchmarks/gpu_train_plan.py --layers 2,4 \\
        --master-weights float32 --remat off

Compiles `make_step_fn` (the step TrainStep runs, with the WKV Pallas kernel) for the
compile-only H100 target of gpu_hlo.py and prints what XLA plans: the scratch (`temp`) and
the state (`args`; the new state is written over it). The scratch grows linearly with the
depth, so two depths give the per-layer figure and the full depth's by extrapolation. A
diagnostic between GPU sessions (which remat settings fit beside the training state), not a
measurement: the real compile can differ (on 2026-11-27 this predicted 61.7 GiB of scratch
for the 1.6B step with bf16 master weights and no remat; an H100 allocated 61.77). Needs
the environment of gpu_hlo.py (JAX's CUDA plugin, no GPU).

`--devices N` plans the data-parallel step over N GPUs of one host (state replicated, batch
split, XLA's gradient all-reduce), as TrainStep runs it. Where the plan exceeds XLA's own
limit for the compile-only target (61.02 GiB), XLA rematerializes and logs "Can't reduce
memory use below ... down from X GiB originally": X is the plan before that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_hlo import compile_only_devices, pretend_gpu  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="2,4", help="depths to compile (two or more)")
    p.add_argument("--full-depth", type=int, default=24, help="depth to extrapolate to")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--mode", choices=("full", "state", "state+shift"), default="full")
    p.add_argument("--master-weights", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", choices=("off", "block", "dots"), default="off")
    p.add_argument(
        "--devices", type=int, default=1,
        help="data parallel over this many GPUs of one host (--batch rows each)",
    )  # fmt: skip
    p.add_argument(
        "--shard-optimizer", action="store_true",
        help="AdamW's moments split over the devices (TrainStep(shard_optimizer=True))",
    )  # fmt: skip
    p.add_argument(
        "--row-groups", type=int, default=0,
        help="the head loss's row groups (0: the device count, as TrainStep; 1: one group, "
        "the head's gradient reduced after every piece)",
    )  # fmt: skip
    p.add_argument("--out", help="write the plans as JSON here")
    return p.parse_args(argv)


def plan(devices, layers: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_train_cpu import remat_setting
    from rwkv_ray.train.config import JobConfig
    from rwkv_ray.train.step import (
        TrainState,
        build_model,
        build_optimizer,
        make_step_fn,
        optimizer_shardings,
    )

    remat = remat_setting(args.remat)
    shape = {"vocab_size": args.vocab, "num_layers": layers, "hidden_size": args.hidden}
    model_settings = {"config": shape, "dtype": "bfloat16", "remat": remat,
                      "master_weights": args.master_weights, "wkv_impl": "kernel"}  # fmt: skip
    config = JobConfig.from_dict(
        {"mode": args.mode, "model": model_settings, "data": {"train": "unused"}}
    )
    model = build_model(config)
    optimizer = build_optimizer(config, model, 1000)
    # As TrainStep: the state replicated, the batch split over "data".
    mesh = jax.sharding.Mesh(devices, ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    split = optimizer_shardings(optimizer, mesh, args.shard_optimizer)
    state = TrainState(
        [abstract(v.value) for v in model.trainable_variables],
        [abstract(v.value) for v in model.non_trainable_variables],
        [
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
            for v, s in zip(optimizer.variables, split, strict=True)
        ],
    )
    state_shardings = TrainState(replicated, replicated, split)
    batch = (1, args.batch * len(devices), args.seq_len)
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct(batch, jnp.float32, sharding=rows)
    started = time.perf_counter()
    step = jax.jit(
        make_step_fn(model, optimizer, 1.0, remat, row_groups=args.row_groups or len(devices)),
        in_shardings=(state_shardings, rows, rows),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    with jax.set_mesh(mesh):  # the WKV kernel splits the batch per device under the mesh
        memory = step.lower(state, tokens, mask).compile().memory_analysis()
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    return {
        "layers": layers,
        "temp_gib": gib(memory.temp_size_in_bytes),
        "args_gib": gib(memory.argument_size_in_bytes),
        "compile_s": round(time.perf_counter() - started),
    }


def main(argv=None):
    args = parse_args(argv)
    devices = compile_only_devices(args.devices)
    pretend_gpu()
    depths = sorted(int(n) for n in args.layers.split(","))
    if len(depths) < 2:
        sys.exit("--layers needs two depths or more (the per-layer figure is their slope)")
    plans = []
    for layers in depths:
        plans.append(plan(devices, layers, args))
        print(json.dumps(plans[-1]), flush=True)
    first, last = plans[0], plans[-1]
    span = last["layers"] - first["layers"]
    extra = args.full_depth - last["layers"]
    per_layer = {k: (last[k] - first[k]) / span for k in ("temp_gib", "args_gib")}
    full = {k: round(last[k] + extra * per_layer[k], 2) for k in per_layer}
    report = {
        "target": "H100 80GB HBM3 (compile-only, gpu_hlo.H100_TARGET)",
        "settings": vars(args),
        "plans": plans,
        "per_layer_gib": {k: round(v, 3) for k, v in per_layer.items()},
        f"extrapolated_{args.full_depth}_layers_gib": full,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
