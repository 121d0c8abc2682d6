"""Next-token cross-entropy for left-padded batches, in float32. No Ray here.

`summed_loss` takes logits; `summed_head_loss` takes the hidden states and the head matrix
and never holds the [B, T, V] logits (the training step's path: at B4 T4096 V65536 the logits
alone are 4 GiB in float32, and as much again for their gradient).

Position t predicts token t+1. A prediction counts when the target token is real
(not padding, id 0), the input token is real (a padded step has seen nothing), and the
target's `loss_mask` is set (prompt/response masking: 0 on prompt tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PAD_ID = 0


def target_weights(tokens, loss_mask=None):
    """[B,T] tokens (+ optional [B,T] loss_mask) -> [B,T-1] float32 weights of the
    predictions logits[:, :-1] -> tokens[:, 1:]."""
    real = tokens != PAD_ID
    weights = (real[:, :-1] & real[:, 1:]).astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * loss_mask[:, 1:].astype(jnp.float32)
    return weights


def cross_entropy(logits, targets):
    """-log softmax(logits)[target] over the last axis (float32), any leading shape."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def token_losses(logits, tokens):
    """Per-prediction cross-entropy [B,T-1] (float32) of logits [B,T,V] for tokens [B,T]."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:])


def summed_loss(logits, tokens, loss_mask=None):
    """(sum of weighted token losses, number of counted tokens): sum-then-divide keeps the
    loss of a global batch the same however it is split over workers and micro-batches."""
    weights = target_weights(tokens, loss_mask)
    return jnp.sum(token_losses(logits, tokens) * weights), jnp.sum(weights)


def mean_loss(logits, tokens, loss_mask=None):
    """Mean cross-entropy over counted tokens (0 when none count)."""
    total, count = summed_loss(logits, tokens, loss_mask)
    return total / jnp.maximum(count, 1.0)


def summed_head_loss(hidden, kernel, tokens, loss_mask=None, rows_per_piece=2048, row_groups=1):
    """`summed_loss(hidden @ kernel, tokens, loss_mask)` computed piece by piece.

    hidden [B,T,C]; kernel [C,V] (cast to hidden's dtype, as the Dense head does; logits are
    accumulated in float32). The time axis is cut into pieces of about rows_per_piece / B
    steps, every row's together; each piece's logits [B, steps, V] are made, reduced to its
    loss and dropped: a [rows_per_piece, V] peak instead of [B, T, V]. Under differentiation
    each piece's gradients are made in the same pass (`_head_loss_and_grads`), so the
    logits are never remade. Pieces run along time, not over the flattened rows, so that
    under a data-parallel mesh every device keeps its own rows (flattened pieces straddled
    the devices' rows: XLA gathered the whole batch's hidden states onto every device, and
    each computed the head for all of them).

    `row_groups` (the data-parallel device count) splits the batch rows into that many
    groups, each summing its own float32 part of the kernel's gradient over the pieces; the
    parts are added after the last piece. So each device sums its rows' part locally and the
    devices' parts are reduced once: with one group XLA reduce-scattered the whole [C, V]
    gradient after every piece (32 times per step at B4 T4096 on each of 4 GPUs). Rows that
    do not split evenly into the groups take one group."""
    weights = target_weights(tokens, loss_mask)
    batch, predictions = weights.shape
    steps = max(1, min(predictions, rows_per_piece // max(batch, 1)))
    pad = (-predictions) % steps  # padded steps weigh 0

    def pieces(x, fill=0):  # [B, T-1, ...] -> [pieces, B, steps, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.swapaxes(x.reshape(batch, -1, steps, *x.shape[2:]), 0, 1)

    h = pieces(hidden[:, :-1])
    groups = row_groups if row_groups >= 1 and batch % row_groups == 0 else 1
    targets = pieces(tokens[:, 1:], fill=PAD_ID)
    total = _pieces_loss(h, kernel, targets, pieces(weights), groups)
    return total, jnp.sum(weights)


def _piece_logits(h_piece, kernel_low):
    return jnp.dot(h_piece, kernel_low, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pieces_loss(h, kernel, targets, weights, groups):
    """Sum over pieces [P, B, S, ...] of the weighted cross-entropy of h @ kernel (targets and
    weights get no gradient; `groups`: see summed_head_loss's row_groups)."""
    kernel_low = kernel.astype(h.dtype)  # once, not per piece

    def body(total, piece):
        h_piece, targets_piece, w_piece = piece
        logits = _piece_logits(h_piece, kernel_low)
        return total + jnp.sum(cross_entropy(logits, targets_piece) * w_piece), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (h, targets, weights))  # T = 1: no pieces
    return total


def _head_loss_and_grads(h, kernel, targets, weights, groups):
    """The loss and its gradients in one pass over the pieces (a fused linear cross-entropy):
    each piece's logits give its loss and d logits = (softmax - onehot) * weight at once.
    d logits is cast to h's dtype before the two gradient matmuls, as the forward's operands
    are (JAX's own rule multiplied it in float32: TF32 GEMMs on a GPU, 27 ms of the 1.6B
    step's 462 on an H100; with this pass and no remade logits the step took 427); the
    kernel's gradient is summed over the pieces in float32, one sum per group of rows."""
    kernel_low = kernel.astype(h.dtype)  # once, not per piece

    def grouped(x):  # [B, S, ...] -> [groups, B / groups, S, ...]
        return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])

    def body(d_kernel, piece):
        h_piece, targets_piece, w_piece = piece
        logits = _piece_logits(h_piece, kernel_low)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets_piece[..., None], axis=-1)[..., 0]
        loss = jnp.sum((log_z - picked) * w_piece)
        target_hot = jax.nn.one_hot(targets_piece, logits.shape[-1], dtype=jnp.float32)
        d_logits = (jnp.exp(logits - log_z[..., None]) - target_hot) * w_piece[..., None]
        d_logits = d_logits.astype(h.dtype)
        d_h_piece = jnp.dot(d_logits, kernel_low.T, preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum(
            "gbsc,gbsv->gcv", grouped(h_piece), grouped(d_logits),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return d_kernel, (loss, d_h_piece.astype(h.dtype))

    zeros = jnp.zeros((groups, *kernel.shape), jnp.float32)
    d_kernel, (losses, d_h) = jax.lax.scan(body, zeros, (h, targets, weights))
    return jnp.sum(losses), (d_h, jnp.sum(d_kernel, axis=0))


def _pieces_loss_fwd(h, kernel, targets, weights, groups):
    total, (d_h, d_kernel) = _head_loss_and_grads(h, kernel, targets, weights, groups)
    return total, (d_h, d_kernel.astype(kernel.dtype))


def _pieces_loss_bwd(groups, saved, d_total):
    d_h, d_kernel = saved
    # In float32: d_total is 1 / count under a mean, which bf16 would round.
    scale = lambda x: (x.astype(jnp.float32) * d_total).astype(x.dtype)  # noqa: E731
    return scale(d_h), scale(d_kernel), None, None


_pieces_loss.defvjp(_pieces_loss_fwd, _pieces_loss_bwd)
