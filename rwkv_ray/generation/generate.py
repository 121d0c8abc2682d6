"""`generate` and `stream_generate`: batched, compiled, exact RWKV6 generation.

    result = generate(model, ["The Eiffel tower is in"], 32, search_mode="topp", k=0.8)
    result.text[0], result.tokens[0], result.finish_reason[0]
    more = generate(model, [[]], 32, state=result.state)      # continues exactly

Semantics:
- `prompts`: a list of str (encoded with `tokenizer`, default the World tokenizer) or of
  id lists (ids 1..V-1). Rows are left-padded with id 0, which is exact: each row gets
  what it would get alone.
- Sampling settings: see `rwkv_ray.generation.sampling` (the seed's search modes and
  repetition penalty, the official pipeline's alpha penalties, token_ban). Every bad value
  raises ValueError naming the argument before anything is computed.
- `end_token` (an id or a list of ids) ends a row; id 0 (end of text in the World
  vocabulary, padding here) always does. The end token is the last entry of `.tokens`
  and is fed to the model (so the state covers it: a chat can continue after "\\n\\n");
  `.text` leaves it out. Id 0 is the exception: padding to this model, it is not fed, so a
  row that ended on it keeps the state and logits from before it (continuing it with an
  empty prompt ends on 0 again at once: give it a prompt). `stop` (str or list of str)
  ends a row when its text contains one; `.text` is cut before it (this path checks on
  the host after every token).
- `.state` (a `GenerationState`) covers the prompt and every token in `.tokens`, and
  carries the next-token logits, so `generate([[]], n2, state=r1.state)` continues exactly
  where `generate(p, n1)` stopped: greedy chunks equal one pass of n1 + n2 tokens.
  `state=` takes batch 1 (shared by every row) or one row per prompt; an empty prompt needs
  a state with logits (a generation result's state).
- `seed` makes sampling reproducible (same seed, same settings, same batch -> same tokens).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from rwkv_ray.generation import engine as eng
from rwkv_ray.generation.sampling import (
    PenaltyState,
    SamplerFeatures,
    SamplingParams,
    make_sampling_params,
)
from rwkv_ray.generation.state import GenerationState, check_state, state_logits
from rwkv_ray.generation.text_stream import generated_bytes
from rwkv_ray.models import RWKV6CausalLM, RWKV6State

FINISH_REASONS = ("end_token", "stop", "length")


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns. Row b: tokens[b] (prompt excluded, nothing after an end
    token), finish_reason[b] in FINISH_REASONS, text[b]; `state` covers every row."""

    tokens: list[list[int]]
    finish_reason: list[str]
    state: GenerationState
    end_tokens: frozenset[int] = frozenset()
    stop_text: list[str | None] = dataclasses.field(default_factory=list)
    tokenizer: object = dataclasses.field(default=None, repr=False)

    @property
    def text(self) -> list[str]:
        out = []
        for b, tokens in enumerate(self.tokens):
            if self.stop_text and self.stop_text[b] is not None:
                out.append(self.stop_text[b])
                continue
            if self.finish_reason[b] == "end_token" and tokens and tokens[-1] in self.end_tokens:
                tokens = tokens[:-1]
            text = generated_bytes(_tokenizer(self.tokenizer), tokens)
            out.append(text.decode("utf-8", errors="replace"))
        return out


@dataclasses.dataclass
class _Request:
    """Validated, bucketed inputs of one call (host side)."""

    prompts: list[list[int]]
    batch: int  # bucketed batch
    max_new_tokens: int
    params: SamplingParams
    features: SamplerFeatures
    end_mask: np.ndarray
    end_tokens: frozenset[int]
    stop: tuple[str, ...]
    seed: int
    state: object
    tokenizer: object


def _tokenizer(tokenizer):
    if tokenizer is None:
        from rwkv_ray.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
    return tokenizer


def _prompt_ids(prompts, vocab_size: int, tokenizer) -> tuple[list[list[int]], object]:
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of str or of token id lists")
    out = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            tokenizer = _tokenizer(tokenizer)
            ids = list(tokenizer.encode(prompt))
        elif isinstance(prompt, Sequence | np.ndarray):
            ids = np.asarray(prompt).reshape(-1).tolist() if len(prompt) else []
        else:
            ids = None
        if ids is None or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"prompts[{b}] must be a str or a list of int ids")
        if any(not 1 <= i < vocab_size for i in ids):
            raise ValueError(f"prompts[{b}] holds an id outside [1, {vocab_size}) (0 is padding)")
        out.append(ids)
    return out, tokenizer


def _end_mask(end_token, vocab_size: int) -> tuple[np.ndarray, frozenset[int]]:
    ids = [] if end_token is None else end_token
    if isinstance(ids, int | np.integer):
        ids = [ids]
    mask = np.zeros(vocab_size, bool)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < vocab_size:
            raise ValueError(f"end_token must be ids in [0, {vocab_size}), got {end_token!r}")
        mask[i] = True
    mask[0] = True  # id 0 is end of text / padding: it always ends a row
    return mask, frozenset(int(i) for i in np.flatnonzero(mask))


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a non-empty str or a list of them, got {stop!r}")
    return stop


def _prepare(
    model, prompts, max_new_tokens, sampling: dict, end_token, stop, seed, state, tokenizer
) -> _Request:
    vocab = model.config.vocab_size
    ids, tokenizer = _prompt_ids(prompts, vocab, tokenizer)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    batch = eng.bucket_batch(len(ids))
    params, features = make_sampling_params(batch, vocab, **sampling)
    if features.penalty_window is not None:
        longest = eng.bucket_prompt(max(1, *map(len, ids))) + eng.bucket_new_tokens(
            int(max_new_tokens)
        )
        if 2 * features.penalty_window >= longest:
            # Every position's window then starts at 0: the same penalties as no window,
            # without the [B, W] history a window keeps (it grew with W: 2**27 took 2 GB).
            features = dataclasses.replace(features, penalty_window=None)
    end_mask, end_tokens = _end_mask(end_token, vocab)
    stop = _stop_strings(stop)
    if seed is None:
        seed = secrets.randbits(31)
    elif isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    if state is not None:
        check_state(model.config, state, len(ids))
    empty = [b for b, row in enumerate(ids) if not row]
    if empty and state_logits(state) is None:
        raise ValueError(
            f"prompts {empty} are empty: an empty prompt continues from a state that carries "
            "its logits (a GenerationResult.state); pass at least one token otherwise"
        )
    if stop:
        tokenizer = _tokenizer(tokenizer)
    return _Request(
        ids,
        batch,
        int(max_new_tokens),
        params,
        features,
        end_mask,
        end_tokens,
        stop,
        int(seed),
        state,
        tokenizer,
    )


def _rows(x, rows: int, batch: int):
    """Broadcast a batch-1 piece to `rows`, pad to `batch` rows with zeros (a fresh copy)."""
    x = jnp.asarray(x, jnp.float32)
    x = jnp.broadcast_to(x, (x.shape[0], rows, *x.shape[2:])) if x.shape[1] == 1 else x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, batch - rows)
    return jnp.pad(x, pad)


def _start_state(model, request: _Request):
    """Initial state and logits of every (bucketed) row, as fresh device buffers."""
    rows, batch, vocab = len(request.prompts), request.batch, model.config.vocab_size
    if request.state is None:
        state = [jnp.array(piece, copy=True) for piece in model.initial_state(batch)]
        return RWKV6State(*state), jnp.zeros((batch, vocab), jnp.float32)
    pieces = [_rows(piece, rows, batch) for piece in request.state]
    logits = state_logits(request.state)
    if logits is None:
        logits = jnp.zeros((batch, vocab), jnp.float32)
    else:
        logits = _rows(jnp.asarray(logits)[None], rows, batch)[0]
    return RWKV6State(*pieces), logits


def _prefill(engine, request: _Request, state, logits):
    width = eng.bucket_prompt(max(len(p) for p in request.prompts))
    if width == 0:  # every prompt is empty: continue from the state's logits
        return state, logits
    ids = np.zeros((request.batch, width), np.int32)
    for b, prompt in enumerate(request.prompts):
        if prompt:
            ids[b, width - len(prompt) :] = prompt
    trainable, non_trainable = engine.variables()
    chunk = min(width, eng.PREFILL_CHUNK)
    for start in range(0, width, chunk):
        logits, state = engine.prefill_fn(
            trainable, non_trainable, ids[:, start : start + chunk], state, logits
        )
    return state, logits


def _penalties(engine, request: _Request, vocab: int) -> PenaltyState:
    length = np.zeros(request.batch, np.int32)
    length[: len(request.prompts)] = [len(p) for p in request.prompts]
    f = request.features
    if not (f.penalty or f.alpha):
        return PenaltyState(None, None, jnp.asarray(length), None, None)
    width = max(1, eng.bucket_prompt(max(len(p) for p in request.prompts)))
    if f.penalty_window is not None:
        width += eng.bucket_new_tokens(request.max_new_tokens)
    history = np.zeros((request.batch, width), np.int32)
    for b, prompt in enumerate(request.prompts):
        history[b, : len(prompt)] = prompt
    return engine.init_fn(history, length, vocab_size=vocab, features=f)


def _start(model, request: _Request) -> tuple[eng.Engine, eng.DecodeCarry]:
    engine = eng.engine_for(model)
    state, logits = _start_state(model, request)
    state, logits = _prefill(engine, request, state, logits)
    penalties = _penalties(engine, request, model.config.vocab_size)
    done = np.arange(request.batch) >= len(request.prompts)  # batch-bucket padding rows
    bucket = eng.bucket_new_tokens(request.max_new_tokens)
    return engine, eng.new_carry(state, logits, bucket, penalties, request.seed, done)


def _result(request: _Request, carry, reasons=None, stop_text=None) -> GenerationResult:
    rows = len(request.prompts)
    tokens, count, ended = (np.asarray(x) for x in (carry.tokens, carry.count, carry.ended))
    out_tokens = [tokens[b, : count[b]].tolist() for b in range(rows)]
    if reasons is None:
        reasons = [None] * rows
    reasons = [r or ("end_token" if ended[b] else "length") for b, r in enumerate(reasons)]
    state = GenerationState(*(piece[:, :rows] for piece in carry.state), carry.logits[:rows])
    return GenerationResult(
        out_tokens, reasons, state, request.end_tokens, stop_text or [], request.tokenizer
    )


def _causal_lm(model) -> RWKV6CausalLM:
    """`model`, or the RWKV6CausalLM that an object of the seed's API wraps (`RWKV` and
    `RWKV.model` of `rwkv_ray.compat`); TypeError for anything else."""
    if isinstance(model, RWKV6CausalLM):
        return model
    inner = getattr(model, "causal_lm", None)
    if isinstance(inner, RWKV6CausalLM):
        return inner
    raise TypeError(
        f"model must be an RWKV6CausalLM (rwkv_ray.load_model), got {type(model).__name__}"
    )


def generate(
    model,
    prompts,
    max_new_tokens: int,
    search_mode: str = "greedy",
    k=None,
    temperature: float = 1.0,
    penalty: float = 1.0,
    penalty_window: int | None = None,
    max_penalty_range: Sequence[int] | None = None,
    alpha_frequency: float = 0.0,
    alpha_presence: float = 0.0,
    alpha_decay: float = 1.0,
    token_ban: Sequence[int] = (),
    end_token=None,
    stop=None,
    seed: int | None = None,
    state=None,
    tokenizer=None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt (semantics in the module docstring).

    Without `stop`, the whole decode loop runs on the device (one `lax.while_loop`)."""
    model = _causal_lm(model)
    sampling = dict(
        search_mode=search_mode,
        k=k,
        temperature=temperature,
        penalty=penalty,
        penalty_window=penalty_window,
        max_penalty_range=max_penalty_range,
        alpha_frequency=alpha_frequency,
        alpha_presence=alpha_presence,
        alpha_decay=alpha_decay,
        token_ban=token_ban,
    )
    request = _prepare(
        model, prompts, max_new_tokens, sampling, end_token, stop, seed, state, tokenizer
    )
    if request.stop:
        stream = GenerationStream(model, request)
        for _ in stream:
            pass
        return stream.result
    engine, carry = _start(model, request)
    carry = engine.loop_fn(
        *engine.decode_variables(),
        carry,
        request.params,
        request.end_mask,
        jnp.int32(request.max_new_tokens),
        features=request.features,
    )
    return _result(request, carry)


class GenerationStream:
    """Iterator over decode steps: each item is a list with one entry per prompt, the token
    produced at this step or None for a row that had already finished. After the iteration,
    `.result` is the `GenerationResult` (as `generate` would return it)."""

    def __init__(self, model, request: _Request):
        self.request = request
        self.result: GenerationResult | None = None
        self._model = model

    def __iter__(self) -> Iterator[list[int | None]]:
        request = self.request
        engine, carry = _start(self._model, request)
        weights = engine.decode_variables()
        limit = jnp.int32(request.max_new_tokens)
        rows = len(request.prompts)
        texts = [bytearray() for _ in range(rows)]
        reasons: list[str | None] = [None] * rows
        stop_text: list[str | None] = [None] * rows
        for step in range(request.max_new_tokens):
            before = np.asarray(carry.done)[:rows]
            if before.all():
                break
            carry = engine.step_fn(
                *weights,
                carry,
                request.params,
                request.end_mask,
                limit,
                features=request.features,
            )
            tokens = np.asarray(carry.tokens[:rows, step])
            out = [None if before[b] else int(tokens[b]) for b in range(rows)]
            if request.stop:
                carry = self._check_stop(carry, out, texts, reasons, stop_text)
            yield out
        self.result = _result(request, carry, reasons, stop_text if request.stop else None)

    def _check_stop(self, carry, out, texts, reasons, stop_text):
        tokenizer = self.request.tokenizer
        stopped = []
        for b, token in enumerate(out):
            if token is None or token in self.request.end_tokens:
                continue
            seen = len(texts[b])
            texts[b] += generated_bytes(tokenizer, [token])
            for stop in self.request.stop:
                needle = stop.encode("utf-8")
                at = texts[b].find(needle, max(0, seen - len(needle) + 1))
                if at >= 0:
                    stopped.append(b)
                    reasons[b] = "stop"
                    stop_text[b] = bytes(texts[b][:at]).decode("utf-8", errors="replace")
                    break
        if stopped:
            carry = carry._replace(done=carry.done.at[np.asarray(stopped)].set(True))
        return carry


def stream_generate(
    model,
    prompts,
    max_new_tokens: int,
    search_mode: str = "greedy",
    k=None,
    temperature: float = 1.0,
    penalty: float = 1.0,
    penalty_window: int | None = None,
    max_penalty_range: Sequence[int] | None = None,
    alpha_frequency: float = 0.0,
    alpha_presence: float = 0.0,
    alpha_decay: float = 1.0,
    token_ban: Sequence[int] = (),
    end_token=None,
    stop=None,
    seed: int | None = None,
    state=None,
    tokenizer=None,
) -> GenerationStream:
    """Like `generate`, but returns a `GenerationStream` that yields each step's tokens as
    they are produced (one compiled step per token). Arguments are validated now."""
    model = _causal_lm(model)
    sampling = dict(
        search_mode=search_mode,
        k=k,
        temperature=temperature,
        penalty=penalty,
        penalty_window=penalty_window,
        max_penalty_range=max_penalty_range,
        alpha_frequency=alpha_frequency,
        alpha_presence=alpha_presence,
        alpha_decay=alpha_decay,
        token_ban=token_ban,
    )
    request = _prepare(
        model, prompts, max_new_tokens, sampling, end_token, stop, seed, state, tokenizer
    )
    return GenerationStream(model, request)
