"""The WKV kernel's decay gate (decay_check="call"): XLA's plain form against the Pallas
kernel at several programs sizes and warps; device time per call (median of 5 traces).

    python benchmarks/bench_decay_gate.py --shape 8x4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profile_generate import traced_kernel_times
from rwkv_ray.ops import wkv_kernel_intra as intra


def device_ms(fn, x, traces=5):
    jax.block_until_ready(fn(x))
    return statistics.median(
        sum(traced_kernel_times(lambda: fn(x)).values()) for _ in range(traces)
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="8x4096", help="BxT (H32 N64)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--per-program", default="2,4,8,16,32")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    b, t = map(int, args.shape.split("x"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-7.0, -0.1, (b, t, 32, 64)), args.dtype)
    rows = {"plain": device_ms(jax.jit(functools.partial(intra.factored_everywhere, chunk=16)), x)}
    want = np.asarray(intra.factored_everywhere(x, 16))
    for per in map(int, args.per_program.split(",")):
        for warps in map(int, args.warps.split(",")):
            fn = jax.jit(functools.partial(
                intra.factored_everywhere_kernel, chunk=16, num_warps=warps, per_program=per
            ))  # fmt: skip
            assert (np.asarray(fn(x)) == want).all()
            rows[f"kernel p{per} w{warps}"] = device_ms(fn, x)
    for name, ms in sorted(rows.items(), key=lambda kv: kv[1]):
        print(f"{args.shape} {args.dtype} {name}: {ms * 1e3:.1f} us", flush=True)
    if args.out:
        card = jax.devices()[0].device_kind
        with open(args.out, "w") as f:
            json.dump(
                {"card": card, "shape": args.shape, "dtype": args.dtype, "ms": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
