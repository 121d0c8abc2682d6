"""Where a training step's time goes on a GPU: device time per kernel and per kind of kernel.

    python benchmarks/profile_train.py --mode state --batch 4 --seq-len 4096 --out /tmp/p.json

Builds the step bench_train_cpu.py / bench_train_gpu.py time (`rwkv_ray.train.step.TrainStep`,
random weights and tokens), compiles and warms it, then records one step in a JAX profiler
trace. Reports the wall time, the device-busy time, the top kernels by device time, and totals
per kind (our WKV kernels by name, GEMMs, loop/input fusions, copies, collectives), plus the
peak device memory. Each top kernel names its origin: the shape and JAX source path of the
compiled HLO instruction it runs (`kernel_origins`). A diagnostic, not a benchmark of
record (that is bench_train_gpu.py).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profile_generate import COLLECTIVE, traced_kernel_times  # noqa: E402

# First match wins: (kind, pattern on the kernel name).
KINDS = [
    ("collective", COLLECTIVE.pattern),
    ("wkv_kernel", r"wkv6"),
    ("gemm", r"gemm|cutlass|xmma|cublas|sm90_|sm80_|_mma|triton_dot|dot"),
    ("reduce", r"reduce|logsumexp"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic.update|concatenate|slice"),
    ("fusion", r"fusion|loop_|input_|triton"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_origins(hlo_text: str) -> dict[str, str]:
    """Kernel name, as the profiler shows it, -> "shape op_name" of the compiled HLO
    instructions it runs. The profiler writes instruction names with "_" for "."
    (fusion.13 -> fusion_13); op_name is the JAX source path, shortened, with `block_N` as
    `block_*`. XLA emits one kernel for identical fusions (the instructions that name it as
    their `deduplicated_name`): the same-shape weight gradients of several projections run
    as one kernel name, so every distinct source path of the group is listed, " | " apart."""
    paths: dict[str, list[str]] = {}
    shapes: dict[str, str] = {}
    for line in hlo_text.splitlines():
        found = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name="([^"]+)"', line)
        if not found:
            continue
        name, shape, op = found.groups()
        shared = re.search(r'deduplicated_name="([^"]+)"', line)
        kernel = re.sub(r"[.\-]", "_", shared.group(1) if shared else name)
        op = re.sub(r"^jit\(\w+\)/(while/body/closed_call/)?", "", op)
        op = re.sub(r"block_\d+", "block_*", op)
        shapes.setdefault(kernel, shape.rstrip(","))
        group = paths.setdefault(kernel, [])
        if op not in group:
            group.append(op)
    return {kernel: f"{shapes[kernel]} {' | '.join(ops)}" for kernel, ops in paths.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b6", help="a shape of bench_train_cpu.py")
    p.add_argument("--mode", default="state", choices=("full", "state", "state+shift"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", choices=("off", "block", "dots"), default="off")
    p.add_argument(
        "--gpus", type=int, default=1,
        help="data parallel over this many GPUs (--batch rows each); kernels of GPU 0",
    )  # fmt: skip
    p.add_argument(
        "--shard-optimizer", action="store_true",
        help="AdamW's moments split over the GPUs (scaling.shard_optimizer)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out")
    p.add_argument(
        "--hlo-out",
        help="also write the compiled step's HLO text here, gzipped (to look up a kernel "
        "whose origin the report could not name, e.g. a GEMM fusion inside the loss loop)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np

    from benchmarks.bench_train_cpu import (
        SHAPES,
        build_timed_model,
        pipelined_step_times,
        remat_setting,
    )
    from rwkv_ray.train.config import JobConfig
    from rwkv_ray.train.step import TrainStep, build_optimizer, move_to_host

    config = JobConfig.from_dict(
        {
            "mode": args.mode,
            "model": {
                "config": SHAPES[args.shape],
                "dtype": args.dtype,
                "remat": remat_setting(args.remat),
            },
            "data": {"train": "unused"},
        }
    )
    if jax.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: JAX sees {jax.device_count()} device(s)")
    model = build_timed_model(config)  # the model bench_train_gpu.py times
    optimizer = build_optimizer(config, model, 1000)
    move_to_host(model, optimizer)  # as the training workers do: the state is the GPU copy
    trainer = TrainStep(
        model, optimizer, clip_norm=1.0, remat=config.model.remat,
        shard_optimizer=args.shard_optimizer,
    )  # fmt: skip
    state = trainer.initial_state()
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(0)
    rows = args.batch * args.gpus
    tokens = rng.integers(1, vocab, (1, rows, args.seq_len)).astype(np.int32)
    mask = np.ones(tokens.shape, np.float32)
    started = time.perf_counter()
    state, _ = trainer(state, tokens, mask)
    compile_s = time.perf_counter() - started
    # Wall time per step as the workers run them (each queued before the last one ends).
    state, times = pipelined_step_times(trainer, state, tokens, mask, 3)
    wall_ms = statistics.median(times) * 1e3
    # The step donates its state: the traced call's output is simply dropped. Traced alone,
    # so the span (first kernel start to last kernel end) less the busy time is the time
    # the GPU idles inside one step.
    extent: dict[str, float] = {}
    plane = "/device:GPU" if args.gpus == 1 else "/device:GPU:0"
    step = lambda: trainer(state, tokens, mask)[1]  # noqa: E731
    totals = traced_kernel_times(step, extent=extent, plane=plane)
    by_kind: collections.Counter[str] = collections.Counter()
    for name, ms in totals.items():
        by_kind[kind_of(name)] += ms
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
    with jax.set_mesh(trainer.mesh):  # the step as compiled (cached: no new compile)
        hlo = trainer.compiled(state, trainer.shard_batch(tokens), trainer.shard_batch(mask))
    hlo_text = hlo.as_text()
    origins = kernel_origins(hlo_text)
    if args.hlo_out:
        Path(args.hlo_out).write_bytes(gzip.compress(hlo_text.encode()))
    # Device time per source op over all kernels, the layers together (block_*).
    by_origin: collections.Counter[str] = collections.Counter()
    for name, ms in totals.items():
        by_origin[origins.get(name, name)] += ms
    stats = jax.devices()[0].memory_stats() or {}
    report = {
        "args": vars(args),
        "card": jax.devices()[0].device_kind,
        "first_step_s": round(compile_s, 2),
        "wall_ms": round(wall_ms, 2),
        "tokens_per_s": round(tokens.size / (wall_ms / 1e3), 1),
        "device_busy_ms": round(sum(totals.values()), 2),
        "device_span_ms": round(extent.get("span_ms", 0.0), 2),
        "device_compute_ms": round(extent.get("compute_ms", 0.0), 2),
        "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "by_kind_ms": {k: round(v, 2) for k, v in by_kind.most_common()},
        "by_origin_ms": {k: round(v, 2) for k, v in by_origin.most_common(args.top)},
        "top": [
            {"name": n[:140], "kind": kind_of(n), "ms": round(ms, 3), "origin": origins.get(n)}
            for n, ms in ranked
        ],
    }
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
