"""WKV6 in chunked matrix form: exact, overflow-free for any decay, parallel over chunks.

Shapes (B batch, T steps, H heads, N head size, L chunk size, C = ceil(T / L) chunks):
  r, k, v, log_w: [B,T,H,N]; u: [H,N]; state: [B,H,N,N] indexed [key i, value j], float32.
`log_w` is the log of the decay (<= 0; RWKV6: log_w = -exp(w_raw), anywhere from ~-1e-4 to
~-1e3). Same math as `wkv_scan.wkv6_scan`, the reference this must match.

Algorithm. T is padded with zeros up to C*L (k = 0 writes nothing and log_w = 0 is decay 1,
so the final state is unchanged; the padded y rows are sliced off). Inside a chunk, with
positions t, s in [0, L) and every sum taken in log space:
  a_prev[t]   = sum_{m<t} log_w[m]          decay from the chunk start to just before t
  a_after[s]  = sum_{m>s} log_w[m]          decay from just after s to the chunk end
  a_total     = sum_m log_w[m]              decay over the whole chunk
  e[t,s]      = sum_{s<m<t} log_w[m]        pairwise decay, for s < t
  y[t] = sum_{s<t} (r_t . k_s . exp(e[t,s])) v_s          intra-chunk
       + (r_t . u . k_t) v_t                              diagonal (bonus)
       + (r_t * exp(a_prev[t])) @ S_start                 inter-chunk
  S_end = exp(a_total) * S_start + sum_s (k_s * exp(a_after[s]))^T v_s
Every exponent is a sum of log_w <= 0, so no exp() can overflow (exp(-cumsum) is never
formed) and underflow to 0 is the right answer. Each sum is accumulated from zero over
exactly its own range, never taken as a difference of two cumsums: with log_w ~ -1e3 next to
~-1e-4 such a difference keeps only ~1e-4 of the small sum (measured: errors 2e-5..6e-5 of
max|y| instead of 3e-7). The intra-chunk and diagonal terms and the decayed r, k are computed
for all chunks at once; the C chunk steps read y = r' @ S then write S <- decay * S + k'^T v
in one `keras.ops.scan`, each a small matmul.

Non-finite inputs: a NaN or inf in v or k at step s makes every output of its chunk NaN,
also before s (the masked pairs are multiplied by 0, and 0 * inf is NaN), where the scan
spoils only steps >= s. Such inputs are failures either way (training stops on the NaN loss).

Memory (XLA temporaries measured for B=8 T=256 H=4 N=64, L=4; size(r) = B*T*H*N floats):
forward ~15 * size(r), forward+backward ~50 * size(r) (the scan alone: 4 and 200). It grows
with L through the [B,H,C,L,L,N] pairwise tensor (L * size(r) each) and with N / L through
the [B,H,N,N] states saved per chunk for the backward pass (N / L * size(r)).
"""

from __future__ import annotations

from keras import ops

from rwkv_ray.ops.wkv_scan import float32_inputs, scan_outputs

# Measured on CPU (benchmarks/bench_wkv_cpu.py --chunk-sizes 2 4 8 16, N = 64): L = 4 was the
# fastest forward+backward and needed the least memory; L = 16 was 1.5-2x slower (the pairwise
# tensor grows with L, the carried states with N / L).
DEFAULT_CHUNK_SIZE = 4


def wkv6_chunked(r, k, v, log_w, u, initial_state=None, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """WKV6 in chunks of `chunk_size` steps. Shapes in the module docstring.

    Returns (y [B,T,H,N] in r's dtype, final_state [B,H,N,N] float32).

    Example:
        y, state = wkv6_chunked(r, k, v, -ops.exp(w_raw), u, state, chunk_size=16)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = r.dtype
    r, k, v, log_w, u, state = float32_inputs(r, k, v, log_w, u, initial_state)
    steps = ops.shape(r)[1]
    if isinstance(steps, int):
        # A chunk longer than the sequence would only add padding (T = 1 decoding: one step).
        chunk_size = min(chunk_size, max(steps, 1))
    r, k, v, log_w = (_to_chunks(x, chunk_size) for x in (r, k, v, log_w))
    a_prev, a_after, a_total = _log_decays(log_w)

    y_inter, state = _inter_chunk(r, k, v, a_prev, a_after, a_total, state)
    y = _intra_chunk(r, k, v, log_w) + _diagonal(r, k, v, u) + y_inter
    return ops.cast(_from_chunks(y, steps), out_dtype), state


def _to_chunks(x, chunk_size: int):
    """[B,T,H,N] -> [B,H,C,L,N], zero-padding T up to a multiple of L."""
    b, t, h, n = ops.shape(x)  # tensors where unknown (tensorflow graphs)
    pad = -t % chunk_size
    # C as an int whenever T is known: Keras's TensorFlow scan needs a static length.
    x = ops.reshape(
        ops.pad(x, [[0, 0], [0, pad], [0, 0], [0, 0]]),
        (b, (t + pad) // chunk_size, chunk_size, h, n),
    )
    return ops.transpose(x, (0, 3, 1, 2, 4))


def _from_chunks(y, steps: int):
    """[B,H,C,L,N] -> [B,T,H,N], dropping the padded steps."""
    b, h, _, _, n = ops.shape(y)
    y = ops.reshape(ops.transpose(y, (0, 2, 3, 1, 4)), (b, -1, h, n))
    return y[:, :steps]


def _log_decays(log_w):
    """Per-chunk log decays from log_w [B,H,C,L,N]:
    a_prev [..,L,N] (sum over m < t), a_after [..,L,N] (m > s), a_total [..,N] (all m)."""
    a = ops.cumsum(log_w, axis=-2)
    zero = ops.zeros_like(log_w[..., :1, :])
    # Exclusive sums by shifting the inclusive ones: a[t] - log_w[t] would cancel badly.
    a_prev = ops.concatenate([zero, a[..., :-1, :]], axis=-2)
    suffix = ops.flip(ops.cumsum(ops.flip(log_w, axis=-2), axis=-2), axis=-2)
    a_after = ops.concatenate([suffix[..., 1:, :], zero], axis=-2)
    return a_prev, a_after, a[..., -1, :]


def _pairwise_decay(log_w):
    """exp(sum_{s<m<t} log_w[m]) for s < t, else 0: [B,H,C,L,N] -> [B,H,C,L(t),L(s),N]."""
    chunk_size = ops.shape(log_w)[-2]
    pos = ops.arange(chunk_size)
    later = (pos[:, None] > pos[None, :])[:, :, None]  # [t or m, s, 1]: t > s
    # terms[m, s] = log_w[m] for m > s; summing m up to t-1 gives e[t, s] from zero.
    terms = ops.where(later, log_w[..., :, None, :], 0.0)
    inclusive = ops.cumsum(terms, axis=-3)  # sum_{s<m<=t}
    e = ops.concatenate([ops.zeros_like(inclusive[..., :1, :, :]), inclusive[..., :-1, :, :]], -3)
    # e = 0 wherever t <= s, so exp(e) <= 1 everywhere (no inf, hence no NaN gradient); the
    # mask then removes the non-causal pairs.
    return ops.where(later, ops.exp(e), 0.0)


def _intra_chunk(r, k, v, log_w):
    """sum_{s<t} (sum_i r_t[i] k_s[i] decay[t,s,i]) v_s within each chunk: [B,H,C,L,N]."""
    decay = _pairwise_decay(log_w)
    scores = ops.sum(r[..., :, None, :] * k[..., None, :, :] * decay, axis=-1)  # [..,t,s]
    return ops.matmul(scores, v)


def _diagonal(r, k, v, u):
    """The current token's own contribution, weighted by the bonus u: [B,H,C,L,N]."""
    bonus = ops.sum(r * u[:, None, None, :] * k, axis=-1, keepdims=True)
    return bonus * v


def _inter_chunk(r, k, v, a_prev, a_after, a_total, state):
    """What each chunk reads from the state carried in from earlier chunks, [B,H,C,L,N], and
    the final state [B,H,N,N].

    Sequential over the C chunks: read y = (r * exp(a_prev)) @ S, then write
    S <- exp(a_total) * S + (k * exp(a_after))^T v. Doing the read inside the scan (rather than
    stacking every chunk's start state and reading in parallel) never materialises the
    [B,H,C,N,N] start states in the forward pass, and measured faster on CPU."""

    def step(s, x):
        r_c, k_c, v_c, decay = x  # [B,H,L,N] x 3, [B,H,N,1]
        y_c = ops.matmul(r_c, s)
        s = decay * s + ops.matmul(ops.swapaxes(k_c, -1, -2), v_c)
        return s, y_c

    # Decays applied in parallel, then chunk-major for the scan: [C,B,H,...].
    xs = (r * ops.exp(a_prev), k * ops.exp(a_after), v, ops.exp(a_total)[..., None])
    xs = tuple(ops.moveaxis(x, 2, 0) for x in xs)
    state, y = scan_outputs(step, state, xs, y_like=xs[0][0])
    return ops.moveaxis(y, 0, 2), state
