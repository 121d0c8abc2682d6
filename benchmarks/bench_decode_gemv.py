"""The decode step's GEMMs one shape at a time: XLA's GEMM against a Pallas GEMV sweep.

    python benchmarks/bench_decode_gemv.py --out /tmp/decode_gemv.json

At batch 1-2 a decode step reads every weight once, so each projection is a skinny GEMM
([M, K] x [K, N], M = 2 to 8 stacked rows) bound by HBM bandwidth. For each of the 1.6B
shape's decode GEMMs (packed r|k|v|g, output, packed FFN key|receptance, FFN value, the
vocabulary head) this times, inside one jitted chain over enough distinct weight copies that
nothing is served from L2 (each GEMM's input depends on the previous GEMM's output, as in the
model):
  xla:   `x @ w`, XLA's own (autotuned Triton or cuBLAS) GEMM;
  read:  a float32 sum of w, XLA's reduction: how fast a plain read of the bytes goes;
  gemv:  a Pallas (Triton) kernel, grid (N blocks, K splits), each program streaming its
         [K/split, bn] slab of w in [bk, bn] tiles against x padded to 16 rows; the split
         partial sums are added by XLA after it. Every (bn, bk, split, stages) of a small
         grid is timed; the best is reported.
A diagnostic for the decode layout, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_gemm import time_fn  # noqa: E402

# (name, rows at batch 2 packed, K, N): the 1.6B shape's decode GEMMs.
SHAPES = (
    ("rkvg_packed", 8, 2048, 8192),
    ("output", 2, 2048, 2048),
    ("ffn_key_receptance_packed", 4, 2048, 9216),
    ("ffn_value", 2, 7168, 2048),
    ("head", 2, 2048, 65536),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--rows", type=int, default=0, help="override every shape's M (e.g. 32)")
    p.add_argument("--chain-mb", type=int, default=600, help="bytes of weights per timed call")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    return p.parse_args(argv)


def gemv(x, w, *, bn, bk, split, stages, warps=4):
    """x [M, K] @ w [K, N] -> [M, N] float32 for M <= 16 (Pallas Triton)."""
    from jax.experimental.pallas import triton as plt

    m, k = x.shape
    n = w.shape[1]
    rows = max(16, m)
    part = k // split
    steps = part // bk
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xs = x_ref[:, pl.ds(i * bk, bk)]
            ws = w_ref[pl.ds(i * bk, bk), :]
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((rows, bn), jnp.float32))

    out = pl.pallas_call(
        kernel,
        grid=(n // bn, split),
        in_specs=[
            pl.BlockSpec((rows, part), lambda j, s: (0, s)),
            pl.BlockSpec((part, bn), lambda j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((None, rows, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split, rows, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        name="decode_gemv",
    )(xp, w)
    return out.sum(0)[:m]


def chain(op, weights, x):
    """op over every weight copy, each input nudged by the previous output (a dependency)."""
    for w in weights:
        y = op(x, w)
        nudge = y[:, :1] if y.ndim == 2 else y  # the read's sum is a scalar
        x = x + (nudge * 1e-6).astype(x.dtype)
    return x


def splits_for(k):
    return [s for s in (1, 2, 4, 7, 8, 14) if k % s == 0 and ((k // s) & (k // s - 1)) == 0]


def time_shape(name, m, k, n, args):
    """The rows of one GEMM shape: XLA, the read, the best Pallas GEMV."""
    nbytes = k * n * 2
    copies = max(4, -(-args.chain_mb * 2**20 // nbytes))
    keys = jax.random.split(jax.random.key(0), copies)
    weights = [(jax.random.normal(kk, (k, n)) * 0.02).astype(jnp.bfloat16) for kk in keys]
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    rows = []

    def report(kind, op, **extra):
        seconds = time_fn(functools.partial(chain, op), weights, x, args.reps)
        row = dict(
            shape=name, m=m, k=k, n=n, kind=kind,
            us_per_gemm=round(seconds / copies * 1e6, 2),
            tb_per_s=round(nbytes * copies / seconds / 1e12, 3), **extra,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        return seconds

    xla = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
    report("xla", xla)
    report("read", lambda x, w: jnp.sum(w.astype(jnp.float32)))
    best = None
    grid = itertools.product((64, 128), (128, 256), splits_for(k), (3, 4))
    for bn, bk, split, stages in grid:
        if n % bn or (k // split) % bk or (k // split) < bk:
            continue
        config = dict(bn=bn, bk=bk, split=split, stages=stages)
        op = functools.partial(gemv, **config)
        try:
            err = float(jnp.max(jnp.abs(op(x, weights[0]) - xla(x, weights[0]))))
            seconds = time_fn(functools.partial(chain, op), weights, x, args.reps)
        except Exception as exc:  # a config Triton cannot compile: skip it, say so
            print(f"  skip {config}: {type(exc).__name__}")
            continue
        if best is None or seconds < best[0]:
            best = (seconds, config, err)
    if best:  # timed once more, as the rows above
        report("gemv_best", functools.partial(gemv, **best[1]), **best[1], max_abs_err=best[2])
    return rows


def main(argv=None):
    args = parse_args(argv)
    wanted = args.shapes.split(",")
    rows = []
    for name, m, k, n in SHAPES:
        if name not in wanted:
            continue
        rows += time_shape(name, args.rows or m, k, n, args)
        if args.out:  # after every shape: a run cut short keeps what it measured
            result = dict(device=str(jax.devices()[0].device_kind), rows=rows)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
