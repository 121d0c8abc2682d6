"""RWKV6LayerNorm (rwkv_ray/models/rwkv6_layer_norm.py): torch's F.layer_norm numbers and
gradients (float64 reference) in a form XLA fuses, including rows whose mean dwarfs their
spread."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch

from rwkv_ray.models import RWKV6LayerNorm


def make_norm(dtype="float32", width=96):
    norm = RWKV6LayerNorm(epsilon=1e-5, dtype=dtype, name="ln1")
    norm.build((None, None, width))
    rng = np.random.default_rng(0)
    norm.gamma.assign(rng.standard_normal(width).astype(np.float32))
    norm.beta.assign(rng.standard_normal(width).astype(np.float32))
    return norm


def inputs(width=96):
    """[3, 2, width] float32: ordinary rows, and rows with |mean| 1e3 and 3e4 x their std
    (where E[x^2] - E[x]^2 without a shift loses every digit in float32)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, width)).astype(np.float32)
    x[1] = x[1] + 1e3
    x[2] = 3e4 + x[2]
    return x


def torch_layer_norm(x, norm, cotangent=None):
    """F.layer_norm in float64 of these (float32) values; with `cotangent`, also the
    gradients of sum(out * cotangent) wrt (x, gamma, beta)."""
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    gamma, beta = (
        torch.tensor(np.asarray(w, np.float32), dtype=torch.float64, requires_grad=True)
        for w in norm.weights
    )
    out = torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, 1e-5)
    if cotangent is None:
        return out.detach().numpy()
    (out * torch.tensor(cotangent, dtype=torch.float64)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in (x, gamma, beta)]


def test_matches_torch_layer_norm_in_float64():
    """float32 result within 2e-5 of the float64 F.layer_norm (|values| are O(1)-O(3))."""
    norm, x = make_norm(), inputs()
    got = np.asarray(norm(x))
    want = torch_layer_norm(x, norm)
    err = np.abs(got - want).max(axis=-1)
    assert err.max() < 2e-5, err


def test_bfloat16_policy_output():
    norm, x = make_norm("bfloat16"), inputs()[:1]  # bf16 inputs: only the ordinary rows
    got = norm(x)
    assert got.dtype == "bfloat16"
    want = torch_layer_norm(np.asarray(jnp.asarray(x, "bfloat16"), np.float32), norm)
    assert np.abs(np.asarray(got, np.float32) - want).max() < 4e-2  # bf16 output rounding


def test_gradients_match_torch_in_float64():
    """d(sum(out * cotangent)) wrt x, gamma, beta within 1e-4 of the largest |gradient|,
    the large-mean rows included (Keras' own layer misses there by ~1e-2: its
    x * inv + (beta - mean * inv) cancels in float32)."""
    norm, x = make_norm(), inputs()
    cotangent = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)

    def loss(weights, x):
        out, _ = norm.stateless_call(weights, [], x)
        return jnp.sum(out * cotangent)

    weights = [w.value for w in norm.weights]
    dweights, dx = jax.grad(loss, argnums=(0, 1))(weights, jnp.asarray(x))
    _, want = torch_layer_norm(x, norm, cotangent)
    for got, ref in zip([dx, *dweights], want, strict=True):
        err = np.abs(np.asarray(got, np.float64) - ref).max()
        assert err <= 1e-4 * np.abs(ref).max(), err


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_weights_and_config_are_keras_layer_normalizations(name):
    """Same weight names (checkpoints, conversion) and a config that rebuilds the layer."""
    norm = make_norm()
    assert any(w.path == f"ln1/{name}" for w in norm.weights)
    clone = RWKV6LayerNorm.from_config(norm.get_config())
    assert clone.epsilon == norm.epsilon and isinstance(clone, keras.layers.LayerNormalization)
