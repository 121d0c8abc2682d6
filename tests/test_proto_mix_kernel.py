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
    main(["--interpret", "--rows", "64", "--width", "256", "--configs", "32:128:4"])
    assert '"max_rel_error"' in capsys.readouterr().out
