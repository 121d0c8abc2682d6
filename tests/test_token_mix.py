"""TimeMix's five token-shift mixes as Pallas kernels (rwkv_ray/ops/token_mix.py) against the
plain form the model runs elsewhere (`mix_slots_plain`): the five outputs and the gradients
of a, xx, maa and every mix, in Pallas' interpreter on the CPU; on a GPU (`-m gpu`) compiled
by Triton."""

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

from rwkv_ray.ops.token_mix import ROWS, SUBTILES, column_block, mix_slots, mix_slots_plain  # noqa: E402


def make(b, t, c, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    a = jax.random.normal(ks[0], (b, t, c)).astype(dtype)
    xx = jax.random.normal(ks[1], (b, t, c)).astype(dtype)
    maa = jax.random.uniform(ks[2], (5, c))  # float32, as the model's parameters
    mixes = [(0.3 * x).astype(dtype) for x in jax.random.normal(ks[3], (5, b, t, c))]
    douts = [x.astype(dtype) for x in jax.random.normal(ks[4], (5, b, t, c))]
    return a, xx, maa, mixes, douts


def results(fn, a, xx, maa, mixes, douts):
    """(the five outputs, d a, d xx, d maa, the five d mixes) of sum_s <fn_s, dout_s>."""

    def loss(a, xx, maa, *mixes):
        outs = fn(a, xx, maa, list(mixes))
        return sum(jnp.sum(o.astype(jnp.float32) * d.astype(jnp.float32)) for o, d in
                   zip(outs, douts, strict=True))  # fmt: skip

    grads = jax.jit(jax.grad(loss, argnums=range(8)))(a, xx, maa, *mixes)
    return [*fn(a, xx, maa, mixes), *grads]


NAMES = [f"out{s}" for s in range(5)] + ["da", "dxx", "dmaa"] + [f"dmix{s}" for s in range(5)]


def check(b, t, c, dtype, seed, interpret=True):
    """float32: the kernel against the plain form, 1e-6 relative RMS. bf16: both against the
    plain form on float32 copies of the same inputs (the kernel rounds once per output, the
    plain form after every operation): the kernel no less exact than the plain form, or
    within 4e-3 (about one bf16 ulp on every element)."""
    a, xx, maa, mixes, douts = make(b, t, c, dtype, seed)
    fused = jax.jit(lambda a, xx, maa, m: mix_slots(a, xx, maa, m, interpret=interpret))
    ours = results(fused, a, xx, maa, mixes, douts)
    theirs = results(mix_slots_plain, a, xx, maa, mixes, douts)
    assert_same_form(NAMES, ours, theirs)
    if dtype == jnp.float32:
        assert_close(NAMES, ours, theirs, 1e-6, f"B{b} T{t} C{c} float32")
        return
    f32 = [x.astype(jnp.float32) for x in (a, xx)]
    truth = results(mix_slots_plain, *f32, maa, [m.astype(jnp.float32) for m in mixes], douts)
    assert_no_less_exact(NAMES, ours, theirs, truth, f"B{b} T{t} C{c} bf16")


@pytest.mark.parametrize(
    "b, t, c, dtype",
    [
        (2, ROWS * SUBTILES // 2, 256, jnp.float32),  # one backward program's rows exactly
        (1, 3 * ROWS * SUBTILES + 7, 96, jnp.float32),  # padded rows; 32-wide tiles
        (3, 1, 64, jnp.bfloat16),  # one token
        (2, 50, 512, jnp.bfloat16),  # two 256-wide tiles; padded rows
    ],
)
def test_interpret_matches_plain_form(b, t, c, dtype):
    check(b, t, c, dtype, seed=t + c)


def test_column_block_is_the_widest_dividing_power_of_2():
    assert [column_block(c) for c in (2048, 2560, 768, 96, 64, 48)] == [256, 256, 256, 32, 64, None]


def test_rejects_bad_shapes():
    a = jnp.zeros((1, 4, 64))
    mixes = [a] * 5
    with pytest.raises(ValueError, match="expected 5 mixes"):
        mix_slots(a, a, jnp.zeros((5, 64)), mixes[:4], interpret=True)
    with pytest.raises(ValueError, match=r"mixes\[2\] has shape"):
        mix_slots(a, a, jnp.zeros((5, 64)), [a, a, a[:, :2], a, a], interpret=True)
    with pytest.raises(ValueError, match="maa has shape"):
        mix_slots(a, a, jnp.zeros((4, 64)), mixes, interpret=True)
    odd = jnp.zeros((1, 4, 48))
    with pytest.raises(ValueError, match="C = 48"):
        mix_slots(odd, odd, jnp.zeros((5, 48)), [odd] * 5, interpret=True)


SHARDED = (
    MESH_SETUP
    + """
from rwkv_ray.ops.token_mix import mix_slots

keys = jax.random.split(jax.random.PRNGKey(0), 5)
a, xx = (jax.random.normal(keys[i], (4, 70, 64)) for i in range(2))
maa = jax.random.uniform(keys[2], (5, 64))
mixes = list(jax.random.normal(keys[3], (5, 4, 70, 64)))
douts = list(jax.random.normal(keys[4], (5, 4, 70, 64)))

def run(a, xx, maa, *mixes):
    def loss(a, xx, maa, *mixes):
        outs = mix_slots(a, xx, maa, list(mixes), interpret=True)
        return sum(jnp.sum(o * d) for o, d in zip(outs, douts))
    return mix_slots(a, xx, maa, list(mixes), interpret=True), jax.grad(
        loss, argnums=range(8))(a, xx, maa, *mixes)

args, batched_ndim = (a, xx, maa, *mixes), 3
"""
    + MESH_CHECK
)


def test_splits_the_batch_per_device_under_a_mesh():
    """2 virtual CPU devices, the kernels in Pallas' interpreter: under a data-parallel mesh
    (the training step's) each device mixes its own rows (shard_map, nothing gathered), and
    the outputs and every gradient (d maa summed over the devices) equal the single-device
    call's to 1e-6."""
    result = run_script(SHARDED)
    assert result["shard_map"] and result["all_gathers"] == 0, result
    assert result["max_rel_err"] < 1e-6, result


def test_no_rows_and_mixed_dtypes_as_the_plain_form():
    """B * T = 0: five empty outputs (it raised inside Pallas). a in bf16 beside a float32
    xx: float32 out, as the plain form's (it was a's bf16: 1.7e-3 off a float64 evaluation;
    the plain form rounds maa to a's bf16 first: 6.9e-4 there)."""
    from rwkv_ray.ops.token_mix import mix_slots, mix_slots_plain

    c = 64
    maa = jnp.linspace(-1, 1, 5 * c).reshape(5, c)
    empty = jnp.zeros((2, 0, c))
    outs = mix_slots(empty, empty, maa, [empty] * 5, interpret=True)
    assert [o.shape for o in outs] == [(2, 0, c)] * 5
    ks = jax.random.split(jax.random.PRNGKey(0), 7)
    a = jax.random.normal(ks[0], (1, 17, c)).astype(jnp.bfloat16)
    xx = jax.random.normal(ks[1], (1, 17, c))
    mixes = [jax.random.normal(k, (1, 17, c)) for k in ks[2:]]
    ours = mix_slots(a, xx, maa, mixes, interpret=True)
    plain = mix_slots_plain(a, xx, maa, mixes)
    f64 = [np.asarray(x, np.float64) for x in (a, xx, maa)]
    for s, (o, p) in enumerate(zip(ours, plain, strict=True)):
        assert o.dtype == p.dtype == jnp.float32
        truth = f64[0] + f64[1] * (f64[2][s] + np.asarray(mixes[s], np.float64))
        assert rel(o, truth) < 1e-6 and rel(o, truth) <= rel(p, truth), (rel(o, truth), s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_matches_plain_form(dtype):
    """Compiled by Triton: the 1.6B model's width (C 2048), padded rows."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (JAX_PLATFORMS=cuda)")
    check(2, 1000, 2048, dtype, seed=5, interpret=False)


@pytest.mark.gpu
def test_gpu_time_mix_layer_kernel_path_matches_chunked():
    """RWKV6TimeMix in training shape on a GPU, impl "kernel" (the WKV kernel, ln_x + gate and
    the token-mix kernels) against impl "chunked" (pure JAX) with the same weights: output,
    the input's gradient and every trainable weight's, float32 with full-precision matmuls
    on both paths, relative RMS within 1e-4 (the gradients 5e-4, as the WKV kernel's tests)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (JAX_PLATFORMS=cuda)")
    from rwkv_ray.models.rwkv6_config import RWKV6Config
    from rwkv_ray.models.rwkv6_time_mix import RWKV6TimeMix

    cfg = RWKV6Config(vocab_size=256, num_layers=2, hidden_size=256, mix_lora_size=16)
    layer = RWKV6TimeMix(cfg, 1, wkv_impl="chunked", dtype="float32")
    layer.build()
    ks = jax.random.split(jax.random.PRNGKey(7), 4 + len(layer.trainable_variables))
    # Random non-zero weights everywhere (the official init zeroes the LoRA factors).
    for key, var in zip(ks[4:], layer.trainable_variables, strict=True):
        var.assign(0.1 * jax.random.normal(key, var.shape) + var.value)
    b, t, c = 2, 200, cfg.hidden_size
    a = jax.random.normal(ks[0], (b, t, c))
    mask = jnp.ones((b, t), bool).at[0, :37].set(False)  # left padding on one row
    shift = jax.random.normal(ks[1], (b, c))
    wkv = jax.random.normal(ks[2], (b, cfg.num_heads, cfg.head_size, cfg.head_size))
    dout = jax.random.normal(ks[3], (b, t, c))
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def run(impl):
        layer.wkv_impl = impl

        def loss(trainable, a):
            (out, _, state), _ = layer.stateless_call(trainable, frozen, a, mask, shift, wkv)
            return jnp.sum(out * dout) + jnp.sum(state), out

        with jax.default_matmul_precision("highest"):
            (grads, da), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(trainable, a)
        return [out, da, *grads]

    kernel, chunked = run("kernel"), run("chunked")
    names = ["out", "da"] + [v.path for v in layer.trainable_variables]
    errors = {n: rel(x, y) for n, x, y in zip(names, kernel, chunked, strict=True)}
    print(" ".join(f"{n}={e:.1e}" for n, e in errors.items()))
    assert errors["out"] < 1e-4, errors
    assert max(errors.values()) < 5e-4, errors
