"""Is a fused Pallas kernel for TimeMix's token-shift mix worth building? A prototype.

    python benchmarks/proto_mix_kernel.py --out /tmp/mix.json           # on a GPU
    JAX_PLATFORMS=cpu python benchmarks/proto_mix_kernel.py --interpret --rows 64 --width 256

The mix of every TimeMix layer (rwkv_ray/models/rwkv6_time_mix.py), per token:
    lora = tanh(xxx @ maa_w1) -> 5 slots of 32 -> lora_s = hidden_s @ maa_w2[s]
    mixed_s = a + xx * (maa_s + lora_s)                    s in w, k, v, r, g
XLA runs it as a GEMM writing the [B, T, 5, C] `lora` and a fusion reading it back to write
the five mixed inputs: 15 ms a step at the 1.6B shape (B4 T4096, 24 layers) on an H100,
and its gradient's [B, T, 5, C] assembly another 11.6 ms (BENCHMARKS.md, training "Next").
The kernel here does the slot matmuls (K = 32) with the mixes as their epilogue, so `lora`
never leaves the chip: it reads a, xx and hidden and writes the five outputs (about 470 MB
a layer at that shape, against about 1.1 GB for XLA's two kernels). It times both, one
layer's shapes, same process, median of --reps after a warm-up, for each --configs entry,
and checks the kernel against the model's form (the kernel computes in float32 and rounds
once to bf16). Then the backward (`pallas_mix_grads`: d_a, d_xx, the hidden's, maa_w2's and
maa's gradients without the [B, T, 5, C] tensor; two kernels) against XLA's gradient of the
model's form, timed the same way. Both compile for the compile-only H100 and A100 targets
(gpu_hlo.py); never run on a GPU yet. Wired into TimeMix only if they beat XLA there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SLOTS, LORA = 5, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=16384, help="B * T tokens")
    p.add_argument("--width", type=int, default=2048, help="hidden size C")
    p.add_argument(
        "--configs", default="32:128:4,64:128:4,32:256:4,16:128:2",
        help="kernel configurations block_rows:block_cols:num_warps, comma-separated",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="Pallas' interpreter (CPU check)")
    p.add_argument("--out")
    return p.parse_args(argv)


def xla_mix(a, xx, hidden, maa_w2, maa):
    """The model's form and dtypes: a, xx [N, C]; hidden [N, 5*32]; maa_w2 [5, 32, C];
    maa [5, C]; all bf16, the LoRA's output and the mixes in bf16 as the model computes."""
    import jax.numpy as jnp

    lora = jnp.einsum("nsd,sdc->nsc", hidden.reshape(hidden.shape[0], SLOTS, LORA), maa_w2)
    return tuple(a + xx * (maa[s] + lora[:, s]) for s in range(SLOTS))


def pallas_mix(a, xx, hidden, maa_w2, maa, *, block_rows, block_cols, num_warps, interpret):
    """The fused form; same arguments and results as xla_mix."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    rows, width = a.shape
    if rows % block_rows or width % block_cols:
        raise ValueError(f"rows {rows} / width {width} must be multiples of the blocks")
    f32 = jnp.float32
    slot_hidden = [hidden[:, s * LORA : (s + 1) * LORA] for s in range(SLOTS)]
    maa8 = jnp.zeros((8, width), maa.dtype).at[:SLOTS].set(maa)  # 8 rows: a power of two

    def kernel(a_ref, xx_ref, *refs):
        h_refs, w_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS]
        maa_ref, out_refs = refs[2 * SLOTS], refs[2 * SLOTS + 1 :]
        base, delta = a_ref[...].astype(f32), xx_ref[...].astype(f32)
        for s in range(SLOTS):
            h, w = h_refs[s][...], w_refs[s][...]
            if interpret:  # XLA's CPU dot takes no bf16 x bf16 -> f32
                h, w = h.astype(f32), w.astype(f32)
            lora = jnp.dot(h, w, preferred_element_type=f32)
            mix = maa_ref[s, :].astype(f32)[None, :]
            out_refs[s][...] = (base + delta * (mix + lora)).astype(out_refs[s].dtype)

    tile = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
    in_specs = [
        tile,
        tile,
        *[pl.BlockSpec((block_rows, LORA), lambda i, j: (i, 0)) for _ in range(SLOTS)],
        *[pl.BlockSpec((LORA, block_cols), lambda i, j: (0, j)) for _ in range(SLOTS)],
        pl.BlockSpec((8, block_cols), lambda i, j: (0, j)),
    ]
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    call = pl.pallas_call(
        kernel,
        grid=(rows // block_rows, width // block_cols),
        in_specs=in_specs,
        out_specs=[tile] * SLOTS,
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype)] * SLOTS,
        compiler_params=params,
        interpret=interpret,
        name="token_mix_fwd",
    )
    return tuple(call(a, xx, *slot_hidden, *[maa_w2[s] for s in range(SLOTS)], maa8))


def pallas_mix_grads(xx, hidden, maa_w2, maa, grads, *, block_rows=32, block_cols=128,
                     row_groups=16, num_warps=4, interpret=False):  # fmt: skip
    """The backward of the mix without the [N, 5, C] gradient: given the five outputs'
    cotangents `grads`, returns (d_a, d_xx [N, C]; d_hidden [N, 5*32]; d_maa_w2 [5, 32, C];
    d_maa [5, C]). Kernel 1 walks row blocks (d_a, d_xx and d_hidden, whose sums run over
    C); kernel 2 walks column blocks (d_maa_w2 and d_maa, whose sums run over the rows), one
    partial sum per group of rows, added up after."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    rows, width = xx.shape
    f32 = jnp.float32
    cols = width // block_cols
    if rows % (block_rows * row_groups) or width % block_cols:
        raise ValueError(f"rows {rows} / width {width} do not divide into the blocks")
    slot_hidden = [hidden[:, s * LORA : (s + 1) * LORA] for s in range(SLOTS)]
    slot_w2 = [maa_w2[s] for s in range(SLOTS)]
    maa8 = jnp.zeros((8, width), maa.dtype).at[:SLOTS].set(maa)
    mm = f32 if interpret else xx.dtype  # XLA's CPU dot takes no bf16 x bf16 -> f32

    def by_rows(*refs):
        g_refs, xx_ref = refs[:SLOTS], refs[SLOTS]
        h_refs, w_refs = refs[SLOTS + 1 : 2 * SLOTS + 1], refs[2 * SLOTS + 1 : 3 * SLOTS + 1]
        maa_ref, da_ref, dxx_ref = refs[3 * SLOTS + 1 : 3 * SLOTS + 4]
        dh_refs = refs[3 * SLOTS + 4 :]
        hs = [h[...].astype(mm) for h in h_refs]

        def column(j, dh):
            cut = pl.ds(j * block_cols, block_cols)
            delta = xx_ref[:, cut].astype(f32)
            d_a = jnp.zeros_like(delta)
            d_xx = jnp.zeros_like(delta)
            new = []
            for s in range(SLOTS):
                g = g_refs[s][:, cut].astype(f32)
                w = w_refs[s][:, cut].astype(mm)
                lora = jnp.dot(hs[s], w, preferred_element_type=f32)
                d_a += g
                d_xx += g * (maa_ref[s, cut].astype(f32)[None, :] + lora)
                e = (g * delta).astype(mm)
                new.append(dh[s] + lax.dot_general(
                    e, w, (((1,), (1,)), ((), ())), preferred_element_type=f32))  # fmt: skip
            da_ref[:, cut] = d_a.astype(da_ref.dtype)
            dxx_ref[:, cut] = d_xx.astype(dxx_ref.dtype)
            return tuple(new)

        zero = jnp.zeros((block_rows, LORA), f32)
        dh = lax.fori_loop(0, cols, column, (zero,) * SLOTS)
        for s in range(SLOTS):
            dh_refs[s][...] = dh[s].astype(dh_refs[s].dtype)

    per_group = rows // row_groups

    def by_columns(*refs):
        g_refs, xx_ref = refs[:SLOTS], refs[SLOTS]
        h_refs = refs[SLOTS + 1 : 2 * SLOTS + 1]
        dw_refs, dmaa_ref = refs[2 * SLOTS + 1 : 3 * SLOTS + 1], refs[3 * SLOTS + 1]

        def row_block(r, acc):
            cut = pl.ds(r * block_rows, block_rows)
            delta = xx_ref[cut, :].astype(f32)
            dw, dmaa = list(acc[:SLOTS]), list(acc[SLOTS:])
            for s in range(SLOTS):
                e = g_refs[s][cut, :].astype(f32) * delta
                dmaa[s] += jnp.sum(e, axis=0)
                h = h_refs[s][cut, :].astype(mm)
                dw[s] += lax.dot_general(
                    h, e.astype(mm), (((0,), (0,)), ((), ())), preferred_element_type=f32
                )
            return (*dw, *dmaa)

        init = (jnp.zeros((LORA, block_cols), f32),) * SLOTS
        init += (jnp.zeros((block_cols,), f32),) * SLOTS
        acc = lax.fori_loop(0, per_group // block_rows, row_block, init)
        for s in range(SLOTS):
            dw_refs[s][...] = acc[s]
            dmaa_ref[s, :] = acc[SLOTS + s]

    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    row_tile = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
    d_a, d_xx, *d_hidden = pl.pallas_call(
        by_rows,
        grid=(rows // block_rows,),
        in_specs=[row_tile] * (SLOTS + 1)
        + [pl.BlockSpec((block_rows, LORA), lambda i: (i, 0))] * SLOTS
        + [pl.BlockSpec((LORA, width), lambda i: (0, 0))] * SLOTS
        + [pl.BlockSpec((8, width), lambda i: (0, 0))],
        out_specs=[row_tile, row_tile]
        + [pl.BlockSpec((block_rows, LORA), lambda i: (i, 0))] * SLOTS,
        out_shape=[jax.ShapeDtypeStruct(xx.shape, xx.dtype)] * 2
        + [jax.ShapeDtypeStruct((rows, LORA), f32)] * SLOTS,
        compiler_params=params,
        interpret=interpret,
        name="token_mix_bwd_rows",
    )(*grads, xx, *slot_hidden, *slot_w2, maa8)
    col_tile = pl.BlockSpec((per_group, block_cols), lambda j, q: (q, j))
    *d_w2, d_maa = pl.pallas_call(
        by_columns,
        grid=(cols, row_groups),
        in_specs=[col_tile] * (SLOTS + 1)
        + [pl.BlockSpec((per_group, LORA), lambda j, q: (q, 0))] * SLOTS,
        out_specs=[pl.BlockSpec((None, LORA, block_cols), lambda j, q: (q, 0, j))] * SLOTS
        + [pl.BlockSpec((None, 8, block_cols), lambda j, q: (q, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((row_groups, LORA, width), f32)] * SLOTS
        + [jax.ShapeDtypeStruct((row_groups, 8, width), f32)],
        compiler_params=params,
        interpret=interpret,
        name="token_mix_bwd_columns",
    )(*grads, xx, *slot_hidden)
    d_hidden = jnp.concatenate(d_hidden, axis=1).astype(hidden.dtype)
    d_w2 = jnp.stack([d.sum(0) for d in d_w2]).astype(maa_w2.dtype)
    return d_a, d_xx, d_hidden, d_w2, d_maa.sum(0)[:SLOTS].astype(maa.dtype)


def timed(fn, args, reps: int) -> float:
    """Median device-synchronized wall ms of fn(*args) after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    n, c, bf16 = args.rows, args.width, jnp.bfloat16
    inputs = (
        jnp.asarray(rng.normal(size=(n, c)), bf16),
        jnp.asarray(rng.normal(size=(n, c)), bf16),
        jnp.asarray(np.tanh(rng.normal(size=(n, SLOTS * LORA))), bf16),
        jnp.asarray(rng.uniform(-0.01, 0.01, size=(SLOTS, LORA, c)), bf16),
        jnp.asarray(rng.uniform(0, 1, size=(SLOTS, c)), bf16),
    )
    plain = jax.jit(xla_mix)
    want = plain(*inputs)
    report = {"device": jax.devices()[0].device_kind, "args": vars(args), "configs": {}}
    moved = (2 * n * c + n * SLOTS * LORA + SLOTS * LORA * c + SLOTS * c + SLOTS * n * c) * 2
    if not args.interpret:
        report["xla_ms"] = round(timed(plain, inputs, args.reps), 4)
        report["bytes_moved_by_the_kernel"] = moved
    worst = 0.0
    for config in args.configs.split(","):
        rows, cols, warps = (int(x) for x in config.split(":"))
        options = dict(block_rows=rows, block_cols=cols, num_warps=warps)
        fused = jax.jit(lambda *x, o=options: pallas_mix(*x, **o, interpret=args.interpret))
        got = fused(*inputs)
        # The kernel rounds once (float32 math); the model's form rounds each bf16 op: a few
        # bf16 steps of the outputs' scale apart.
        error = max(
            float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
            / float(jnp.max(jnp.abs(w.astype(jnp.float32))))
            for g, w in zip(got, want, strict=True)
        )
        row = {"max_rel_error": error}
        if not args.interpret:
            row["pallas_ms"] = round(timed(fused, inputs, args.reps), 4)
            row["pallas_gb_per_s"] = round(moved / row["pallas_ms"] / 1e6, 1)
        report["configs"][config] = row
        worst = max(worst, error)
    # The backward, default configuration, against XLA's gradient of the model's form.
    grads = tuple(jnp.asarray(rng.normal(size=(n, c)), bf16) for _ in range(SLOTS))
    plain_grads = jax.jit(lambda g, *x: jax.vjp(xla_mix, *x)[1](g))
    fused_grads = jax.jit(
        lambda g, a, xx, h, w2, maa: pallas_mix_grads(xx, h, w2, maa, g, interpret=args.interpret)
    )
    want_grads = plain_grads(grads, *inputs)
    got_grads = fused_grads(grads, *inputs)
    names = ("d_a", "d_xx", "d_hidden", "d_maa_w2", "d_maa")
    backward = {}
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        w32, g32 = w.astype(jnp.float32), g.astype(jnp.float32)
        backward[name] = float(jnp.max(jnp.abs(g32 - w32))) / float(jnp.max(jnp.abs(w32)))
    report["backward_max_rel_error"] = backward
    if not args.interpret:
        report["backward_xla_ms"] = round(timed(plain_grads, (grads, *inputs), args.reps), 4)
        report["backward_pallas_ms"] = round(timed(fused_grads, (grads, *inputs), args.reps), 4)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if worst > 2**-6:  # a few bf16 rounding steps of the outputs' largest magnitude
        raise SystemExit(f"the kernel disagrees with the XLA form: max relative error {worst}")
    if max(backward.values()) > 2**-5:  # bf16 sums over thousands of rows on XLA's side
        raise SystemExit(f"the backward disagrees with XLA's gradient: {backward}")


if __name__ == "__main__":
    main()
