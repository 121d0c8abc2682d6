"""How fast the decode step's weight reads can go: the 1.6B shape's per-token GEMMs alone.

    python benchmarks/bench_decode_gemm.py --batch-sizes 2,32 --out /tmp/decode_gemm.json

At decode, a token costs one read of every weight, so the projections' GEMMs (M = batch rows)
are bandwidth-bound. This times the 24 layers' projections three ways, each as one jitted
function over bf16 weights, with every layer's input depending on the previous layer's
output (as in the model):
  separate: one GEMM per projection (what the model runs today: r, k, v, g, output;
            FFN key, receptance, value);
  packed:   r|k|v|g as one GEMM of the 4 inputs stacked on rows against the weights
            concatenated on columns (the off-diagonal blocks are wasted compute, free at
            small M), likewise FFN key|receptance;
  batched:  r, k, v, g as one batched GEMM [4, M, C] x [4, C, C].
A diagnostic for choosing the decode layout, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="2,32")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=7168)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out")
    return p.parse_args(argv)


def make_weights(key, c, f, layers):
    def w(key, shape):
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)

    out = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), 8)
        out.append(
            dict(
                r=w(ks[0], (c, c)),
                k=w(ks[1], (c, c)),
                v=w(ks[2], (c, c)),
                g=w(ks[3], (c, c)),
                o=w(ks[4], (c, c)),
                fk=w(ks[5], (c, f)),
                fr=w(ks[6], (c, c)),
                fv=w(ks[7], (f, c)),
            )  # fmt: skip
        )
    return out


def pack(layer):
    return dict(
        rkvg=jnp.concatenate([layer[s] for s in "rkvg"], axis=1),
        rkvg_stack=jnp.stack([layer[s] for s in "rkvg"]),
        o=layer["o"],
        fkr=jnp.concatenate([layer["fk"], layer["fr"]], axis=1),
        fv=layer["fv"],
    )


def separate(weights, x):
    for w in weights:
        xs = [x * (1 + 0.01 * i) for i in range(4)]
        r, k, v, g = (xs[i] @ w[s] for i, s in enumerate("rkvg"))
        x = x + (r * k + v * g) @ w["o"]
        h = jnp.square(jax.nn.relu((x * 1.01) @ w["fk"]))
        x = x + jax.nn.sigmoid((x * 0.99) @ w["fr"]) * (h @ w["fv"])
    return x


def packed(weights, x):
    m, c = x.shape
    for w in weights:
        xs = jnp.concatenate([x * (1 + 0.01 * i) for i in range(4)], axis=0)  # [4M, C]
        full = xs @ w["rkvg"]  # [4M, 4C]: block (i, i) is projection i of input i
        r, k, v, g = (full[i * m : (i + 1) * m, i * c : (i + 1) * c] for i in range(4))
        x = x + (r * k + v * g) @ w["o"]
        f = w["fv"].shape[0]
        both = jnp.concatenate([x * 1.01, x * 0.99], axis=0) @ w["fkr"]  # [2M, F + C]
        h = jnp.square(jax.nn.relu(both[:m, :f]))
        x = x + jax.nn.sigmoid(both[m:, f:]) * (h @ w["fv"])
    return x


def batched(weights, x):
    for w in weights:
        xs = jnp.stack([x * (1 + 0.01 * i) for i in range(4)])  # [4, M, C]
        r, k, v, g = jnp.einsum("smc,scd->smd", xs, w["rkvg_stack"])
        x = x + (r * k + v * g) @ w["o"]
        h = jnp.square(jax.nn.relu((x * 1.01) @ w["fkr"][:, : w["fv"].shape[0]]))
        x = x + jax.nn.sigmoid((x * 0.99) @ w["fkr"][:, w["fv"].shape[0] :]) * (h @ w["fv"])
    return x


def time_fn(fn, weights, x, reps):
    fn = jax.jit(fn)
    fn(weights, x).block_until_ready()
    fn(weights, x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(weights, x).block_until_ready()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    args = parse_args(argv)
    c, f, layers = args.hidden, args.ffn, args.layers
    raw = make_weights(jax.random.key(0), c, f, layers)
    packed_weights = [pack(w) for w in raw]
    weight_bytes = layers * (6 * c * c + 2 * c * f) * 2
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        x = jax.random.normal(jax.random.key(1), (batch, c), jnp.bfloat16)
        for name, fn, weights in (
            ("separate", separate, raw),
            ("packed", packed, packed_weights),
            ("batched", batched, packed_weights),
        ):
            seconds = time_fn(fn, weights, x, args.reps)
            row = dict(
                batch=batch, layout=name, ms=round(seconds * 1e3, 3),
                tb_per_s=round(weight_bytes / seconds / 1e12, 3),
            )  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    result = dict(device=str(jax.devices()[0].device_kind), weight_gb=weight_bytes / 1e9, rows=rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
