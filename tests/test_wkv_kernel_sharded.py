"""The fused WKV kernel under a data-parallel mesh: each device runs its own rows.

XLA cannot partition a Pallas call, so under a context mesh (`jax.set_mesh`, as the training
step sets it) `wkv6_kernel` wraps itself in shard_map. Checked on 2 virtual CPU devices with
the kernel in Pallas' interpreter, in a subprocess (the device count is fixed at JAX start):
the shard_map is there, and outputs, final state and every gradient (d(u) summed over the
devices) equal the single-device call.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from kernel_checks import run_script

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    if os.environ.get("WKV_TEST_GPU") == "1":
        del os.environ["XLA_FLAGS"]
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rwkv_ray.ops.wkv_kernel import wkv6_kernel

    INTERPRET = os.environ.get("WKV_TEST_GPU") != "1"  # else the real kernel on 2 GPUs
    MODE = "3d" if INTERPRET else "loop"

    b, t, h, n = (4, 20, 2, 16) if INTERPRET else (4, 200, 4, 64)
    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    r, k, v = (jax.random.normal(keys[i], (b, t, h, n)) for i in range(3))
    log_w = -jnp.exp(jax.random.normal(keys[3], (b, t, h, n)) - 1.0)
    u = jax.random.normal(keys[4], (h, n))
    s0 = jax.random.normal(keys[5], (b, h, n, n))
    dy = jax.random.normal(keys[6], (b, t, h, n))
    args = (r, k, v, log_w, u, s0)

    def loss(*a):
        y, st = wkv6_kernel(*a, interpret=INTERPRET, mode=MODE)
        return jnp.sum(y * dy) + jnp.sum(st * st)

    def run(*a):
        y, st = wkv6_kernel(*a, interpret=INTERPRET, mode=MODE)
        return y, st, jax.grad(loss, argnums=tuple(range(6)))(*a)

    plain = jax.jit(run)(*args)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    rows = NamedSharding(mesh, P("data"))
    sharded_args = [jax.device_put(x, rows if x.ndim == 4 else NamedSharding(mesh, P()))
                    for x in args]
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(run)(*sharded_args))
        hlo = jax.jit(run).lower(*sharded_args).compile().as_text()
        sharded = jax.jit(run)(*sharded_args)
    flat_plain = jax.tree_util.tree_leaves(plain)
    flat_sharded = jax.tree_util.tree_leaves(sharded)
    err = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
           for a, b in zip(flat_sharded, flat_plain)]
    print("RESULT " + json.dumps({
        "devices": int(mesh.devices.size),
        "shard_map_in_jaxpr": "shard_map" in jaxpr,
        "shard_map_without_mesh": "shard_map" in str(jax.make_jaxpr(run)(*args)),
        "all_gathers": hlo.count("all-gather"),
        "all_reduces": hlo.count("all-reduce"),
        "max_rel_err": max(err),
        "du_norm": float(jnp.linalg.norm(plain[2][4])),
        "y_sharding": str(sharded[0].sharding.spec),
    }))
    """
)


def _check(result: dict, tolerance: float):
    assert result["devices"] == 2
    assert result["shard_map_in_jaxpr"] and not result["shard_map_without_mesh"]
    assert result["du_norm"] > 0  # the summed-over-devices gradient is exercised
    assert result["all_gathers"] == 0, result  # nothing gathered onto every device
    assert result["max_rel_err"] < tolerance, result


def test_kernel_splits_the_batch_per_device_under_a_mesh():
    """2 virtual CPU devices, the kernel in Pallas' interpreter (float32: exact to 1e-5)."""
    _check(run_script(SCRIPT), 1e-5)


@pytest.mark.gpu
def test_gpu_kernel_splits_the_batch_per_gpu():
    """The Triton kernel on 2 GPUs (float32 inputs: TF32-free IEEE dots, so 1e-4)."""
    import jax

    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        gpus = []
    if len(gpus) < 2 or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        pytest.skip("needs 2 CUDA GPUs (JAX sees fewer)")
    _check(run_script(SCRIPT, WKV_TEST_GPU="1", JAX_PLATFORMS="cuda"), 1e-4)
