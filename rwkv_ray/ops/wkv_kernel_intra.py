"""Intra-chunk pieces of the fused WKV6 kernel (rwkv_ray/ops/wkv_kernel*.py): log-decay
cumsums kept precise under very strong decay, the decay factors, and the three contractions with
M[t, s, i] = exp(Ae_t[i] - A_s[i]) (s < t). Pure jax; traced inside Pallas kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _mm(a, b, mm_dtype, dims=None, tf32=False):
    """a @ b (or dot_general with dims), operands in mm_dtype, float32 accumulation. Float32
    operands use exact IEEE float32 (Precision.HIGHEST), or with `tf32` Precision.DEFAULT:
    TF32 on the tensor cores."""
    a, b = a.astype(mm_dtype), b.astype(mm_dtype)
    prec = lax.Precision.HIGHEST if mm_dtype == F32 and not tf32 else None
    dims = dims or (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


# Log-decays are clamped at -_BIG before they are summed: a factor exp(-50) ~ 2e-22 makes no
# visible change to a float32 state (to 2e-22 of it) against the exact 0 of a -1e3 decay, and
# keeps the other exponents of its chunk precise: a difference of two cumsums of size ~50 per
# strong decay instead of ~1e3 or more. (Counting such decays apart from the sums, as until
# 2026-11-28, was exact too but doubled every scan and reduction of the sequential passes.)
_BIG = 50.0


def _clamp(lw):
    return jnp.maximum(lw, -_BIG)


def _chunk_terms(lw):
    """Inclusive / exclusive cumsums of the clamped log-decays over the chunk, and its total."""
    ws = _clamp(lw)
    a_inc = jnp.cumsum(ws, axis=0)
    return a_inc, a_inc - ws, jnp.sum(ws, axis=0)


def _dexp(x, y=None):
    """exp(x - y) for cumsums x after y (exponent <= 0; clamped for rounding). y=None means
    the chunk start."""
    return jnp.exp(jnp.minimum(x if y is None else x - y, 0.0))


def _iota(chunk, axis):
    return lax.broadcasted_iota(jnp.int32, (chunk, chunk), axis)


def _m3d(inc, exc, chunk):
    """M[t, s, i] = exp(Ae_t[i] - A_s[i]) for s < t, else 0."""
    causal = (_iota(chunk, 0) > _iota(chunk, 1))[:, :, None]
    return jnp.where(causal, _dexp(exc[:, None, :], inc[None, :, :]), 0.0)


def _row(ref, base, j):
    return ref[pl.ds(base + j, 1), :].astype(F32)  # [1, N]


def _add_row(a, w_ref, base, j):
    return a + _clamp(_row(w_ref, base, j))


# The three intra-chunk contractions with M. "3d": one [C, C, N] broadcast; "loop": C steps
# of [C, N] work, one key/row at a time (rows re-read from L1/L2), less register pressure.
# "factored": M[t, s, i] = exp(Ae_t[i] - ref[i]) * exp(ref[i] - A_s[i]) with ref the
# exclusive cumsum at the chunk's middle row, so each contraction is one matmul of scaled
# operands (2 C N exps instead of C^2 N); taken per chunk when every one of those exponents
# lies within +-_FACTOR_LIMIT (no float32 overflow or underflow), else "loop".
_FACTOR_LIMIT = 60.0


def _factors(inc, exc, chunk):
    """(exp(Ae_t - ref) [C, N], exp(ref - A_s) [C, N], whether the factored form is exact)."""
    rows = lax.broadcasted_iota(jnp.int32, exc.shape, 0)
    # A masked sum, not a slice: Pallas' Triton backend cannot slice a value.
    ref = jnp.sum(jnp.where(rows == chunk // 2, exc, 0.0), axis=0, keepdims=True)
    up, down = exc - ref, ref - inc
    bound = jnp.maximum(jnp.max(jnp.abs(up)), jnp.max(jnp.abs(down)))
    ok = bound < _FACTOR_LIMIT
    return jnp.exp(jnp.minimum(up, _FACTOR_LIMIT)), jnp.exp(jnp.minimum(down, _FACTOR_LIMIT)), ok


# A mode with this suffix takes the factored form everywhere without the per-chunk check
# (and without the "loop" code in the kernel: 126 -> 87 registers in the forward's output
# kernel, 25% -> 31% occupancy on an H200). _call (wkv_kernel_call.py) launches it only for
# the heads where `factored_everywhere` holds.
UNCHECKED = "_unchecked"


def factored_everywhere(log_w, chunk):
    """Whether every chunk's factored form is exact, per batch row and head, from the
    log-decays alone. `_factors`' largest exponents are the sums of the clamped log-decays
    over each half of the chunk (from the middle row to either end), so it holds where every
    half-chunk sums above -_FACTOR_LIMIT (with 1% to spare for the cumsums' rounding): one
    -50 decay a half passes, two do not. log_w [B, T, H, N] with T a multiple of chunk (as
    `_wkv6` gets it). A [B, H] bool array (False where a log-decay is NaN)."""
    b, t, h, n = log_w.shape
    half = chunk // 2
    sums = jnp.sum(_clamp(log_w.astype(F32)).reshape(b, t // half, half, h, n), axis=2)
    # NaN as -inf: XLA's CPU min reduction drops NaNs in long rows (seen at T = 4112).
    sums = jnp.where(jnp.isnan(sums), -jnp.inf, sums)
    return jnp.min(sums, axis=(1, 3)) > -0.99 * _FACTOR_LIMIT


def factored_everywhere_kernel(log_w, chunk, interpret=False, num_warps=None, per_program=4):
    """`factored_everywhere` (the reference above) as one Pallas kernel that reads log_w
    once: a program per batch row, head and `per_program` half-chunks gives their least
    sum, and an XLA min over those decides. XLA's form writes the [B, T / half, H, N]
    float32 sums and reads them back. On an H200 (2026-11-29, `bench_decay_gate.py`): bf16
    B8 T4096 50.1 us for XLA's two reductions, 34.1 us here; float32 B4 T4096 43.3 against
    34.5. Small programs, each thread loading 128 bytes, were the fastest: 4 half-chunks a
    program with 1 warp for bf16 and 2 for float32 (`num_warps` None; 4 warps took 62 us
    and 32 half-chunks with 4 warps 79)."""
    b, t, h, n = log_w.shape
    half = chunk // 2
    halves = t // half
    per_program = math.gcd(halves, per_program)  # a power of 2: t is a multiple of chunk
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        warps = num_warps or max(1, jnp.dtype(log_w.dtype).itemsize // 2)
        params = plt.CompilerParams(num_warps=warps, num_stages=1)
    least = pl.pallas_call(
        _least_half_sum_kernel,
        grid=(b, h, halves // per_program),
        in_specs=[
            pl.BlockSpec((None, per_program, half, None, n), lambda b_, h_, c: (b_, c, 0, h_, 0))
        ],
        out_specs=pl.BlockSpec((None, None, None), lambda b_, h_, c: (b_, h_, c)),
        out_shape=jax.ShapeDtypeStruct((b, h, halves // per_program), F32),
        compiler_params=params,
        interpret=interpret,
        name="wkv6_decay_gate",
    )(log_w.reshape(b, halves, half, h, n))
    return jnp.min(least, axis=2) > -0.99 * _FACTOR_LIMIT


def _least_half_sum_kernel(lw_ref, out_ref):
    lw = lw_ref[...].astype(F32)  # [half-chunks, half, N]
    # The clamp written so that a NaN stays NaN (a max could drop it), and a NaN sum counts
    # as -inf: the reference's min propagates NaN, which fails its test.
    sums = jnp.sum(jnp.where(lw < -_BIG, -_BIG, lw), axis=1)
    out_ref[...] = jnp.min(jnp.where(sums == sums, sums, -jnp.inf))


def _checked(ok, factored, loop, mode):
    """factored() where `ok` (per chunk), else loop(); factored() alone in UNCHECKED modes."""
    return factored() if mode.endswith(UNCHECKED) else lax.cond(ok, factored, loop)


def _causal(x, chunk):
    """x [C, C] (indexed [t, s]) with the pairs s >= t zeroed."""
    return jnp.where(_iota(chunk, 0) > _iota(chunk, 1), x, 0.0)


def _exact_mm(a, b, dims=None, mode="factored"):
    """The factored contractions: IEEE float32, so the factored path keeps "loop"'s accuracy
    ("factored"), or TF32 on the tensor cores ("factored_tf32": 10-bit mantissas, for bf16
    inputs, whose P and intra terms are rounded to bf16 or added to bf16-rounded terms)."""
    return _mm(a, b, F32, dims, tf32=mode.startswith("factored_tf32"))


def _intra_p(r, k, inc, exc, k_ref, w_ref, base, chunk, mode):
    """P[t, s] = sum_i r_t[i] k_s[i] M[t, s, i]."""
    if mode.startswith("factored"):
        q, kk, ok = _factors(inc, exc, chunk)
        return _checked(
            ok,
            lambda: _causal(_exact_mm(r * q, k * kk, _NT, mode), chunk),
            lambda: _intra_p(r, k, inc, exc, k_ref, w_ref, base, chunk, "loop"),
            mode,
        )
    if mode == "3d":
        return jnp.sum(r[:, None, :] * k[None, :, :] * _m3d(inc, exc, chunk), axis=2)
    t_idx, s_idx = _iota(chunk, 0), _iota(chunk, 1)
    p = jnp.zeros((chunk, chunk), F32)
    a_s = jnp.zeros((1, r.shape[1]), F32)
    for j in range(chunk - 1):
        a_s = _add_row(a_s, w_ref, base, j)
        col = jnp.sum(r * _row(k_ref, base, j) * _dexp(exc, a_s), axis=1, keepdims=True)
        p = p + jnp.where((s_idx == j) & (t_idx > j), col, 0.0)
    return p


# d(log_w) is a suffix sum of r * dr - k * dk whose largest terms (neighbouring tokens, M = 1)
# cancel, so where every log-decay is strong and the true d(log_w) tiny, its relative error is
# large though its absolute error is not: every log_w near -12, chunk 16, float32, 5.1e-3
# relative RMS on an H200 (2026-11-29; other gradients <= 4e-6). Taking dr's and dk's
# exponents from the same cumsums in "loop" brought it to 7.5e-4 in the interpreter, but on
# the GPU it stayed at 5.1e-3 (presumably the two kernels round their cumsums differently)
# and the fallback path took 9% longer (B8 T4096 f+b 7.17 -> 7.83 ms): not kept.
def _intra_dr(d, k, inc, exc, k_ref, w_ref, base, chunk, mode):
    """out[t, i] = sum_s D[t, s] k_s[i] M[t, s, i]."""
    if mode.startswith("factored"):
        q, kk, ok = _factors(inc, exc, chunk)
        return _checked(
            ok,
            lambda: q * _exact_mm(_causal(d, chunk), k * kk, None, mode),
            lambda: _intra_dr(d, k, inc, exc, k_ref, w_ref, base, chunk, "loop"),
            mode,
        )
    if mode == "3d":
        return jnp.sum(d[:, :, None] * k[None, :, :] * _m3d(inc, exc, chunk), axis=1)
    t_idx, s_idx = _iota(chunk, 0), _iota(chunk, 1)
    out = jnp.zeros_like(k)
    a_s = jnp.zeros((1, k.shape[1]), F32)
    for j in range(chunk - 1):
        a_s = _add_row(a_s, w_ref, base, j)
        d_col = jnp.sum(jnp.where((s_idx == j) & (t_idx > j), d, 0.0), axis=1, keepdims=True)
        out = out + d_col * _row(k_ref, base, j) * _dexp(exc, a_s)
    return out


def _intra_dk(d, d_t, r, inc, exc, r_ref, w_ref, base, chunk, mode):
    """out[s, i] = sum_t D[t, s] r_t[i] M[t, s, i]; d_t = D^T (modes "loop", "factored*")."""
    if mode.startswith("factored"):
        q, kk, ok = _factors(inc, exc, chunk)
        return _checked(
            ok,
            lambda: kk * _exact_mm(_causal(d, chunk), r * q, _TN, mode),
            lambda: _intra_dk(d, d_t, r, inc, exc, r_ref, w_ref, base, chunk, "loop"),
            mode,
        )
    if mode == "3d":
        return jnp.sum(d[:, :, None] * r[:, None, :] * _m3d(inc, exc, chunk), axis=0)
    s_idx, t_idx = _iota(chunk, 0), _iota(chunk, 1)  # d_t is indexed [s, t]
    out = jnp.zeros_like(r)
    ae_t = _clamp(_row(w_ref, base, 0))  # exclusive cumsum at t = 1
    for j in range(1, chunk):
        d_col = jnp.sum(jnp.where((t_idx == j) & (s_idx < j), d_t, 0.0), axis=1, keepdims=True)
        out = out + d_col * _row(r_ref, base, j) * _dexp(ae_t, inc)
        ae_t = _add_row(ae_t, w_ref, base, j)
    return out


def _decay_factors(inc, exc, last):
    """exp(Ae) (rows to chunk start), exp(A_last - A) (rows to chunk end), exp(A_last)."""
    return _dexp(exc), _dexp(last[None, :], inc), _dexp(last)[:, None]
