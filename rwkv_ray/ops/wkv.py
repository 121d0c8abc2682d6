"""`wkv6`: the one WKV6 entry point, choosing between the implementations per call.

Shapes (B batch, T steps, H heads, N head size):
  r, k, v, log_w: [B,T,H,N]; u (the bonus, "time_faaaa"): [H,N];
  state: [B,H,N,N] indexed [key i, value j], always float32.
`log_w` is the log of the decay (<= 0; RWKV6: log_w = -exp(w_raw)). Per step:
  y_t[j] = sum_i r_t[i] * (S_{t-1}[i,j] + u[i] * k_t[i] * v_t[j])
  S_t    = exp(log_w_t)[:, None] * S_{t-1} + k_t^T v_t

Implementations (`impl`, else env RWKV_WKV_IMPL, else legacy env OPS_KERNEL, else 'auto'):
  'scan'    one step per token (`wkv_scan`), the reference;
  'chunked' exact chunked matrix form (`wkv_chunked`), pure keras.ops, any backend;
  'kernel'  the fused GPU kernel, `rwkv_ray.ops.wkv_kernel` (JAX only), which must provide
            `is_available() -> (ok, reason)` and `wkv6_kernel(r, k, v, log_w, u,
            initial_state=None, *, chunk_size=...)` (chunk_size passed only when given);
  'auto'    the kernel when available, else 'chunked' (the reason is logged once).
A single step (T == 1, decoding) skips the chunk machinery: the kernel module's
`wkv6_kernel_step` (one kernel updating the state in place) when 'kernel' is chosen, else
`wkv6_single_step`.
An explicit request that cannot be met raises; nothing falls back silently.
"""

from __future__ import annotations

import importlib
import logging
import numbers
import os

import keras

from rwkv_ray.ops.wkv_chunked import wkv6_chunked
from rwkv_ray.ops.wkv_scan import wkv6_scan, wkv6_single_step

WKV_IMPLS = ("auto", "scan", "chunked", "kernel")
KERNEL_MODULE = "rwkv_ray.ops.wkv_kernel"
# Legacy switch of the seed project: OPS_KERNEL=1 meant "pure ops", 0 the CUDA kernel.
LEGACY_OPS_KERNEL = {"1": "chunked", "0": "kernel"}

logger = logging.getLogger("rwkv_ray.ops")
_fallback_logged = False  # the only global state: 'auto' explains its fallback once


def wkv6(
    r, k, v, log_w, u, initial_state=None, *, impl: str | None = None, chunk_size=None,
    group_norm=None, output_gate=None, output_gate_silu=False,
):  # fmt: skip
    """WKV6 over a sequence. Shapes and the meaning of `impl` in the module docstring.

    Args:
        r, k, v: receptance, key, value [B,T,H,N] (any float dtype; computed in float32).
        log_w: log-decay [B,T,H,N], <= 0.
        u: bonus [H,N].
        initial_state: [B,H,N,N] [key, value] float32, or None for zeros.
        impl: one of WKV_IMPLS, or None for the environment's choice.
        chunk_size: steps per chunk for 'chunked' / 'kernel'; None: the implementation's
            default (chunked: `wkv_chunked.DEFAULT_CHUNK_SIZE`, measured on CPU). The
            kernel takes powers of 2 in [16, 64]: under 'auto' a size must suit the one
            that runs (a GPU's kernel refuses 4, the CPU's chunked form takes it).
        group_norm: None, or (gamma [H,N], beta [H,N], eps): y comes back GroupNorm'd per
            head (RWKV6's ln_x; `group_norm_heads`, float32 statistics). The kernel's
            decoding step does it in the same kernel (from its float32 output); with the
            gate too, the chunked kernel's sequences through `group_norm_gate`.
        output_gate: None, or g [B,T,H,N]: y comes back as `y.astype(r.dtype) * g` (after
            the norm; RWKV6's silu(g) gate), in the decoding kernel too.
        output_gate_silu: output_gate is the gate's pre-activation: silu(output_gate)
            gates (the chunked kernel's `group_norm_gate` then keeps only the
            pre-activation for the backward).

    Returns:
        (y [B,T,H,N] in r's dtype, final_state [B,H,N,N] float32).

    Example:
        y, state = wkv6(r, k, v, -keras.ops.exp(w_raw), u, state, impl="chunked")
    """
    check_shapes(r, k, v, log_w, u, initial_state, group_norm, output_gate)
    chosen, _ = resolve_wkv_impl(impl)
    whole = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if chunk_size is not None and not (whole and chunk_size >= 1):
        # Checked whatever runs (the scan and single steps take no chunks), so a bad value
        # fails where it is written rather than when the sequence or machine changes.
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if chosen == "kernel":
        kernel = importlib.import_module(KERNEL_MODULE)
        reason = kernel.head_size_reason(r.shape[-1])
        if reason and _requested_impl(impl)[0] == "kernel":
            raise ValueError(f"WKV impl 'kernel' cannot run this shape: {reason}")
        if reason:  # 'auto': the model allows any head size that divides its width
            _log_fallback_once(reason)
            chosen = "chunked"
    if chunk_size is not None and chosen == "kernel":
        # The kernel's own rule, checked for every T (its one-token step takes no chunks).
        kernel.check_chunk_size(chunk_size)
    if r.shape[1] == 0:  # an empty sequence: no output, the state passes through
        b, _, h, n = r.shape
        state = keras.ops.zeros((b, h, n, n), "float32") if initial_state is None else initial_state
        return keras.ops.zeros(r.shape, r.dtype), keras.ops.cast(state, "float32")
    gated_norm = group_norm is not None and output_gate is not None
    fuse_gate = chosen == "kernel" and r.shape[1] > 1 and gated_norm
    if output_gate is not None and output_gate_silu and not fuse_gate:
        output_gate = keras.ops.silu(output_gate)
    if r.shape[1] == 1 and chosen == "kernel":
        # A decoding step: one kernel updating the state in place (and norming, gating y).
        kernel = importlib.import_module(KERNEL_MODULE)
        fused = {"group_norm": group_norm, "output_gate": output_gate}
        fused = {name: value for name, value in fused.items() if value is not None}
        return kernel.wkv6_kernel_step(r, k, v, log_w, u, initial_state, **fused)
    if r.shape[1] == 1:
        # Every implementation reduces to one application of the recurrence; the chunked
        # forms would pad the token to a whole chunk.
        y, state = wkv6_single_step(r, k, v, log_w, u, initial_state)
    elif chosen == "scan":
        y, state = wkv6_scan(r, k, v, log_w, u, initial_state)
    else:
        # Each implementation keeps its own default chunk size (CPU- and GPU-tuned differ).
        options = {} if chunk_size is None else {"chunk_size": chunk_size}
        if chosen == "kernel":
            kernel = importlib.import_module(KERNEL_MODULE)
            y, state = kernel.wkv6_kernel(r, k, v, log_w, u, initial_state, **options)
            if fuse_gate:
                # ln_x and the gate as one Pallas kernel each way (group_norm_gate.py).
                from rwkv_ray.ops.group_norm_gate import group_norm_gate

                gated = group_norm_gate(y, output_gate, *group_norm, gate_silu=output_gate_silu)
                return gated, state
        else:
            y, state = wkv6_chunked(r, k, v, log_w, u, initial_state, **options)
    if group_norm is not None:
        y = keras.ops.cast(group_norm_heads(y, *group_norm), r.dtype)
    if output_gate is not None:
        y = y * keras.ops.cast(output_gate, r.dtype)  # y is in r's dtype already
    return y, state


def group_norm_heads(y, gamma, beta, eps):
    """GroupNorm with one group per head, in float32: y [B,T,H,N]; gamma, beta [H,N]."""
    ops = keras.ops
    y = ops.cast(y, "float32")
    mean = ops.mean(y, axis=-1, keepdims=True)
    var = ops.mean(ops.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) * ops.rsqrt(var + eps)
    return y * ops.cast(gamma, "float32") + ops.cast(beta, "float32")


def resolve_wkv_impl(requested: str | None = None) -> tuple[str, str]:
    """The implementation `wkv6(..., impl=requested)` runs, and why.

    Raises ValueError for an unknown name, RuntimeError when 'kernel' is asked for
    explicitly and cannot run."""
    name, source = _requested_impl(requested)
    if name in ("scan", "chunked"):
        return name, f"{name} requested by {source}"
    ok, why = kernel_status()
    if name == "kernel":
        if not ok:
            raise RuntimeError(f"WKV impl 'kernel' requested by {source} is unavailable: {why}")
        return "kernel", f"kernel requested by {source}: {why}"
    if ok:
        return "kernel", f"auto: {why}"
    _log_fallback_once(why)
    return "chunked", f"auto: kernel unavailable ({why}); using 'chunked'"


def kernel_status() -> tuple[bool, str]:
    """(ok, reason) for the fused kernel, importing it only on the JAX backend."""
    backend = keras.backend.backend()
    if backend != "jax":
        return False, f"the fused kernel needs the JAX backend, Keras runs on {backend!r}"
    try:
        kernel = importlib.import_module(KERNEL_MODULE)
    except ModuleNotFoundError as err:
        if err.name != KERNEL_MODULE:
            return False, f"{KERNEL_MODULE} needs a missing module: {err}"
        return False, f"{KERNEL_MODULE} does not exist in this build"
    except ImportError as err:
        return False, f"{KERNEL_MODULE} failed to import: {err}"
    ok, reason = kernel.is_available()
    return bool(ok), reason


def _requested_impl(requested: str | None) -> tuple[str, str]:
    """(normalised name, where it came from); ValueError for anything unknown."""
    if requested is not None:
        name, source = requested, "the impl argument"
    elif os.environ.get("RWKV_WKV_IMPL"):
        name, source = os.environ["RWKV_WKV_IMPL"], "env RWKV_WKV_IMPL"
    elif os.environ.get("OPS_KERNEL"):
        legacy = os.environ["OPS_KERNEL"].strip()
        if legacy not in LEGACY_OPS_KERNEL:
            raise ValueError(
                f"unknown env OPS_KERNEL={legacy!r}: use '1' (pure ops, 'chunked') or '0' "
                f"('kernel'), or better RWKV_WKV_IMPL, one of {WKV_IMPLS}"
            )
        name, source = LEGACY_OPS_KERNEL[legacy], f"legacy env OPS_KERNEL={legacy}"
    else:
        name, source = "auto", "default"
    normalised = str(name).strip().lower()
    if normalised not in WKV_IMPLS:
        raise ValueError(f"unknown WKV impl {name!r} (from {source}); use one of {WKV_IMPLS}")
    return normalised, source


def _log_fallback_once(reason: str) -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning("WKV impl 'auto' uses 'chunked': %s", reason)


def check_shapes(r, k, v, log_w, u, initial_state=None, group_norm=None, output_gate=None) -> None:
    """ValueError naming the offending shapes unless r, k, v, log_w are one [B,T,H,N] shape,
    u is [H,N], initial_state (if given) [B,H,N,N], group_norm's gamma and beta [H,N] and
    output_gate r's shape. Unknown (None) sizes match. TypeError unless r, k, v, log_w, u
    are floating point (an integer r gave an integer y)."""
    for name, x in (("r", r), ("k", k), ("v", v), ("log_w", log_w), ("u", u)):
        if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype)):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    shape = tuple(r.shape)
    if len(shape) != 4:
        raise ValueError(f"r must be [B,T,H,N], got shape {shape}")
    for name, x in (("k", k), ("v", v), ("log_w", log_w)):
        if not _same_shape(x.shape, shape):
            raise ValueError(
                f"r, k, v, log_w must share one [B,T,H,N] shape: r {shape}, {name} {tuple(x.shape)}"
            )
    b, _, h, n = shape
    if not _same_shape(u.shape, (h, n)):
        raise ValueError(f"u must be [H,N] = {(h, n)} for r of shape {shape}, got {tuple(u.shape)}")
    if initial_state is not None and not _same_shape(initial_state.shape, (b, h, n, n)):
        raise ValueError(
            f"initial_state must be [B,H,N,N] = {(b, h, n, n)} for r of shape {shape}, got "
            f"{tuple(initial_state.shape)}"
        )
    # The fused kernels check these; the plain paths would broadcast a wrong shape.
    if group_norm is not None:
        for name, x in zip(("gamma", "beta"), group_norm[:2], strict=True):
            if not _same_shape(x.shape, (h, n)):
                raise ValueError(
                    f"group_norm's {name} must be [H,N] = {(h, n)}, got {tuple(x.shape)}"
                )
    if output_gate is not None and not _same_shape(output_gate.shape, shape):
        raise ValueError(f"output_gate must have r's shape {shape}, got {tuple(output_gate.shape)}")


def _same_shape(got, want) -> bool:
    got = tuple(got)
    return len(got) == len(want) and all(
        g is None or w is None or g == w for g, w in zip(got, want, strict=True)
    )
