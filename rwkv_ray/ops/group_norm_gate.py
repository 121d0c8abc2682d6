"""RWKV6's ln_x and output gate after the chunked WKV kernel, as one Pallas (Triton) kernel
each way: out = bf16(GroupNorm_per_head(y)) * g, with float32 statistics. The plain form
(`rwkv_ray.ops.wkv.group_norm_heads`, then the gate) is the reference; XLA compiles its
gradient into a fusion of five chained row reductions that ran at about a quarter of the
H100's memory bandwidth (6.6 ms of the 1.6B state-tuning step, 2026-11-28). Here every
program holds `ROWS` tokens of one head in registers, so the statistics and the gradient's
two row sums are warp reductions, and each direction reads and writes every element once.
The statistics are recomputed in the backward (nothing is stored beside y and g). With
`gate_silu` the gate's silu is taken inside too, so that only its pre-activation is kept
for the backward. Pure jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel import per_device_rows
from rwkv_ray.ops.wkv_kernel_intra import F32

ROWS = 64  # tokens per program


def _stats(y, eps):
    """(y - mean) * rstd per row, and rstd; y [rows, N] float32."""
    centred = y - jnp.mean(y, axis=1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + eps)
    return centred * rstd, rstd


def _gate(g_ref, dtype, silu):
    """The gate in `dtype` (silu of the stored pre-activation where silu), and the float32
    pre-activation and its sigmoid for the backward (None without silu)."""
    if not silu:
        return g_ref[...].astype(dtype), None, None
    pre = g_ref[...].astype(F32)
    sig = jax.nn.sigmoid(pre)
    return (pre * sig).astype(dtype), pre, sig


def _forward_kernel(y_ref, g_ref, gamma_ref, beta_ref, out_ref, *, eps, silu):
    dtype = out_ref.dtype
    x_hat, _ = _stats(y_ref[...].astype(F32), eps)
    z = x_hat * gamma_ref[...][None, :] + beta_ref[...][None, :]
    out_ref[...] = (z.astype(dtype) * _gate(g_ref, dtype, silu)[0]).astype(dtype)


def _backward_kernel(
    y_ref, g_ref, gamma_ref, beta_ref, dout_ref, dy_ref, dg_ref, dgamma_ref, dbeta_ref, *,
    eps, silu, t,
):  # fmt: skip
    """dy, dg (of the pre-activation where silu), and this block's sums of d gamma and
    d beta over its rows (as the plain form's autodiff: the gate's product and the cast to
    bf16 transposed in bf16). `t`: the rows before the padding."""
    dtype = dy_ref.dtype
    x_hat, rstd = _stats(y_ref[...].astype(F32), eps)
    # A padded (zero) row's x_hat is 0 * rsqrt(0 + eps): NaN where eps is 0 or flushes to 0,
    # which d gamma's sum would spread to every channel.
    row = pl.program_id(1) * ROWS + jax.lax.broadcasted_iota(jnp.int32, x_hat.shape, 0)
    x_hat = jnp.where(row < t, x_hat, 0.0)
    gamma = gamma_ref[...][None, :]
    z = (x_hat * gamma + beta_ref[...][None, :]).astype(dtype)
    dout = dout_ref[...].astype(dtype)
    g, pre, sig = _gate(g_ref, dtype, silu)
    dg = (dout * z).astype(dtype)
    if silu:  # d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
        dg = dg.astype(F32) * (sig * (1.0 + pre * (1.0 - sig)))
    dg_ref[...] = dg.astype(dg_ref.dtype)
    dz = (dout * g).astype(dtype).astype(F32)
    dgamma_ref[...] = jnp.sum(dz * x_hat, axis=0)
    dbeta_ref[...] = jnp.sum(dz, axis=0)
    dx_hat = dz * gamma
    mean_dx_hat = jnp.mean(dx_hat, axis=1, keepdims=True)
    mean_dx_hat_x_hat = jnp.mean(dx_hat * x_hat, axis=1, keepdims=True)
    dy_ref[...] = (rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)).astype(dtype)


def _specs(rows, n):
    piece = pl.BlockSpec((None, rows, None, n), lambda b, c, h: (b, c, h, 0))
    head = pl.BlockSpec((None, n), lambda b, c, h: (h, 0))
    partial = pl.BlockSpec((None, None, None, n), lambda b, c, h: (b, c, h, 0))
    return piece, head, partial


def _params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=4, num_stages=1)


def _padded(x, rows):
    pad = (-x.shape[1]) % rows
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _group_norm_gate(y, g, gamma, beta, eps, silu, t, interpret):
    b, t, h, n = y.shape
    piece, head, _ = _specs(ROWS, n)
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps, silu=silu),
        grid=(b, t // ROWS, h),
        in_specs=[piece, piece, head, head],
        out_specs=piece,
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        compiler_params=_params(interpret),
        interpret=interpret,
        name="group_norm_gate_fwd",
    )(y, g, gamma, beta)


def _group_norm_gate_fwd(y, g, gamma, beta, eps, silu, t, interpret):
    out = _group_norm_gate(y, g, gamma, beta, eps, silu, t, interpret)
    return out, (y, g, gamma, beta)


def _group_norm_gate_bwd(eps, silu, t, interpret, residuals, dout):
    y, g, gamma, beta = residuals
    b, padded, h, n = y.shape
    piece, head, partial = _specs(ROWS, n)
    blocks = jax.ShapeDtypeStruct((b, padded // ROWS, h, n), F32)
    dy, dg, dgamma, dbeta = pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps, silu=silu, t=t),
        grid=(b, padded // ROWS, h),
        in_specs=[piece, piece, head, head, piece],
        out_specs=[piece, piece, partial, partial],
        out_shape=(
            jax.ShapeDtypeStruct(y.shape, y.dtype),
            jax.ShapeDtypeStruct(g.shape, g.dtype),
            blocks,
            blocks,
        ),
        compiler_params=_params(interpret),
        interpret=interpret,
        name="group_norm_gate_bwd",
    )(y, g, gamma, beta, dout)
    return dy, dg, jnp.sum(dgamma, axis=(0, 1)), jnp.sum(dbeta, axis=(0, 1))


_group_norm_gate.defvjp(_group_norm_gate_fwd, _group_norm_gate_bwd)


def group_norm_gate(y, g, gamma, beta, eps, *, gate_silu=False, interpret=False):
    """bf16(GroupNorm(y)) * g with one group per head (float32 statistics); y, g [B,T,H,N] in
    one dtype (the WKV output's and the gate's), gamma, beta [H,N] (cast to float32). With
    `gate_silu`, g is the gate's pre-activation and silu(g) (rounded to y's dtype) gates: the
    kernels then keep only the pre-activation for the backward, as plain autodiff of silu
    would, instead of both. Differentiable in y, g, gamma and beta. `interpret=True` runs
    Pallas' interpreter (CPU)."""
    if g.shape != y.shape:
        raise ValueError(f"g has shape {g.shape}, expected y's {y.shape}")
    h, n = y.shape[2:]
    for name, x in (("gamma", gamma), ("beta", beta)):
        if x.shape != (h, n):
            raise ValueError(f"{name} has shape {x.shape}, expected {(h, n)}")
    t = y.shape[1]
    try:
        eps = float(eps)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f"eps must be a number known when tracing (it is compiled in): {e}") from e
    if t == 0:  # no rows: no program to run
        return jnp.zeros(y.shape, y.dtype)

    def per_device(y, g, gamma, beta):
        # Padded rows are zeros: zero gradient (their dout is zero; the backward masks them).
        out = _group_norm_gate(
            _padded(y, ROWS), _padded(g, ROWS), gamma, beta, eps, bool(gate_silu), t, interpret
        )
        return out[:, :t]

    # Under a data-parallel mesh each device norms its own rows (as the WKV kernel does).
    call = per_device_rows(per_device, y.shape[0], (True, True, False, False), 1)
    return call(y, g.astype(y.dtype), gamma.astype(F32), beta.astype(F32))
