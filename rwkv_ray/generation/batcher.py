"""Continuous batching: concurrent requests share decode steps, each exactly as if alone.

    batcher = ContinuousBatcher(model, slots=8)
    stream = batcher.submit([5, 6, 7], 32, search_mode="topp", k=0.9, seed=1)
    for tokens in stream:  # (or `async for` when submitted from a running event loop)
        ...                # the new tokens of this request, one list per decode call
    stream.result          # a GenerationResult of one row, as `generate(model, [p], 32, ...)`

A background thread owns `slots` rows of decode state. Each loop turn it admits waiting
requests into free slots (the new row is prefilled alone by the library's own compiled
prefill, then scattered into its slot), runs `steps_per_call` decode steps of every slot in
one compiled call, hands each row's new tokens to its request and frees the slots of
finished rows. Free slots are computed too (fixed shapes: one compilation per feature set).

Exactness: a slot is the library's own `DecodeCarry` of a one-prompt call (its batch is
`bucket_batch(1)` rows: row 0 is the request, any others are finished padding) and the
compiled step is `jax.vmap` of the library's `Engine._decode_step` over slots. So a request
gets its own PRNG stream (`fold_in(key(seed), step)` with its own step counter), its own
sampling parameters, end tokens and token limit, and draws exactly what
`generate(model, [prompt], n, seed=...)` draws alone (a one-prompt call: the library's
stream of row b inside a larger batch depends on that batch). The sampler's static
features cover every busy row (`_union`); a row whose feature is off is unchanged by it
(penalty 1, alpha 0, no ban, top-k 0, top-p 1 are exact identities), and a row's penalty
state is only read while its own feature keeps the feature on, so it is always up to date.

Stop strings are checked on the host after each call. A row that stops there has decoded
up to `steps_per_call - 1` tokens too many; they are dropped from its tokens, but its state
would cover them, so while a busy row has stop strings and wants its state
(`need_state=True`), calls decode one step.

Not batched: a repetition penalty with `penalty_window` (its window is a static size and its
history grows with the prompt): such a request runs alone through `stream_generate`, one at
a time, on a side thread; its results are the library's by construction.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from functools import partial

import jax
import jax.numpy as jnp

from rwkv_ray.generation import engine as eng
from rwkv_ray.generation.generate import GenerationResult, GenerationStream, _prepare, _start
from rwkv_ray.generation.sampling import PenaltyState, SamplerFeatures
from rwkv_ray.generation.state import GenerationState
from rwkv_ray.generation.text_stream import generated_bytes

_STATS = ("admitted", "finished", "cancelled", "alone", "decode_calls", "row_steps", "max_busy")
_SAMPLING_KEYS = (
    "search_mode",
    "k",
    "temperature",
    "penalty",
    "penalty_window",
    "max_penalty_range",
    "alpha_frequency",
    "alpha_presence",
    "alpha_decay",
    "token_ban",
)


class BatchStream:
    """One submitted request: iterate it (sync, or async if submitted inside an event loop)
    for lists of new token ids; afterwards `.result` is its `GenerationResult` (batch 1;
    `.state` is None unless submitted with `need_state`). `cancel()` frees its slot."""

    def __init__(self, request, need_state: bool, on_finish=None):
        self.request, self.need_state, self.on_finish = request, need_state, on_finish
        self.result: GenerationResult | None = None
        self.cancelled = False
        self.tokens: list[int] = []
        self._text = bytearray()  # decoded bytes so far, for the stop strings
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._queue = asyncio.Queue() if self._loop else queue.Queue()
        self._batcher: ContinuousBatcher | None = None

    def cancel(self) -> None:
        if self.result is None and not self.cancelled:
            self.cancelled = True
            if self._batcher is not None:
                self._batcher._wake()

    def _put(self, item) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _next(self, item):
        kind, value = item
        if kind == "error":
            raise value
        if kind == "done":
            raise StopIteration if self._loop is None else StopAsyncIteration
        return value

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        return self._next(self._queue.get())

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[int]:
        return self._next(await self._queue.get())

    def _stop_hit(self, token: int) -> str | None:
        """Add `token`'s bytes; the text before a stop string if one now appears (as the
        library's `GenerationStream` checks it)."""
        request = self.request
        if not request.stop or token in request.end_tokens:
            return None
        seen = len(self._text)
        self._text += generated_bytes(request.tokenizer, [token])
        for stop in request.stop:
            needle = stop.encode("utf-8")
            at = self._text.find(needle, max(0, seen - len(needle) + 1))
            if at >= 0:
                return bytes(self._text[:at]).decode("utf-8", errors="replace")
        return None


def _full_penalties(p: PenaltyState, vocab: int) -> PenaltyState:
    """Every piece present (zeros where the request's features left it out)."""
    rows = p.length.shape[0]
    return PenaltyState(
        jnp.zeros((rows, vocab), jnp.int32) if p.counts is None else p.counts,
        None,
        p.length,
        jnp.zeros((rows, vocab), jnp.float32) if p.frequency is None else p.frequency,
        jnp.zeros((rows, vocab), bool) if p.present is None else p.present,
    )


def _for_features(p: PenaltyState, f: SamplerFeatures) -> PenaltyState:
    """The pieces a step with features `f` expects (None where the feature is off)."""
    counts = p.counts if f.penalty else None
    frequency, present = (p.frequency, p.present) if f.alpha else (None, None)
    return PenaltyState(counts, None, p.length, frequency, present)


def _merge(old: PenaltyState, new: PenaltyState) -> PenaltyState:
    """`new`'s pieces where the step computed them, `old`'s elsewhere."""
    return PenaltyState(*(o if n is None else n for o, n in zip(old, new, strict=True)))


def _union(features) -> SamplerFeatures:
    """A feature set covering every row, rounded up to a few tiers (fewer compilations):
    the token ban always; top-k with top-p (both sorts); both penalty kinds together."""
    features = list(features)
    sort = any(f.top_k or f.top_p for f in features)
    penalties = any(f.penalty or f.alpha for f in features)
    return SamplerFeatures(
        sample=any(f.sample for f in features),
        top_k=sort,
        top_p=sort,
        penalty=penalties,
        alpha=penalties,
        ban=True,
    )


class ContinuousBatcher:
    """Serves `submit`ted requests of one model with shared, compiled decode steps.

    Args:
        model: an `RWKV6CausalLM`.
        slots: rows decoded together (the compiled batch size); 1 = requests one at a time.
        steps_per_call: decode steps per compiled call (fewer host round trips; a row that
            ends inside a call wastes at most this many - 1 steps of its slot).
        max_new_tokens: the largest `max_new_tokens` a request may ask for (sizes each
            slot's token buffer).
        tokenizer: decodes tokens for stop strings (default: the World tokenizer).
    """

    def __init__(self, model, slots=8, steps_per_call=4, max_new_tokens=4096, tokenizer=None):
        if slots < 1 or steps_per_call < 1 or max_new_tokens < 1:
            raise ValueError(
                f"slots, steps_per_call and max_new_tokens must be >= 1, got "
                f"{slots}, {steps_per_call}, {max_new_tokens}"
            )
        self.model, self.engine = model, eng.engine_for(model)
        self.slots, self.steps_per_call = int(slots), int(steps_per_call)
        self.max_new_tokens, self.tokenizer = int(max_new_tokens), tokenizer
        self.width = eng.bucket_new_tokens(self.max_new_tokens)
        self.stats = collections.Counter(dict.fromkeys(_STATS, 0))
        self._rows: list[BatchStream | None] = [None] * self.slots
        self._waiting: collections.deque[BatchStream] = collections.deque()
        self._wakeup = threading.Condition()
        self._alone_lock = threading.Lock()
        self._closed = False
        self._batch = self._empty_batch()
        self._thread = threading.Thread(target=self._run, name="rwkv-batcher", daemon=True)
        self._thread.start()

    # ---- public ------------------------------------------------------------------------
    def submit(
        self,
        prompt,
        max_new_tokens: int,
        end_token=None,
        stop=None,
        seed: int | None = None,
        state=None,
        need_state: bool = False,
        on_finish=None,
        **sampling,
    ) -> BatchStream:
        """Queue one prompt (a str or a list of ids) with `generate`'s arguments; raises
        ValueError on bad input, before anything runs. `on_finish(result)` runs on the
        batcher's thread when the request ends (result None if cancelled), before the
        stream's last item is delivered."""
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling arguments {sorted(unknown)}")
        request = _prepare(
            self.model, [prompt], max_new_tokens, sampling, end_token, stop, seed, state,
            self.tokenizer,
        )  # fmt: skip
        if int(max_new_tokens) > self.max_new_tokens:  # an int or a numpy integer by now
            raise ValueError(
                f"max_new_tokens must be <= {self.max_new_tokens} here, got {max_new_tokens}"
            )
        stream = BatchStream(request, need_state, on_finish)
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if request.features.penalty_window is not None:
            threading.Thread(target=self._run_alone, args=(stream,), daemon=True).start()
            return stream
        stream._batcher = self
        with self._wakeup:
            self._waiting.append(stream)
            self._wakeup.notify()
        return stream

    def busy(self) -> int:
        return sum(row is not None for row in self._rows)

    def describe(self) -> dict:
        return dict(
            slots=self.slots,
            busy=self.busy(),
            waiting=len(self._waiting),
            steps_per_call=self.steps_per_call,
            **self.stats,
        )

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(timeout=30)

    # ---- compiled pieces ----------------------------------------------------------------
    def _row(self, request):
        """A request's slot content (its one-prompt carry, params, end mask, limit),
        prefilled; the token buffer is widened to the batcher's."""
        _, carry = _start(self.model, request)
        carry = carry._replace(
            tokens=jnp.zeros((request.batch, self.width), jnp.int32),
            penalties=_full_penalties(carry.penalties, self.model.config.vocab_size),
        )
        params = jax.tree.map(jnp.asarray, request.params)
        return carry, params, jnp.asarray(request.end_mask), jnp.int32(request.max_new_tokens)

    def _empty_batch(self):
        """Every slot holds a finished 1-token placeholder row."""
        request = _prepare(self.model, [[1]], 1, {}, None, None, 0, None, self.tokenizer)
        carry, *rest = self._row(request)
        row = (carry._replace(done=jnp.ones_like(carry.done)), *rest)
        return jax.tree.map(lambda x: jnp.stack([x] * self.slots), row)

    # ---- the loop (batcher thread) -----------------------------------------------------
    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _run(self) -> None:
        while not self._closed:
            with self._wakeup:
                while not self._closed and not self._waiting and not self.busy():
                    self._wakeup.wait()
            try:
                self._drop_cancelled()
                self._admit()
                if self.busy():
                    self._step()
            except Exception as err:  # fail the requests in flight, keep serving
                for slot, stream in enumerate(self._rows):
                    if stream is not None:
                        self._end(slot, None, err)
                self._batch = self._empty_batch()  # a failed call may have consumed it

    def _drop_cancelled(self) -> None:
        for slot, stream in enumerate(self._rows):
            if stream is not None and stream.cancelled:
                self.stats["cancelled"] += 1
                self._end(slot, None)
        with self._wakeup:
            gone = [s for s in self._waiting if s.cancelled]
            for stream in gone:
                self._waiting.remove(stream)
        for stream in gone:
            self.stats["cancelled"] += 1
            self._finish(stream, None)

    def _admit(self) -> None:
        for slot in range(self.slots):
            if self._rows[slot] is not None:
                continue
            with self._wakeup:
                if not self._waiting:
                    return
                stream = self._waiting.popleft()
            try:
                row = self._row(stream.request)
            except Exception as err:
                self._finish(stream, None, err)
                continue
            self._batch = _place(self._batch, row, jnp.int32(slot))
            self._rows[slot] = stream
            self.stats["admitted"] += 1
            self.stats["max_busy"] = max(self.stats["max_busy"], self.busy())

    def _step(self) -> None:
        busy = [(slot, s) for slot, s in enumerate(self._rows) if s is not None]
        features = _union(s.request.features for _, s in busy)
        exact_stop = any(s.request.stop and s.need_state for _, s in busy)
        steps = 1 if exact_stop else self.steps_per_call
        self._batch, tokens, active = _decode(
            self.engine.decode_variables(), self._batch, self.engine, features, steps
        )
        carry = self._batch[0]
        tokens, active, done, ended = jax.device_get(
            (tokens, active, carry.done[:, 0], carry.ended[:, 0])
        )
        self.stats["decode_calls"] += 1
        self.stats["row_steps"] += int(active.sum())
        for slot, stream in busy:
            try:
                self._take(slot, stream, tokens, active, done, ended)
            except Exception as err:  # this request's host-side work failed: it alone ends
                self._end(slot, None, err)

    def _take(self, slot: int, stream: BatchStream, tokens, active, done, ended) -> None:
        """Hand a decode call's tokens of `slot` to its stream; end it where it is done."""
        new = [int(t) for t, a in zip(tokens[slot], active[slot], strict=True) if a]
        stop_text = None
        for i, token in enumerate(new):
            stop_text = stream._stop_hit(token)
            if stop_text is not None:
                new = new[: i + 1]
                break
        stream.tokens += new
        if new:
            stream._put(("tokens", new))
        if stop_text is not None:
            self._end(slot, self._result(slot, stream, "stop", stop_text))
        elif done[slot]:
            reason = "end_token" if ended[slot] else "length"
            self._end(slot, self._result(slot, stream, reason, None))

    def _result(self, slot: int, stream: BatchStream, reason: str, stop_text) -> GenerationResult:
        state = None
        if stream.need_state:
            carry = self._batch[0]
            pieces = (piece[slot, :, :1] for piece in carry.state)
            state = GenerationState(*pieces, carry.logits[slot, :1])
        request = stream.request
        return GenerationResult(
            [stream.tokens],
            [reason],
            state,
            request.end_tokens,
            [stop_text] if request.stop else [],
            request.tokenizer,
        )

    def _end(self, slot: int, result, error=None) -> None:
        stream, self._rows[slot] = self._rows[slot], None
        if result is not None:
            self.stats["finished"] += 1
        self._finish(stream, result, error)

    @staticmethod
    def _finish(stream: BatchStream, result, error=None) -> None:
        stream.result = result
        if stream.on_finish is not None:
            try:
                stream.on_finish(result)
            except Exception as err:  # report it to the client rather than lose it
                error = error or err
        stream._put(("error", error) if error is not None else ("done", result))

    def _run_alone(self, stream: BatchStream) -> None:
        """A request the batch cannot hold: the library's stream, one such at a time."""
        # Waiting for the one before it: a cancel ends the wait (and frees its session).
        while not self._alone_lock.acquire(timeout=0.05):
            if stream.cancelled:
                self.stats["cancelled"] += 1
                self._finish(stream, None)
                return
        try:
            library = GenerationStream(self.model, stream.request)
            for step in library:
                if stream.cancelled:
                    self.stats["cancelled"] += 1
                    self._finish(stream, None)
                    return
                if step[0] is not None:
                    stream.tokens.append(step[0])
                    stream._put(("tokens", [step[0]]))
            result = library.result
            if not stream.need_state:
                result.state = None
            self.stats["alone"] += 1
            self._finish(stream, result)
        except Exception as err:
            self._finish(stream, None, err)
        finally:
            self._alone_lock.release()


# Module-level compiled functions: batchers of one model (engine) share their compilations.
@partial(jax.jit, static_argnums=(2, 3, 4), donate_argnums=(1,))
def _decode(weights, batch, engine, features, steps):
    """`steps` decode steps of every slot: (batch, tokens [S, steps], active [S, steps]).
    `weights`: `engine.decode_variables()`."""
    carry, params, end_mask, limit = batch
    step = partial(engine._decode_step, *weights, features=features)
    rows = jax.vmap(lambda c, p, e, n: step(c, p, e, n))
    width = carry.tokens.shape[-1]

    def body(c, _):
        new = rows(c._replace(penalties=_for_features(c.penalties, features)), *batch[1:])
        new = new._replace(penalties=_merge(c.penalties, new.penalties))
        at = jnp.minimum(c.step, width - 1)[:, None]
        token = jnp.take_along_axis(new.tokens[:, 0], at, axis=1)[:, 0]
        return new, (token, ~c.done[:, 0])

    carry, (tokens, active) = jax.lax.scan(body, carry, None, length=steps)
    return (carry, params, end_mask, limit), tokens.T, active.T


@partial(jax.jit, donate_argnums=(0,))
def _place(batch, row, slot):
    """Write one request's slot content into slot `slot` of the batch (in place)."""
    return jax.tree.map(lambda whole, part: whole.at[slot].set(part), batch, row)


__all__ = ["BatchStream", "ContinuousBatcher"]
