"""Next-token cross-entropy for left-padded batches, in float32. No Ray here.

`summed_loss` takes logits; `summed_head_loss` takes the hidden states and the head matrix
and never holds the [B, T, V] logits (the training step's path: at B4 T4096 V65536 the logits
alone are 4 GiB in float32, and as much again for their gradient).

Position t predicts token t+1. A prediction counts when the target token is real
(not padding, id 0), the input token is real (a padded step has seen nothing), and the
target's `loss_mask` is set (prompt/response masking: 0 on prompt tokens).
"""

from __future__ import annotations

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


def summed_head_loss(hidden, kernel, tokens, loss_mask=None, rows_per_piece=2048):
    """`summed_loss(hidden @ kernel, tokens, loss_mask)` computed piece by piece.

    hidden [B,T,C]; kernel [C,V] (cast to hidden's dtype, as the Dense head does; logits are
    accumulated in float32). The time axis is cut into pieces of about rows_per_piece / B
    steps, every row's together; each piece's logits [B, steps, V] are made, reduced to its
    loss and dropped, and remade in the backward pass (jax.checkpoint): one more head matmul
    for a [rows_per_piece, V] peak instead of [B, T, V]. Pieces run along time, not over
    the flattened rows, so that under a data-parallel mesh every device keeps its own rows
    (flattened pieces straddled the devices' rows: XLA gathered the whole batch's hidden
    states onto every device, and each computed the head for all of them)."""
    weights = target_weights(tokens, loss_mask)
    batch, predictions = weights.shape
    steps = max(1, min(predictions, rows_per_piece // max(batch, 1)))
    pad = (-predictions) % steps  # padded steps weigh 0

    def pieces(x, fill=0):  # [B, T-1, ...] -> [pieces, B, steps, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.swapaxes(x.reshape(batch, -1, steps, *x.shape[2:]), 0, 1)

    h = pieces(hidden[:, :-1])
    targets = pieces(tokens[:, 1:], fill=PAD_ID)
    w = pieces(weights)

    @jax.checkpoint
    def piece_loss(h_piece, targets_piece, w_piece):
        logits = head_logits(h_piece, kernel)
        return jnp.sum(cross_entropy(logits, targets_piece) * w_piece)

    def body(total, piece):
        return total + piece_loss(*piece), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (h, targets, w))  # T = 1: no pieces
    return total, jnp.sum(weights)


@jax.custom_vjp
def head_logits(hidden, kernel):
    """hidden [..., C] @ kernel [C, V] in hidden's dtype (the kernel cast to it, as the Dense
    head does), accumulated and returned in float32. The backward pass casts the logits'
    gradient to hidden's dtype too: JAX's own rule would multiply the float32 gradient with
    the bfloat16 operands in float32 (TF32 GEMMs on a GPU: 27 ms of a 1.6B step's 462, where
    bfloat16 takes about 8). The kernel's gradient comes back float32-accumulated in the
    kernel's own dtype (float32 master weights: summed over the pieces in float32)."""
    return jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _head_logits_fwd(hidden, kernel):
    return head_logits(hidden, kernel), (hidden, kernel)


def _head_logits_bwd(saved, d_logits):
    hidden, kernel = saved
    d_logits = d_logits.astype(hidden.dtype)
    d_hidden = jnp.dot(d_logits, kernel.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
    rows = hidden.reshape(-1, hidden.shape[-1])
    d_kernel = jnp.dot(
        rows.T, d_logits.reshape(-1, d_logits.shape[-1]), preferred_element_type=jnp.float32
    )
    return d_hidden.astype(hidden.dtype), d_kernel.astype(kernel.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)
