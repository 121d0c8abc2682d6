"""`RWKV6State`: the recurrent state of a whole RWKV6 model, batched, float32.

Per layer l there are three pieces (the same three the official `rwkv` package keeps as
state[3l], state[3l+1], state[3l+2]):
  att_shift[l]  [B, C]        ln1 output of the last real token (TimeMix token shift)
  wkv[l]        [B, H, N, N]  the WKV matrix state, indexed [key, value]
  ffn_shift[l]  [B, C]        ln2 output of the last real token (ChannelMix token shift)
Stored stacked over layers: att_shift [L,B,C], wkv [L,B,H,N,N], ffn_shift [L,B,C].
A NamedTuple, so it is a pytree for JAX (jit, grad, donation) and a nest for tf/torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from keras import ops


class RWKV6State(NamedTuple):
    att_shift: object  # [L, B, C] float32
    wkv: object  # [L, B, H, N, N] float32, [key, value]
    ffn_shift: object  # [L, B, C] float32

    @property
    def batch_size(self) -> int:
        return int(self.wkv.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.wkv.shape[0])

    @classmethod
    def zeros(cls, num_layers: int, batch_size: int, num_heads: int, head_size: int):
        hidden = num_heads * head_size
        return cls(
            att_shift=ops.zeros((num_layers, batch_size, hidden), "float32"),
            wkv=ops.zeros((num_layers, batch_size, num_heads, head_size, head_size), "float32"),
            ffn_shift=ops.zeros((num_layers, batch_size, hidden), "float32"),
        )

    def row(self, index: int) -> RWKV6State:
        """One batch row (negative counts from the end), kept as a batch of 1."""
        i = self._row_index(index)
        return RWKV6State(*(piece[:, i : i + 1] for piece in self))

    def _row_index(self, index: int) -> int:
        batch = self.att_shift.shape[1]
        if not -batch <= index < batch:
            raise IndexError(f"row {index} is outside this state's batch of {batch}")
        return index % batch

    def numpy(self) -> RWKV6State:
        return RWKV6State(*(np.asarray(ops.convert_to_numpy(piece)) for piece in self))

    # ---- the official `rwkv` package's list layout ----------------------------------------
    def to_official(self, row: int = 0) -> list[np.ndarray]:
        """The `rwkv` package's state list (3 float32 arrays per layer) for one batch row."""
        state, row = self.numpy(), self._row_index(row)
        out: list[np.ndarray] = []
        for layer in range(self.num_layers):
            out += [
                state.att_shift[layer, row],
                state.wkv[layer, row],
                state.ffn_shift[layer, row],
            ]
        return out

    @classmethod
    def from_official(cls, states: list | tuple) -> RWKV6State:
        """From one or more `rwkv` package state lists (each 3 arrays per layer) -> batch."""
        if states and not isinstance(states[0], (list, tuple)):
            states = [states]
        rows = [[np.asarray(piece, dtype=np.float32) for piece in s] for s in states]
        if not rows or not rows[0] or any(len(s) % 3 for s in rows):
            raise ValueError("an official state list holds 3 arrays per layer (at least one)")
        c = rows[0][0].shape[-1] if rows[0][0].ndim == 1 else -1
        h, n = rows[0][1].shape[:2] if rows[0][1].ndim == 3 else (-1, -1)
        want = ((c,), (h, n, n), (c,))
        for r, s in enumerate(rows):
            if len(s) != len(rows[0]):
                raise ValueError(f"state {r} has {len(s) // 3} layers, state 0 {len(rows[0]) // 3}")
            for i, piece in enumerate(s):
                if piece.shape != want[i % 3] or c != h * n:
                    raise ValueError(
                        f"state {r}, layer {i // 3}: piece {i % 3} has shape {piece.shape}; the "
                        "layout is [C] (att shift), [H, N, N] (wkv), [C] (ffn shift), C = H * N"
                    )
        return cls(
            att_shift=np.stack([np.stack(s[0::3]) for s in rows], axis=1),
            wkv=np.stack([np.stack(s[1::3]) for s in rows], axis=1),
            ffn_shift=np.stack([np.stack(s[2::3]) for s in rows], axis=1),
        )
