"""`GenerationState`: an `RWKV6State` that also carries the next-token logits.

A state covers every token fed through the model; the logits of the last of those tokens
cannot be recomputed from the state alone, so generation keeps them next to it. That is
what makes chunked generation exact: `generate(p, n1)` feeds its last generated token, and
`generate([[]], n2, state=r1.state)` starts sampling from `r1.state.logits`, exactly as one
pass of n1 + n2 tokens would. A plain `RWKV6State` (a tuned state, a state read from a file
saved without logits) works too whenever the prompt is not empty.

`check_state` decides whether a state fits a model and a batch, with a clear error.
"""

from __future__ import annotations

import numpy as np

from rwkv_ray.models import RWKV6State


class StateMismatchError(ValueError):
    """A state does not fit the model (or the batch); the message says which piece."""


class GenerationState(RWKV6State):
    """`RWKV6State` plus `logits` [B, V] float32 (or None): the next-token logits after the
    last token the state covers. Behaves as an `RWKV6State` everywhere else."""

    def __new__(cls, att_shift, wkv, ffn_shift, logits=None):
        self = super().__new__(cls, att_shift, wkv, ffn_shift)
        self.logits = logits
        return self

    def row(self, index: int) -> GenerationState:
        i = self._row_index(index)
        logits = None if self.logits is None else self.logits[i : i + 1]
        return GenerationState(*RWKV6State.row(self, i), logits=logits)

    def plain(self) -> RWKV6State:
        return RWKV6State(*self)


def state_logits(state) -> np.ndarray | None:
    return getattr(state, "logits", None)


def expected_shapes(config, batch: int | None = None) -> dict[str, tuple]:
    """Shapes of the state pieces for a model config (batch None = any)."""
    layers, c, h, n = config.num_layers, config.hidden_size, config.num_heads, config.head_size
    return {
        "att_shift": (layers, batch, c),
        "wkv": (layers, batch, h, n, n),
        "ffn_shift": (layers, batch, c),
    }


def check_state(config, state, batch: int | None = None) -> int:
    """Raise `StateMismatchError` unless `state` fits the model `config`; return its batch.

    `batch` given: the state's batch must be 1 (broadcast) or equal to it."""
    if not isinstance(state, RWKV6State):
        raise StateMismatchError(f"state must be an RWKV6State, got {type(state).__name__}")
    state_batch = int(np.shape(state.wkv)[1]) if len(np.shape(state.wkv)) == 5 else None
    for name, want in expected_shapes(config, state_batch).items():
        got = tuple(np.shape(getattr(state, name)))
        if got != want:
            raise StateMismatchError(
                f"state.{name} has shape {got} but the model (L={config.num_layers}, "
                f"C={config.hidden_size}, H={config.num_heads}, N={config.head_size}) "
                f"needs {want}"
            )
    logits = state_logits(state)
    if logits is not None and tuple(np.shape(logits)) != (state_batch, config.vocab_size):
        raise StateMismatchError(
            f"state.logits has shape {tuple(np.shape(logits))}, the model needs "
            f"({state_batch}, {config.vocab_size})"
        )
    if batch is not None and state_batch not in (1, batch):
        raise StateMismatchError(
            f"state has batch {state_batch}; it must be 1 (shared by every row) or {batch}"
        )
    return state_batch
