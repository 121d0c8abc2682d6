"""Server-side session states: an LRU cache bounded by bytes, with expiry and delete.

A session maps an id to the `GenerationState` after its last turn, so the next turn sends
only the new text. Entries older than `ttl_s` (since last use) expire; when the total size
exceeds `max_bytes`, the least recently used entries are dropped. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


def state_nbytes(state) -> int:
    """Bytes held by a state's pieces (and its logits, if any)."""
    pieces = list(state)
    logits = getattr(state, "logits", None)
    if logits is not None:
        pieces.append(logits)
    return int(sum(np.asarray(p).nbytes for p in pieces))


class SessionCache:
    """LRU by memory budget with expiry. `get` refreshes an entry; `put` may evict others."""

    def __init__(
        self,
        max_bytes: int = 1 << 30,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_bytes < 1 or ttl_s <= 0:
            raise ValueError(f"max_bytes and ttl_s must be positive, got {max_bytes}, {ttl_s}")
        self.max_bytes, self.ttl_s, self._clock = int(max_bytes), float(ttl_s), clock
        self._entries: OrderedDict[str, tuple[object, int, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self._bytes -= size

    def _expire(self, now: float) -> None:
        for key in [k for k, (_, _, t) in self._entries.items() if now - t > self.ttl_s]:
            self._drop(key)

    def get(self, key: str):
        """The session's state, or None (unknown or expired)."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key not in self._entries:
                return None
            state, size, _ = self._entries.pop(key)
            self._entries[key] = (state, size, now)
            return state

    def put(self, key: str, state) -> None:
        """Store (or replace) a session's state; raise ValueError if it alone is too big."""
        size = state_nbytes(state)
        if size > self.max_bytes:
            raise ValueError(f"a session state of {size} bytes exceeds the {self.max_bytes} budget")
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (state, size, now)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def delete(self, key: str) -> bool:
        """Remove a session; True if it existed."""
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True
