"""One WKV6 step (T == 1, decoding) as one Pallas kernel that updates the state in place.

Per (b, h), with S the [key, value] state:
    y[j]     = sum_i r[i] * S[i, j] + (sum_i r[i] u[i] k[i]) * v[j]
    S_new    = exp(log_w)[:, None] * S + k[:, None] * v[None, :]
What it saves over the same math in plain JAX (`wkv_scan.wkv6_single_step`): there, two
XLA fusions read S (the output's reduction and the update), so inside the decode loop XLA
copies the loop-carried state every step rather than update it in place (H100, 1.6B shape,
batch 32: a 0.27 ms memcpy of a 3.4 ms step, plus a third pass over the 400 MB state). Here
S is read once and written once, into its own buffer (`input_output_aliases`), and each
layer's step is one kernel instead of three.

Differentiable through `jax.vjp` of the plain-JAX step (decoding never differentiates, but
a T == 1 training batch may). Pure jax; the dispatcher (rwkv_ray/ops/wkv.py) imports it
through wkv_kernel.py on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rwkv_ray.ops.wkv_kernel_intra import F32


def _step_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, s_ref, y_ref, s_out_ref):
    r = r_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    w = w_ref[...].astype(F32)
    state = s_ref[...]
    bonus = jnp.sum(r * u_ref[...] * k)
    y_ref[...] = (jnp.sum(r[:, None] * state, axis=0) + bonus * v).astype(y_ref.dtype)
    s_out_ref[...] = jnp.exp(w)[:, None] * state + k[:, None] * v[None, :]


def _pallas_step(r, k, v, log_w, u, state, interpret):
    """r, k, v, log_w [B, H, N]; u [H, N] f32; state [B, H, N, N] f32 -> (y [B, H, N] in r's
    dtype, new state), the state's buffer reused for the new one."""
    b, h, n = r.shape
    row = pl.BlockSpec((None, None, n), lambda i, j: (i, j, 0))
    head = pl.BlockSpec((None, n), lambda i, j: (j, 0))
    square = pl.BlockSpec((None, None, n, n), lambda i, j: (i, j, 0, 0))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=4, num_stages=1)
    return pl.pallas_call(
        _step_kernel,
        grid=(b, h),
        in_specs=[row, row, row, row, head, square],
        out_specs=[row, square],
        out_shape=(
            jax.ShapeDtypeStruct((b, h, n), r.dtype),
            jax.ShapeDtypeStruct((b, h, n, n), F32),
        ),
        input_output_aliases={5: 1},
        interpret=interpret,
        compiler_params=params,
        name="wkv6_step",
    )(r, k, v, log_w, u, state)


def _plain_step(r, k, v, log_w, u, state):
    """The same step in plain JAX (float32), for the gradient."""
    r, k, v, w = (x.astype(F32) for x in (r, k, v, log_w))
    y = jnp.einsum("bhi,bhij->bhj", r, state) + jnp.sum(r * u * k, -1, keepdims=True) * v
    return y, jnp.exp(w)[..., None] * state + k[..., :, None] * v[..., None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _step(r, k, v, log_w, u, state, interpret):
    return _pallas_step(r, k, v, log_w, u, state, interpret)


def _step_fwd(r, k, v, log_w, u, state, interpret):
    return _pallas_step(r, k, v, log_w, u, state, interpret), (r, k, v, log_w, u, state)


def _step_bwd(interpret, residuals, cotangents):
    (r, k, v, log_w, u, state), (dy, dstate) = residuals, cotangents
    _, vjp = jax.vjp(_plain_step, r, k, v, log_w, u, state)
    grads = vjp((dy.astype(F32), dstate))
    return tuple(g.astype(x.dtype) for g, x in zip(grads, residuals, strict=True))


_step.defvjp(_step_fwd, _step_bwd)


def wkv6_kernel_step(r, k, v, log_w, u, initial_state=None, *, interpret=False):
    """WKV6 for T == 1: r, k, v, log_w [B, 1, H, N]; u [H, N]; state [B, H, N, N] float32
    ([key, value]) or None for zeros. Returns (y [B, 1, H, N] in r's dtype, new state).
    `interpret=True` runs the kernel in Pallas' interpreter (CPU)."""
    b, t, h, n = r.shape
    if t != 1:
        raise ValueError(f"wkv6_kernel_step takes one step (T == 1), got T = {t}")
    if initial_state is None:
        initial_state = jnp.zeros((b, h, n, n), F32)
    k, v = k.astype(r.dtype), v.astype(r.dtype)
    y, state = _step(
        r[:, 0], k[:, 0], v[:, 0], log_w[:, 0].astype(F32), u.astype(F32),
        initial_state.astype(F32), interpret,
    )  # fmt: skip
    return y[:, None], state
