"""Does the WKV kernel compile for each GPU generation it targets? Checked without a GPU.

    PYTHONPATH=. /tmp/gpuaot/bin/python benchmarks/compile_targets.py \\
        --out benchmarks/results/compile_targets.json

The issue asks for sm90 (H100/H200) and sm80 (A100) at least; our GPU machines are H100s and
H200s only. XLA compiles for a GPU it does not see from a target description (gpu_hlo.py's
H100_TARGET and A100_TARGET), and that compile includes Triton's for every Pallas kernel, so
a kernel that cannot be built for a compute capability (too much shared memory, an
instruction the generation lacks) fails here. For each target: `jax.value_and_grad` of the WKV op
through the kernel (forward, backward and the gradient of the initial state) in bf16 and
float32 at T = 4096 and 65 (the chunked kernels) and T = 1 (the decoding step kernel);
`--sm70` adds a V100 description as the check that the target matters (every kernel must
fail there: XLA builds Triton kernels for sm80 and later only). Compiles, not runs: a pass says
nothing of speed or of numbers on that card. Needs the environment of gpu_hlo.py.
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

from benchmarks.gpu_hlo import A100_TARGET, H100_TARGET, compile_only_device  # noqa: E402

SHAPES = ((2, 4096), (1, 65), (3, 1))  # (B, T); H4 N64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sm70", action="store_true", help="also a V100 target (expected to fail)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def check(device, dtype_name: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from rwkv_ray.ops import wkv6

    dtype = jnp.dtype(dtype_name)
    sharding = jax.sharding.SingleDeviceSharding(device)
    heads, size = 4, 64

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    x = spec((batch, steps, heads, size), dtype)
    args = (x, x, x, spec(x.shape, jnp.float32), spec((heads, size), jnp.float32),
            spec((batch, heads, size, size), jnp.float32))  # fmt: skip

    def loss(r, k, v, log_w, u, state):
        y, final = wkv6(r, k, v, log_w, u, state, impl="kernel")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

    started = time.perf_counter()
    row = {"dtype": dtype_name, "batch": batch, "steps": steps}
    try:
        # value_and_grad: the forward kernels stay (the gradients alone need not run them).
        jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)))).lower(*args).compile()
        row["compiled"] = True
    except Exception as err:  # noqa: BLE001 - the report is the point
        row.update(compiled=False, error=f"{type(err).__name__}: {str(err)[:400]}")
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv=None):
    args = parse_args(argv)
    from benchmarks.gpu_hlo import pretend_gpu

    pretend_gpu()  # the dispatcher must take the kernel path
    targets = {"sm90 (H100 80GB HBM3)": H100_TARGET, "sm80 (A100-SXM4-80GB)": A100_TARGET}
    if args.sm70:
        targets["sm70 (V100, expected to fail)"] = A100_TARGET.replace(
            "cuda_compute_capability { major: 8 }", "cuda_compute_capability { major: 7 }"
        )
    import jax

    report = {"jax": jax.__version__, "command": " ".join(sys.argv), "targets": {}}
    for name, target in targets.items():
        device = compile_only_device(target)
        rows = [
            check(device, dtype, batch, steps)
            for dtype in ("bfloat16", "float32")
            for batch, steps in SHAPES
        ]
        for row in rows:
            print(name, json.dumps(row), flush=True)
        report["targets"][name] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
