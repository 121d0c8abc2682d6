"""WKV6 forward kernels and their launchers (the math: rwkv_ray/ops/wkv_kernel.py).

"fused": one sequential kernel per (b, h, value block) (`value_splits`). "two_pass": the
state entering every chunk (`_entry_states`, sequential; shared with the two-pass backward),
then every chunk's outputs in parallel. `use_two_pass` picks between them. Pure jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel_call import (
    _block_split_specs,
    _call,
    _chunk_loop,
    _chunk_specs,
    _load,
    _mm_dtype,
    _value_split_specs,
)
from rwkv_ray.ops.wkv_kernel_intra import _TN, F32, _chunk_terms, _decay_factors, _intra_p, _mm

# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(
    r_ref, k_ref, v_ref, w_ref, u_ref, s0_ref, y_ref, st_ref=None, hs_ref=None, *, chunk,
    mm_dtype, mode,
):  # fmt: skip
    """Sequential over the chunks of its block of tokens, the state in registers: the whole
    sequence (fused forward, st_ref the final state; hs_ref, where given, the state entering
    every chunk, as the two-pass forward's pass 1 stores it) or one span of the two-pass
    forward's pass 2 (s0_ref the state entering the span, no st_ref)."""
    n_chunks = r_ref.shape[0] // chunk
    u = u_ref[...].astype(F32)

    def body(c, s, advance):
        base = c * chunk
        if hs_ref is not None:
            hs_ref[pl.ds(c * s.shape[0], s.shape[0]), :] = s.astype(hs_ref.dtype)
        sl = pl.ds(base, chunk)
        r, k, v, lw = (_load(x, sl) for x in (r_ref, k_ref, v_ref, w_ref))
        inc, exc, last = _chunk_terms(lw)
        p = _intra_p(r, k, inc, exc, k_ref, w_ref, base, chunk, mode)
        bonus = jnp.sum(r * u[None, :] * k, axis=1)
        f_start, f_end, f_all = _decay_factors(inc, exc, last)
        y = _mm(r * f_start, s, mm_dtype) + _mm(p, v, mm_dtype) + bonus[:, None] * v
        y_ref[sl, :] = y.astype(y_ref.dtype)
        return f_all * s + _mm(k * f_end, v, mm_dtype, _TN) if advance else s

    s = _chunk_loop(n_chunks, body, s0_ref[...].astype(F32), final=st_ref is not None)
    if st_ref is not None:
        st_ref[...] = s


def _chunk_states_kernel(k_ref, v_ref, w_ref, s0_ref, hs_ref, st_ref=None, *, chunk, mm_dtype):
    """Two-pass forward, pass 1 (sequential over chunks): the state entering every chunk,
    hs[c*N:(c+1)*N] = S before chunk c, and the final state (st_ref; None where the caller
    does not need it). Only the cheap state update runs in the sequential loop; the
    intra-chunk work is left to the parallel pass 2."""
    n = k_ref.shape[1]

    def body(c, s, advance):
        hs_ref[pl.ds(c * n, n), :] = s.astype(hs_ref.dtype)
        if not advance:
            return s
        sl = pl.ds(c * chunk, chunk)
        k, v, lw = (_load(x, sl) for x in (k_ref, v_ref, w_ref))
        inc, exc, last = _chunk_terms(lw)
        _, f_end, f_all = _decay_factors(inc, exc, last)
        return f_all * s + _mm(k * f_end, v, mm_dtype, _TN)

    final = st_ref is not None
    s = _chunk_loop(k_ref.shape[0] // chunk, body, s0_ref[...].astype(F32), final=final)
    if final:
        st_ref[...] = s


# ----------------------------------------------------------------------------- launchers


# Heads (B * H) from which a head's programs need not be split by value columns: about two
# programs per SM on an H100 or H200 (132 SMs).
MANY_HEADS = 256


def value_splits(b: int, h: int, n: int) -> int:
    """How many value-column blocks the sequential kernels split each head into.

    They are sequential over chunks inside a program, so a small batch (prefill of one
    prompt: B*H = 32 programs) would leave most of an H100's 132 SMs idle. The value columns
    are independent given P (recomputed per block, O(C^2 N) like the rest), so split them
    until there are >= MANY_HEADS programs, keeping blocks >= 16 columns (Triton's dot
    minimum)."""
    splits = 1
    while b * h * splits < MANY_HEADS and n // (splits * 2) >= 16:
        splits *= 2
    return splits


def state_pass_splits(opts, b: int, h: int, n: int) -> int:
    """Value splits of both two-pass directions' sequential passes: opts.state_splits, else
    `value_splits`. One decision for both directions: with equal arguments XLA merges the
    forward's state pass with the backward's identical one."""
    return opts.state_splits or value_splits(b, h, n)


def use_two_pass(b: int, h: int, t: int, chunk: int, forward: str) -> bool:
    """'auto': the two-pass forward for more than one chunk and fewer than MANY_HEADS heads,
    else the fused one. Measured on an H200 (bf16, H32 N64, chunk 16, back to back,
    2026-11-29; BENCHMARKS.md): with one program per SM or fewer the fused kernel's chain of
    chunks is its time and the two-pass forward wins (B4 T4096 0.69 against 0.82 ms, B1
    T16384 1.43 against 2.33); with two or more per SM the fused kernel, which reads every
    input once and writes no states, wins (B8 T4096 0.86 against 1.01, B16 T1024 0.44
    against 0.49). The two-pass forward's cost is a transient [B, H, T/span, N, N] buffer of
    span-entry states (`stack_dtype`; 0.25 GiB at B4 T4096 in bf16), freed before the
    forward returns."""
    if forward != "auto":
        return forward == "two_pass"
    return t > chunk and b * h < MANY_HEADS


def _forward(r, k, v, log_w, u, s0, chunk, opts):
    b, t, h, n = r.shape
    if use_two_pass(b, h, t, chunk, opts.forward):
        return _forward_two_pass(r, k, v, log_w, u, s0, chunk, opts)[:2]
    return _forward_fused(r, k, v, log_w, u, s0, chunk, opts)


def _forward_fused(r, k, v, log_w, u, s0, chunk, opts, with_states=False):
    """(y, final state), and with_states the state entering every chunk as
    `_forward_two_pass`'s hs (for the two-pass backward), from one sequential kernel."""
    b, t, h, n = r.shape
    splits = state_pass_splits(opts, b, h, n)
    bv = n // splits
    # Grid (b, h, value block): r, k, log_w whole heads; v, y and the state by value block.
    full, cols, state, stack = _value_split_specs(t, n, bv, t // chunk)
    head = pl.BlockSpec((None, n), lambda b_, h_, j: (h_, 0))
    kern = functools.partial(_fwd_kernel, chunk=chunk, mm_dtype=_mm_dtype(r.dtype), mode=opts.mode)
    out_shape = (
        jax.ShapeDtypeStruct((b, t, h, n), r.dtype),
        jax.ShapeDtypeStruct((b, h, n, n), F32),
    )
    out_specs = [cols, state]
    if with_states:
        hs_dtype = stack_dtype(chunk, chunk, r.dtype)
        out_shape += (jax.ShapeDtypeStruct((b, h, t // chunk * n, n), hs_dtype),)
        out_specs.append(stack)
    return _call(
        kern,
        [full, full, cols, full, head, state],
        out_specs,
        out_shape,
        (b, h, splits),
        opts,
        "wkv6_fwd_states" if with_states else "wkv6_fwd",
    )(r, k, v, log_w, u, s0)


def stack_dtype(span: int, chunk: int, dtype):
    """The dtype of the stored span-entry states and span-exit state gradients. With one chunk
    per span they are only ever matmul operands, which the kernels round to the input's
    matmul dtype anyway (bf16 inputs: bf16), so storing them rounded is bit-identical and
    halves their memory traffic; longer spans carry them on in float32 (the state itself,
    in registers and in pass 1, is always float32)."""
    return _mm_dtype(dtype) if span == chunk else F32


def _entry_states(k, v, log_w, s0, span, opts, splits=1, hs_dtype=F32):
    """Pass 1 of both two-pass directions: hs [B, H, T/span * N, N] (hs_dtype), the state
    entering every span, and the final state (float32). Grid (b, h, value block): a state's
    value columns only depend on v's, so small batches can split them (as the fused forward
    does)."""
    kern = functools.partial(_chunk_states_kernel, mm_dtype=_mm_dtype(k.dtype))
    return _sequential_pass(kern, (k, v, log_w, s0), 1, span, opts, splits, hs_dtype, "wkv6_states")


def _sequential_pass(kernel, args, split_arg, span, opts, splits, stack_dtype, name):
    """A sequential state pass of either direction (`_chunk_states_kernel`, the backward's
    `_chunk_state_grads_kernel`): args are three [B, T, H, N] arrays (args[split_arg] split
    by value columns) and a [B, H, N, N] state; returns (a state per span,
    [B, H, T/span * N, N] in stack_dtype; the final state, float32).

    With a longer `pass1_length` the sequential kernel steps over blocks of that many tokens
    (fewer, longer steps: a long sequence with few programs is this pass's latency), keeping
    a float32 state per block; then every block's spans are filled in from it, all blocks in
    parallel (the same kernel, one program per block)."""
    b, t, h, n = args[0].shape
    block, bv = pass1_length(t, span, opts.pass1_stride), n // splits

    def in_specs(full, cols, state):
        return [cols if i == split_arg else full for i in range(3)] + [state]

    full, cols, state, stack = _value_split_specs(t, n, bv, t // block)
    stacked, final = _call(
        functools.partial(kernel, chunk=block),
        in_specs(full, cols, state),
        [stack, state],
        (
            jax.ShapeDtypeStruct((b, h, t // block * n, n), stack_dtype if block == span else F32),
            jax.ShapeDtypeStruct((b, h, n, n), F32),
        ),
        (b, h, splits),
        opts,
        name,
    )(*args)
    if block == span:
        return stacked, final
    full, cols, state, stack = _block_split_specs(block, n, bv, block // span * n)
    filled = _call(
        functools.partial(kernel, chunk=span),
        in_specs(full, cols, state),
        stack,
        jax.ShapeDtypeStruct((b, h, t // span * n, n), stack_dtype),
        (b, h, splits, t // block),
        opts,
        f"{name}_fill",
    )(*args[:3], stacked)
    return filled, final


def pass1_length(t: int, span: int, pass1_stride: int) -> int:
    """Tokens per step of the sequential pass 1 (both directions): the longest span * 2**k up
    to pass1_stride that divides t (span itself when none is longer; a power of 2, as
    Triton's blocks must be). The blocks' states are carried in float32 and their spans
    filled in by a parallel kernel."""
    best = span
    while best * 2 <= pass1_stride and t % (best * 2) == 0:
        best *= 2
    return best


def span_length(t: int, state_stride: int) -> int:
    """Tokens per span of both two-pass directions: state_stride, or for a shorter sequence
    (a multiple of the chunk; wkv6_kernel pads a longer one to a multiple of state_stride)
    the longest state_stride / 2**k that divides it: all of it when that is a power of 2.
    Triton's blocks are powers of 2: a span of 80 tokens would not compile."""
    span = state_stride
    while t % span:
        span //= 2
    return span


def _forward_two_pass(r, k, v, log_w, u, s0, chunk, opts):
    """(y, final state, hs). Pass 1 stores the state entering every span (`span_length`
    tokens); pass 2 runs each span's chunks from it, all spans in parallel. A longer span
    means fewer sequential steps in pass 1 and less state traffic, a shorter one more
    parallel programs. hs is the two-pass backward's pass 1a too (the same spans)."""
    b, t, h, n = r.shape
    span = span_length(t, opts.stride)
    # Value-split like the backward's pass 1a: with equal arguments XLA merges the two calls
    # (at B1 T16384 on an H100 they were two passes of 1.97 and 1.73 ms).
    splits, hs_dtype = state_pass_splits(opts, b, h, n), stack_dtype(span, chunk, r.dtype)
    hs, st = _entry_states(k, v, log_w, s0, span, opts, splits, hs_dtype)
    # Pass 2: grid (b, h, span); span c of the time axis and of the entry states.
    piece, head_c, entry_c, _ = _chunk_specs(span, n)
    y = _call(
        functools.partial(_fwd_kernel, chunk=chunk, mm_dtype=_mm_dtype(r.dtype), mode=opts.mode),
        [piece] * 4 + [head_c, entry_c],
        piece,
        jax.ShapeDtypeStruct((b, t, h, n), r.dtype),
        (b, h, t // span),
        opts,
        "wkv6_fwd_output",
    )(r, k, v, log_w, u, hs)
    return y, st, hs
