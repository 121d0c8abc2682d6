"""WKV6 reference: one `keras.ops.scan` step per token (obvious, slow, exact).

Shapes (B batch, T steps, H heads, N head size):
  r, k, v, log_w: [B,T,H,N]; u: [H,N]; state: [B,H,N,N] indexed [key i, value j], float32.
`log_w` is the log of the decay (<= 0; RWKV6 uses log_w = -exp(w_raw)). Per step:
  y_t[j]    = sum_i r_t[i] * (S_{t-1}[i,j] + u[i] * k_t[i] * v_t[j])
  S_t[i,j]  = exp(log_w_t[i]) * S_{t-1}[i,j] + k_t[i] * v_t[j]
Computes in float32 whatever the input dtype; y comes back in r's dtype.

Only `keras.ops` is used, so this runs on every Keras backend; on JAX it is a `lax.scan`
with a static trip count, hence jit-able and differentiable in every input.
"""

from __future__ import annotations

import keras
from keras import ops


def float32_inputs(r, k, v, log_w, u, initial_state):
    """Cast everything to float32 and fill in a zero initial state [B,H,N,N]."""
    r, k, v, log_w, u = (ops.cast(x, "float32") for x in (r, k, v, log_w, u))
    if initial_state is None:
        b, _, h, n = ops.shape(r)
        initial_state = ops.zeros((b, h, n, n), "float32")
    return r, k, v, log_w, u, ops.cast(initial_state, "float32")


def scan_outputs(step, state, xs, y_like):
    """`keras.ops.scan(step, state, xs)` -> (final state, stacked outputs) on every backend.

    Keras's TensorFlow scan wants each step's output shaped like the carry, so there the
    output (shaped like `y_like`) rides along in the carry, and TF also stacks one state per
    step (T * [B,H,N,N] floats, then dropped). Other backends stack only the outputs."""
    if keras.backend.backend() != "tensorflow":
        return ops.scan(step, state, xs)

    def carried(carry, x):
        new_state, y = step(carry[0], x)
        return (new_state, y), (new_state, y)

    (state, _), (_, ys) = ops.scan(carried, (state, ops.zeros_like(y_like)), xs)
    return state, ys


def wkv6_scan(r, k, v, log_w, u, initial_state=None):
    """WKV6 by a plain scan over time. Shapes in the module docstring.

    Returns (y [B,T,H,N] in r's dtype, final_state [B,H,N,N] float32).

    Example:
        y, state = wkv6_scan(r, k, v, -ops.exp(w_raw), u)
    """
    out_dtype = r.dtype
    r, k, v, log_w, u, state = float32_inputs(r, k, v, log_w, u, initial_state)

    def step(s, x):
        r_t, k_t, v_t, log_w_t = x  # each [B,H,N]
        return recurrence_step(s, r_t, k_t, v_t, log_w_t, u)

    # Time-major inputs: [T,B,H,N].
    xs = tuple(ops.moveaxis(x, 1, 0) for x in (r, k, v, log_w))
    state, y = scan_outputs(step, state, xs, y_like=xs[0][0])
    return ops.cast(ops.moveaxis(y, 0, 1), out_dtype), state


def recurrence_step(state, r_t, k_t, v_t, log_w_t, u):
    """One token of the recurrence, all float32: state [B,H,N,N]; r_t, k_t, v_t, log_w_t
    [B,H,N]; u [H,N]. Returns (new state, y_t [B,H,N])."""
    kv = k_t[..., :, None] * v_t[..., None, :]  # [B,H,N,N]
    y_t = ops.einsum("bhi,bhij->bhj", r_t, state + u[:, :, None] * kv)
    return ops.exp(log_w_t)[..., None] * state + kv, y_t


def wkv6_single_step(r, k, v, log_w, u, initial_state=None):
    """WKV6 for T == 1 (a decoding step): the recurrence applied once, with no scan or
    chunk machinery around it. Same signature and results as `wkv6_scan`."""
    out_dtype = r.dtype
    r, k, v, log_w, u, state = float32_inputs(r, k, v, log_w, u, initial_state)
    state, y = recurrence_step(state, r[:, 0], k[:, 0], v[:, 0], log_w[:, 0], u)
    return ops.cast(y[:, None], out_dtype), state
