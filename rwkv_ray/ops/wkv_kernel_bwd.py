"""WKV6 backward kernels and their launchers (the math: rwkv_ray/ops/wkv_kernel.py).

"fused": two sequential kernels per (b, h), forward then reverse over the chunks. "two_pass"
(derivation above _chunk_state_grads_kernel): the span-entry states (wkv_kernel_fwd's
`_entry_states`) and span-exit state gradients, then every span's gradients in parallel.
`use_two_pass_backward` picks between them. Pure jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel_call import (
    _call,
    _chunk_loop,
    _chunk_specs,
    _load,
    _mm_dtype,
    _specs,
)
from rwkv_ray.ops.wkv_kernel_fwd import (
    _entry_states,
    _sequential_pass,
    pass1_length,
    span_length,
    stack_dtype,
    state_pass_splits,
)
from rwkv_ray.ops.wkv_kernel_intra import (
    _NT,
    _TN,
    F32,
    _chunk_terms,
    _decay_factors,
    _intra_dk,
    _intra_dr,
    _intra_p,
    _mm,
)

# ----------------------------------------------------------------------------- kernels


def _bwd_dr_kernel(k_ref, v_ref, w_ref, s0_ref, dy_ref, drn_ref, *, chunk, mm_dtype, mode):
    """Forward direction: drn_t = S_{t-1} dy_t (dr without the u-bonus term)."""
    n_chunks = k_ref.shape[0] // chunk

    def body(c, s):
        base = c * chunk
        sl = pl.ds(base, chunk)
        k, v, lw, dy = (_load(x, sl) for x in (k_ref, v_ref, w_ref, dy_ref))
        inc, exc, last = _chunk_terms(lw)
        d = _mm(dy, v, mm_dtype, _NT)  # d[t, s] = dy_t . v_s
        intra = _intra_dr(d, k, inc, exc, k_ref, w_ref, base, chunk, mode)
        f_start, f_end, f_all = _decay_factors(inc, exc, last)
        drn_ref[sl, :] = f_start * _mm(dy, s, mm_dtype, _NT) + intra
        return f_all * s + _mm(k * f_end, v, mm_dtype, _TN)

    lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(F32))


def _bwd_dkv_kernel(
    r_ref,
    k_ref,
    v_ref,
    w_ref,
    u_ref,
    dy_ref,
    drn_ref,
    dst_ref,
    xfin_ref,
    dr_ref,
    dk_ref,
    dv_ref,
    dw_ref,
    du_ref,
    ds0_ref,
    *,
    chunk,
    mm_dtype,
    mode,
):
    """Reverse direction, carrying G = dL/dS: dr, dk, dv, d log_w, this (b, h)'s part of du,
    and dS0. With dd = r*drn - k*dkn (drn, dkn: dr, dk without the u-bonus term),
    d log_w_t = carry + sum_{m >= t in chunk} dd_m - r_t drn_t, where carry starts at
    rowsum(dS_T * S_T) and gains each later chunk's sum of dd."""
    n_chunks = r_ref.shape[0] // chunk
    u = u_ref[...].astype(F32)[None, :]

    def body(i, carry):
        g, acc_w, acc_u = carry
        base = (n_chunks - 1 - i) * chunk
        sl = pl.ds(base, chunk)
        r, k, v, lw, dy, drn = (_load(x, sl) for x in (r_ref, k_ref, v_ref, w_ref, dy_ref, drn_ref))
        inc, exc, last = _chunk_terms(lw)
        p = _intra_p(r, k, inc, exc, k_ref, w_ref, base, chunk, mode)  # p[t, s]
        d = _mm(dy, v, mm_dtype, _NT)  # d[t, s]
        d_t = _mm(v, dy, mm_dtype, _NT) if mode != "3d" else None
        bonus = jnp.sum(r * u * k, axis=1, keepdims=True)
        vdy = jnp.sum(v * dy, axis=1, keepdims=True)
        f_start, f_end, f_all = _decay_factors(inc, exc, last)
        intra = _intra_dk(d, d_t, r, inc, exc, r_ref, w_ref, base, chunk, mode)
        dkn = f_end * _mm(v, g, mm_dtype, _NT) + intra
        dv = _mm(k * f_end, g, mm_dtype) + _mm(p, dy, mm_dtype, _TN) + bonus * dy
        dr_ref[sl, :] = (drn + u * k * vdy).astype(dr_ref.dtype)
        dk_ref[sl, :] = (dkn + u * r * vdy).astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        rdr = r * drn
        dd = rdr - k * dkn
        tot = jnp.sum(dd, axis=0, keepdims=True)
        dw_ref[sl, :] = (acc_w + tot - jnp.cumsum(dd, axis=0) + dd - rdr).astype(dw_ref.dtype)
        acc_u = acc_u + jnp.sum(r * k * vdy, axis=0, keepdims=True)
        return f_all * g + _mm(r * f_start, dy, mm_dtype, _TN), acc_w + tot, acc_u

    n = r_ref.shape[1]
    init = (dst_ref[...].astype(F32), xfin_ref[...][None, :], jnp.zeros((1, n), F32))
    g, _, acc_u = lax.fori_loop(0, n_chunks, body, init)
    ds0_ref[...] = g
    du_ref[...] = acc_u[0]


# Two-pass backward. Per chunk c, with S_c the state entering it and G_c = dL/dS at its end
# (after its last token), the forward is
#     y      = (r f_start) @ S_c + P @ v + (r.u.k) v
#     S_end  = f_all * S_c + (k f_end)^T @ v
# so, exactly as the fused kernels compute them:
#     drn = dr without the bonus = f_start * (dy @ S_c^T) + intra_dr(dy v^T)
#     dkn = dk without the bonus = f_end * (v @ G_c^T) + intra_dk(dy v^T)
#     dv  = (k f_end) @ G_c + P^T @ dy + (r.u.k) dy
#     G_{c-1} = dL/dS_c = f_all * G_c + (r f_start)^T @ dy          (G_{last} = dS_T)
# Only the two state recurrences are sequential (pass 1a: S_c, _chunk_states_kernel via
# wkv_kernel_fwd's _entry_states; pass 1b: G_c, below); given both, every chunk's gradients
# are independent (pass 2).
# d log_w is a suffix sum over the whole sequence: with dd = r*drn - k*dkn,
#     d log_w_t = rowsum(dS_T * S_T) + sum_{m >= t} dd_m - r_t drn_t.
# Pass 2 writes the in-chunk part (sum over m >= t inside the chunk, minus r_t drn_t) and the
# chunk total; the sum over later chunks is a reverse cumsum in plain JAX (_backward_two_pass).


def _chunk_state_grads_kernel(
    r_ref, w_ref, dy_ref, dst_ref, gs_ref, ds0_ref=None, *, chunk, mm_dtype
):  # fmt: skip
    """Two-pass backward, pass 1b (reverse over chunks): gs[c*N:(c+1)*N] = G_c, dL/dS at the end
    of chunk c, and dS0 = G before chunk 0 (ds0_ref; None where the caller does not need it).
    The value columns are independent (dy's columns only), so the launcher may split them
    like the fused forward."""
    n = r_ref.shape[1]

    def body(c, g, advance):
        gs_ref[pl.ds(c * n, n), :] = g.astype(gs_ref.dtype)
        if not advance:
            return g
        sl = pl.ds(c * chunk, chunk)
        r, lw, dy = (_load(x, sl) for x in (r_ref, w_ref, dy_ref))
        inc, exc, last = _chunk_terms(lw)
        f_start, _, f_all = _decay_factors(inc, exc, last)
        return f_all * g + _mm(r * f_start, dy, mm_dtype, _TN)

    final = ds0_ref is not None
    n_chunks = r_ref.shape[0] // chunk
    g = _chunk_loop(n_chunks, body, dst_ref[...].astype(F32), reverse=True, final=final)
    if final:
        ds0_ref[...] = g


def _state_grads(r, log_w, dy, dst, span, opts, splits, gs_dtype):
    """Pass 1b: gs [B, H, T/span * N, N] (gs_dtype), dL/dS at the end of every span, and dS0
    (float32), value-split by dy's columns (`_sequential_pass`, like the forward's
    `_entry_states`)."""
    kern = functools.partial(_chunk_state_grads_kernel, mm_dtype=_mm_dtype(r.dtype))
    args = (r, log_w, dy, dst)
    return _sequential_pass(kern, args, 2, span, opts, splits, gs_dtype, "wkv6_bwd_state_grads")


def _state_grads_and_dr(r, k, v, log_w, u, dy, dst, hs, span, chunk, opts, splits, gs_dtype):
    """Pass 1b and pass 2a in one launch: (gs, dS0, drn, dr). dr needs the span-entry states
    and dy but not the state gradients, so its programs can run while the sequential pass
    does: that pass is a chain of T/span steps in only B*H*splits programs, which leaves
    most of the GPU idle (B4 T4096 H32 on an H100: 256 programs, 0.55 ms). Grid
    (b, h, splits + spans): the first `splits` programs of each head walk the sequential
    pass, the others are the dr kernel's spans. The last grid axis varies slowest in the
    launch order (Pallas' Triton lowering: grid axes are CUDA's x, y, z), so every
    sequential program is dispatched before any dr program takes an SM."""
    b, t, h, n = r.shape
    bv, n_spans, mm = n // splits, t // span, _mm_dtype(r.dtype)
    seq = pl.BlockSpec((None, t, None, n), lambda b_, h_, z: (b_, 0, h_, 0))
    lane = lambda z: jnp.minimum(z, splits - 1)  # noqa: E731
    cols = pl.BlockSpec((None, t, None, bv), lambda b_, h_, z: (b_, 0, h_, lane(z)))
    state = pl.BlockSpec((None, None, n, bv), lambda b_, h_, z: (b_, h_, 0, lane(z)))
    stack = pl.BlockSpec((None, None, n_spans * n, bv), lambda b_, h_, z: (b_, h_, 0, lane(z)))
    at = lambda z: jnp.maximum(z - splits, 0)  # noqa: E731
    piece = pl.BlockSpec((None, span, None, n), lambda b_, h_, z: (b_, at(z), h_, 0))
    head = pl.BlockSpec((None, n), lambda b_, h_, z: (h_, 0))
    entry = pl.BlockSpec((None, None, n, n), lambda b_, h_, z: (b_, h_, at(z), 0))

    # Each program's z as an input rather than pl.program_id(2): under decay_check="call" the
    # kernel runs inside a pl.when (_call), where Pallas' interpreter cannot take program_id.
    program = pl.BlockSpec((1,), lambda b_, h_, z: (z,))

    def kernel(
        z_p, r_s, w_s, dy_c, dst_s, k_p, v_p, w_p, u_h, dy_p, hs_e, gs_o, ds0_o, drn_o, dr_o, *,
        mode,
    ):  # fmt: skip
        z = z_p[0]

        @pl.when(z < splits)
        def _():
            _chunk_state_grads_kernel(r_s, w_s, dy_c, dst_s, gs_o, ds0_o, chunk=span, mm_dtype=mm)

        @pl.when(z >= splits)
        def _():
            _chunk_dr_kernel(
                k_p, v_p, w_p, u_h, dy_p, hs_e, drn_o, dr_o, chunk=chunk, mm_dtype=mm,
                mode=mode,
            )  # fmt: skip

    return _call(
        functools.partial(kernel, mode=opts.mode),
        [program, seq, seq, cols, state, piece, piece, piece, head, piece, entry],
        [stack, state, piece, piece],
        (
            jax.ShapeDtypeStruct((b, h, n_spans * n, n), gs_dtype),
            jax.ShapeDtypeStruct((b, h, n, n), F32),
            jax.ShapeDtypeStruct((b, t, h, n), F32),
            jax.ShapeDtypeStruct(r.shape, r.dtype),
        ),
        (b, h, splits + n_spans),
        opts,
        "wkv6_bwd_state_grads_dr",
    )(jnp.arange(splits + n_spans, dtype=jnp.int32), r, log_w, dy, dst, k, v, log_w, u, dy, hs)


# Pass 2 is three kernels, one per gradient family, each about as heavy as the forward's
# per-span kernel. As one kernel (both [N, N] states, all three intra-chunk contractions and
# a dozen [C, N] tiles live at once) Triton spilled registers and it ran 28x slower than the
# forward (74.8 ms at B8 T4096 on an H100, BENCHMARKS.md). Each program takes one span of
# `state_stride` tokens (one chunk by default) and walks its chunks from the span's entry
# state (dr: in order) or exit gradient (dk, dv: in reverse), carrying it in registers.
# `merge_dk_dv` runs dk and dv as one kernel (two of the three fit better than all three).


def _chunk_dr_kernel(
    k_ref, v_ref, w_ref, u_ref, dy_ref, hs_ref, drn_ref, dr_ref, *, chunk, mm_dtype, mode
):  # fmt: skip
    """Pass 2a (per span, chunks in order from S entering the span): drn (dr without the
    bonus, float32, for d log_w) and dr."""
    u = u_ref[...].astype(F32)[None, :]

    def body(c, s, advance):
        base = c * chunk
        sl = pl.ds(base, chunk)
        k, v, lw, dy = (_load(x, sl) for x in (k_ref, v_ref, w_ref, dy_ref))
        inc, exc, last = _chunk_terms(lw)
        f_start, f_end, f_all = _decay_factors(inc, exc, last)
        d = _mm(dy, v, mm_dtype, _NT)  # d[t, s] = dy_t . v_s
        drn = f_start * _mm(dy, s, mm_dtype, _NT)
        drn = drn + _intra_dr(d, k, inc, exc, k_ref, w_ref, base, chunk, mode)
        vdy = jnp.sum(v * dy, axis=1, keepdims=True)
        drn_ref[sl, :] = drn
        dr_ref[sl, :] = (drn + u * k * vdy).astype(dr_ref.dtype)
        return f_all * s + _mm(k * f_end, v, mm_dtype, _TN) if advance else s

    _chunk_loop(k_ref.shape[0] // chunk, body, hs_ref[...].astype(F32), final=False)


def _chunk_dkv_kernel(
    r_ref, k_ref, v_ref, w_ref, u_ref, dy_ref, drn_ref, gs_ref, *out_refs,
    chunk, mm_dtype, mode, parts,
):  # fmt: skip
    """Pass 2b and / or 2c (per span, chunks in reverse from G leaving the span). `parts`
    "dk": dk; d log_w's in-span part (dwl, float32: sum_{m >= t in the span} dd_m - r_t drn_t)
    and the span's total of dd (tot); this span's part of du. "dv": dv. "dk+dv": both in one
    kernel (`merge_dk_dv`): they walk the same chunks from the same G and share its read,
    the loads, the decay factors and D = dy v^T, for more live registers."""
    dk_ref, dwl_ref, tot_ref, du_ref = out_refs[:4] if "dk" in parts else (None,) * 4
    dv_ref = out_refs[-1] if "dv" in parts else None
    u = u_ref[...].astype(F32)[None, :]

    def body(c, carry, advance):
        g, later, du = carry  # later: the sum of dd over this span's later chunks
        base = c * chunk
        sl = pl.ds(base, chunk)
        r, k, lw, dy = (_load(x, sl) for x in (r_ref, k_ref, w_ref, dy_ref))
        inc, exc, last = _chunk_terms(lw)
        f_start, f_end, f_all = _decay_factors(inc, exc, last)
        if dk_ref is not None:
            v, drn = _load(v_ref, sl), _load(drn_ref, sl)
            d = _mm(dy, v, mm_dtype, _NT)
            d_t = _mm(v, dy, mm_dtype, _NT) if mode != "3d" else None
            dkn = f_end * _mm(v, g, mm_dtype, _NT)
            dkn = dkn + _intra_dk(d, d_t, r, inc, exc, r_ref, w_ref, base, chunk, mode)
            vdy = jnp.sum(v * dy, axis=1, keepdims=True)
            dk_ref[sl, :] = (dkn + u * r * vdy).astype(dk_ref.dtype)
            rdr = r * drn
            dd = rdr - k * dkn
            tot = jnp.sum(dd, axis=0, keepdims=True)
            dwl = later + tot - jnp.cumsum(dd, axis=0) + dd - rdr
            dwl_ref[sl, :] = dwl.astype(dwl_ref.dtype)
            later, du = later + tot, du + jnp.sum(r * k * vdy, axis=0, keepdims=True)
        if dv_ref is not None:
            p = _intra_p(r, k, inc, exc, k_ref, w_ref, base, chunk, mode)
            bonus = jnp.sum(r * u * k, axis=1, keepdims=True)
            dv = _mm(k * f_end, g, mm_dtype) + _mm(p, dy, mm_dtype, _TN) + bonus * dy
            dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        g = f_all * g + _mm(r * f_start, dy, mm_dtype, _TN) if advance else g
        return g, later, du

    zero = jnp.zeros((1, r_ref.shape[1]), F32)
    carry = (gs_ref[...].astype(F32), zero, zero)
    _, span_total, du = _chunk_loop(r_ref.shape[0] // chunk, body, carry, True, final=False)
    if dk_ref is not None:
        tot_ref[...] = span_total[0]
        du_ref[...] = du[0]


def _chunk_dv_dlw_kernel(*refs, chunk, mm_dtype, mode):
    """Pass 2c (dv) of a span, then d log_w of the span: its in-span part (from the dk
    kernel) plus the cross-span part, one row for the whole span (`_cross_span_part`)."""
    *dkv_refs, dwl_ref, cross_ref, dv_ref, dlw_ref = refs
    _chunk_dkv_kernel(*dkv_refs, dv_ref, chunk=chunk, mm_dtype=mm_dtype, mode=mode, parts="dv")
    dwl = dwl_ref[...].astype(F32) + cross_ref[...][None, :]
    dlw_ref[...] = dwl.astype(dlw_ref.dtype)


def _cross_span_part(tot, dst, st):
    """d log_w's cross-span part, the fused kernel's acc_w carry: for span c,
    rowsum(dS_T * S_T) + the totals of all later spans. [B, H, T/span, N] float32."""
    later = lax.cumsum(tot, axis=2, reverse=True) - tot
    return jnp.sum(dst * st, axis=-1)[:, :, None, :] + later


# ----------------------------------------------------------------------------- launchers


def _backward_fused(r, k, v, log_w, u, s0, st, dy, dst, chunk, opts):
    b, t, h, n = r.shape
    seq, head, state = _specs(n)
    mm = _mm_dtype(r.dtype)
    drn = _call(
        functools.partial(_bwd_dr_kernel, chunk=chunk, mm_dtype=mm, mode=opts.mode),
        [seq(t)] * 3 + [state, seq(t)],
        seq(t),
        jax.ShapeDtypeStruct((b, t, h, n), F32),
        (b, h),
        opts,
        "wkv6_bwd_dr",
    )(k, v, log_w, s0, dy)
    xfin = jnp.sum(dst * st, axis=-1)  # d log_w's final-state term, [B, H, N]
    vec = pl.BlockSpec((None, None, n), lambda b_, h_: (b_, h_, 0))
    dr, dk, dv, dlw, du, ds0 = _call(
        functools.partial(_bwd_dkv_kernel, chunk=chunk, mm_dtype=mm, mode=opts.mode),
        [seq(t)] * 4 + [head, seq(t), seq(t), state, vec],
        [seq(t)] * 4 + [vec, state],
        (
            jax.ShapeDtypeStruct((b, t, h, n), r.dtype),
            jax.ShapeDtypeStruct((b, t, h, n), k.dtype),
            jax.ShapeDtypeStruct((b, t, h, n), v.dtype),
            jax.ShapeDtypeStruct((b, t, h, n), log_w.dtype),
            jax.ShapeDtypeStruct((b, h, n), F32),
            jax.ShapeDtypeStruct((b, h, n, n), F32),
        ),
        (b, h),
        opts,
        "wkv6_bwd_dkv",
    )(r, k, v, log_w, u, dy, drn, dst, xfin)
    return dr, dk, dv, dlw, jnp.sum(du, axis=0).astype(u.dtype), ds0.astype(s0.dtype)


def use_two_pass_backward(b: int, h: int, t: int, chunk: int, backward: str) -> bool:
    """'auto': the two-pass backward whenever there is more than one chunk. Measured on an
    H100 (bf16, B8 T4096 H32 N64, chunk 16; BENCHMARKS.md): backward kernels 7.7 ms against
    the fused backward's 18.3 ms. The fused one runs two sequential loops of T/chunk steps
    with only B*H programs; the two-pass one keeps only the cheap state recurrences
    sequential and moves 2 x [B, H, T/span, N, N] (`stack_dtype`) through memory."""
    if backward != "auto":
        return backward == "two_pass"
    return t > chunk


def _backward_two_pass(r, k, v, log_w, u, s0, st, dy, dst, chunk, opts, hs=None):
    """Passes 1a (hs, unless the forward kept it), 1b (gs) and 2, over spans of
    `span_length` tokens (the forward's); d log_w's cross-span sums are added by the dv
    kernel (by XLA after the merged dk + dv kernel). Transient memory:
    hs and gs, each [B, H, T/span, N, N] in `stack_dtype` (0.5 GiB each at B8 T4096 H32 N64,
    bf16, spans of 16), plus d log_w's in-span part and drn, [B, T, H, N] float32 each."""
    b, t, h, n = r.shape
    span, splits = span_length(t, opts.stride), state_pass_splits(opts, b, h, n)
    n_spans, stored = t // span, stack_dtype(span, chunk, r.dtype)
    if hs is None:
        hs = _entry_states(k, v, log_w, s0, span, opts, splits, stored)[0]
    piece, head, entry, row = _chunk_specs(span, n)
    seq_f32 = jax.ShapeDtypeStruct((b, t, h, n), F32)
    rows = jax.ShapeDtypeStruct((b, h, n_spans, n), F32)
    grid, mm = (b, h, n_spans), _mm_dtype(r.dtype)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    kw = dict(chunk=chunk, mm_dtype=mm, mode=opts.mode)
    if opts.overlap_dr and pass1_length(t, span, opts.pass1_stride) == span:
        gs, ds0, drn, dr = _state_grads_and_dr(
            r, k, v, log_w, u, dy, dst, hs, span, chunk, opts, splits, stored
        )
    else:
        gs, ds0 = _state_grads(r, log_w, dy, dst, span, opts, splits, stored)
        drn, dr = _call(
            functools.partial(_chunk_dr_kernel, **kw),
            [piece] * 3 + [head, piece, entry],
            [piece, piece],
            (seq_f32, like(r)),
            grid,
            opts,
            "wkv6_bwd_chunks_dr",
        )(k, v, log_w, u, dy, hs)
    dkv = functools.partial(_chunk_dkv_kernel, **kw)
    # d log_w's in-span part in log_w's dtype where that is narrower than float32 (bf16: one
    # more rounding before the cross-span sums are added; half the bytes written and read
    # back by the dv kernel).
    dwl_dtype = log_w.dtype if jnp.dtype(log_w.dtype).itemsize < 4 else F32
    dwl_shape = jax.ShapeDtypeStruct((b, t, h, n), dwl_dtype)
    dk_specs, dk_shapes = [piece, piece, row, row], (like(k), dwl_shape, rows, rows)
    dkv_args = (r, k, v, log_w, u, dy, drn, gs)
    dkv_specs = [piece] * 4 + [head, piece, piece, entry]
    if opts.merge_dk_dv:
        dk, dwl, tot, du, dv = _call(
            functools.partial(dkv, parts="dk+dv"),
            dkv_specs,
            [*dk_specs, piece],
            (*dk_shapes, like(v)),
            grid,
            opts,
            "wkv6_bwd_chunks_dkv",
        )(*dkv_args)
        cross = jnp.transpose(_cross_span_part(tot, dst, st), (0, 2, 1, 3))[:, :, None]
        dlw = (dwl.reshape(b, n_spans, span, h, n) + cross).reshape(b, t, h, n)
        dlw = dlw.astype(log_w.dtype)
    else:
        dk, dwl, tot, du = _call(
            # The per-chunk check kept under decay_check="call" too (no gate): on an H200
            # (B8 T4096, 2026-11-28) this kernel took 0.935 ms with it, 0.983 without.
            functools.partial(dkv, parts="dk"), dkv_specs, dk_specs, dk_shapes, grid,
            opts._replace(gate=None), "wkv6_bwd_chunks_dk",
        )(*dkv_args)  # fmt: skip
        # The dv kernel runs after dk's and also writes d log_w: the in-span part plus the
        # cross-span part, a row per span (into the in-span part's buffer unless the outputs
        # are poisoned). As an XLA sum apart it read and wrote all of d log_w once more:
        # 0.08 ms of the 3.4 ms forward + backward at B8 T4096 (bf16, an H200, 2026-11-29).
        dv, dlw = _call(
            # No gate either: on an H200 (B8 T4096, 2026-11-28) its unchecked twin (0.524
            # ms) plus the launch returning at once (0.041) saved 0.011 ms against this
            # kernel alone (0.575), while where no head passed the checked kernel behind its
            # gate took 1.28 ms against 1.15 alone.
            functools.partial(_chunk_dv_dlw_kernel, **kw),
            [*dkv_specs, piece, row],
            [piece, piece],
            (like(v), like(log_w)),
            grid,
            opts._replace(gate=None),
            "wkv6_bwd_chunks_dv",
            aliases={len(dkv_specs): 1} if dwl.dtype == log_w.dtype else None,
        )(*dkv_args, dwl, _cross_span_part(tot, dst, st))
    return dr, dk, dv, dlw, jnp.sum(du, axis=(0, 2)).astype(u.dtype), ds0.astype(s0.dtype)
