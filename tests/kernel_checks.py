"""Checks shared by the tests of the Pallas kernels that replace a plain JAX form (the ln_x +
gate kernel, the token-mix kernels): the kernel's outputs and gradients against the plain
form's, by relative RMS."""

from __future__ import annotations

import numpy as np

# A script for `run_script`: MESH_SETUP, then code defining `run(*args)` (the op and its
# gradients), `args` and `batched_ndim` (the rank of the arrays split over the batch), then
# MESH_CHECK: run once on one device and once under a 2-device data-parallel mesh; it prints
# whether a shard_map split the rows, how many all-gathers the compiled step has and the
# largest relative difference of any output or gradient.
MESH_SETUP = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
"""
MESH_CHECK = """
plain = jax.jit(run)(*args)
mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
args = [jax.device_put(x, rows if x.ndim == batched_ndim else whole) for x in args]
with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(run)(*args))
    hlo = jax.jit(run).lower(*args).compile().as_text()
    sharded = jax.jit(run)(*args)
errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(plain))]
print("RESULT " + json.dumps({"shard_map": "shard_map" in jaxpr,
                              "all_gathers": hlo.count("all-gather"), "max_rel_err": max(errors)}))
"""


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (relative RMS)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_form(names, ours, theirs):
    for name, got, want in zip(names, ours, theirs, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name


def assert_close(names, ours, theirs, bound, label):
    """float32: every result within `bound` relative RMS of the plain form's."""
    errors = {name: rel(x, y) for name, x, y in zip(names, ours, theirs, strict=True)}
    print(f"{label}:", errors)
    assert max(errors.values()) < bound, errors


def assert_no_less_exact(names, ours, theirs, truth, label):
    """bf16: the kernel's results and the plain form's against `truth` (the plain form on
    float32 copies of the same inputs). The kernel no more than 10% further from it than the
    plain form, or within 4e-3 (about one bf16 ulp on every element) where few elements make
    the figures noisy. Their roundings differ: the kernels compute in float32 and round once
    per output."""
    for name, got, want, exact in zip(names, ours, theirs, truth, strict=True):
        err, plain_err = rel(got, exact), rel(want, exact)
        print(f"{label} {name}: kernel {err:.2e}, plain form {plain_err:.2e}")
        assert err <= max(1.1 * plain_err, 4e-3), (name, err, plain_err)


def run_script(script: str, **env_extra) -> dict:
    """Runs `script` in a fresh Python (JAX's device count is fixed at its start; the script
    sets XLA_FLAGS for virtual CPU devices itself) with the repo first on PYTHONPATH, on the
    CPU unless env_extra says otherwise, and returns the JSON it prints after "RESULT "."""
    import json
    import os
    import subprocess
    import sys

    path = os.pathsep.join(x for x in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", **env_extra}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])
