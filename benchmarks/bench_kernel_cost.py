"""What one more kernel costs inside a compiled decode loop, on a GPU.

Decoding one token at batch 1 launches about 20 kernels per layer (benchmarks/gpu_hlo.py):
four or five weight-streaming GEMMs and many small fusions between them. Whether fusing
the small ones is worth a custom kernel depends on what each costs in XLA's command
buffers. This measures it directly: a `lax.fori_loop` whose body is a chain of `depth`
dependent tiny kernels on a [2, C] array (each op behind an optimization barrier, so XLA
cannot fuse them), timed for several depths; the slope is the cost per kernel. The same
for a chain of dependent [2, C] x [C, C] matmuls over distinct weights (each its own
GEMM kernel), so one weight read split into more kernels can be priced too.

    python benchmarks/bench_kernel_cost.py --out benchmarks/results/kernel_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def tiny_chain(depth: int, steps: int):
    """fori_loop of `steps` iterations, each `depth` dependent elementwise kernels."""

    def body(_, x):
        for _ in range(depth):
            x = lax.optimization_barrier(jnp.tanh(x) * 0.5 + 0.25)
        return x

    return jax.jit(lambda x: lax.fori_loop(0, steps, body, x))


def gemm_chain(weights, steps: int):
    """fori_loop of `steps` iterations, each one dependent [2, C] x [C, N_i] matmul per
    weight (N_i columns, the output's first C fed on)."""

    def body(_, x):
        for w in weights:
            y = jnp.dot(x, w, preferred_element_type=jnp.float32)
            x = (y[:, : x.shape[1]] * 1e-3).astype(x.dtype)
        return x

    return jax.jit(lambda x: lax.fori_loop(0, steps, body, x))


def time_call(fn, x, reps: int) -> float:
    """Median seconds of `reps` device-synchronized calls after two warm-ups."""
    for _ in range(2):
        fn(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slope(xs, ys) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum(
        (a - mx) ** 2 for a in xs
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=2048, help="C, the model width")
    ap.add_argument("--steps", type=int, default=200, help="loop iterations per call")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per point (median)")
    ap.add_argument("--depths", default="1,8,16,32,64", help="tiny kernels per iteration")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    c, steps = args.width, args.steps
    dev = jax.devices()[0]
    result = {"device": dev.device_kind, "jax": jax.__version__, "width": c, "steps": steps}

    x = jnp.ones((2, c), jnp.float32)
    depths = [int(d) for d in args.depths.split(",")]
    per_step = [time_call(tiny_chain(d, steps), x, args.reps) / steps * 1e6 for d in depths]
    result["tiny"] = {
        "depths": depths,
        "us_per_iteration": per_step,
        "us_per_kernel": slope(depths, per_step),
    }
    print(f"tiny kernels: {dict(zip(depths, per_step, strict=True))} us per iteration; "
          f"{result['tiny']['us_per_kernel']:.3f} us per kernel")  # fmt: skip

    # The same bytes read as 1, 2, 4 or 8 GEMMs a step: 8 C x C bf16 matrices (64 MiB at
    # C = 2048, beyond L2), as [C, 8C], 2 x [C, 4C], 4 x [C, 2C] or 8 x [C, C].
    key = jax.random.PRNGKey(0)
    xb = jnp.ones((2, c), jnp.bfloat16)
    gemm = {}
    for pieces in (1, 2, 4, 8):
        ws = [
            jax.random.normal(jax.random.fold_in(key, i), (c, 8 * c // pieces), jnp.bfloat16)
            for i in range(pieces)
        ]
        seconds = time_call(gemm_chain(ws, steps), xb, args.reps)
        gemm[pieces] = seconds / steps * 1e6
        del ws
    mib = 8 * c * c * 2 / 2**20
    result["gemm"] = {
        "bytes_per_iteration_mib": mib,
        "us_per_iteration_by_kernels": gemm,
        "tb_per_s_by_kernels": {k: mib * 2**20 / (v * 1e-6) / 1e12 for k, v in gemm.items()},
        "us_per_extra_kernel": slope(list(gemm), list(gemm.values())),
    }
    print(f"GEMM chain, {mib:.0f} MiB a step in 1/2/4/8 kernels: {gemm} us; "
          f"{result['gemm']['us_per_extra_kernel']:.3f} us per extra kernel")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
