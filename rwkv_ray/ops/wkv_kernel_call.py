"""Pallas plumbing shared by the WKV6 forward (wkv_kernel_fwd.py) and backward
(wkv_kernel_bwd.py) kernels: the static options, row loads inside a kernel, the BlockSpecs of
the (b, h) and (b, h, chunk) grids, and `_call`, a pallas_call wrapper (Triton compiler
params; NaN-poisoned outputs for tests). Pure jax.
"""

from __future__ import annotations

import collections
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel_intra import F32, UNCHECKED

_Opts = collections.namedtuple(
    "_Opts",
    [
        "interpret",
        "poison",
        "num_warps",
        "num_stages",
        "mode",
        "forward",
        "backward",
        "keep",
        "stride",
        "pass1_stride",
        "merge_dk_dv",
        "state_splits",
        "overlap_dr",
        "decay_check",
        "gate",
    ],
)

# Triton warps per kernel where `num_warps` is None (the default), else 4. Measured on an
# H100 (bf16, B4 T4096 H32 N64, chunk 16, the 1.6B training step's shape; BENCHMARKS.md,
# 2026-11-28): with 2 warps dk 0.578 / dr 0.417 / the state gradients 0.544 ms against
# 0.650 / 0.444 / 0.593 with 4; every other kernel was faster with 4 (the states 0.587
# against 0.730), and 8 was slower everywhere.
KERNEL_WARPS = {
    "wkv6_bwd_chunks_dk": 2,
    "wkv6_bwd_chunks_dr": 2,
    "wkv6_bwd_state_grads": 2,
    "wkv6_bwd_state_grads_dr": 2,  # the two above in one launch (overlap_dr)
}


# Triton pipeline stages per kernel where `num_stages` is None (the default), else 1. With 3
# stages the sequential passes' loads become cp.async copies issued chunks ahead of their
# use. Measured on an H200 (bf16, chunk 16; BENCHMARKS.md, 2026-11-28): B8 T4096 the states
# 0.602 -> 0.512 ms and the state gradients 1.193 -> 1.082 ms, B1 T16384 1.866 -> 1.797 and
# 2.058 -> 1.583; 2 stages were slower at B1 T16384 (states 2.290) and 4 no faster than 3.
# The per-chunk kernels have no loop to pipeline; wkv6_bwd_state_grads is the loop of
# wkv6_bwd_state_grads_dr without dr (overlap_dr=False). The fused forward (B8 T4096, H200,
# 2026-11-29): 0.902 -> 0.765 ms with 3 stages.
KERNEL_STAGES = {
    "wkv6_fwd": 3,
    "wkv6_fwd_states": 3,
    "wkv6_states": 3,
    "wkv6_bwd_state_grads": 3,
    "wkv6_bwd_state_grads_dr": 3,
}


_UNROLL = 8  # loops over at most this many chunks run as straight-line code


def _chunk_loop(n_chunks, body, carry, reverse=False, final=True):
    """carry = body(c, carry, advance) for the chunks c of a kernel's block, in order (or
    reversed). Up to _UNROLL chunks are unrolled, so every offset is static: in a fori_loop
    even one iteration goes through dynamic slices, which cost the two-pass forward a third
    more (3.26 vs 2.42 ms, B8 T4096 on an H100). `advance` tells body whether the carried
    state must be moved past chunk c: not after the last chunk when the caller does not want
    the final state (final=False; unrolled loops only), so that no dead matmul is emitted.
    Longer loops run one chunk per iteration: 2, 4 or 8 chunks per iteration of the
    sequential passes measured slower on an H100 (BENCHMARKS.md, 2026-11-28)."""
    order = list(range(n_chunks - 1, -1, -1) if reverse else range(n_chunks))
    if n_chunks <= _UNROLL:
        for c in order:
            carry = body(c, carry, final or c != order[-1])
        return carry
    if reverse:
        return lax.fori_loop(0, n_chunks, lambda i, x: body(n_chunks - 1 - i, x, True), carry)
    return lax.fori_loop(0, n_chunks, lambda c, x: body(c, x, True), carry)


def _load(ref, sl):
    return ref[sl, :].astype(F32)


def _specs(n):
    seq = lambda t_pad: pl.BlockSpec((None, t_pad, None, n), lambda b, h: (b, 0, h, 0))  # noqa: E731
    head = pl.BlockSpec((None, n), lambda b, h: (h, 0))
    state = pl.BlockSpec((None, None, n, n), lambda b, h: (b, h, 0, 0))
    return seq, head, state


def _call(kernel, in_specs, out_specs, out_shape, grid, opts, name, aliases=None):
    """pallas_call; with opts.poison the outputs start NaN-filled (aliased inputs), so a test
    sees any element the kernel leaves unwritten. `aliases` ({input index: output index},
    kernels without a gate) lets outputs take inputs' buffers; poisoned outputs do not.

    With opts.gate (decay_check="call": a [B * H] int32 array, 1 for the batch rows and heads
    where `factored_everywhere` holds), a kernel given as functools.partial(..., mode=a
    checked factored mode) on a grid (b, h, ...) runs as two launches into the same output
    buffers: its UNCHECKED twin for the heads whose gate is 1, then itself for the others,
    each program returning at once where the other launch computes (so a head with strong
    decays falls back alone). A lax.cond between the two (a gate for the whole call) decides
    on the host (XLA's GPU conditional copies its predicate back and waits for it): with one
    the 1.6B training step ran 0.9% slower than without the option (47.19k against 47.67k
    tokens/s, an H200, 2026-11-28); with the two launches, 1.8% faster."""
    outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    mode = getattr(kernel, "keywords", {}).get("mode", "")
    poisoned = lambda: tuple(jnp.full(o.shape, jnp.nan, o.dtype) for o in outs)  # noqa: E731
    if opts.gate is None or not mode.startswith("factored") or mode.endswith(UNCHECKED):
        launch = _launch(
            kernel, in_specs, out_specs, out_shape, grid, opts, name, opts.poison, aliases
        )
        if not opts.poison:
            return launch
        return lambda *args: launch(*args, *poisoned())
    if aliases:
        raise ValueError(f"{name}: a gated kernel's outputs cannot take its inputs' buffers")
    heads = grid[1]
    gated = [pl.BlockSpec((1,), lambda b_, h_, *_: (b_ * heads + h_,)), *in_specs]
    unchecked = functools.partial(kernel, mode=mode + UNCHECKED)
    first = _launch(
        _when(unchecked, 1), gated, out_specs, out_shape, grid, opts, name + UNCHECKED,
        opts.poison,
    )  # fmt: skip
    second = _launch(_when(kernel, 0), gated, out_specs, out_shape, grid, opts, name, True)

    def call(*args):
        ys = first(opts.gate, *args, *(poisoned() if opts.poison else ()))
        return second(opts.gate, *args, *(ys if isinstance(out_shape, tuple) else (ys,)))

    return call


def _when(kernel, want):
    """kernel where the gate (its new first input: this program's head's) is `want`."""

    def gated(gate_ref, *refs):
        @pl.when(gate_ref[0] == want)
        def _():
            kernel(*refs)

    return gated


def _launch(kernel, in_specs, out_specs, out_shape, grid, opts, name, aliased, aliases=None):
    """The pallas_call of kernel(*inputs, *outputs); with `aliased`, one more input per output
    gives that output's buffer (its contents stay where the kernel writes nothing); else
    `aliases` maps inputs to the outputs that reuse their buffers."""
    params = None
    if not opts.interpret:
        from jax.experimental.pallas import triton as plt

        measured = name.removesuffix(UNCHECKED)
        warps = opts.num_warps or KERNEL_WARPS.get(measured, 4)
        stages = opts.num_stages or KERNEL_STAGES.get(measured, 1)
        params = plt.CompilerParams(num_warps=warps, num_stages=stages)
    ospecs = out_specs if isinstance(out_specs, list) else [out_specs]
    n_in, n_out = len(in_specs), len(ospecs)
    if aliased:  # the aliases go unread
        body = lambda *refs: kernel(*refs[:n_in], *refs[n_in + n_out :])  # noqa: E731
    return pl.pallas_call(
        body if aliased else kernel,
        grid=grid,
        in_specs=in_specs + ospecs if aliased else in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=opts.interpret,
        name=name,
        input_output_aliases={n_in + i: i for i in range(n_out)} if aliased else aliases or {},
    )


def _mm_dtype(dtype):
    return F32 if jnp.dtype(dtype) == jnp.float32 else jnp.bfloat16


def _chunk_specs(chunk, n):
    """Grid (b, h, chunk) blocks: chunk c of a [B, T, H, N] array, a head's u, block c of a
    [B, H, T/chunk * N, N] state stack, row c of a [B, H, T/chunk, N] per-chunk vector."""
    piece = pl.BlockSpec((None, chunk, None, n), lambda b_, h_, c: (b_, c, h_, 0))
    head = pl.BlockSpec((None, n), lambda b_, h_, c: (h_, 0))
    entry = pl.BlockSpec((None, None, n, n), lambda b_, h_, c: (b_, h_, c, 0))
    row = pl.BlockSpec((None, None, None, n), lambda b_, h_, c: (b_, h_, c, 0))
    return piece, head, entry, row


def _block_split_specs(block, n, bv, rows):
    """Grid (b, h, value block j, time block c) blocks: time block c (`block` tokens) of a
    [B, T, H, N] array, whole or its value columns block j; value columns block j of block c
    of a [B, H, T/block * N, N] state stack (one state per block) and of a
    [B, H, T/block * rows, N] one (`rows` rows per block)."""
    full = pl.BlockSpec((None, block, None, n), lambda b_, h_, j, c: (b_, c, h_, 0))
    cols = pl.BlockSpec((None, block, None, bv), lambda b_, h_, j, c: (b_, c, h_, j))
    state = pl.BlockSpec((None, None, n, bv), lambda b_, h_, j, c: (b_, h_, c, j))
    stack = pl.BlockSpec((None, None, rows, bv), lambda b_, h_, j, c: (b_, h_, c, j))
    return full, cols, state, stack


def _value_split_specs(t, n, bv, n_chunks=0):
    """Grid (b, h, value block j) blocks: a whole head of a [B, T, H, N] array, value columns
    block j of one, value columns block j of a [B, H, N, N] state and of a
    [B, H, n_chunks * N, N] state stack."""
    full = pl.BlockSpec((None, t, None, n), lambda b_, h_, j: (b_, 0, h_, 0))
    cols = pl.BlockSpec((None, t, None, bv), lambda b_, h_, j: (b_, 0, h_, j))
    state = pl.BlockSpec((None, None, n, bv), lambda b_, h_, j: (b_, h_, 0, j))
    stack = pl.BlockSpec((None, None, n_chunks * n, bv), lambda b_, h_, j: (b_, h_, 0, j))
    return full, cols, state, stack
