"""One WKV6 step (T == 1, decoding) as one Pallas kernel that updates the state in place.

Per (b, h), with S the [key, value] state:
    y[j]     = sum_i r[i] * S[i, j] + (sum_i r[i] u[i] k[i]) * v[j]
    S_new    = exp(log_w)[:, None] * S + k[:, None] * v[None, :]
and optionally y GroupNorm'd over the head (the model's ln_x) and multiplied by an output
gate (the model's silu(g)) in the same program.
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


def _step_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, s_ref, *refs, eps, gated):
    """refs: (gamma, beta,) (gate,) y, new state. With `eps` (not None) y leaves GroupNorm'd
    per head with gamma, beta: the program holds the head's whole output, so the norm costs
    no kernel of its own; `gated`: then multiplied by the gate, rounded as
    `y.astype(dtype) * gate` rounds (so the same numbers as the unfused model)."""
    y_ref, s_out_ref = refs[-2:]
    r = r_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    w = w_ref[...].astype(F32)
    state = s_ref[...]
    bonus = jnp.sum(r * u_ref[...] * k)
    y = jnp.sum(r[:, None] * state, axis=0) + bonus * v
    if eps is not None:
        y = _head_norm(y, refs[0][...], refs[1][...], eps)
    if gated:
        y = y.astype(y_ref.dtype).astype(F32) * refs[-3][...].astype(F32)
    y_ref[...] = y.astype(y_ref.dtype)
    s_out_ref[...] = jnp.exp(w)[:, None] * state + k[:, None] * v[None, :]


def _head_norm(y, gamma, beta, eps):
    """GroupNorm over the last axis (one head's values), float32 statistics."""
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    return (y - mean) * jax.lax.rsqrt(var + eps) * gamma + beta


def _pallas_step(r, k, v, log_w, u, state, norm, gate, eps, interpret):
    """r, k, v, log_w [B, H, N]; u [H, N] f32; state [B, H, N, N] f32; norm None or
    (gamma, beta) [H, N] f32; gate None or [B, H, N] in r's dtype -> (y [B, H, N] in r's
    dtype, new state), the state's buffer reused for the new one."""
    b, h, n = r.shape
    row = pl.BlockSpec((None, None, n), lambda i, j: (i, j, 0))
    head = pl.BlockSpec((None, n), lambda i, j: (j, 0))
    square = pl.BlockSpec((None, None, n, n), lambda i, j: (i, j, 0, 0))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=4, num_stages=1)
    norm_args = () if norm is None else tuple(norm)
    gate_args = () if gate is None else (gate,)
    kernel = functools.partial(
        _step_kernel, eps=None if norm is None else eps, gated=gate is not None
    )
    return pl.pallas_call(
        kernel,
        grid=(b, h),
        in_specs=[row, row, row, row, head, square]
        + [head] * len(norm_args)
        + [row] * len(gate_args),
        out_specs=[row, square],
        out_shape=(
            jax.ShapeDtypeStruct((b, h, n), r.dtype),
            jax.ShapeDtypeStruct((b, h, n, n), F32),
        ),
        input_output_aliases={5: 1},
        interpret=interpret,
        compiler_params=params,
        name="wkv6_step",
    )(r, k, v, log_w, u, state, *norm_args, *gate_args)


def _plain_step(r, k, v, log_w, u, state, norm, gate, eps):
    """The same step in plain JAX (float32; the gate's product as the kernel rounds it),
    for the gradient."""
    dtype = r.dtype
    r, k, v, w = (x.astype(F32) for x in (r, k, v, log_w))
    y = jnp.einsum("bhi,bhij->bhj", r, state) + jnp.sum(r * u * k, -1, keepdims=True) * v
    if norm is not None:
        y = _head_norm(y, *norm, eps)
    if gate is not None:
        y = y.astype(dtype).astype(F32) * gate.astype(F32)
    return y, jnp.exp(w)[..., None] * state + k[..., :, None] * v[..., None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _step(r, k, v, log_w, u, state, norm, gate, eps, interpret):
    return _pallas_step(r, k, v, log_w, u, state, norm, gate, eps, interpret)


def _step_fwd(r, k, v, log_w, u, state, norm, gate, eps, interpret):
    out = _pallas_step(r, k, v, log_w, u, state, norm, gate, eps, interpret)
    return out, (r, k, v, log_w, u, state, norm, gate)


def _step_bwd(eps, interpret, residuals, cotangents):
    (dy, dstate) = cotangents
    _, vjp = jax.vjp(lambda *a: _plain_step(*a, eps), *residuals)
    grads = vjp((dy.astype(F32), dstate))
    return jax.tree.map(lambda g, x: g.astype(x.dtype), grads, residuals)


_step.defvjp(_step_fwd, _step_bwd)


def wkv6_kernel_step(
    r, k, v, log_w, u, initial_state=None, *, group_norm=None, output_gate=None,
    interpret=False,
):  # fmt: skip
    """WKV6 for T == 1: r, k, v, log_w [B, 1, H, N]; u [H, N]; state [B, H, N, N] float32
    ([key, value]) or None for zeros. Returns (y [B, 1, H, N] in r's dtype, new state).
    `group_norm` None, or (gamma [H, N], beta [H, N], eps): y leaves GroupNorm'd per head
    (RWKV6's ln_x, float32 statistics of the float32 output) inside the same kernel.
    `output_gate` None, or [B, 1, H, N]: y leaves as `y.astype(r.dtype) * output_gate`
    (RWKV6's silu(g) gate), also inside the kernel.
    `interpret=True` runs the kernel in Pallas' interpreter (CPU)."""
    b, t, h, n = r.shape
    if t != 1:
        raise ValueError(f"wkv6_kernel_step takes one step (T == 1), got T = {t}")
    if initial_state is None:
        initial_state = jnp.zeros((b, h, n, n), F32)
    norm, eps = None, None
    if group_norm is not None:
        gamma, beta, eps = group_norm
        norm = (gamma.astype(F32).reshape(h, n), beta.astype(F32).reshape(h, n))
        eps = float(eps)
    k, v = k.astype(r.dtype), v.astype(r.dtype)
    gate = None if output_gate is None else output_gate[:, 0].astype(r.dtype)
    y, state = _step(
        r[:, 0], k[:, 0], v[:, 0], log_w[:, 0].astype(F32), u.astype(F32),
        initial_state.astype(F32), norm, gate, eps, interpret,
    )  # fmt: skip
    return y[:, None], state
