"""The training step on a 2-device data-parallel mesh keeps every device on its own rows.

Run on 2 virtual CPU devices in a subprocess (the device count is fixed at JAX start). The
head's loss is applied in pieces (`summed_head_loss`); pieces cut across the flattened rows
made XLA gather the whole batch's hidden states onto every device, so each device computed
the head for the global batch (on 4 H100s the state-tuning step took 0.52 s instead of 0.37).
Checked: the compiled step has no all-gather, and its loss equals the model's own loss.
Also: AdamW's moments split over the devices (shard_optimizer) give the replicated numbers,
and the head's gradient is reduced over the devices once, not after every piece.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

# Both scripts run after this, on 2 virtual CPU devices; each prints one "RESULT {json}".
PRELUDE = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from rwkv_ray.train.config import JobConfig
    from rwkv_ray.train.loss import mean_loss
    from rwkv_ray.train.step import (
        TrainStep, build_model, build_optimizer, move_to_host, to_numpy,
    )

    def tiny_job(mode, **shape):
        layer = {"vocab_size": 53, "num_layers": 1, "hidden_size": 64, "mix_lora_size": 8,
                 "decay_lora_size": 8, **shape}
        config = {"mode": mode, "model": {"config": layer}, "data": {"train": "unused"}}
        return layer, JobConfig.from_dict(config)
    """
)


def run_on_two_devices(script: str) -> dict:
    """PRELUDE + script in a fresh Python (the device count is fixed at JAX start)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu", KERAS_BACKEND="jax")
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


ROWS_SCRIPT = """
    layer, config = tiny_job("state")
    model = build_model(config)
    # 4 rows x 1100 steps: 1099 predictions a row, pieces of 512 steps -> 3 pieces.
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, layer["vocab_size"], (4, 1100)).astype(np.int32)
    tokens[1, :300] = 0  # a left-padded row
    mask = (tokens != 0).astype(np.float32)
    logits, _ = model.forward(tokens)
    expected = float(mean_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask)))
    trainer = TrainStep(model, build_optimizer(config, model, 10), clip_norm=1.0)
    state = trainer.initial_state()
    batch = [trainer.shard_batch(x[None]) for x in (tokens, mask)]
    with jax.set_mesh(trainer.mesh):
        hlo = trainer._step.lower(state, *batch).compile().as_text()
    state, metrics = trainer(state, tokens[None], mask[None])
    # move_to_host: with another device the default (as a GPU is on a worker), a model built
    # there and moved, and the values written back, have their variables on the host's
    # device 0.
    with jax.default_device(jax.devices()[1]):
        hosted = build_model(config)
        built_on = sorted({d.id for v in hosted.weights for d in v.value.devices()})
        move_to_host(hosted)
        trainer.write_back(state)
    placed = lambda m: sorted({d.id for v in m.weights for d in v.value.devices()})
    print("RESULT " + json.dumps({
        "built_on": built_on,
        "hosted_on": placed(hosted),
        "written_back_on": placed(model),
        "devices": int(trainer.mesh.devices.size),
        "all_gathers": hlo.count("all-gather"),
        "all_reduces": hlo.count("all-reduce"),
        "loss": metrics["loss"],
        "expected": expected,
    }))
"""


def test_step_keeps_each_device_on_its_rows_and_variables_on_the_host():
    result = run_on_two_devices(ROWS_SCRIPT)
    assert result["devices"] == 2
    assert result["all_gathers"] == 0, result
    assert result["all_reduces"] > 0, result  # the state gradients are summed over devices
    assert abs(result["loss"] - result["expected"]) < 1e-5 * result["expected"], result
    # The Keras variables stay in host memory (device 0 here): the step's state is the only
    # copy on the accelerators.
    assert result["built_on"] == [1], result  # the move below is not a no-op
    assert result["hosted_on"] == [0] and result["written_back_on"] == [0], result


ZERO1_SCRIPT = """
    # hidden 128: the FFN's matrices (128 x 448) are above the 2**14 elements that are split
    layer, config = tiny_job("full", num_layers=2, hidden_size=128)
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, layer["vocab_size"], (3, 1, 4, 40)).astype(np.int32)
    tokens[:, 0, 2, :9] = 0  # a left-padded row
    mask = (tokens != 0).astype(np.float32)
    runs = {}
    for split in (False, True):
        model = build_model(config)  # the same init seed: the same weights both times
        optimizer = build_optimizer(config, model, 10)
        trainer = TrainStep(model, optimizer, clip_norm=1.0, shard_optimizer=split)
        state = trainer.initial_state()
        losses = []
        for step in range(3):
            state, metrics = trainer(state, tokens[step], mask[step])
            losses.append(metrics["loss"])
        specs = sorted({str(a.sharding.spec) for a in state.optimizer})
        parts = max(len({str(s.index) for s in a.addressable_shards}) for a in state.optimizer)
        trainer.write_back(state)  # the split moments come back whole
        runs[split] = {
            "losses": losses,
            "specs": specs,
            "parts": parts,
            "weights": [to_numpy(a).tolist() for a in state.trainable[:6]],
            "moments": [  # the large ones: those split in the second run
                np.asarray(v.value).tolist() for v in optimizer.variables if v.value.size >= 2**14
            ][:8],
        }
    print("RESULT " + json.dumps(runs))
"""


def test_split_optimizer_state_gives_the_replicated_numbers():
    """scaling.shard_optimizer (ZeRO stage 1) on 2 devices: AdamW's moments are cut in two
    (each device holds half of every large one), and three full-tuning steps give the
    losses, weights and moments of the replicated step within float32 reduction-order noise
    (1e-5 relative); write_back assembles the split moments."""
    runs = run_on_two_devices(ZERO1_SCRIPT)
    replicated, split = runs["false"], runs["true"]
    assert replicated["specs"] == ["P()"] and replicated["parts"] == 1, replicated["specs"]
    assert "P('data',)" in split["specs"] and split["parts"] == 2, split["specs"]
    np.testing.assert_allclose(split["losses"], replicated["losses"], rtol=1e-5)
    assert max(np.abs(np.asarray(m)).max() for m in replicated["moments"]) > 0  # it updated
    for key in ("weights", "moments"):
        for got, want in zip(split[key], replicated[key], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


HEAD_SCRIPT = """
    import re
    from rwkv_ray.train.step import TrainState, make_step_fn

    def loop_collectives(text, vocab):
        # Collectives on a [.., vocab] array inside a while loop's body computation.
        bodies = set(re.findall(r"body=%([\\w.\\-]+)", text))
        found = 0
        for computation in re.split(r"\\n(?=\\S)", text):
            name = re.match(r"(?:ENTRY )?%([\\w.\\-]+)", computation)
            if name and name.group(1) in bodies:
                shape = rf"= \\S*\\[[\\d,]*\\b{vocab}\\]"
                op = r"[^=]*? (?:all-reduce|reduce-scatter)"
                found += len(re.findall(shape + op, computation))
        return found

    layer, config = tiny_job("full")
    rng = np.random.default_rng(3)
    # 4 rows x 1100 steps: pieces of 512 steps -> 3 pieces, a loop the compiler keeps.
    tokens = rng.integers(1, layer["vocab_size"], (1, 4, 1100)).astype(np.int32)
    mask = np.ones(tokens.shape, np.float32)
    runs = {}
    for groups in (1, 2):
        model = build_model(config)
        optimizer = build_optimizer(config, model, 10)
        trainer = TrainStep(model, optimizer, clip_norm=1.0)  # row groups: the 2 devices
        if groups == 1:  # the same step with one row group, as before
            shardings = TrainState(trainer.replicated, trainer.replicated,
                                   trainer.optimizer_shardings)
            trainer._step = jax.jit(
                make_step_fn(model, optimizer, 1.0, row_groups=1),
                in_shardings=(shardings, trainer.data, trainer.data),
                out_shardings=(shardings, trainer.replicated), donate_argnums=(0,),
            )
        state = trainer.initial_state()
        batch = [trainer.shard_batch(x) for x in (tokens, mask)]
        with jax.set_mesh(trainer.mesh):
            hlo = trainer._step.lower(state, *batch).compile().as_text()
        state, metrics = trainer(state, tokens, mask)
        runs[groups] = {
            "in_loop": loop_collectives(hlo, layer["vocab_size"]),
            "loss": metrics["loss"],
            "weights": [to_numpy(a).tolist() for a in state.trainable],
        }
    print("RESULT " + json.dumps(runs))
"""


def test_head_gradient_is_reduced_over_the_devices_once():
    """Full tuning on 2 devices, 3 pieces of the head's loss: with one row group the head's
    gradient is summed over the devices inside the pieces' loop (after every piece); with the
    step's row groups (one per device) there is no collective on a [.., vocab] array in any
    loop, and the step's loss and weights are the same (float32 reduction-order noise)."""
    runs = run_on_two_devices(HEAD_SCRIPT)
    one, per_device = runs["1"], runs["2"]
    assert one["in_loop"] >= 1, one["in_loop"]  # the check sees the per-piece reduction
    assert per_device["in_loop"] == 0, per_device["in_loop"]
    np.testing.assert_allclose(per_device["loss"], one["loss"], rtol=1e-6)
    for got, want in zip(per_device["weights"], one["weights"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
