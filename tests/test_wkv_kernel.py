"""The fused WKV6 kernel (rwkv_ray/ops/wkv_kernel.py) against a float64 lax.scan reference.

GPU tests are marked `gpu` and skipped without a CUDA GPU; the interpret-mode tests run the
same Pallas kernels on CPU (small shapes) and are never skipped.
Bounds (relative RMS error, ||x - ref|| / ||ref||): float32 inputs 1e-4 (state and gradients
5e-4: strong decay loses a few bits in the float32 log-decay cumsums), bf16 inputs 2e-2.
"""

import collections
import functools
import os
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from rwkv_ray.ops import wkv_kernel as wk  # noqa: E402
from rwkv_ray.ops import wkv_kernel_intra as intra  # noqa: E402
from rwkv_ray.ops.wkv_kernel_fwd import pass1_length, span_length, stack_dtype  # noqa: E402

NAMES = ("r", "k", "v", "log_w", "u", "initial_state")


def ref_wkv6(r, k, v, log_w, u, s0):
    """Plain per-token recurrence in float64. [B,T,H,N] inputs, state [B,H,N,N] (key, value)."""
    r, k, v, log_w, u, s0 = (jnp.asarray(x, jnp.float64) for x in (r, k, v, log_w, u, s0))

    def step(s, x):
        rt, kt, vt, wt = x
        kv = kt[..., :, None] * vt[..., None, :]
        y = jnp.einsum("bhi,bhij->bhj", rt, s + u[None, :, :, None] * kv)
        return jnp.exp(wt)[..., None] * s + kv, y

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (r, k, v, log_w))
    st, ys = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(ys, 0, 1), st


def make_inputs(seed, b, t, h, n, dtype, decay, log_w_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shp = (b, t, h, n)
    r, k, v = (rng.standard_normal(shp).astype(np.float32) for _ in range(3))
    if decay == "weak":  # decays near 1: long memory
        lw = -np.exp(rng.standard_normal(shp) * 0.5 - 5.0)
    else:  # typical values plus 10% of entries at -1e3 (state wiped on that key)
        lw = -np.exp(rng.standard_normal(shp) * 1.5 - 1.0)
        lw = np.where(rng.random(shp) < 0.1, -1e3, lw)
    u = rng.standard_normal((h, n)).astype(np.float32)
    s0 = rng.standard_normal((b, h, n, n)).astype(np.float32)
    dy = rng.standard_normal(shp).astype(np.float32)
    dst = rng.standard_normal((b, h, n, n)).astype(np.float32)
    ins = [jnp.asarray(x, dtype) for x in (r, k, v)] + [jnp.asarray(lw, log_w_dtype)]
    ins += [jnp.asarray(u, dtype), jnp.asarray(s0, jnp.float32)]
    return ins, jnp.asarray(dy), jnp.asarray(dst)


def rel_rms(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _loss(fn, dy, dst):
    def loss(*args):
        y, st = fn(*args)
        return jnp.sum(y.astype(dy.dtype) * dy) + jnp.sum(st.astype(dst.dtype) * dst)

    return loss


def reference_and_grads(ins, dy, dst):
    """Float64 outputs and gradients of the reference (x64 on only inside)."""
    with jax.enable_x64(True):
        ins64 = [jnp.asarray(np.asarray(x, np.float64)) for x in ins]
        dy64, dst64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (dy, dst))
        y, st = jax.jit(ref_wkv6)(*ins64)
        grads = jax.jit(jax.grad(_loss(ref_wkv6, dy64, dst64), argnums=range(6)))(*ins64)
        return np.asarray(y), np.asarray(st), [np.asarray(g) for g in grads]


def check_against_reference(
    b, t, h, n, dtype, decay, chunk=16, interpret=False, seed=0, kernel=None,
    log_w_dtype=jnp.float32,
):  # fmt: skip
    """kernel: None for wkv6_kernel, or another function of the same signature."""
    ins, dy, dst = make_inputs(seed, b, t, h, n, dtype, decay, log_w_dtype)
    if kernel is None:
        fn = lambda *a: wk.wkv6_kernel(*a, chunk_size=chunk, interpret=interpret)  # noqa: E731
    else:
        fn = lambda *a: kernel(*a, interpret=interpret)  # noqa: E731
    y, st = jax.jit(fn)(*ins)
    grads = jax.jit(jax.grad(_loss(fn, dy, dst), argnums=range(6)))(*ins)
    y_ref, st_ref, grads_ref = reference_and_grads(ins, dy, dst)  # sees the rounded inputs
    assert y.shape == (b, t, h, n) and y.dtype == ins[0].dtype
    assert st.shape == (b, h, n, n) and st.dtype == jnp.float32
    errs = {"y": rel_rms(y, y_ref), "state": rel_rms(st, st_ref)}
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        errs["d" + name] = rel_rms(g, g_ref)
    bound = 1e-4 if dtype == jnp.float32 else 2e-2
    print(
        f"B{b}-T{t}-H{h}-N{n} {jnp.dtype(dtype).name} {decay}: "
        + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
    )
    assert errs["y"] < bound, errs
    for name, e in errs.items():
        assert e < 5 * bound, (name, errs)
    return errs


def _kernel_names(options, ins):
    """The Pallas kernels (by name) that the gradient of wkv6_kernel(**options) launches (in
    the interpreter; a kernel's twin without the per-chunk check counted as the kernel)."""
    loss = lambda *a: jnp.sum(wk.wkv6_kernel(*a, interpret=True, **options)[0])  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=range(6)))(*ins))
    return set(re.findall(r"name=(wkv6\w+?)(?:_unchecked)?\b", jaxpr))


# ---------------------------------------------------------------- CPU (Pallas interpret mode)


def test_interpret_matches_reference():
    check_against_reference(1, 20, 1, 16, jnp.float32, "strong", interpret=True, seed=20)


def with_kernel_options(**options):
    """Run check_against_reference with extra wkv6_kernel options."""
    fn = wk.wkv6_kernel

    def run(*args, **kwargs):
        wk.wkv6_kernel = lambda *a, **kw: fn(*a, **options, **kw)
        try:
            return check_against_reference(*args, **kwargs)
        finally:
            wk.wkv6_kernel = fn

    return run


def test_interpret_fused_kernels_with_value_split_match_reference():
    """The one-pass kernels both ways; N=64 with B*H=2: the fused forward splits each head into
    4 value blocks of 16."""
    assert wk.value_splits(2, 1, 64) == 4 and wk.value_splits(8, 32, 64) == 1
    run = with_kernel_options(forward="fused", backward="fused")
    run(2, 19, 1, 64, jnp.float32, "strong", interpret=True, seed=21)


def test_interpret_two_pass_forward_matches_reference():
    """Span-entry states (value-split in two: N=32, B*H=4), then every span in parallel (what
    'auto' picks beyond one chunk): T=37 with spans of 32 is two spans of two chunks, the
    second span padded."""
    assert wk.use_two_pass(1, 32, 1024, 16, "auto") and not wk.use_two_pass(8, 32, 16, 16, "auto")
    run = with_kernel_options(forward="two_pass", backward="two_pass", state_stride=32)
    run(2, 37, 2, 32, jnp.float32, "weak", interpret=True, seed=22)


def test_interpret_longest_spans_both_ways():
    """Spans of MAX_BLOCK = 64 tokens (four chunks); T=170 is three spans, the last padded;
    T=40, shorter than a span, is padded to three chunks and cut into spans of one (48 is
    not a power of 2); strong decay; the backward reuses the forward's span-entry states."""
    run = with_kernel_options(
        forward="two_pass", backward="two_pass", state_stride=wk.MAX_BLOCK, keep_states=True,
        mode="3d",
    )  # fmt: skip
    run(1, 170, 1, 16, jnp.float32, "strong", interpret=True, seed=24)
    run(1, 40, 1, 16, jnp.float32, "strong", interpret=True, seed=25)


@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_interpret_bf16_log_decays_match_reference(decay):
    """bf16 log-decays (fla's convention): d log_w's in-span part is stored in bf16 before the
    cross-span sums are added (one more rounding); T=200 is 13 chunks, the last padded."""
    check_against_reference(
        1, 200, 2, 64, jnp.bfloat16, decay, interpret=True, seed=34, log_w_dtype=jnp.bfloat16
    )


def test_auto_forward_is_fused_from_many_heads():
    """'auto': the two-pass forward below MANY_HEADS heads (B * H) beyond one chunk, the fused
    one from there (measured faster with two or more programs per SM) and for one chunk."""
    assert wk.use_two_pass(4, 32, 4096, 16, "auto") and wk.use_two_pass(1, 255, 32, 16, "auto")
    assert not wk.use_two_pass(8, 32, 4096, 16, "auto")
    assert not wk.use_two_pass(1, 256, 32, 16, "auto")
    assert not wk.use_two_pass(1, 8, 16, 16, "auto")
    assert wk.value_splits(8, 32, 64) == 1 and wk.value_splits(4, 32, 64) == 2


def test_interpret_fused_forward_keeps_chunk_states_for_the_backward():
    """Differentiated, the fused forward stores the state entering every chunk as it goes
    (one kernel, `wkv6_fwd_states`) and the two-pass backward takes them instead of running
    its own states pass; keep_states=False recomputes them there. Both match the float64
    reference, strong decay, float32 and bf16; with 2 value splits (N=32, B*H=4) the stored
    states come from two programs per head."""
    ins, _, _ = make_inputs(30, 2, 37, 2, 32, jnp.float32, "strong")
    kept = _kernel_names(dict(forward="fused", backward="two_pass"), ins)
    assert "wkv6_fwd_states" in kept and "wkv6_states" not in kept, kept
    again = _kernel_names(dict(forward="fused", backward="two_pass", keep_states=False), ins)
    assert "wkv6_fwd" in again and "wkv6_states" in again and "wkv6_fwd_states" not in again
    two_pass = _kernel_names(dict(forward="two_pass", backward="two_pass"), ins)
    assert "wkv6_fwd_states" not in two_pass and "wkv6_states" in two_pass, two_pass
    for dtype, seed in ((jnp.float32, 31), (jnp.bfloat16, 32)):
        with_kernel_options(forward="fused", backward="two_pass")(
            2, 37, 2, 32, dtype, "strong", interpret=True, seed=seed
        )
    with_kernel_options(forward="fused", backward="two_pass", keep_states=False)(
        1, 37, 2, 32, jnp.float32, "weak", interpret=True, seed=33
    )


def test_spans_are_powers_of_two():
    """Triton's blocks are powers of 2: a sequence shorter than state_stride (padded to whole
    chunks) is cut into the longest power-of-2 spans that divide it, not taken whole (80
    tokens as one span did not compile on a GPU)."""
    assert span_length(80, 256) == 16 and span_length(96, 256) == 32
    assert span_length(128, 256) == 128 and span_length(4096, 256) == 256
    assert span_length(4096, 16) == 16 and span_length(48, 64) == 16


def test_interpret_bf16_two_pass_stores_rounded_states_exactly():
    """bf16 inputs with one chunk per span: the stored entry states (and state gradients) are
    bf16, as the kernels round them for their matmuls anyway. The forward is bit-identical to
    the fused one (float32 state in registers, rounded at each use), and both directions meet
    the bf16 bounds against the float64 reference."""
    assert stack_dtype(16, 16, jnp.bfloat16) == jnp.bfloat16
    assert stack_dtype(64, 16, jnp.bfloat16) == stack_dtype(16, 16, jnp.float32) == jnp.float32
    ins, _, _ = make_inputs(25, 1, 40, 1, 16, jnp.bfloat16, "weak")
    fused = wk.wkv6_kernel(*ins, interpret=True, mode="3d", forward="fused")
    two_pass = wk.wkv6_kernel(*ins, interpret=True, mode="3d", forward="two_pass")
    for a, b in zip(fused, two_pass, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    run = with_kernel_options(forward="two_pass", backward="two_pass", mode="3d")
    run(1, 40, 1, 16, jnp.bfloat16, "strong", interpret=True, seed=26)


@pytest.mark.parametrize(
    ("decay", "algorithm"), [("weak", "two_pass"), ("strong", "fused")], ids=["weak", "strong"]
)
def test_interpret_factored_mode_matches_reference(decay, algorithm):
    """mode "factored": weak decay takes the matmul form in every chunk (two-pass kernels),
    strong decay (-1e3 entries) falls back to "loop" per chunk (fused kernels)."""
    ins, _, _ = make_inputs(0, 1, 16, 1, 32, jnp.float32, decay)
    inc, exc, _ = intra._chunk_terms(ins[3][0, :, 0])
    assert bool(intra._factors(inc, exc, 16)[2]) == (decay == "weak")
    run = with_kernel_options(mode="factored", forward=algorithm, backward=algorithm)
    run(2, 37, 2, 32, jnp.float32, decay, interpret=True, seed=23)


def test_pass1_length_is_the_longest_dividing_multiple_of_the_span():
    assert pass1_length(4096, 16, 64) == pass1_length(16384, 16, 64) == 64
    assert pass1_length(96, 16, 64) == 32 and pass1_length(160, 16, 64) == 32  # 48: not 2**k
    assert pass1_length(80, 16, 64) == pass1_length(4096, 16, 16) == 16
    assert pass1_length(256, 32, 128) == 128


def test_interpret_coarse_pass1_matches_reference():
    """pass1_stride 64 over spans of 16: both sequential passes step over blocks of 64 tokens
    (T=128: two blocks, float32 block states), then fill in four spans per block in parallel;
    strong decay; outputs, final state and every gradient against the reference."""
    options = dict(forward="two_pass", backward="two_pass", pass1_stride=64)
    ins, _, _ = make_inputs(0, 1, 128, 1, 16, jnp.float32, "weak")
    names = _kernel_names(options, ins)
    assert "wkv6_states_fill" in names and "wkv6_bwd_state_grads_fill" in names
    run = with_kernel_options(forward="two_pass", backward="two_pass", pass1_stride=64)
    run(2, 128, 2, 32, jnp.float32, "strong", interpret=True, seed=27)


def test_interpret_coarse_pass1_bf16_with_padding_matches_reference():
    """bf16 (the filled-in states are stored rounded, the block states stay float32): T=150
    pads to 160 = 5 blocks of 32 (the longest multiple of 16 up to 64 that divides 160)."""
    run = with_kernel_options(forward="two_pass", backward="two_pass", pass1_stride=64)
    run(1, 150, 1, 16, jnp.bfloat16, "weak", interpret=True, seed=28)


@pytest.mark.parametrize("mode", ["factored", "loop"])
def test_interpret_merged_dk_dv_kernel_matches_reference(mode):
    """merge_dk_dv: the two-pass backward's dk and dv kernels as one; spans of two chunks
    (T=70 pads to 96: three spans), strong decay."""
    options = dict(backward="two_pass", merge_dk_dv=True, state_stride=32)
    ins, _, _ = make_inputs(0, 1, 64, 1, 16, jnp.float32, "weak")
    names = _kernel_names(options, ins)
    kernels = {x for x in names if x.startswith("wkv6_bwd_chunks_")}
    assert kernels == {"wkv6_bwd_chunks_dkv"}, kernels  # dr runs with the state grads
    assert "wkv6_bwd_state_grads_dr" in names
    run = with_kernel_options(backward="two_pass", merge_dk_dv=True, state_stride=32, mode=mode)
    run(2, 70, 2, 32, jnp.float32, "strong", interpret=True, seed=29)


def test_interpret_state_splits_match_reference():
    """state_splits=4: both sequential passes split each N=64 head into four value blocks of
    16 columns (the automatic choice here is 4 as well at B*H = 2, so also 1: one block);
    strong decay; outputs, final state and every gradient against the reference."""
    for splits in (1, 4):
        run = with_kernel_options(forward="two_pass", backward="two_pass", state_splits=splits)
        run(1, 40, 2, 64, jnp.float32, "strong", interpret=True, seed=31 + splits)


@pytest.mark.parametrize("overlap", [True, False])
def test_interpret_overlapped_dr_matches_reference(overlap):
    """overlap_dr (the default): the backward's dr kernel and its state-gradient pass in one
    launch (grid: 2 value splits, N=32 and B*H=2, then 3 spans of 16: T=40 pads to 48);
    False: two launches. Both against the reference, strong decay."""
    ins, _, _ = make_inputs(0, 1, 40, 2, 32, jnp.float32, "weak")
    names = _kernel_names(dict(backward="two_pass", overlap_dr=overlap), ins)
    kernels = {
        x for x in names if x.startswith("wkv6_bwd_state_grads") or x == "wkv6_bwd_chunks_dr"
    }
    want = (
        {"wkv6_bwd_state_grads_dr"} if overlap else {"wkv6_bwd_state_grads", "wkv6_bwd_chunks_dr"}
    )
    assert kernels == want, kernels
    run = with_kernel_options(backward="two_pass", overlap_dr=overlap)
    run(1, 40, 2, 32, jnp.float32, "strong", interpret=True, seed=51)
    run(2, 40, 1, 32, jnp.bfloat16, "weak", interpret=True, seed=52)


@pytest.mark.parametrize(
    "dtype, bound", [(jnp.float32, 3e-5), (jnp.bfloat16, 3e-2)], ids=["fp32", "bf16"]
)
def test_interpret_d_log_w_over_many_spans(dtype, bound):
    """d log_w's part from after each span is a suffix sum over the later spans (32 of them
    at T=512), which cancels: at strong decay it stays within 3e-5 (float32) / 3e-2 (bf16)
    relative RMS of the float64 reference (measured 1.4e-5 / 1.7e-2). The identity
    rowsum(G * S_end) in the state-gradient pass was 4x more exact but made that pass 0.37 ms
    slower at B8 T4096 on an H200 (2026-11-28; BENCHMARKS.md), so it was taken back."""
    errors = with_kernel_options(backward="two_pass")(
        1, 512, 2, 64, dtype, "strong", interpret=True, seed=7
    )
    assert errors["dlog_w"] < bound, errors


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_interpret_factored_tf32_matches_reference(dtype):
    """mode "factored_tf32" runs (on CPU its contractions are exact float32; on a GPU TF32,
    the GPU tests of the defaults); float32 inputs fall back to "factored"."""
    run = with_kernel_options(mode="factored_tf32", forward="two_pass", backward="two_pass")
    run(1, 37, 2, 32, dtype, "weak", interpret=True, seed=61)


def test_kernel_warps_default_per_kernel_and_explicit_for_all():
    """num_warps None gives each kernel its KERNEL_WARPS entry (4 elsewhere); an int gives
    every kernel that many. Read from the Triton compiler parameters of the lowered grad."""
    ins, _, _ = make_inputs(0, 1, 64, 1, 16, jnp.bfloat16, "weak")

    def warps(**options):
        loss = lambda *a: jnp.sum(wk.wkv6_kernel(*a, **options)[0].astype(jnp.float32))  # noqa: E731
        program = str(jax.make_jaxpr(jax.grad(loss, argnums=range(4)))(*ins))
        found = re.findall(r"num_warps=(\d+).*?name=(wkv6_\w+)", program, flags=re.S)
        return {name: int(w) for w, name in found}

    default = warps()
    assert default["wkv6_bwd_chunks_dk"] == 2 and default["wkv6_bwd_state_grads_dr"] == 2, default
    assert warps(overlap_dr=False)["wkv6_bwd_state_grads"] == 2
    assert default["wkv6_states"] == 4 and default["wkv6_fwd_output"] == 4, default
    assert set(warps(num_warps=8).values()) == {8}


def test_blocks_must_be_powers_of_two_up_to_max_block():
    """Spans, pass-1 steps and chunks: powers of 2 (Triton's blocks) of at most MAX_BLOCK
    tokens (the float32 precision of a cumsum of clamped log-decays)."""
    x, u = jnp.zeros((1, 32, 1, 16)), jnp.zeros((1, 16))
    for stride in (8, 24, 48, 128):
        with pytest.raises(
            ValueError, match=r"state_stride must be a power of 2 in \[chunk_size 16, 64\]"
        ):
            wk.wkv6_kernel(x, x, x, x, u, state_stride=stride, interpret=True)
    for stride in (40, 128):
        with pytest.raises(
            ValueError, match="pass1_stride must be a multiple of state_stride 16 up to 64"
        ):
            wk.wkv6_kernel(x, x, x, x, u, pass1_stride=stride, interpret=True)
    with pytest.raises(ValueError, match=r"chunk_size must be a power of 2 in \[16, 64\]"):
        wk.wkv6_kernel(x, x, x, x, u, chunk_size=128, interpret=True)
    with pytest.raises(ValueError, match="state_splits must be a power of 2 leaving >= 16"):
        wk.wkv6_kernel(x, x, x, x, jnp.zeros((1, 16)), state_splits=2, interpret=True)


GATES = {
    "reference": intra.factored_everywhere,
    "kernel": functools.partial(intra.factored_everywhere_kernel, interpret=True),
}


@pytest.mark.parametrize("gate", GATES)
def test_factored_everywhere_bounds_every_chunks_exponents(gate):
    """decay_check="call" leaves the per-chunk check out where every half-chunk's clamped
    log-decays sum above -0.99 * 60 = -59.4 (`_factors`' largest exponents); the Pallas
    kernel that the op runs decides as the plain form does."""
    factored_everywhere = GATES[gate]

    def everywhere(values, chunk=16, t=None):
        lw = jnp.asarray(values, jnp.float32).reshape(1, -1, 1, 1)
        return bool(factored_everywhere(jnp.tile(lw, (1, (t or 1), 1, 1)), chunk))

    assert everywhere([-7.42] * 16) and not everywhere([-7.43] * 16)  # 8 * 7.42 = 59.36
    assert everywhere([-3.71] * 32, 32) and not everywhere([-3.72] * 32, 32)
    strong_each_half = [-1e3] + [-1.0] * 7  # clamped: -50 - 7 = -57
    assert everywhere(strong_each_half * 2, t=3)
    assert not everywhere([-1e3, -1e3] + [-0.1] * 14)  # two in one half: -100.6
    assert everywhere([-jnp.inf] + [0.0] * 15)  # clamped at -50 as the kernels do
    assert not everywhere([jnp.nan] + [-1.0] * 15)
    lw = jnp.full((2, 32, 3, 4), -1.0).at[1, 20:22, 2, 3].set(-60.0)  # per batch row and head
    np.testing.assert_array_equal(
        factored_everywhere(lw, 16), [[True, True, True], [True, True, False]]
    )
    with pytest.raises(ValueError, match="decay_check must be 'chunk' or 'call', got 'row'"):
        x = jnp.zeros((1, 32, 1, 16))
        wk.wkv6_kernel(x, x, x, x, jnp.zeros((1, 16)), decay_check="row", interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, chunk", [(16, 16), (4112, 16), (4096, 32), (96, 32)])
def test_interpret_decay_gate_kernel_equals_plain_form(t, chunk, dtype):
    """The gate kernel against `factored_everywhere` on random decays around the bound,
    per batch row and head, with NaN, -inf and -1e3 decays planted; T of 1 to 257 chunks
    (odd counts give programs of 2 half-chunks)."""
    got, want = _decay_gates(t, chunk, dtype, interpret=True)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < want.size  # both answers occur


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, chunk", [(4096, 16), (4112, 16), (96, 32)])
def test_gpu_decay_gate_kernel_equals_plain_form(t, chunk, dtype):
    _needs_gpu()
    got, want = _decay_gates(t, chunk, dtype, interpret=False)
    np.testing.assert_array_equal(got, want)


def _decay_gates(t, chunk, dtype, interpret):
    rng = np.random.default_rng(t + chunk)
    b, h, n = 3, 5, 16
    per_token = 0.99 * 60 / (chunk // 2)  # a half-chunk of these sums to the bound
    near = np.array([0.98, 1.0, 1.02, 1.04, 1.06])[:, None]  # per head: some pass, some fail
    lw = rng.uniform(-per_token, -per_token * 0.9, (b, t, h, n)) * near
    lw[0, :, 0] = -1.0
    lw[0, t // 2, 0, 3] = np.nan
    lw[1, :, 1] = -1.0
    lw[1, 0, 1, 5] = -np.inf
    lw[2, :, 2] = -0.5
    lw[2, [0, t - 1], 2, 7] = -1e3  # one in the first half-chunk, one in the last
    lw = jnp.asarray(lw, dtype)
    got = intra.factored_everywhere_kernel(lw, chunk, interpret=interpret)
    return np.asarray(got), np.asarray(intra.factored_everywhere(lw, chunk))


@pytest.mark.parametrize(
    "decays, everywhere",
    [("uniform_at_bound", True), ("uniform_below", False), ("sparse_strong", True),
     ("strong", False), ("mixed_heads", [[True, False], [True, True]])],
)  # fmt: skip
def test_interpret_decay_check_per_call_matches_reference(decays, everywhere):
    """decay_check="call": the unchecked kernels where every half-chunk's decays sum above
    the bound, here as close to it as it lets ("uniform_at_bound": decays in [-7.42, -6.5],
    a half-chunk's exponents reach 59.4 of the 60 allowed: float32 overflows nowhere) or
    with a -1e3 decay at the start of every half-chunk ("sparse_strong"), else the checked
    ones; per batch row and head ("mixed_heads": one head's decays strong, the others' at
    the bound: both launches of each pair compute). float32, T = 100 (two-pass both ways),
    outputs poisoned: outputs, final state and every gradient equal to decay_check="chunk"'s
    to 1e-6, and against the float64 reference within the file's bounds; d log_w against
    the reference only where decays are mixed: with (nearly) every decay near -7.5 its true
    values are tiny and the suffix sums' float32 cancellation leaves 6.5e-4 (at the bound)
    to 1.1e-2 (below it) in both variants alike."""
    ins, dy, dst = make_inputs(5, 2, 100, 2, 16, jnp.float32, "strong")
    rng = np.random.default_rng(6)
    shape = ins[3].shape
    if decays == "uniform_at_bound":
        ins[3] = jnp.asarray(rng.uniform(-7.42, -6.5, shape), jnp.float32)
    elif decays == "uniform_below":
        ins[3] = jnp.asarray(rng.uniform(-7.9, -7.43, shape), jnp.float32)
    elif decays == "sparse_strong":
        lw = rng.uniform(-1.0, -0.1, shape)
        lw[:, ::8] = -1e3
        ins[3] = jnp.asarray(lw, jnp.float32)
    elif decays == "mixed_heads":
        lw = rng.uniform(-7.42, -6.5, shape)
        lw[0, :, 1] = ins[3][0, :, 1]
        ins[3] = jnp.asarray(lw, jnp.float32)
    padded = jnp.pad(ins[3], ((0, 0), (0, 12), (0, 0), (0, 0)))  # as the kernel pads T to 112
    np.testing.assert_array_equal(
        intra.factored_everywhere(padded, 16), np.broadcast_to(everywhere, (2, 2))
    )
    results, kernels = {}, {}
    for check in ("call", "chunk"):
        # Poisoned outputs: every element written by whichever launch of each pair computes.
        fn = functools.partial(
            wk.wkv6_kernel, decay_check=check, interpret=True, poison_outputs=check == "call"
        )
        grad = jax.grad(_loss(fn, dy, dst), argnums=range(6))
        results[check] = [*jax.jit(fn)(*ins), *jax.jit(grad)(*ins)]
        program = str(jax.make_jaxpr(grad)(*ins))
        kernels[check] = collections.Counter(re.findall(r"name=(wkv6_\w+)", program))
    # Each kernel with intra-chunk terms but dk and dv launched twice (with and without the
    # check, one of them returning at once), the others once.
    twice = ("wkv6_fwd_output", "wkv6_bwd_state_grads_dr")
    for name, count in kernels["chunk"].items():
        assert kernels["call"][name] == count, (name, kernels)
        unchecked = kernels["call"][name + "_unchecked"]
        assert unchecked == (count if name in twice else 0), (name, kernels)
    assert all(kernels["chunk"][name] == 1 for name in twice), kernels
    y_ref, st_ref, grads_ref = reference_and_grads(ins, dy, dst)
    names = ("y", "state") + tuple("d" + n for n in NAMES)
    near_bound = decays in ("uniform_at_bound", "uniform_below", "mixed_heads")
    for name, x, same, ref in zip(
        names, results["call"], results["chunk"], [y_ref, st_ref, *grads_ref], strict=True
    ):
        assert rel_rms(x, same) < 1e-6, name
        if name != "dlog_w" or not near_bound:
            assert rel_rms(x, ref) < (1e-4 if name == "y" else 5e-4), (name, rel_rms(x, ref))


def test_interpret_two_pass_backward_matches_reference():
    """Chunk-entry states and chunk-exit state gradients (value-split in two: N=32, B*H=4),
    then every chunk's gradients in parallel; T=21 is two chunks, the second padded; 10% of
    the decays are -1e3."""
    assert wk.value_splits(2, 2, 32) == 2
    assert wk.use_two_pass_backward(1, 32, 1024, 16, "two_pass")
    assert not wk.use_two_pass_backward(1, 32, 1024, 16, "fused")
    assert wk.use_two_pass_backward(1, 32, 1024, 16, "auto")
    assert not wk.use_two_pass_backward(1, 32, 16, 16, "auto")
    run = with_kernel_options(forward="fused", backward="two_pass", mode="3d")
    run(2, 21, 2, 32, jnp.float32, "strong", interpret=True, seed=23)


def test_interpret_weak_decay_chunk32_3d_kept_states():
    """The "3d" intra-chunk variant; the backward reuses the forward's chunk-entry states."""
    run = with_kernel_options(mode="3d", backward="two_pass", keep_states=True)
    run(1, 33, 1, 16, jnp.float32, "weak", chunk=32, interpret=True)


@pytest.mark.parametrize(
    "decay,dtype", [("strong", jnp.float32), ("weak", jnp.float32), ("strong", jnp.bfloat16)]
)
def test_interpret_decode_step_matches_reference(decay, dtype):
    """wkv6_kernel_step (T == 1, the state updated in place): output, state and every
    gradient (through the plain-JAX step's VJP), N=64 as on a GPU."""
    check_against_reference(
        2, 1, 3, 64, dtype, decay, interpret=True, seed=31, kernel=wk.wkv6_kernel_step
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_interpret_decode_step_fuses_the_group_norm(dtype):
    check_fused_group_norm(2, dtype, interpret=True)


def check_fused_group_norm(batch, dtype, interpret):
    """group_norm=(gamma, beta, eps), output_gate=g: y leaves the step kernel GroupNorm'd
    per head and gated. Against the plain single step followed by the dispatcher's
    group_norm_heads (float32, from the kernel's float32 output, so bf16 differs only by
    that output's rounding) and `y.astype(dtype) * g`: y, the state and the gradients of
    every input, gamma, beta and g included; and the norm alone, without the gate."""
    from rwkv_ray.ops.wkv import group_norm_heads
    from rwkv_ray.ops.wkv_scan import wkv6_single_step

    ins, dy, dst = make_inputs(33, batch, 1, 3, 64, dtype, "strong")
    rng = np.random.default_rng(33)
    gamma, beta = (jnp.asarray(rng.normal(1, 0.3, (3, 64)), jnp.float32) for _ in range(2))
    gate = jnp.asarray(rng.normal(0, 1, (batch, 1, 3, 64)), dtype)
    eps = 64e-5

    def fused(*a, gated=True):
        gating = {"output_gate": a[8]} if gated else {}
        return wk.wkv6_kernel_step(
            *a[:6], group_norm=(a[6], a[7], eps), **gating, interpret=interpret
        )

    def plain(*a, gated=True):
        y, state = wkv6_single_step(*a[:4], a[4], a[5])
        y = group_norm_heads(y.astype(jnp.float32), a[6], a[7], eps).astype(a[0].dtype)
        return (y * a[8] if gated else y), state

    args = (*ins, gamma, beta, gate)
    bound = 1e-5 if dtype == jnp.float32 else 2e-2
    for gated in (True, False):
        got = jax.jit(functools.partial(fused, gated=gated))(*args)
        want = jax.jit(functools.partial(plain, gated=gated))(*args)
        for a, b in zip(got, want, strict=True):
            assert rel_rms(a, b) < bound, (gated, rel_rms(a, b))

    def loss(fn):
        def value(*a):
            y, state = fn(*a)
            return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(state * dst)

        return jax.jit(jax.grad(value, argnums=range(9)))

    grads = zip(loss(fused)(*args), loss(plain)(*args), strict=True)
    names = "r k v log_w u state gamma beta gate".split()
    for name, (got, want) in zip(names, grads, strict=True):
        assert rel_rms(got, want) < 5 * bound, (name, rel_rms(got, want))


def test_decode_step_in_a_loop_reuses_the_state_buffer():
    """A jitted loop of steps (as in decoding) equals the reference over the same tokens; the
    kernel's output state is its input's buffer (input_output_aliases)."""
    ins, _, _ = make_inputs(5, 2, 6, 2, 16, jnp.float32, "weak")
    r, k, v, log_w, u, s0 = ins

    def decode(state):
        def body(t, carry):
            ys, state = carry
            at = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)  # noqa: E731
            y, state = wk.wkv6_kernel_step(at(r), at(k), at(v), at(log_w), u, state, interpret=True)
            return jax.lax.dynamic_update_slice_in_dim(ys, y, t, axis=1), state

        return jax.lax.fori_loop(0, 6, body, (jnp.zeros_like(r), state))

    ys, st = jax.jit(decode, donate_argnums=0)(jnp.array(s0))
    y_ref, st_ref = ref_wkv6(*ins)
    assert rel_rms(ys, y_ref) < 1e-5 and rel_rms(st, st_ref) < 1e-5
    # The GPU call (traced, not run): the state argument (5) is output 1's buffer.
    jaxpr = jax.make_jaxpr(lambda *a: wk.wkv6_kernel_step(*a))(*(x[:, :1] for x in ins[:4]), u, s0)
    assert "input_output_aliases=((5, 1),)" in str(jaxpr)


def test_decode_step_under_vmap():
    """The serving batcher vmaps a one-row decode step over its slots: the vmapped kernel
    equals the reference per slot and keeps the state's buffer aliased."""
    ins, _, _ = make_inputs(9, 3, 1, 2, 16, jnp.float32, "strong")  # 3 slots of one row each
    r, k, v, log_w, u, s0 = ins
    rows = [x[:, None] for x in (r, k, v, log_w, s0)]  # [slots, 1, ...]

    def step(r, k, v, log_w, s, interpret=True):
        return wk.wkv6_kernel_step(r, k, v, log_w, u, s, interpret=interpret)

    y, st = jax.jit(jax.vmap(step))(*rows)
    y_ref, st_ref = ref_wkv6(*ins)
    assert rel_rms(y[:, 0], y_ref) < 1e-5 and rel_rms(st[:, 0], st_ref) < 1e-5
    jaxpr = jax.make_jaxpr(jax.vmap(lambda *a: step(*a, interpret=False)))(*rows)
    assert "input_output_aliases=((5, 1),)" in str(jaxpr)


def test_is_available_reports_reason():
    ok, reason = wk.is_available()
    assert isinstance(ok, bool) and reason


# ---------------------------------------------------------------- GPU


def _needs_gpu():
    try:
        has = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        has = False
    if not has or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        pytest.skip("needs a CUDA GPU (JAX sees none)")
    ok, reason = wk.is_available()
    if not ok:
        pytest.skip(f"needs a CUDA GPU of sm80+: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 4096])
def test_gpu_matches_reference(t, decay, dtype):
    """The defaults: the 'auto' algorithms (beyond one chunk, the two-pass forward with spans
    of one chunk and the two-pass backward) and mode 'factored_tf32' (weak decay takes its
    matmul form, in TF32 for bf16 inputs; strong decay its per-chunk fallback)."""
    _needs_gpu()
    check_against_reference(2, t, 2, 64, dtype, decay, seed=t)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("t", [65, 4096])
def test_gpu_bf16_log_decays_match_reference(t, decay):
    """bf16 inputs with bf16 log-decays (fla's convention; d log_w's in-span part in bf16)."""
    _needs_gpu()
    check_against_reference(2, t, 2, 64, jnp.bfloat16, decay, seed=t + 7, log_w_dtype=jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("t", [65, 1024])
def test_gpu_many_heads_matches_reference(t, decay, dtype):
    """The defaults at MANY_HEADS heads (B64 H4): the fused forward, keeping its chunk-entry
    states for the two-pass backward."""
    _needs_gpu()
    assert not wk.use_two_pass(64, 4, t, 16, "auto")
    check_against_reference(64, t, 4, 64, dtype, decay, seed=t + 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 65, 4096])
@pytest.mark.parametrize(
    "options",
    [
        dict(forward="fused", backward="fused"),
        dict(forward="fused", backward="two_pass"),
        dict(forward="fused", backward="two_pass", keep_states=False),
        dict(forward="two_pass", backward="two_pass"),
        dict(forward="two_pass", backward="two_pass", keep_states=True),
        dict(forward="two_pass", state_stride=64),
        dict(forward="two_pass", state_stride=32),
        dict(mode="loop"),
        dict(mode="factored", forward="fused", backward="fused"),
        dict(pass1_stride=64),
        dict(merge_dk_dv=True),
        dict(overlap_dr=False),
        dict(mode="factored"),
        dict(num_stages=1),
        dict(num_stages=2),
    ],
    ids=[
        "fused",
        "fused_kept",
        "fused_recomputed",
        "two_pass",
        "two_pass_kept",
        "stride64",
        "stride32",
        "loop",
        "factored_fused",
        "pass1_64",
        "merge_dk_dv",
        "dr_apart",
        "factored_ieee",
        "stages1",
        "stages2",
    ],  # fmt: skip
)
def test_gpu_algorithms_match_reference(options, t, dtype):
    """Each forward/backward algorithm explicitly, strong decay (B1: the two-pass backward's
    sequential passes split each head's value columns in four)."""
    _needs_gpu()
    with_kernel_options(**options)(1, t, 2, 64, dtype, "strong", seed=t + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("t", [65, 4096])
def test_gpu_decay_check_per_call_matches_reference(t, decay, dtype):
    """decay_check="call" on the GPU: weak decay takes the kernels without the per-chunk
    check (compiled by Triton, unlike in the interpreter), strong decay the checked ones."""
    _needs_gpu()
    with_kernel_options(decay_check="call")(2, t, 2, 64, dtype, decay, seed=t + 3)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("t", [65, 4096])
def test_gpu_factored_ieee_matches_reference(t, decay):
    """mode "factored", bf16 inputs: the factored contractions as IEEE float32 FMAs instead of
    the default's TF32 (weak decay takes them in every chunk) within the bf16 bounds."""
    _needs_gpu()
    with_kernel_options(mode="factored")(2, t, 2, 64, jnp.bfloat16, decay, seed=t + 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_decode_step_matches_reference(batch, dtype):
    """The decoding step kernel (T == 1): output, state and gradients, strong decay."""
    _needs_gpu()
    check_against_reference(
        batch, 1, 4, 64, dtype, "strong", seed=batch, kernel=wk.wkv6_kernel_step
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_decode_step_fuses_the_group_norm(batch, dtype):
    _needs_gpu()
    check_fused_group_norm(batch, dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["fused", "two_pass"])
@pytest.mark.parametrize("t", [1, 100])
def test_gpu_poisoned_outputs_all_written(t, backward):
    """Every kernel output (forward and backward) starts NaN-filled: any unwritten element
    would surface as NaN or as a mismatch."""
    _needs_gpu()
    _check_poisoned(t, interpret=False, backward=backward)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["strong", "weak"])
@pytest.mark.parametrize("backward", ["fused", "two_pass"])
def test_gpu_poisoned_outputs_all_written_decay_check_per_call(backward, decay):
    """decay_check="call": every output written by whichever launch of each pair computes
    (weak decay: the kernels without the per-chunk check; strong: the checked ones)."""
    _needs_gpu()
    _check_poisoned(100, interpret=False, backward=backward, decay=decay, decay_check="call")


def _check_poisoned(t, interpret, backward="auto", decay="strong", decay_check="chunk"):
    b, h, n = (1, 1, 16) if interpret else (2, 3, 64)
    ins, dy, dst = make_inputs(1, b, t, h, n, jnp.float32, decay)
    mode = "3d" if interpret else "factored"  # "3d" interprets faster on CPU
    kw = dict(interpret=interpret, poison_outputs=True, mode=mode, backward=backward,
              decay_check=decay_check)  # fmt: skip
    fn = lambda *a: wk.wkv6_kernel(*a, **kw)  # noqa: E731
    y, st = jax.jit(fn)(*ins)
    y_ref, st_ref, grads_ref = reference_and_grads(ins, dy, dst)
    assert rel_rms(y, y_ref) < 1e-4 and rel_rms(st, st_ref) < 1e-4
    grads = jax.jit(jax.grad(_loss(fn, dy, dst), argnums=range(6)))(*ins)
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert rel_rms(g, g_ref) < 5e-4, name


def test_interpret_poisoned_outputs_all_written():
    """T=20 (two chunks), the two-pass backward; the fused one is poison-checked on the GPU."""
    _check_poisoned(20, interpret=True, backward="two_pass")


def test_interpret_empty_sequence_float16_and_mixed_dtypes():
    _check_empty_float16_and_mixed(interpret=True)


@pytest.mark.gpu
def test_gpu_empty_sequence_float16_and_mixed_dtypes():
    _needs_gpu()
    _check_empty_float16_and_mixed(interpret=False)


def _check_empty_float16_and_mixed(interpret):
    """T = 0 passes the state through (a min over no decays raised); float16 runs as
    float32 (it ran as bf16: state 2e-3 off); a float32 k, v beside a bf16 r is not
    rounded to bf16 (state 2e-3 off). Bounds: relative RMS against the float64 reference
    of the same values; y in r's dtype."""
    ins, _, _ = make_inputs(31, 1, 0, 1, 16, jnp.float32, "weak")
    y, st = wk.wkv6_kernel(*ins, interpret=interpret)
    assert y.shape == (1, 0, 1, 16)
    np.testing.assert_array_equal(np.asarray(st), np.asarray(ins[5]))

    ins, _, _ = make_inputs(32, 1, 33, 1, 16, jnp.float32, "strong")
    half = [x.astype(jnp.float16) for x in ins[:3]] + ins[3:]
    exact = [x.astype(jnp.float32) for x in half]  # the float16 values, exactly
    y_ref, st_ref = ref_wkv6(*exact)
    y, st = wk.wkv6_kernel(*half, interpret=interpret)
    assert y.dtype == jnp.float16 and st.dtype == jnp.float32
    assert rel_rms(st, st_ref) < 1e-5 and rel_rms(y, y_ref) < 1e-3  # y: float16 rounding

    mixed = [ins[0].astype(jnp.bfloat16), *ins[1:]]
    y_ref, st_ref = ref_wkv6(*[x.astype(jnp.float32) for x in mixed])
    y, st = wk.wkv6_kernel(*mixed, interpret=interpret)
    assert y.dtype == jnp.bfloat16
    assert rel_rms(st, st_ref) < 1e-5 and rel_rms(y, y_ref) < 1e-2
