"""The Pallas ln_x + gate kernel (rwkv_ray/ops/group_norm_gate.py) against the plain form the
dispatcher used before (`group_norm_heads`, cast, gate): output and the gradients of y, g,
gamma and beta, in Pallas' interpreter on the CPU; on a GPU (`-m gpu`) compiled by Triton."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from kernel_checks import (  # noqa: E402
    MESH_CHECK,
    MESH_SETUP,
    assert_close,
    assert_no_less_exact,
    assert_same_form,
    rel,
    run_script,
)

from rwkv_ray.ops.group_norm_gate import ROWS, group_norm_gate  # noqa: E402
from rwkv_ray.ops.wkv import group_norm_heads  # noqa: E402

EPS = 64e-5  # RWKV6's ln_x epsilon (head_size_divisor 8: 1e-5 * 8**2)


def plain(y, g, gamma, beta, silu=False):
    gate = jax.nn.silu(g) if silu else g
    return group_norm_heads(y, gamma, beta, EPS).astype(y.dtype) * gate.astype(y.dtype)


def make(b, t, h, n, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    # Rows of different scales and offsets, as WKV outputs have; one row constant (var 0).
    scale = jnp.exp(jax.random.normal(ks[0], (b, t, h, 1)))
    y = (jax.random.normal(ks[1], (b, t, h, n)) * scale + scale).astype(dtype)
    y = y.at[0, 0, 0].set(0.5)
    g = (2 * jax.random.normal(ks[2], (b, t, h, n))).astype(dtype)
    gamma = 1.0 + 0.1 * jax.random.normal(ks[3], (h, n))
    beta = 0.1 * jax.random.normal(ks[4], (h, n))
    dout = jax.random.normal(ks[5], (b, t, h, n)).astype(dtype)
    return y, g, gamma, beta, dout


def check(b, t, h, n, dtype, seed, silu=False, interpret=True):
    """float32: the kernel against the plain form (1e-5 relative RMS). bf16: both against the
    plain form on float32 copies of the same inputs; the kernel no more than 10% worse than the
    plain form, or within bf16's rounding noise (4e-3 relative RMS: about one bf16 ulp on
    every element) where few elements make the figures noisy. Their roundings differ: the
    kernel takes silu in float32 and rounds once, jax.nn.silu on bf16 rounds the sigmoid
    too."""
    y, g, gamma, beta, dout = make(b, t, h, n, dtype, seed)
    fused = jax.jit(lambda *a: group_norm_gate(*a, EPS, gate_silu=silu, interpret=interpret))
    reference = lambda *a: plain(*a, silu=silu)  # noqa: E731

    def results(fn, *inputs):
        d = dout.astype(inputs[0].dtype)
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * d.astype(jnp.float32))  # noqa: E731
        return (fn(*inputs), *jax.jit(jax.grad(loss, argnums=range(4)))(*inputs))

    names = ("out", "dy", "dg", "dgamma", "dbeta")
    ours, theirs = results(fused, y, g, gamma, beta), results(reference, y, g, gamma, beta)
    assert_same_form(names, ours, theirs)
    if dtype == jnp.float32:
        assert_close(names, ours, theirs, 1e-5, f"B{b} T{t} H{h} N{n} float32 silu={silu}")
        return
    f32 = [x.astype(jnp.float32) for x in (y, g, gamma, beta)]
    truth = results(reference, *f32)
    assert_no_less_exact(names, ours, theirs, truth, f"B{b} T{t} bf16 silu={silu}")


@pytest.mark.parametrize("silu", [False, True], ids=["gate", "silu_gate"])
@pytest.mark.parametrize(
    "t, dtype",
    [(ROWS, jnp.float32), (2 * ROWS + 13, jnp.float32), (1, jnp.bfloat16), (100, jnp.bfloat16)],
)
def test_interpret_matches_plain_form(t, dtype, silu):
    """Whole blocks and a padded last block (T = 141, 100), one token (T = 1); the gate as
    given, or silu of it (`gate_silu`: the gradient is the pre-activation's)."""
    check(2, t, 3, 64, dtype, seed=t, silu=silu)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
def test_padded_rows_leave_d_gamma_finite_at_any_eps(interpret):
    """eps 0 (or one that flushes to 0) made a padded zero row's x_hat 0 * inf = NaN, and
    d gamma's sum turned NaN in every channel (T = 17: 47 padded rows). T = 0: empty out
    (it raised inside Pallas); eps must be a number when tracing (named, not a deep error)."""
    if not interpret and jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (JAX_PLATFORMS=cuda)")
    y, g, gamma, beta, dout = make(1, 17, 2, 16, jnp.float32, seed=3)
    y = y.at[0, 0, 0].set(jnp.arange(16.0))  # make's constant row: NaN at eps 0 in any form

    def grads(fn, eps):
        loss = lambda *a: jnp.sum(fn(*a, eps) * dout)  # noqa: E731
        return jax.grad(loss, argnums=range(4))(y, g, gamma, beta)

    for eps in (0.0, 1e-40):
        ours = grads(lambda *a: group_norm_gate(*a, interpret=interpret), eps)
        ref = grads(lambda y, g, gm, bt, e: group_norm_heads(y, gm, bt, e) * g, eps)
        for name, a, b in zip(("dy", "dg", "dgamma", "dbeta"), ours, ref, strict=True):
            assert np.all(np.isfinite(np.asarray(a))), (eps, name)
            assert rel(a, b) < 1e-5, (eps, name, rel(a, b))
    empty = jnp.zeros((1, 0, 2, 16))
    out = group_norm_gate(empty, empty, gamma, beta, EPS, interpret=interpret)
    assert out.shape == (1, 0, 2, 16)
    with pytest.raises(TypeError, match="eps must be a number known when tracing"):
        jax.jit(lambda e: group_norm_gate(y, g, gamma, beta, e, interpret=interpret))(EPS)


def test_rejects_mismatched_shapes():
    y = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(ValueError, match="g has shape"):
        group_norm_gate(y, jnp.zeros((1, 4, 2, 8)), jnp.ones((2, 16)), jnp.zeros((2, 16)), EPS)
    with pytest.raises(ValueError, match="gamma has shape"):
        group_norm_gate(y, y, jnp.ones((16,)), jnp.zeros((2, 16)), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("silu", [False, True], ids=["gate", "silu_gate"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_matches_plain_form(dtype, silu):
    """Compiled by Triton: the 1.6B model's head layout (H32 N64), a padded last block."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (JAX_PLATFORMS=cuda)")
    check(2, 1000, 32, 64, dtype, seed=5, silu=silu, interpret=False)


def dispatcher_inputs(b, t, h, n, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    r, k, v = (jax.random.normal(ks[i], (b, t, h, n)).astype(dtype) for i in range(3))
    log_w = -jnp.exp(jax.random.normal(ks[3], (b, t, h, n)) * 0.5 - 2.0)
    u = 0.5 * jax.random.normal(ks[4], (h, n))
    gate = (2 * jax.random.normal(ks[5], (b, t, h, n))).astype(dtype)
    gamma, beta = 1.0 + 0.1 * jnp.cos(jnp.arange(h * n)).reshape(h, n), jnp.zeros((h, n))
    return (r, k, v, log_w, u), gate, (gamma, beta, EPS)


def test_dispatcher_output_gate_silu_is_silu_of_the_gate():
    """wkv6(..., output_gate=g, output_gate_silu=True) off the kernel: exactly
    output_gate=silu(g) (the plain path takes silu before gating)."""
    from rwkv_ray.ops import wkv6

    args, gate, norm = dispatcher_inputs(1, 20, 2, 16, jnp.float32, seed=1)
    y1, s1 = wkv6(*args, impl="chunked", group_norm=norm, output_gate=gate, output_gate_silu=True)
    y2, s2 = wkv6(*args, impl="chunked", group_norm=norm, output_gate=jax.nn.silu(gate))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_dispatcher_kernel_with_norm_and_silu_gate(dtype):
    """The model's call on a GPU (impl "kernel": the WKV kernel, then group_norm_gate with
    the silu gate) against impl "chunked" (pure JAX, plain norm and gate): output, state and
    the gradients of r, k, v, log_w, u and the gate, relative RMS within 1e-4 (float32) /
    2e-2 (bf16), the gradients within 5x that."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (JAX_PLATFORMS=cuda)")
    from rwkv_ray.ops import wkv6

    args, gate, norm = dispatcher_inputs(2, 300, 4, 64, dtype, seed=2)
    dy = jax.random.normal(jax.random.PRNGKey(3), args[0].shape)

    def run(impl):
        def loss(*a):
            y, state = wkv6(*a[:5], impl=impl, group_norm=norm, output_gate=a[5],
                            output_gate_silu=True)  # fmt: skip
            return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(state), (y, state)

        # The reference's float32 matmuls in full precision: XLA's default on a GPU is TF32
        # for them, which would make the chunked path the less exact one.
        precision = "highest" if impl == "chunked" else None
        with jax.default_matmul_precision(precision):
            grads, (y, state) = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(*args, gate)
        return (y, state, *grads)

    bound = 1e-4 if dtype == jnp.float32 else 2e-2
    names = ("y", "state", "dr", "dk", "dv", "dlog_w", "du", "dgate")
    errors = {n: rel(a, b) for n, a, b in zip(names, run("kernel"), run("chunked"), strict=True)}
    print(jnp.dtype(dtype).name, " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
    for i, (name, error) in enumerate(errors.items()):
        # Gradients 5x the bound, as the WKV kernel's own tests allow.
        assert error < (bound if i < 2 else 5 * bound), (name, errors)


SHARDED = (
    MESH_SETUP
    + """
from rwkv_ray.ops.group_norm_gate import group_norm_gate

keys = jax.random.split(jax.random.PRNGKey(0), 5)
y, g, dout = (jax.random.normal(keys[i], (4, 70, 2, 16)) for i in range(3))
gamma, beta = (1.0 + jax.random.normal(keys[3], (2, 16)), jax.random.normal(keys[4], (2, 16)))

def run(*a):
    loss = lambda *a: jnp.sum(group_norm_gate(*a, 64e-5, gate_silu=True, interpret=True) * dout)
    return group_norm_gate(*a, 64e-5, gate_silu=True, interpret=True), jax.grad(
        loss, argnums=range(4))(*a)

args, batched_ndim = (y, g, gamma, beta), 4
"""
    + MESH_CHECK
)


def test_splits_the_batch_per_device_under_a_mesh():
    """2 virtual CPU devices (a subprocess: the device count is fixed at JAX's start), the
    kernel in Pallas' interpreter: under a mesh each device norms its own rows (shard_map,
    nothing gathered), and output and gradients (d gamma, d beta summed over the devices)
    equal the single-device call's to 1e-6."""
    result = run_script(SHARDED)
    assert result["shard_map"] and result["all_gathers"] == 0, result
    assert result["max_rel_err"] < 1e-6, result
