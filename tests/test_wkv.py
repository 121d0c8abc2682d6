"""WKV6 ops against the obvious float64 reference: outputs, final state and every gradient.

Shapes: r, k, v, log_w [B,T,H,N] (log_w = log-decay), u [H,N], state [B,H,N,N] as
[key, value] float32. Forward references: a float64 numpy double loop over t. Gradient
references: jax.grad of a float64 lax.scan (under jax.enable_x64). Tolerances are relative
to the largest magnitude of the reference (float32 accumulation over up to 130 steps).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rwkv_ray.ops import WKV_IMPLS, resolve_wkv_impl, wkv6
from rwkv_ray.ops import wkv as wkv_module
from rwkv_ray.ops.wkv_chunked import wkv6_chunked
from rwkv_ray.ops.wkv_scan import wkv6_scan, wkv6_single_step

FWD_TOL = 5e-6  # max |fp32 - fp64| / max |fp64|, outputs and final state (seen: 4e-7)
GRAD_TOL = 1e-5  # same for every gradient (seen: 4e-7)
IMPLS = {"scan": jax.jit(wkv6_scan), "chunked": jax.jit(wkv6_chunked)}


# --- references -----------------------------------------------------------------------------


def loop64(r, k, v, log_w, u, state=None):
    """The definition, one step at a time, in float64 numpy: (y, final_state)."""
    r, k, v, log_w, u = (np.asarray(x, np.float64) for x in (r, k, v, log_w, u))
    b, t, h, n = r.shape
    s = np.zeros((b, h, n, n)) if state is None else np.array(state, np.float64)
    y = np.zeros((b, t, h, n))
    for i in range(t):
        kv = k[:, i, :, :, None] * v[:, i, :, None, :]  # [B,H,N(key),N(value)]
        y[:, i] = np.einsum("bhi,bhij->bhj", r[:, i], s + u[None, :, :, None] * kv)
        s = np.exp(log_w[:, i])[..., None] * s + kv
    return y, s


def scan64(r, k, v, log_w, u, state):
    """Same definition as a jnp lax.scan, to differentiate in float64 (call under x64)."""

    def step(s, x):
        r_t, k_t, v_t, w_t = x
        kv = k_t[..., :, None] * v_t[..., None, :]
        y_t = jnp.einsum("bhi,bhij->bhj", r_t, s + u[:, :, None] * kv)
        return jnp.exp(w_t)[..., None] * s + kv, y_t

    s, y = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (r, k, v, log_w)))
    return jnp.moveaxis(y, 0, 1), s


def weighted_loss(fn, args, y_weight, s_weight):
    """A random-weighted scalar of y and the final state: every gradient path is exercised."""
    y, s = fn(*args)
    return jnp.sum(y * y_weight) + jnp.sum(s * s_weight)


# Gradients with respect to all of `args` (a tuple), compiled once per function and shape.
GRADS = {
    name: jax.jit(jax.grad(partial(weighted_loss, fn)))
    for name, fn in (("scan", wkv6_scan), ("chunked", wkv6_chunked), ("float64", scan64))
}


# --- cases ----------------------------------------------------------------------------------


def make_case(b, t, h, n, decay, seed=0):
    """float32 inputs; decay 'weak' (log_w ~ -1e-4..-2e-2), 'strong' (~ -7..-1100) or 'mixed'
    (either, per element, with some exact zeros = no decay, as left padding produces)."""
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((b, t, h, n)) for _ in range(3))
    weak = -np.exp(rng.uniform(-8, -4, (b, t, h, n)))
    strong = -np.exp(rng.uniform(2, 7, (b, t, h, n)))
    pick = rng.integers(0, 3, (b, t, h, n))
    log_w = {
        "weak": weak,
        "strong": strong,
        "mixed": np.select([pick == 0, pick == 1], [weak, strong], 0.0),
    }[decay]
    u = rng.standard_normal((h, n))
    state = rng.standard_normal((b, h, n, n))
    return [x.astype(np.float32) for x in (r, k, v, log_w, u, state)]


def case_id(b, t, h, n, decay):
    return f"B{b}-T{t}-H{h}-N{n}-{decay}"


def grid(shapes, decays=("weak", "strong", "mixed")):
    return [pytest.param(*s, d, id=case_id(*s, d)) for s in shapes for d in decays]


def assert_close(got, want, tol, what):
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), f"{what}: NaN or inf"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(np.max(np.abs(want)), 1e-30)
    err = np.max(np.abs(got - want)) / scale
    assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > rtol {tol:.0e}"


# T = 1, 7, 64, 130 (7 and 130 are not multiples of the default chunk); H 1/3; N 16/64; B 1/2.
FWD_SHAPES = [(1, 1, 1, 16), (2, 7, 3, 16), (1, 64, 3, 64), (2, 130, 3, 16), (1, 130, 3, 64)]
GRAD_SHAPES = [(1, 1, 3, 16), (2, 7, 1, 16), (1, 64, 3, 64), (2, 130, 3, 16)]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("b,t,h,n,decay", grid(FWD_SHAPES))
def test_forward_matches_float64_loop(b, t, h, n, decay, with_state):
    r, k, v, log_w, u, state = make_case(b, t, h, n, decay)
    state = state if with_state else None
    y_ref, s_ref = loop64(r, k, v, log_w, u, state)
    for name, fn in IMPLS.items():
        y, s = fn(r, k, v, log_w, u, state)
        assert y.dtype == np.float32 and s.dtype == np.float32
        assert_close(y, y_ref, FWD_TOL, f"{name} y")
        assert_close(s, s_ref, FWD_TOL, f"{name} final state")


def float64_grads(args, y_weight, s_weight):
    with jax.enable_x64(True):
        to64 = partial(jnp.asarray, dtype=jnp.float64)
        grads = GRADS["float64"](tuple(map(to64, args)), to64(y_weight), to64(s_weight))
        return [np.asarray(g) for g in grads]


@pytest.mark.parametrize("b,t,h,n,decay", grid(GRAD_SHAPES))
def test_gradients_match_float64(b, t, h, n, decay):
    args = tuple(make_case(b, t, h, n, decay))
    rng = np.random.default_rng(1)
    y_weight = rng.standard_normal((b, t, h, n)).astype(np.float32)
    s_weight = rng.standard_normal((b, h, n, n)).astype(np.float32)
    want = float64_grads(args, y_weight, s_weight)
    names = ("r", "k", "v", "log_w", "u", "initial_state")
    for impl in ("scan", "chunked"):
        got = GRADS[impl](args, y_weight, s_weight)
        for name, g, g_ref in zip(names, got, want, strict=True):
            assert_close(g, g_ref, GRAD_TOL, f"{impl} d/d{name}")


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize(
    "b,h,n,decay", [(1, 1, 16, "weak"), (3, 2, 64, "strong"), (2, 3, 16, "mixed")]
)
def test_single_step_matches_float64_loop_and_its_gradients(b, h, n, decay, with_state):
    """The T == 1 decoding path: outputs, final state and every gradient."""
    r, k, v, log_w, u, state = make_case(b, 1, h, n, decay)
    state = state if with_state else None
    y_ref, s_ref = loop64(r, k, v, log_w, u, state)
    y, s = jax.jit(wkv6_single_step)(r, k, v, log_w, u, state)
    assert_close(y, y_ref, FWD_TOL, "single step y")
    assert_close(s, s_ref, FWD_TOL, "single step final state")
    if state is None:
        return
    rng = np.random.default_rng(4)
    y_weight = rng.standard_normal(r.shape).astype(np.float32)
    s_weight = rng.standard_normal(state.shape).astype(np.float32)
    args = (r, k, v, log_w, u, state)
    want = float64_grads(args, y_weight, s_weight)
    got = jax.grad(weighted_loss, argnums=1)(wkv6_single_step, args, y_weight, s_weight)
    for name, g, g_ref in zip(
        ("r", "k", "v", "log_w", "u", "initial_state"), got, want, strict=True
    ):
        assert_close(g, g_ref, GRAD_TOL, f"single step d/d{name}")


def test_dispatcher_uses_the_single_step_for_one_token(monkeypatch):
    """T == 1 never reaches the chunked form (which would pad it to a chunk), whatever the
    impl; an explicit request that cannot be met still raises."""
    called = []
    monkeypatch.setattr(wkv_module, "wkv6_chunked", lambda *a, **k: called.append(a))
    args = make_case(2, 1, 1, 16, "mixed")
    y, s = wkv6(*args, impl="chunked")
    y_ref, s_ref = loop64(*args)
    assert not called
    assert_close(y, y_ref, FWD_TOL, "dispatched y")
    assert_close(s, s_ref, FWD_TOL, "dispatched state")


def test_gradients_without_initial_state_match_scan():
    r, k, v, log_w, u, _ = make_case(2, 7, 1, 16, "mixed", seed=3)
    y_weight = np.random.default_rng(2).standard_normal(r.shape).astype(np.float32)
    args = (r, k, v, log_w, u, None)
    g_scan = GRADS["scan"](args, y_weight, 0.0)[:5]  # no gradient for the absent state
    for g_chunk, g_ref in zip(GRADS["chunked"](args, y_weight, 0.0)[:5], g_scan, strict=True):
        assert_close(g_chunk, np.asarray(g_ref, np.float64), GRAD_TOL, "chunked vs scan grad")


@pytest.mark.parametrize("chunk_size", [1, 3, 64])  # 64 > T: a single chunk
def test_any_chunk_size_matches_reference(chunk_size):
    r, k, v, log_w, u, state = make_case(2, 37, 3, 16, "mixed", seed=4)
    y_ref, s_ref = loop64(r, k, v, log_w, u, state)
    y, s = jax.jit(wkv6_chunked, static_argnames="chunk_size")(
        r, k, v, log_w, u, state, chunk_size=chunk_size
    )
    assert_close(y, y_ref, FWD_TOL, f"L={chunk_size} y")
    assert_close(s, s_ref, FWD_TOL, f"L={chunk_size} state")


def test_extreme_decay_has_no_nan_in_gradients():
    """log_w down to -1e4 (exp underflows to 0) and exactly 0, over several chunks."""
    r, k, v, _, u, state = make_case(2, 130, 3, 16, "strong", seed=5)  # shapes compiled above
    rng = np.random.default_rng(6)
    log_w = np.where(rng.random(r.shape) < 0.5, -1e4, 0.0).astype(np.float32)
    y_ref, s_ref = loop64(r, k, v, log_w, u, state)
    grads = GRADS["chunked"]((r, k, v, log_w, u, state), 1.0, 1.0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    y, s = IMPLS["chunked"](r, k, v, log_w, u, state)
    assert_close(y, y_ref, FWD_TOL, "y")
    assert_close(s, s_ref, FWD_TOL, "state")


@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_bfloat16_inputs(impl):
    """bf16 in: y comes back bf16 (within bf16 rounding), the state stays float32."""
    r, k, v, log_w, u, state = make_case(2, 33, 3, 16, "mixed", seed=7)
    bf16 = [x.astype(ml_dtypes.bfloat16) for x in (r, k, v, log_w)]
    y_ref, s_ref = loop64(*bf16, u, state)  # the exact result for the rounded inputs
    y, s = IMPLS[impl](*bf16, u, state)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(y, y_ref, 2**-8, "bf16 y")  # one bf16 rounding of the output
    assert_close(s, s_ref, FWD_TOL, "state from bf16 inputs")


@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_two_halves_equal_one_pass(impl):
    r, k, v, log_w, u, state = make_case(2, 130, 3, 16, "mixed", seed=8)
    fn = IMPLS[impl]
    y_full, s_full = fn(r, k, v, log_w, u, state)
    # Two equal halves (one compile), 65 steps each: not a multiple of the chunk size.
    first, second = ([x[:, :65] for x in (r, k, v, log_w)], [x[:, 65:] for x in (r, k, v, log_w)])
    y1, s1 = fn(*first, u, state)
    y2, s2 = fn(*second, u, s1)
    assert_close(np.concatenate([y1, y2], axis=1), np.asarray(y_full, np.float64), 1e-6, "y")
    assert_close(s2, np.asarray(s_full, np.float64), 1e-6, "state")


# --- dispatcher -----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("RWKV_WKV_IMPL", raising=False)
    monkeypatch.delenv("OPS_KERNEL", raising=False)
    monkeypatch.setattr(wkv_module, "_fallback_logged", False)
    return monkeypatch


@pytest.mark.parametrize("impl", ["scan", "chunked", "auto"])
def test_wkv6_under_jit(impl, clean_env):
    r, k, v, log_w, u, state = make_case(2, 21, 3, 16, "mixed", seed=9)
    y_ref, s_ref = loop64(r, k, v, log_w, u, state)
    y, s = jax.jit(lambda *a: wkv6(*a, impl=impl))(r, k, v, log_w, u, state)
    assert_close(y, y_ref, FWD_TOL, f"{impl} y")
    assert_close(s, s_ref, FWD_TOL, f"{impl} state")


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RWKV_WKV_IMPL": "scan"}, "scan"),
        ({"RWKV_WKV_IMPL": " Chunked "}, "chunked"),
        ({"OPS_KERNEL": "1"}, "chunked"),
        ({"RWKV_WKV_IMPL": "scan", "OPS_KERNEL": "1"}, "scan"),  # the new switch wins
        ({}, "chunked"),  # auto, no kernel on CPU
    ],
    ids=["env-scan", "env-chunked", "legacy-1", "new-beats-legacy", "default-auto"],
)
def test_env_switches(env, expected, clean_env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert resolve_wkv_impl()[0] == expected
    assert resolve_wkv_impl("scan")[0] == "scan"  # the argument beats the environment


@pytest.mark.parametrize(
    "env,value",
    [({"RWKV_WKV_IMPL": "cuda"}, "cuda"), ({"OPS_KERNEL": "yes"}, "yes"), ({}, "fast")],
)
def test_unknown_impl_names_value_and_choices(env, value, clean_env):
    for name, v in env.items():
        clean_env.setenv(name, v)
    with pytest.raises(ValueError) as err:
        resolve_wkv_impl("fast" if not env else None)
    assert repr(value) in str(err.value)
    assert "chunked" in str(err.value)


def test_explicit_kernel_on_cpu_raises_with_reason(clean_env):
    assert "kernel" in WKV_IMPLS
    with pytest.raises(RuntimeError, match=r"'kernel' .* unavailable: \S+"):
        resolve_wkv_impl("kernel")
    clean_env.setenv("OPS_KERNEL", "0")  # legacy 0 = the kernel
    with pytest.raises(RuntimeError, match="OPS_KERNEL"):
        wkv6(*make_case(1, 4, 1, 8, "weak"))


def test_auto_falls_back_to_chunked_and_logs_once(clean_env, caplog):
    args = make_case(1, 5, 1, 8, "weak")
    with caplog.at_level(logging.INFO, logger="rwkv_ray.ops"):
        impl, reason = resolve_wkv_impl("auto")
        resolve_wkv_impl(None)
        jax.jit(wkv6)(*args)
    assert impl == "chunked" and "kernel unavailable" in reason
    records = [rec for rec in caplog.records if rec.name == "rwkv_ray.ops"]
    assert len(records) == 1, [rec.getMessage() for rec in records]
    assert "chunked" in records[0].getMessage()


def test_auto_and_kernel_use_an_available_kernel(clean_env):
    """With a (fake) kernel that says it is available, 'auto' and 'kernel' both call it,
    passing chunk_size only when one is given."""
    calls = []
    fake = types.SimpleNamespace(
        is_available=lambda: (True, "fake GPU"),
        wkv6_kernel=lambda *args, **options: calls.append(options) or ("y", "state"),
        wkv6_kernel_step=lambda *args, **norm: calls.append(("step", norm)) or ("y1", "state1"),
        check_chunk_size=lambda size: calls.append(("check", size)),
        head_size_reason=lambda n: None,
    )
    clean_env.setitem(sys.modules, wkv_module.KERNEL_MODULE, fake)
    args = make_case(1, 4, 1, 8, "weak")
    assert resolve_wkv_impl("auto") == ("kernel", "auto: fake GPU")
    assert wkv6(*args) == ("y", "state")
    assert wkv6(*args, impl="kernel", chunk_size=32) == ("y", "state")
    one_token = [x[:, :1] if i < 4 else x for i, x in enumerate(args)]
    assert wkv6(*one_token) == ("y1", "state1")  # decoding: the kernel's one-step form
    # ... which also norms y when asked (the model's ln_x).
    norm = (np.ones((1, 8), np.float32), np.zeros((1, 8), np.float32), 1e-5)
    assert wkv6(*one_token, group_norm=norm) == ("y1", "state1")
    normed = ("step", {"group_norm": norm})
    # ... and gates it (the model's silu(g)).
    gate = np.ones((1, 1, 1, 8), np.float32)
    assert wkv6(*one_token, group_norm=norm, output_gate=gate) == ("y1", "state1")
    gated = ("step", {"group_norm": norm, "output_gate": gate})
    # The kernel's chunk-size rule is checked for every T (also a one-token step).
    assert wkv6(*one_token, impl="kernel", chunk_size=16) == ("y1", "state1")
    expected = [{}, ("check", 32), {"chunk_size": 32}, ("step", {}), normed, gated]
    expected += [("check", 16), ("step", {})]
    assert len(calls) == len(expected)
    for got, want in zip(calls, expected, strict=True):
        if isinstance(want, tuple) and want[0] == "step" and want[1]:
            assert got[0] == "step" and got[1].keys() == want[1].keys()
            assert all(got[1][key] is want[1][key] for key in want[1])
        else:
            assert got == want


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.__setitem__(1, a[1][:, :3]), r"k \(1, 3, 2, 8\)"),
        (lambda a: a.__setitem__(3, a[3][..., :4]), r"log_w \(1, 5, 2, 4\)"),
        (lambda a: a.__setitem__(4, a[4][0]), r"u must be \[H,N\] = \(2, 8\).*got \(8,\)"),
        (lambda a: a.__setitem__(5, a[5][:, :, :4]), r"got \(1, 2, 4, 8\)"),
        (lambda a: a.__setitem__(0, a[0][0]), r"r must be \[B,T,H,N\], got shape \(5, 2, 8\)"),
    ],
    ids=["k", "log_w", "u", "state", "r-rank"],
)
def test_shape_errors_name_the_shapes(change, message):
    args = make_case(1, 5, 2, 8, "weak")
    change(args)
    with pytest.raises(ValueError, match=message):
        wkv6(*args, impl="scan")


@pytest.mark.parametrize("impl", ["scan", "chunked"])
def test_norm_gate_and_dtype_errors_on_the_plain_paths(impl):
    """The fused kernels refused these; the plain paths broadcast a wrong gamma or gate and
    returned an integer y for integer inputs."""
    args = make_case(2, 5, 2, 8, "weak")
    heads = np.ones((2, 8), np.float32)
    with pytest.raises(
        ValueError, match=r"group_norm's gamma must be \[H,N\] = \(2, 8\), got \(8,\)"
    ):
        wkv6(*args, impl=impl, group_norm=(heads[0], heads, 1e-5))
    with pytest.raises(ValueError, match=r"group_norm's beta must be"):
        wkv6(*args, impl=impl, group_norm=(heads, heads[None], 1e-5))
    with pytest.raises(
        ValueError, match=r"output_gate must have r's shape \(2, 5, 2, 8\), got \(1, 5, 2, 8\)"
    ):
        wkv6(*args, impl=impl, output_gate=np.ones((1, 5, 2, 8), np.float32))
    for i, name in enumerate(("r", "k", "v", "log_w", "u")):
        bad = list(args)
        bad[i] = np.asarray(bad[i]).astype(np.int32)
        with pytest.raises(TypeError, match=rf"{name} must be floating point, got int32"):
            wkv6(*bad, impl=impl)


# --- other Keras backends ---------------------------------------------------------------------

BACKEND_SCRIPT = """
import sys, numpy as np, keras
sys.path.insert(0, {tests!r})
from test_wkv import loop64, make_case, assert_close, FWD_TOL
from rwkv_ray.ops import wkv6
args = make_case(2, 19, 3, 8, "mixed", seed=10)
y_ref, s_ref = loop64(*args)
for impl in ("scan", "chunked"):
    y, s = wkv6(*(keras.ops.convert_to_tensor(x) for x in args), impl=impl)
    assert_close(keras.ops.convert_to_numpy(y), y_ref, FWD_TOL, impl + " y")
    assert_close(keras.ops.convert_to_numpy(s), s_ref, FWD_TOL, impl + " state")
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_pure_impls_under_other_keras_backends(backend):
    script = BACKEND_SCRIPT.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_an_empty_sequence_passes_the_state_through():
    """T = 0: no output, the initial state comes back (both pure paths raised IndexError)."""
    from rwkv_ray.ops.wkv import wkv6

    rng = np.random.default_rng(0)
    x = np.zeros((2, 0, 1, 8), np.float32)
    u = rng.standard_normal((1, 8)).astype(np.float32)
    s0 = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    for impl in ("scan", "chunked"):
        y, state = wkv6(x, x, x, x, u, s0, impl=impl)
        assert tuple(y.shape) == (2, 0, 1, 8)
        np.testing.assert_array_equal(np.asarray(state), s0)
        _, zeros = wkv6(x, x, x, x, u, impl=impl)
        np.testing.assert_array_equal(np.asarray(zeros), np.zeros_like(s0))


@pytest.mark.parametrize("impl", ["scan", "chunked"])
@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, "16", True])
def test_a_bad_chunk_size_is_refused_by_every_implementation(impl, chunk_size):
    """The scan and the one-token step take no chunks; a bad value still fails where it is
    written (the scan ignored chunk_size=-2 before, so the error came only on a change of
    implementation)."""
    for t in (1, 5):
        with pytest.raises(ValueError, match=r"chunk_size must be a positive integer"):
            wkv6(*make_case(1, t, 2, 8, "weak"), impl=impl, chunk_size=chunk_size)


def test_auto_falls_back_for_a_head_size_the_kernel_cannot_tile(clean_env, caplog):
    """On a GPU 'auto' chose the kernel for any head size, which then raised for N = 48
    (the model allows any N dividing its width): now 'chunked', said once; an explicit
    'kernel' raises the reason up front."""
    from rwkv_ray.ops import wkv_kernel

    fake = types.SimpleNamespace(
        is_available=lambda: (True, "fake GPU"),
        head_size_reason=wkv_kernel.head_size_reason,
        wkv6_kernel=lambda *args, **options: pytest.fail("the kernel ran for N = 24"),
        wkv6_kernel_step=lambda *args, **options: pytest.fail("the step kernel ran for N = 24"),
    )
    clean_env.setitem(sys.modules, wkv_module.KERNEL_MODULE, fake)
    clean_env.setattr(wkv_module, "_fallback_logged", False)
    for t in (1, 7):
        args = make_case(2, t, 2, 24, "mixed", seed=t)
        y, state = wkv6(*args)
        y_ref, state_ref = wkv6(*args, impl="scan")
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state), np.asarray(state_ref), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"'kernel' cannot run this shape: head size N must"):
            wkv6(*args, impl="kernel")
    records = [rec for rec in caplog.records if rec.name == "rwkv_ray.ops"]
    assert len(records) == 1 and "got 24" in records[0].getMessage()
