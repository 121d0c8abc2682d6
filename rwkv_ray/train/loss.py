"""Next-token cross-entropy for left-padded batches, in float32. No Ray here.

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


def token_losses(logits, tokens):
    """Per-prediction cross-entropy [B,T-1] (float32) of logits [B,T,V] for tokens [B,T]."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - picked


def summed_loss(logits, tokens, loss_mask=None):
    """(sum of weighted token losses, number of counted tokens): sum-then-divide keeps the
    loss of a global batch the same however it is split over workers and micro-batches."""
    weights = target_weights(tokens, loss_mask)
    return jnp.sum(token_losses(logits, tokens) * weights), jnp.sum(weights)


def mean_loss(logits, tokens, loss_mask=None):
    """Mean cross-entropy over counted tokens (0 when none count)."""
    total, count = summed_loss(logits, tokens, loss_mask)
    return total / jnp.maximum(count, 1.0)
