"""Fused WKV6 kernel for JAX on CUDA GPUs: Pallas (Triton backend), forward and custom VJP.

Layouts (fixed across rwkv_ray): r, k, v, log_w are [B, T, H, N]; u is [H, N]; the state is
[B, H, N, N] indexed [key, value], float32. `log_w` is the log-decay (<= 0; may be very
negative). Per head, with S_{-1} = initial state:

    y_t[j] = sum_i r_t[i] * (S_{t-1}[i, j] + u[i] k_t[i] v_t[j])
    S_t    = exp(log_w_t)[:, None] * S_{t-1} + k_t v_t^T          (no r.k scaling)

Algorithm ("auto" below: two-pass both ways beyond one chunk). The chunk step, as in fla's
chunk_rwkv6, over chunks of `chunk_size` tokens with the state in registers:
with A = inclusive cumsum of log_w inside the chunk, Ae = A - log_w (exclusive), a = A_last,

    y     = (r * exp(Ae)) @ S + P @ v + (r.u.k) v,   P[t, s] = sum_i r_t k_s exp(Ae_t - A_s), s < t
    S_new = exp(a) * S + (k * exp(a - A))^T @ v

Every exponent is <= 0, and log-decays are clamped at -50 before they are summed
(wkv_kernel_intra.py: exp(-50) ~ 2e-22 stands for 0), so any log-decay (down to -inf) is
safe. The intra-chunk matrix P (and the backward's intra-chunk terms) are one matmul of
operands scaled around the chunk's middle row wherever every such exponent is small (mode
"factored"; other chunks fall back to "loop"), or computed exactly key-column by key-column
("loop") or in a [C, C, N] broadcast ("3d").
On an H100 (B8 T4096) "factored" took the forward+backward from 9.05 to 6.49 ms; its matmuls
in TF32 on the tensor cores for bf16 inputs ("factored_tf32", the default) from 6.26 to
4.94 ms (2026-11-28); the clamped decays with 3 pipeline stages in the sequential passes
("KERNEL_STAGES") from 4.92 to 4.15 ms on an H200 (2026-11-28).
Forward, "fused": one sequential Triton program per (b, h) and value-column block
(`value_splits`), which also stores the state entering every chunk for the two-pass backward
when differentiated (`_keeps_states`). Forward, "two_pass": a sequential kernel stores the
state entering every span of `state_stride` tokens, then every span runs its chunks in
parallel with the others.
Backward, "fused": one forward-direction kernel recomputes S and gives dr's state part; one
reverse-direction kernel carries dL/dS and gives dr, dk, dv, d(log_w) (a running suffix sum
of r*dr - k*dk plus the final-state term), d(u) and the initial state's gradient.
Backward, "two_pass" (derivation in wkv_kernel_bwd.py): the states entering and
the state gradients leaving every span (two cheap sequential kernels), then every span's
gradients in parallel (three kernels: dr; dk, d(log_w)'s in-span part, d(u); dv, which also
adds d(log_w)'s sum over later spans, a reverse cumsum of dk's span totals). With
`pass1_stride` both sequential passes step over longer blocks (float32 block states) and a
parallel kernel fills in every span's state from its block's: fewer sequential steps for a
long sequence with few programs.

Matmul operands are in the input dtype (bf16 -> tensor cores; float32 -> exact IEEE float32),
accumulation and state in float32. `interpret=True` runs the same kernels on CPU.

Files: this one holds the custom VJP, `is_available` and the public `wkv6_kernel` (and
re-exports `value_splits`, `use_two_pass`, `use_two_pass_backward`); wkv_kernel_fwd.py the
forward kernels and launchers; wkv_kernel_bwd.py the backward ones; wkv_kernel_call.py the
shared pallas_call / BlockSpec helpers; wkv_kernel_intra.py the intra-chunk math;
wkv_kernel_step.py the one-token step of decoding (`wkv6_kernel_step`, re-exported).
These modules import only jax; the dispatcher (rwkv_ray/ops/wkv.py) imports this one lazily.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rwkv_ray.ops.wkv_kernel_bwd import _backward_fused, _backward_two_pass, use_two_pass_backward
from rwkv_ray.ops.wkv_kernel_call import _Opts
from rwkv_ray.ops.wkv_kernel_fwd import (
    _forward,
    _forward_fused,
    _forward_two_pass,
    use_two_pass,
    value_splits,
)
from rwkv_ray.ops.wkv_kernel_intra import F32, factored_everywhere_kernel
from rwkv_ray.ops.wkv_kernel_step import wkv6_kernel_step

__all__ = [
    "MAX_BLOCK",
    "is_available",
    "use_two_pass",
    "use_two_pass_backward",
    "value_splits",
    "wkv6_kernel",
    "wkv6_kernel_step",
]

# The most tokens a kernel takes one cumsum of log-decays over (a chunk, a span, a step of
# the sequential passes). Decays are clamped at -50 a token, so a cumsum reaches -50 * length
# and exp(last - cumsum) loses float32 digits with it: spans of 256 tokens at T = 4096 with
# strong decay were off by 2.7e-4 in the state and 1.1e-3 in d log_w (float32, an H200,
# 2026-11-28), against 1e-4 / 5e-4 bounds that spans and steps of 64 pass. (With 3 pipeline
# stages a 256-token step also asked for 352 KiB of shared memory; an H200 has 227.)
MAX_BLOCK = 64

# ----------------------------------------------------------------------------- custom VJP


def _gated(log_w, chunk, opts):
    """opts with decay_check="call"'s gate for the factored modes: `factored_everywhere` as a
    [B * H] int32 array (see _call), which the backward reuses."""
    if opts.decay_check != "call" or not opts.mode.startswith("factored"):
        return opts
    gate = factored_everywhere_kernel(log_w, chunk, opts.interpret, opts.num_warps)
    return opts._replace(gate=gate.astype(jnp.int32).reshape(-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _wkv6(r, k, v, log_w, u, s0, chunk, opts):
    return _forward(r, k, v, log_w, u, s0, chunk, _gated(log_w, chunk, opts))


def _keeps_states(r, chunk, opts):
    """Whether the forward hands its chunk-entry states to the two-pass backward (which
    otherwise recomputes them). keep_states=None: where the forward is fused (it stores them
    as it goes, about 0.03 ms at B8 T4096 against a 0.36 ms pass in the backward); the
    two-pass forward computes them anyway, and when both directions are traced in one jit XLA
    merges its pass with the backward's identical one. The fused forward stores one state
    per chunk, so it keeps them only with one chunk per span."""
    b, t, h, _ = r.shape
    if opts.keep is False or not use_two_pass_backward(b, h, t, chunk, opts.backward):
        return False
    if use_two_pass(b, h, t, chunk, opts.forward):
        return opts.keep is True
    return opts.stride == chunk


def _wkv6_fwd(r, k, v, log_w, u, s0, chunk, opts):
    keep, opts = _keeps_states(r, chunk, opts), _gated(log_w, chunk, opts)
    b, t, h, _ = r.shape
    if not keep:
        (y, st), hs = _forward(r, k, v, log_w, u, s0, chunk, opts), None
    elif use_two_pass(b, h, t, chunk, opts.forward):
        y, st, hs = _forward_two_pass(r, k, v, log_w, u, s0, chunk, opts)
    else:
        y, st, hs = _forward_fused(r, k, v, log_w, u, s0, chunk, opts, with_states=True)
    return (y, st), (r, k, v, log_w, u, s0, st, hs, opts.gate)


def _wkv6_bwd(chunk, opts, res, cts):
    dy, dst = cts
    r, k, v, log_w, u, s0, st, hs, gate = res
    b, t, h, _ = r.shape
    opts = opts._replace(gate=gate)
    args = (r, k, v, log_w, u, s0, st, dy.astype(r.dtype), dst.astype(F32), chunk, opts)
    if use_two_pass_backward(b, h, t, chunk, opts.backward):
        return _backward_two_pass(*args, hs=hs)
    return _backward_fused(*args)


_wkv6.defvjp(_wkv6_fwd, _wkv6_bwd)


# ----------------------------------------------------------------------------- public op


def is_available() -> tuple[bool, str]:
    """(ok, reason): a JAX CUDA GPU of compute capability >= 8.0 with Pallas' Triton backend."""
    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError as e:
        return False, f"no JAX GPU backend ({e})"
    if not gpus:
        return False, f"no JAX GPU device (backend {jax.default_backend()!r})"
    cc = getattr(gpus[0], "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return False, f"not a CUDA GPU (compute capability {cc!r})"
    if major < 8:
        return False, f"needs sm80+, found compute capability {cc}"
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as e:
        return False, f"Pallas Triton backend missing ({e})"
    return True, f"CUDA GPU {gpus[0].device_kind} (sm{str(cc).replace('.', '')})"


def head_size_reason(n: int) -> str | None:
    """Why the kernels cannot tile head size n (None: they can): powers of 2 from 16."""
    if n < 16 or n & (n - 1):
        return f"head size N must be a power of 2 >= 16, got {n}"
    return None


def check_chunk_size(chunk_size: int) -> None:
    """ValueError unless chunk_size is one the kernel tiles: a power of 2 in [16, MAX_BLOCK]."""
    if chunk_size < 16 or chunk_size > MAX_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of 2 in [16, {MAX_BLOCK}], got {chunk_size}")


@functools.partial(
    jax.jit,
    static_argnames=(
        "chunk_size",
        "interpret",
        "poison_outputs",
        "num_warps",
        "num_stages",
        "mode",
        "forward",
        "backward",
        "keep_states",
        "state_stride",
        "pass1_stride",
        "merge_dk_dv",
        "state_splits",
        "overlap_dr",
        "decay_check",
    ),
)
def wkv6_kernel(
    r,
    k,
    v,
    log_w,
    u,
    initial_state=None,
    *,
    chunk_size=16,
    interpret=False,
    poison_outputs=False,
    num_warps=None,
    num_stages=None,
    mode="factored_tf32",
    forward="auto",
    backward="auto",
    keep_states=None,
    state_stride=None,
    pass1_stride=None,
    merge_dk_dv=False,
    state_splits=None,
    overlap_dr=True,
    decay_check="call",
):
    """Fused WKV6 (RWKV x060). r, k, v, log_w: [B, T, H, N]; u: [H, N]; state [B, H, N, N]
    ([key, value], float32). log_w is the log-decay (<= 0). Returns (y [B, T, H, N] in r's
    dtype, final_state float32). Differentiable in every input, the initial state included.

    `interpret=True` runs the kernels in Pallas' interpreter (CPU); `poison_outputs=True`
    NaN-fills every kernel output buffer first (a testing aid for unwritten elements);
    `num_warps` / `num_stages` are Triton's (None: each kernel's measured best,
    `KERNEL_WARPS` / `KERNEL_STAGES` in wkv_kernel_call.py); `mode` picks the intra-chunk
    code ("loop", "3d" or "factored": matmuls of scaled operands where exact, else "loop";
    see _intra_p; "factored_tf32", the default: those matmuls in TF32 for bf16 inputs, whose
    terms are rounded to bf16 anyway, and "factored" for float32 ones);
    `forward` the forward algorithm: "fused" (one sequential kernel), "two_pass" (span-entry
    states, then all spans' outputs in parallel) or "auto" (`use_two_pass`);
    `backward` likewise ("fused": two sequential kernels; "two_pass": span-entry states and
    span-exit state gradients, then all spans' gradients in parallel; "auto":
    `use_two_pass_backward`); `keep_states` whether the forward's span-entry states go to
    the two-pass backward instead of being recomputed there (one sequential pass less, but
    [B, H, T/span, N, N] in `stack_dtype` held from forward to backward): True, False, or
    None (the default: where the forward is fused, which stores them as it goes; the two-pass
    forward computes them anyway, and XLA merges its pass with the backward's identical one
    when both are traced in one jit);
    `state_stride` (a power of 2 from chunk_size to MAX_BLOCK; None: chunk_size) the span of
    both two-pass directions: the tokens between the states their sequential passes store,
    and the tokens each parallel program walks chunk by chunk (see _forward_two_pass). On an
    H100 (B8 T4096, forward only, before spans were unrolled) one chunk measured fastest.
    `pass1_stride` (None: the span; at most MAX_BLOCK) the tokens per step of both
    sequential passes when longer: they store a float32 state per block of that many tokens,
    then a parallel kernel fills in every span's from it (`pass1_length`; fewer sequential
    steps where a long sequence has few programs). `merge_dk_dv=True` runs the two-pass
    backward's dk and dv kernels as one (one read of the state gradients and the shared
    loads, more live registers).
    `state_splits` (None: `value_splits`) how many value-column blocks the sequential
    kernels (the fused forward, both two-pass directions' passes) split each head into (more
    programs, each recomputing the intra-chunk terms).
    `overlap_dr=True` launches the two-pass backward's dr kernel together with its
    sequential state-gradient pass, whose few programs leave most SMs idle
    (`_state_grads_and_dr`; not with a longer pass1_stride).
    `decay_check` where the factored modes check that their form is exact: "call" (the
    default: once, from the log-decays: `factored_everywhere`, per batch row and head, true
    where every half-chunk's log-decays sum above -59.4; each kernel with intra-chunk terms
    but dk and dv then launches twice, without the check and the "loop" code for the heads
    where it holds, with them for the others, each program of the other launch returning at
    once: see _call) or "chunk" (in every kernel program, falling back to "loop" code
    there). On an H200 (B8 T4096, 2026-11-28) kernels without the check took the output
    kernel from 126 to 87 registers and 0.616 to 0.502 ms, the state gradients + dr 0.957 ->
    0.771, dv 0.578 -> 0.510; dk 0.935 -> 0.983 (so the dk kernel keeps its check, and dv
    too: its gain was less than the returning launch's cost, and fallen-back heads ran
    slower behind the gate, BENCHMARKS.md); with both launches "call" took forward +
    backward from 3.729 to 3.521 ms back to back (the launches that return at once cost
    about 0.04 ms each) and the 1.6B full-tuning step from 46.98k to 47.83k tokens/s (+1.8%,
    crossed on two GPUs).

    Example: y, s = wkv6_kernel(r, k, v, -jnp.exp(w_raw), u, s0)
    """
    b, t, h, n = r.shape
    for name, x in (("k", k), ("v", v), ("log_w", log_w)):
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {x.shape}, expected r's {r.shape}")
    if u.shape != (h, n):
        raise ValueError(f"u has shape {u.shape}, expected {(h, n)}")
    check_chunk_size(chunk_size)
    modes = ("loop", "3d", "factored", "factored_tf32")
    if mode not in modes:
        raise ValueError(f"mode must be one of {', '.join(map(repr, modes))}, got {mode!r}")
    if decay_check not in ("chunk", "call"):
        raise ValueError(f"decay_check must be 'chunk' or 'call', got {decay_check!r}")
    if forward not in ("auto", "fused", "two_pass"):
        raise ValueError(f"forward must be 'auto', 'fused' or 'two_pass', got {forward!r}")
    if backward not in ("auto", "fused", "two_pass"):
        raise ValueError(f"backward must be 'auto', 'fused' or 'two_pass', got {backward!r}")
    state_stride = state_stride or chunk_size
    # Powers of 2: Triton's blocks are (a span is one, a sequential step's block another).
    if state_stride < chunk_size or state_stride > MAX_BLOCK or state_stride & (state_stride - 1):
        raise ValueError(
            f"state_stride must be a power of 2 in [chunk_size {chunk_size}, {MAX_BLOCK}], "
            f"got {state_stride}"
        )
    pass1_stride = pass1_stride or state_stride
    if pass1_stride < state_stride or pass1_stride > MAX_BLOCK or pass1_stride % state_stride:
        raise ValueError(
            f"pass1_stride must be a multiple of state_stride {state_stride} up to {MAX_BLOCK}, "
            f"got {pass1_stride}"
        )
    unsupported = head_size_reason(n)
    if unsupported:
        raise ValueError(unsupported)
    if state_splits is not None and (state_splits < 1 or state_splits & (state_splits - 1)
                                     or n // state_splits < 16):  # fmt: skip
        raise ValueError(
            f"state_splits must be a power of 2 leaving >= 16 value columns, got {state_splits}"
        )
    if initial_state is None:
        initial_state = jnp.zeros((b, h, n, n), F32)
    elif initial_state.shape != (b, h, n, n):
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {(b, h, n, n)}")
    if t == 0:  # an empty sequence: no output, the state passes through
        return jnp.zeros(r.shape, r.dtype), initial_state.astype(F32)
    # One matmul dtype for r, k, v: their promotion (a float32 k or v beside a bf16 r is
    # not rounded to bf16); float16 runs as float32 (the kernels' operands are bf16 or
    # float32, and bf16 would drop float16's 3 extra mantissa bits). y comes back in r's.
    out_dtype = r.dtype
    dt = jnp.result_type(r.dtype, k.dtype, v.dtype)
    if dt == jnp.float16:
        dt = jnp.dtype(F32)
    r, k, v = (x.astype(dt) for x in (r, k, v))
    if mode == "factored_tf32" and dt == jnp.float32:
        mode = "factored"  # float32 inputs keep IEEE float32 contractions (1e-4 bounds)
    # Whole chunks; beyond one span of the two-pass algorithms, whole spans. Padded steps have
    # k = 0 and log_w = 0, so they change no state, and their outputs are cut off.
    pad = (-t) % (chunk_size if t <= state_stride else state_stride)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        r, k, v, log_w = (jnp.pad(x, widths) for x in (r, k, v, log_w))
    opts = _Opts(
        interpret,
        poison_outputs,
        num_warps,
        num_stages,
        mode,
        forward,
        backward,
        keep_states,
        state_stride,
        pass1_stride,
        merge_dk_dv,
        state_splits,
        overlap_dr,
        decay_check,
        None,  # gate: set inside, from log_w (decay_check="call")
    )
    batched = (True, True, True, True, False, True)  # r, k, v, log_w, u, initial_state
    kernel = per_device_rows(lambda *args: _wkv6(*args, chunk_size, opts), b, batched, 2)
    y, st = kernel(r, k, v, log_w, u, initial_state.astype(F32))
    return y[:, :t].astype(out_dtype), st


def per_device_rows(fn, batch: int, batched: tuple, outputs: int):
    """fn, or under a context mesh of several devices (`jax.set_mesh`; the training step sets
    its data-parallel mesh) fn on each device's rows: shard_map with the batch split over
    every mesh axis. `batched` says which arguments have the batch as their first axis (the
    others are replicated); fn returns `outputs` arrays, all batched. XLA cannot partition a
    Pallas kernel; it would gather the whole batch onto every device and compute all of it
    there. The gradient of a replicated argument (u) sums over the devices (shard_map's
    transpose adds the psum)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return fn
    rows = P(tuple(mesh.axis_names))
    in_specs = tuple(rows if is_batched else P() for is_batched in batched)
    out_specs = (rows,) * outputs if outputs > 1 else rows
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
