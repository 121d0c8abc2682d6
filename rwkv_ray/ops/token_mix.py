"""TimeMix's five token-shift mixes, x_s = a + xx * (maa_s + m_s) for the slots w, k, v, r, g,
as one Pallas (Triton) kernel each way. The plain form (`mix_slots_plain`) is the reference
and what every backend but the GPU kernel runs.

In the 1.6B training step XLA compiled the forward into one fusion of five outputs and the
backward into two (d a and d xx, then d m_s with d maa_s's row sums), reading the five
incoming gradients twice, at 1.6-2.2 TB/s of an H200's 4.8 (about 16 ms of the 341-ms full
step, 2026-11-28). Here the forward reads a, xx and the m_s once and writes the x_s; the
backward reads xx, the m_s and the five gradients once and writes d a, d xx, the d m_s and
per-block partial sums of d maa_s. Arithmetic in float32, rounded once per output (d maa in
float32: the plain form's bf16 d maa is 1e-2 off). Measured on H200s (BENCHMARKS.md,
2026-11-28): +0.85% on the 1.6B step, but only at par with XLA's fusions in its profile
(5.2 + 9.8 ms a step): at the default tile the backward spills (255 registers); the tiles
below are `benchmarks/bench_token_mix.py`'s knobs. Pure jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel import per_device_rows
from rwkv_ray.ops.wkv_kernel_intra import F32

SLOTS = 5
ROWS = 16  # rows (tokens) per tile
SUBTILES = 4  # tiles per backward program: its d maa partial sums cover ROWS * SUBTILES rows
COLUMN_BLOCKS = (256, 128, 64, 32)  # the widest that divides C is a tile's width
NUM_WARPS = 4  # Triton warps of both kernels


def mix_slots_plain(a, xx, maa, mixes):
    """[a + xx * (maa[s] + mixes[s]) for s in range(5)] in a's dtype (maa cast to it first),
    as the official model computes it: a, xx and each mixes[s] [B, T, C]; maa [5, C]."""
    return [a + xx * (maa[s].astype(a.dtype) + mixes[s]) for s in range(SLOTS)]


def column_block(c: int) -> int | None:
    """A tile's width for C channels: the widest of COLUMN_BLOCKS dividing C (Triton's blocks
    are powers of 2), None when none does (the plain form runs)."""
    return next((cols for cols in COLUMN_BLOCKS if c % cols == 0), None)


def _forward_kernel(a_ref, xx_ref, *refs):
    maa_refs, mix_refs, out_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS], refs[2 * SLOTS :]
    a = a_ref[...].astype(F32)
    xx = xx_ref[...].astype(F32)
    for maa_ref, mix_ref, out_ref in zip(maa_refs, mix_refs, out_refs, strict=True):
        scale = maa_ref[...][None, :] + mix_ref[...].astype(F32)
        out_ref[...] = (a + xx * scale).astype(out_ref.dtype)


def _backward_kernel(xx_ref, *refs):
    """d a = sum_s d x_s; d xx = sum_s d x_s * (maa_s + m_s); d m_s = d x_s * xx, whose sum
    over the program's rows is its part of d maa_s."""
    maa_refs, mix_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS]
    dout_refs = refs[2 * SLOTS : 3 * SLOTS]
    da_ref, dxx_ref = refs[3 * SLOTS : 3 * SLOTS + 2]
    dmix_refs, dmaa_refs = refs[3 * SLOTS + 2 : 4 * SLOTS + 2], refs[4 * SLOTS + 2 :]
    maa = [ref[...][None, :] for ref in maa_refs]
    sums = [jnp.zeros(maa_refs[0].shape, F32) for _ in range(SLOTS)]
    for tile in range(SUBTILES):
        rows = pl.ds(tile * ROWS, ROWS)
        xx = xx_ref[rows, :].astype(F32)
        da = dxx = None
        for s in range(SLOTS):
            dout = dout_refs[s][rows, :].astype(F32)
            scale = maa[s] + mix_refs[s][rows, :].astype(F32)
            da = dout if da is None else da + dout
            dxx = dout * scale if dxx is None else dxx + dout * scale
            dmix = dout * xx
            dmix_refs[s][rows, :] = dmix.astype(dmix_refs[s].dtype)
            sums[s] = sums[s] + jnp.sum(dmix, axis=0)
        da_ref[rows, :] = da.astype(da_ref.dtype)
        dxx_ref[rows, :] = dxx.astype(dxx_ref.dtype)
    for dmaa_ref, total in zip(dmaa_refs, sums, strict=True):
        dmaa_ref[...] = total


def _params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _tiles(rows_per_program, cols):
    tile = pl.BlockSpec((rows_per_program, cols), lambda i, j: (i, j))
    channel = pl.BlockSpec((cols,), lambda i, j: (j,))
    partial = pl.BlockSpec((None, cols), lambda i, j: (i, j))
    return tile, channel, partial


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mix(a, xx, maa, interpret, *mixes):
    rows, c = a.shape
    cols = column_block(c)
    tile, channel, _ = _tiles(ROWS, cols)
    out = jax.ShapeDtypeStruct(a.shape, a.dtype)
    return tuple(
        pl.pallas_call(
            _forward_kernel,
            grid=(rows // ROWS, c // cols),
            in_specs=[tile, tile] + [channel] * SLOTS + [tile] * SLOTS,
            out_specs=[tile] * SLOTS,
            out_shape=(out,) * SLOTS,
            compiler_params=_params(interpret),
            interpret=interpret,
            name="token_mix_fwd",
        )(a, xx, *maa, *mixes)
    )


def _mix_fwd(a, xx, maa, interpret, *mixes):
    return _mix(a, xx, maa, interpret, *mixes), (xx, maa, mixes)


def _mix_bwd(interpret, residuals, douts):
    xx, maa, mixes = residuals
    rows, c = xx.shape
    cols, block = column_block(c), ROWS * SUBTILES
    tile, channel, partial = _tiles(block, cols)
    like = jax.ShapeDtypeStruct(xx.shape, xx.dtype)
    sums = jax.ShapeDtypeStruct((rows // block, c), F32)
    outs = pl.pallas_call(
        _backward_kernel,
        grid=(rows // block, c // cols),
        in_specs=[tile] + [channel] * SLOTS + [tile] * (2 * SLOTS),
        out_specs=[tile] * (2 + SLOTS) + [partial] * SLOTS,
        out_shape=(like,) * (2 + SLOTS) + (sums,) * SLOTS,
        compiler_params=_params(interpret),
        interpret=interpret,
        name="token_mix_bwd",
    )(xx, *maa, *mixes, *(d.astype(xx.dtype) for d in douts))
    da, dxx, dmixes, dmaa = outs[0], outs[1], outs[2 : 2 + SLOTS], outs[2 + SLOTS :]
    return (da, dxx, tuple(jnp.sum(x, axis=0) for x in dmaa), *dmixes)


_mix.defvjp(_mix_fwd, _mix_bwd)


def mix_slots(a, xx, maa, mixes, *, interpret=False):
    """`mix_slots_plain`'s five outputs through the Pallas kernels: a, xx and each mixes[s]
    [B, T, C] (run in their promoted dtype, as the plain form's), maa [5, C] (taken in
    float32; its gradient is float32). C needs a
    width of COLUMN_BLOCKS dividing it (`column_block`). Differentiable in every argument;
    `interpret=True` runs Pallas' interpreter (CPU)."""
    if len(mixes) != SLOTS:
        raise ValueError(f"expected {SLOTS} mixes (slots w, k, v, r, g), got {len(mixes)}")
    b, t, c = a.shape
    for name, x in (("xx", xx), *((f"mixes[{s}]", m) for s, m in enumerate(mixes))):
        if x.shape != a.shape:
            raise ValueError(f"{name} has shape {x.shape}, expected a's {a.shape}")
    if maa.shape != (SLOTS, c):
        raise ValueError(f"maa has shape {maa.shape}, expected {(SLOTS, c)}")
    if column_block(c) is None:
        raise ValueError(f"C = {c} is a multiple of none of {COLUMN_BLOCKS}: use mix_slots_plain")
    dtype = jnp.result_type(a, xx, *mixes)  # mix_slots_plain's: nothing rounded to a's
    if b * t == 0:  # no rows: no program to run
        return [jnp.zeros(a.shape, dtype)] * SLOTS
    a = a.astype(dtype)
    block = ROWS * SUBTILES

    def per_device(a, xx, maa, *mixes):
        rows = a.shape[0] * t
        pad = (-rows) % block  # zero rows: zero outputs, zero gradient (their d x_s is zero)

        def flat(x):
            x = x.reshape(rows, c)
            return jnp.pad(x, ((0, pad), (0, 0))) if pad else x

        channels = tuple(maa[s] for s in range(SLOTS))
        outs = _mix(flat(a), flat(xx), channels, interpret, *(flat(m) for m in mixes))
        return tuple(x[:rows].reshape(a.shape[0], t, c) for x in outs)

    # Under a data-parallel mesh each device mixes its own rows (as the WKV kernel does).
    call = per_device_rows(per_device, b, (True, True, False) + (True,) * SLOTS, SLOTS)
    mixes = tuple(m.astype(a.dtype) for m in mixes)
    return list(call(a, xx.astype(a.dtype), maa.astype(F32), *mixes))
