"""TimeMix's five token-shift mixes (rwkv_ray/ops/token_mix.py) alone on a GPU: the Pallas
kernels at several tile shapes against XLA's fusions of the plain form, forward and
forward + backward, at the 1.6B training step's shape (B4 T4096 C2048, bf16). Prints ms and
the GB/s of the bytes each direction must move; --out writes them as JSON."""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from rwkv_ray.ops import token_mix


def timed(fn, *args, reps=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="4x4096x2048", help="B x T x C")
    ap.add_argument(
        "--configs",
        default="16:4:4,16:4:8,4:16:4,8:8:4,32:2:8",
        help="Pallas tiles, comma-separated ROWS:SUBTILES:NUM_WARPS",
    )
    ap.add_argument("--out")
    a = ap.parse_args()
    b, t, c = (int(x) for x in a.shape.split("x"))
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    x, xx = (jax.random.normal(k, (b, t, c), jnp.bfloat16) for k in ks[:2])
    maa = jax.random.uniform(ks[2], (5, c))
    mixes = list(jax.random.normal(ks[3], (5, b, t, c), jnp.bfloat16))
    douts = list(jax.random.normal(ks[4], (5, b, t, c), jnp.bfloat16))
    tensor_gb = b * t * c * 2 / 1e9
    moved = {"fwd": 12 * tensor_gb, "fwd_bwd": (12 + 18) * tensor_gb}

    def runners(mix):
        fwd = jax.jit(lambda x, xx, maa, m: mix(x, xx, maa, m))

        def loss(x, xx, maa, *m):
            outs = mix(x, xx, maa, list(m))
            return sum(jnp.sum(o.astype(jnp.float32) * d) for o, d in zip(outs, douts, strict=True))

        return fwd, jax.jit(jax.grad(loss, argnums=range(8)))

    rows = {}
    configs = [("plain (XLA)", None)] + [(f"pallas {cfg}", cfg) for cfg in a.configs.split(",")]
    if jax.default_backend() != "gpu":  # Pallas' Triton kernels compile only for a GPU
        print(f"no GPU ({jax.default_backend()}): timing the plain form only")
        configs = configs[:1]
    for name, cfg in configs:
        if cfg is None:
            fwd, fb = runners(token_mix.mix_slots_plain)
        else:
            r, s, w = (int(v) for v in cfg.split(":"))
            token_mix.ROWS, token_mix.SUBTILES, token_mix.NUM_WARPS = r, s, w
            fwd, fb = runners(token_mix.mix_slots)
        row = {"fwd_ms": timed(fwd, x, xx, maa, mixes), "fwd_bwd_ms": timed(fb, x, xx, maa, *mixes)}
        row |= {f"{k}_gbps": moved[k] / row[f"{k}_ms"] * 1e3 for k in moved}
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    if a.out:
        result = {"card": jax.devices()[0].device_kind, "shape": a.shape, "rows": rows}
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
