"""Is a fused Pallas kernel for TimeMix's token-shift mix worth building? A forward prototype.

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
once to bf16). Forward only: the backward (d_a, d_xx, the hidden's and maa_w2's gradients
without the [B, T, 5, C] tensor) is worth building only if this runs near the memory
bandwidth. It compiles for the compile-only H100 and A100 targets (gpu_hlo.py) with every
default configuration; never run on a GPU yet.
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
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if worst > 2**-6:  # a few bf16 rounding steps of the outputs' largest magnitude
        raise SystemExit(f"the kernel disagrees with the XLA form: max relative error {worst}")


if __name__ == "__main__":
    main()
