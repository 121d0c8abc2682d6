"""benchmarks/proto_mix_kernel.py: the fused token-shift mix (Pallas, run in its interpreter
on CPU) against the model's XLA form, slot by slot."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.proto_mix_kernel import LORA, SLOTS, main, pallas_mix, xla_mix


@pytest.mark.parametrize("block_rows, block_cols", [(16, 128), (32, 64)])
def test_fused_mix_equals_the_model_form_slot_by_slot(block_rows, block_cols):
    rng = np.random.default_rng(3)
    n, c = 64, 256
    a, xx = (jnp.asarray(rng.normal(size=(n, c)), jnp.bfloat16) for _ in range(2))
    hidden = jnp.asarray(np.tanh(rng.normal(size=(n, SLOTS * LORA))), jnp.bfloat16)
    w2 = jnp.asarray(rng.uniform(-0.5, 0.5, size=(SLOTS, LORA, c)), jnp.bfloat16)
    maa = jnp.asarray(rng.uniform(0, 1, size=(SLOTS, c)), jnp.bfloat16)
    got = pallas_mix(
        a, xx, hidden, w2, maa,
        block_rows=block_rows, block_cols=block_cols, num_warps=4, interpret=True,
    )  # fmt: skip
    want = xla_mix(a, xx, hidden, w2, maa)
    as32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    for s in range(SLOTS):
        scale = np.abs(as32(want[s])).max()
        # The kernel rounds to bf16 once, the model's form after each op: within 2**-6 of the
        # outputs' largest magnitude.
        np.testing.assert_allclose(as32(got[s]), as32(want[s]), atol=scale * 2**-6, rtol=0)
        # The slots differ by more than that, so a slot mix-up would fail above.
        other = as32(want[(s + 1) % SLOTS])
        assert np.abs(other - as32(want[s])).max() > 8 * scale * 2**-6


def test_the_prototype_script_checks_itself_in_the_interpreter(capsys):
    main(["--interpret", "--rows", "512", "--width", "256", "--configs", "32:128:4"])
    out = capsys.readouterr().out
    assert '"max_rel_error"' in out and '"backward_max_rel_error"' in out


def test_fused_mix_gradients_equal_those_of_the_model_form():
    import jax

    from benchmarks.proto_mix_kernel import pallas_mix_grads

    rng = np.random.default_rng(4)
    n, c = 128, 256
    f32 = jnp.float32
    a, xx = (jnp.asarray(rng.normal(size=(n, c)), f32) for _ in range(2))
    hidden = jnp.asarray(np.tanh(rng.normal(size=(n, SLOTS * LORA))), f32)
    w2 = jnp.asarray(rng.uniform(-0.5, 0.5, size=(SLOTS, LORA, c)), f32)
    maa = jnp.asarray(rng.uniform(0, 1, size=(SLOTS, c)), f32)
    grads = tuple(jnp.asarray(rng.normal(size=(n, c)), f32) for _ in range(SLOTS))
    _, vjp = jax.vjp(xla_mix, a, xx, hidden, w2, maa)
    want = vjp(grads)
    got = pallas_mix_grads(
        xx, hidden, w2, maa, grads, block_rows=16, block_cols=64, row_groups=2, interpret=True
    )
    names = ("d_a", "d_xx", "d_hidden", "d_maa_w2", "d_maa")
    for name, g, w in zip(names, got, want, strict=True):
        scale = np.abs(np.asarray(w)).max()
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale, err_msg=name)
