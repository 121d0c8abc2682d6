"""The loss and the jitted step (no Ray): masking, gradient accumulation + remat, bf16."""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_support import pattern_tokens

from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.loss import mean_loss, summed_head_loss, summed_loss
from rwkv_ray.train.step import (
    StepMemoryError,
    TrainStep,
    build_model,
    build_optimizer,
    check_fits,
    summed_loss_fn,
    to_numpy,
)

ONE_LAYER = {"vocab_size": 53, "num_layers": 1, "hidden_size": 64, "mix_lora_size": 8,
             "decay_lora_size": 8}  # fmt: skip


def test_loss_masks_padding_and_prompt():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    tokens = np.array([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.float32)  # row 1: 2-token prompt
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # counted predictions (row, position -> target): row 0: 2->3, 3->4; row 1: 1->2, 2->3, 3->4
    picked = [(0, 2, 4), (0, 3, 5), (1, 1, 3), (1, 2, 4), (1, 3, 6)]
    expected = -np.mean([log_p[b, t, y] for b, t, y in picked])
    got = mean_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    total, count = summed_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
    assert float(count) == 5 and np.isclose(float(total), expected * 5, rtol=1e-6)


@pytest.mark.parametrize("row_groups", [1, 2, 3])
def test_head_loss_in_pieces_equals_the_loss_of_full_logits(row_groups):
    """12 predictions in pieces of 5 (the last one padded), padding and a prompt mask: the
    same sum, count and gradients (hidden and head matrix) as from the whole logits, with
    the head's gradient summed per row group (2: one per row; 3 does not divide 2 rows and
    takes one group)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 11)), jnp.float32)
    tokens = jnp.asarray([[0, 0, 3, 4, 5, 9, 1], [1, 2, 3, 4, 6, 10, 7]])
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], jnp.float32)

    def full(h, w):
        total, count = summed_loss(h @ w, tokens, mask)
        return 0.37 * total, count  # a cotangent other than 1, as a mean loss gives

    def pieces(h, w):
        total, count = summed_head_loss(h, w, tokens, mask, rows_per_piece=5, row_groups=row_groups)
        return 0.37 * total, count

    (total, count), grads = jax.value_and_grad(pieces, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (total_ref, count_ref), grads_ref = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(
        hidden, kernel
    )
    assert float(count) == float(count_ref) == 9
    np.testing.assert_allclose(float(total), float(total_ref), rtol=1e-6)
    assert np.isclose(float(total), 0.37 * float(summed_head_loss(hidden, kernel, tokens, mask)[0]))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    one_step = summed_head_loss(hidden[:, :1], kernel, tokens[:, :1], mask[:, :1])
    assert [float(x) for x in one_step] == [0.0, 0.0]  # T = 1: nothing to predict


def test_head_loss_multiplies_in_the_hidden_dtype_both_ways():
    """bfloat16 hidden states, float32 head matrix (the mixed-precision step): every head
    matmul, the backward pass's too, takes bfloat16 operands (JAX's own rule multiplies the
    float32 logit gradient in float32: TF32 GEMMs on a GPU), and the gradients stay within
    bfloat16 rounding of the float32 ones."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 11)) * 0.3, jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 11, (2, 9)))

    def loss(h, w):
        return summed_head_loss(h, w, tokens, rows_per_piece=6)[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(hidden.astype(jnp.bfloat16), kernel).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    operands = [re.search(r":\s*\((tensor<[^>]*>), (tensor<[^>]*>)\)", d).groups() for d in dots]
    assert len(operands) >= 3, dots  # logits, hidden and kernel gradients
    assert all(a.endswith("bf16>") and b.endswith("bf16>") for a, b in operands), operands
    d_hidden, d_kernel = grad(hidden.astype(jnp.bfloat16), kernel)
    ref_hidden, ref_kernel = grad(hidden, kernel)
    assert d_hidden.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    scale = lambda x: float(jnp.abs(x).max())  # noqa: E731
    assert scale(d_hidden.astype(jnp.float32) - ref_hidden) < 0.03 * scale(ref_hidden)
    assert scale(d_kernel - ref_kernel) < 0.03 * scale(ref_kernel)


def test_step_loss_equals_the_loss_of_the_model_logits():
    """The step applies the head itself (summed_head_loss): its loss must be the model's."""
    config = JobConfig.from_dict({"model": {"config": ONE_LAYER}, "data": {"train": "unused"}})
    model = build_model(config)
    tokens = pattern_tokens(4, 16, ONE_LAYER["vocab_size"], seed=3).astype(np.int32)
    mask = (tokens != 0).astype(np.float32)
    logits, _ = model.forward(tokens)
    expected = float(mean_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)))
    trainer = TrainStep(model, build_optimizer(config, model, 10), clip_norm=1.0)
    _, metrics = trainer(trainer.initial_state(), tokens[None], mask[None])
    assert abs(metrics["loss"] - expected) < 1e-5 * expected


def test_remat_dots_checkpoints_the_model_with_the_matmul_policy():
    """remat "dots": the model runs under jax.checkpoint keeping only matmul outputs (the
    head's pieces have their own checkpoint either way)."""
    config = JobConfig.from_dict({"model": {"config": ONE_LAYER}, "data": {"train": "unused"}})
    model = build_model(config)
    args = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        np.ones((2, 16), np.int32),
        np.ones((2, 16), np.float32),
    )
    for remat, policies in ((False, 0), ("dots", 1)):
        loss = summed_loss_fn(model, remat)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a, f=loss: f(*a)[0]))(*args))
        assert jaxpr.count("DotsSaveable(only_if_no_batch_dims=True)") == policies, remat


def test_remat_blocks_recomputes_only_the_first_blocks():
    """model.remat_blocks=1 of 2 blocks: one more checkpointed call than no remat, one less
    than every block (the head's pieces have their own checkpoint either way)."""
    two_layers = {**ONE_LAYER, "num_layers": 2}
    tokens, mask = np.ones((2, 16), np.int32), np.ones((2, 16), np.float32)

    def checkpoints(**model):
        config = JobConfig.from_dict(
            {"model": {"config": two_layers, **model}, "data": {"train": "unused"}}
        )
        net = build_model(config)
        args = (
            [v.value for v in net.trainable_variables],
            [v.value for v in net.non_trainable_variables],
            tokens,
            mask,
        )
        loss = summed_loss_fn(net, config.model.remat)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: loss(*a)[0]))(*args))
        return len(re.findall(r"\bremat\w*\[", jaxpr))  # jax.checkpoint's primitive: remat2

    none, one, every = (
        checkpoints(),
        checkpoints(remat=True, remat_blocks=1),
        checkpoints(remat=True),
    )
    assert (one - none, every - none) == (1, 2), (none, one, every)


def test_check_fits_counts_state_and_scratch_but_not_the_donated_outputs():
    gib = 2**30
    plan = types.SimpleNamespace(
        argument_size_in_bytes=10 * gib,
        temp_size_in_bytes=5 * gib,
        output_size_in_bytes=10 * gib,
        alias_size_in_bytes=10 * gib,  # the new state is written over the donated one
    )
    check_fits(plan, 15 * gib)
    check_fits(plan, None)  # the backend reports no limit (CPU)
    with pytest.raises(
        StepMemoryError,
        match=r"needs 15\.0 GiB per device \(10\.0 GiB of weights.* 5\.0 GiB of scratch.* 14\.0",
    ) as error:
        check_fits(plan, 14 * gib)
    assert "model.remat_blocks" in str(error.value)


def test_a_step_that_cannot_fit_fails_before_it_runs():
    """The step compiles ahead of its first batch and checks XLA's plan against the memory
    limit: too little memory names the settings, and the state is left as it was."""
    config = JobConfig.from_dict({"model": {"config": ONE_LAYER}, "data": {"train": "unused"}})
    model = build_model(config)
    optimizer = build_optimizer(config, model, 10)
    tokens = pattern_tokens(2, 16, ONE_LAYER["vocab_size"], seed=3).astype(np.int32)[None]
    mask = np.ones(tokens.shape, np.float32)
    small = TrainStep(model, optimizer, clip_norm=1.0, memory_limit=2**20)
    state = small.initial_state()
    before = [to_numpy(v) for v in state.trainable]
    with pytest.raises(StepMemoryError, match="model.remat"):
        small(state, tokens, mask)
    for a, b in zip(before, state.trainable, strict=True):
        np.testing.assert_array_equal(a, to_numpy(b))  # not donated: still readable, unchanged
    roomy = TrainStep(model, optimizer, clip_norm=1.0, memory_limit=2**34)
    _, metrics = roomy(roomy.initial_state(), tokens, mask)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0


def run(steps: int, grad_accum: int, remat: bool = False, pipelined: bool = False, **model):
    config = JobConfig.from_dict(
        {
            "model": {"config": ONE_LAYER, "remat": remat, **model},
            "data": {"train": "unused"},
            "optimizer": {"lr": 1e-2, "grad_accum": grad_accum, "weight_decay": 0.1},
            "schedule": {"warmup_steps": 1},
        }
    )
    model = build_model(config)
    trainer = TrainStep(
        model, build_optimizer(config, model, steps), clip_norm=0.5, remat=config.model.remat
    )
    tokens = pattern_tokens(4 * steps, 16, ONE_LAYER["vocab_size"], seed=2).astype(np.int32)
    tokens = tokens.reshape(steps, grad_accum, 4 // grad_accum, 16)
    state, history, in_flight = trainer.initial_state(), [], None
    for batch in tokens:
        if not pipelined:
            state, metrics = trainer(state, batch, (batch != 0).astype(np.float32))
            history.append(metrics)
            continue
        # As the workers run: the next step is queued before the one before it is read.
        state, pending = trainer.dispatch(state, batch, (batch != 0).astype(np.float32))
        if in_flight is not None:
            history.append(trainer.finish(in_flight))
        in_flight = pending
    if in_flight is not None:
        history.append(trainer.finish(in_flight))
    return [to_numpy(v) for v in state.trainable], history, model


def test_steps_queued_ahead_compute_what_steps_waited_for_compute():
    waited, h1, _ = run(steps=3, grad_accum=1)
    queued, h2, _ = run(steps=3, grad_accum=1, pipelined=True)
    for a, b in zip(waited, queued, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(h2) == 3
    for m1, m2 in zip(h1, h2, strict=True):
        assert (m1["loss"], m1["grad_norm"], m1["lr"]) == (m2["loss"], m2["grad_norm"], m2["lr"])
        assert m2["step_time"] > 0


def test_step_time_leaves_out_the_first_calls_compiling(monkeypatch):
    """step_time (and tokens_per_s from it) of a job's first step counted the step's
    compilation (about 1 s against 0.015 s for the tiny model). Here compiling is made
    to take 2 s more: the first step's time stays far below."""
    import time

    compiled = TrainStep.compiled

    def slow_compile(self, *args):
        if not self._executables:  # compiling
            time.sleep(2.0)
        return compiled(self, *args)

    monkeypatch.setattr(TrainStep, "compiled", slow_compile)
    _, history, _ = run(steps=2, grad_accum=1, pipelined=True)
    assert [m["step_time"] < 1.5 for m in history] == [True, True], history


def test_accumulated_micro_batches_equal_one_batch_and_remat_changes_nothing():
    plain, h1, _ = run(steps=2, grad_accum=1, remat=True)
    accumulated, h2, _ = run(steps=2, grad_accum=2)
    dots, h3, _ = run(steps=2, grad_accum=1, remat="dots")
    for a, b, c in zip(plain, accumulated, dots, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)
        np.testing.assert_allclose(c, b, atol=2e-6)
    for m3, m2 in zip(h3, h2, strict=True):
        assert np.isclose(m3["loss"], m2["loss"], rtol=1e-5)
        assert np.isclose(m3["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for m1, m2 in zip(h1, h2, strict=True):
        assert np.isclose(m1["loss"], m2["loss"], rtol=1e-5)
        assert np.isclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
        assert m1["tokens"] == m2["tokens"] and m1["data_checksum"] == m2["data_checksum"]
    assert h1[0]["grad_norm"] > 0.5  # clipping was active (clip_norm 0.5)


def test_bfloat16_full_tuning_keeps_float32_master_weights():
    weights, history, model = run(steps=3, grad_accum=1, dtype="bfloat16")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert all(w.dtype == np.float32 for w in weights)
    assert history[-1]["loss"] < history[0]["loss"]


def test_bfloat16_master_weights_train_in_bfloat16():
    """master_weights=bfloat16: the trained matrices are bf16 (the decay, bonus and
    GroupNorm stay float32), and the step still learns the pattern."""
    weights, history, model = run(
        steps=3, grad_accum=1, dtype="bfloat16", master_weights="bfloat16"
    )
    assert model.dtype_policy.name == "bfloat16"
    dtypes = {
        v.path.split("/", 1)[1]: np.dtype(w.dtype).name
        for v, w in zip(model.trainable_variables, weights, strict=True)
    }
    assert dtypes["block_0/att/key/kernel"] == "bfloat16"
    assert dtypes["block_0/ffn/value/kernel"] == "bfloat16"
    assert dtypes["block_0/att/time_decay"] == "float32"
    assert dtypes["block_0/att/time_faaaa"] == "float32"
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
