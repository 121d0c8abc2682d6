"""Packed projection kernels (rwkv_ray/models/rwkv6_packed.py): the same numbers as one
matmul per projection, on both of `packed_matmul`'s paths, in a decode step of the model,
and remade by the generation engine when the weights change; the LoRA products of a packed
decode step as multiply + sums."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from rwkv_ray.generation.engine import Engine, engine_for
from rwkv_ray.models import RWKV6CausalLM, RWKV6Config
from rwkv_ray.models.rwkv6_packed import ROW_LIMIT, pack_kernels, packed_matmul, row_product


@pytest.mark.parametrize("rows", [3, ROW_LIMIT + 1], ids=["packed", "sliced"])
def test_packed_matmul_equals_one_matmul_per_block(rows):
    """Two inputs: up to ROW_LIMIT rows each one packed matmul, above it one matmul per
    column slice. Unequal widths, as ChannelMix's key|receptance. fp32: within 1e-5."""
    rng = np.random.default_rng(0)
    widths = [48, 16]
    inputs = [rng.standard_normal((1, rows, 32)).astype(np.float32) for _ in widths]
    kernels = [rng.standard_normal((32, w)).astype(np.float32) for w in widths]
    got = packed_matmul(inputs, np.concatenate(kernels, axis=1), widths)
    for x, w, y in zip(inputs, kernels, got, strict=True):
        assert y.shape == (1, rows, w.shape[1])
        np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, ROW_LIMIT + 1], ids=["packed", "sliced"])
def test_float32_blocks_are_not_rounded(rows):
    """bf16 inputs and kernel: a block asked for in float32 equals the float64 product of
    the bf16 values within float32 rounding (2e-6 relative), far below bf16's 4e-3; the
    other block comes back in bf16."""
    rng = np.random.default_rng(2)
    widths = [16, 8]
    inputs = [jax.numpy.asarray(rng.standard_normal((1, rows, 64)), "bfloat16") for _ in widths]
    kernel = jax.numpy.asarray(rng.standard_normal((64, sum(widths))), "bfloat16")
    rounded, exact = packed_matmul(inputs, kernel, widths, float32_blocks=(1,))
    assert rounded.dtype == jax.numpy.bfloat16 and exact.dtype == jax.numpy.float32
    want = np.asarray(inputs[1], np.float64) @ np.asarray(kernel[:, 16:], np.float64)
    err = np.abs(np.asarray(exact, np.float64) - want).max() / np.abs(want).max()
    assert err < 2e-6, err


def test_row_product_equals_matmul():
    """row_product against float64 matmuls: a [C, N] kernel (maa_w1, decay_w2) and the five
    slots' [S, K, N] kernels against [..., S, K] (maa_w2). bf16 inputs: the products are
    exact in float32, so only the float32 sum's rounding remains (2e-6 of the largest)."""
    rng = np.random.default_rng(3)
    x = jax.numpy.asarray(rng.standard_normal((2, 1, 64)), "bfloat16")
    w = jax.numpy.asarray(rng.standard_normal((64, 40)), "bfloat16")
    got = row_product(x, w)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert got.dtype == jax.numpy.float32 and got.shape == (2, 1, 40)
    assert np.abs(np.asarray(got) - want).max() <= 2e-6 * np.abs(want).max()
    slots = rng.standard_normal((2, 1, 5, 8)).astype(np.float32)
    w2 = rng.standard_normal((5, 8, 64)).astype(np.float32)
    want = np.einsum("btsd,sdc->btsc", slots.astype(np.float64), w2.astype(np.float64))
    got = np.asarray(row_product(slots, w2))
    assert got.shape == (2, 1, 5, 64)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def tiny_model(dtype="float32", lora_scale=0.0):
    """A 2-layer model; `lora_scale` > 0 draws TimeMix's LoRA matrices (zeros at init, so
    their products would be zero whatever computes them) from a normal of that scale."""
    config = RWKV6Config(vocab_size=64, num_layers=2, hidden_size=64, head_size=16)
    model = RWKV6CausalLM.from_model_config(config, dtype=dtype)
    rng = np.random.default_rng(4)
    for block in model.backbone.blocks if lora_scale else ():
        att = block.time_mix
        for weight in (att.maa_w1, att.maa_w2, att.decay_w1, att.decay_w2):
            value = rng.standard_normal(weight.shape) * lora_scale
            weight.assign(value.astype(np.dtype(weight.dtype)))
    return model


@pytest.mark.parametrize(
    "dtype,tol,decay_packed",
    [("float32", 1e-5, True), ("bfloat16", 2e-2, True), ("mixed_bfloat16", 2e-2, False)],
)
def test_decode_step_with_packed_kernels_equals_the_model(dtype, tol, decay_packed):
    """One token after a 5-token prefix, batch 3, random LoRA matrices: hidden states and
    every state piece within `tol` of the largest |value| (bf16: the packed matmul and the
    LoRA products as multiply + sum may sum in another order).
    decay_w1 joins TimeMix's packed kernel unless it is stored in float32 under a bf16
    compute dtype (mixed_bfloat16): packing would round it."""
    model = tiny_model(dtype, lora_scale=0.5)
    backbone = model.backbone
    tokens = jax.numpy.asarray(np.random.default_rng(1).integers(1, 64, (3, 6)), "int32")
    _, state = backbone(tokens[:, :5])
    expected = backbone(tokens[:, 5:], state=state)
    packed = pack_kernels(backbone)
    width = 4 * 64 + (model.config.decay_lora_size if decay_packed else 0)
    assert all(att.shape == (64, width) for att, _ in packed)
    got = backbone(tokens[:, 5:], state=state, packed_kernels=packed)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * np.abs(b).max()


def test_engine_repacks_after_the_weights_change():
    model = tiny_model()
    engine = Engine(model, pack=True)
    first = engine.decode_variables()[2]
    assert engine.decode_variables()[2] is first  # unchanged weights: the same arrays
    receptance = model.backbone.blocks[1].time_mix.receptance.kernel
    receptance.assign(receptance.value + 1.0)
    second = engine.decode_variables()[2]
    assert second is not first
    np.testing.assert_array_equal(np.asarray(second[1][0][:, :64]), np.asarray(receptance.value))
    assert Engine(model, pack=False).decode_variables()[2] is None


def test_engine_for_switches_packing():
    """engine_for(model, pack=...) replaces the cached engine (what generate() uses) only
    when it decodes the other way."""
    model = tiny_model()
    default = engine_for(model)
    assert default.pack is False  # CPU
    assert engine_for(model) is default and engine_for(model, pack=False) is default
    packed = engine_for(model, pack=True)
    assert packed.pack and engine_for(model) is packed


def test_packed_decode_step_runs_no_lora_matmul():
    """With packed kernels (few rows) the LoRA products are multiply + sums: no dot_general
    of the lowered decode step touches a LoRA width (5 * 8 = 40 for maa_w1 and maa_w2, 24
    for the decay), while the unpacked step has them (so the check can fail)."""
    config = RWKV6Config(
        vocab_size=64, num_layers=1, hidden_size=64, head_size=16, mix_lora_size=8,
        decay_lora_size=24,
    )  # fmt: skip
    backbone = RWKV6CausalLM.from_model_config(config).backbone
    tokens = jax.numpy.ones((2, 1), "int32")
    _, state = backbone(jax.numpy.ones((2, 3), "int32"))

    def lora_dots(packed):
        step = jax.jit(lambda t, s, p: backbone(t, state=s, packed_kernels=p))
        text = step.lower(tokens, state, packed).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert dots, "no matmul found in the lowered step"
        return [line for line in dots if re.search(r"\b(40|24|5x8)x|x(40|24)x", line)]

    assert lora_dots(None)  # the unpacked step runs them as matmuls
    assert lora_dots(pack_kernels(backbone)) == []
