"""The Ray Serve application: a FastAPI ingress deployment around `rwkv_ray.generation`.

Routes (JSON bodies; unknown fields, malformed JSON and out-of-range values -> 4xx):
  POST   /v1/generate          prompt or tokens, every sampling control, `state` (a tuned
                               state by name, or an MLflow URI: runs:/<id>[/<path>],
                               models:/<name>@<alias>), `session`, `return_state`, `stream`
  POST   /v1/completions       OpenAI-compatible subset (prompt, max_tokens, temperature,
                               top_p, stop, stream, n=1)
  DELETE /v1/sessions/{id}     drop a session's state
  GET    /v1/states, /v1/models, /v1/stats (the batcher's slots and counters), /healthz

Streaming (`stream: true`) answers `text/event-stream`: one `data: {...}` event per
generated token ({"text", "token"}; the text of a token that ends a multi-byte character or
may start a stop string is held back until it is certain), then a final event with
`finish_reason` and `usage`. The chunks' texts concatenate to the non-streamed `text`.
/v1/completions streams OpenAI `text_completion` chunks and ends with `data: [DONE]`.

Requests are decoded together by a `ContinuousBatcher` (`max_batch_size` slots; 1 = one at
a time): each gets exactly the tokens `generate(model, [prompt], ...)` gives it alone with
the same seed. A client that goes away frees its slot. (A repetition penalty with
`penalty_window` cannot share a batch: such requests run alone, one at a time, through the
library's stream; see `rwkv_ray.generation.batcher`.)

A session holds the state after its last finished turn: a turn with `session` continues
from it (the new prompt is read on top of the whole history) and stores the new state when
it ends. One turn per session at a time: a request on a session with a turn in flight gets
409; a turn whose client went away leaves the session unchanged. If the env var
RWKV_RAY_API_TOKEN is set, every route but /healthz needs `Authorization: Bearer <token>`.

    serve run rwkv_ray.serve.app:app_builder model=models/1b6 states_dir=states
"""

# No `from __future__ import annotations`: FastAPI and Serve read the real annotations.
import asyncio
import base64
import json
import os
import secrets
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from rwkv_ray.generation.text_stream import TextStream
from rwkv_ray.serve.schemas import (
    MAX_NEW_TOKENS,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from rwkv_ray.serve.sessions import SessionCache
from rwkv_ray.serve.states import StateRegistry, UnknownStateError, check_name

TOKEN_ENV = "RWKV_RAY_API_TOKEN"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

api = FastAPI(title="rwkv_ray", description="RWKV6 generation with tuned states and sessions")


def _auth(request: Request) -> None:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


async def _read(request: Request, schema: type[BaseModel], limit: int):
    """Read at most `limit` bytes of body and validate it: 413, 400 (not JSON) or 422."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body is larger than {limit} bytes")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as err:
        errors = err.errors(include_url=False, include_context=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise HTTPException(400, f"malformed JSON: {errors[0]['msg']}") from None
        detail = [{"field": ".".join(map(str, e["loc"])), "error": e["msg"]} for e in errors]
        raise HTTPException(422, detail) from None


def _sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _state_b64(state, model) -> str:
    from rwkv_ray.generation import save_state

    with tempfile.TemporaryDirectory() as tmp:
        path = save_state(state, Path(tmp) / "state.npz", model)
        return base64.b64encode(path.read_bytes()).decode()


def _usage(prompt_ids, tokens) -> Usage:
    return Usage(
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(tokens),
        total_tokens=len(prompt_ids) + len(tokens),
    )


def _message(err: Exception) -> str:
    if isinstance(err, HTTPException):
        return str(err.detail)
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _checked(fn, *args, **kwargs):
    """Call `fn`; an unknown state -> 404, any other bad input (ValueError) -> 400."""
    try:
        return fn(*args, **kwargs)
    except UnknownStateError as err:
        raise HTTPException(404, _message(err)) from None
    except ValueError as err:  # StateMismatchError included
        raise HTTPException(400, _message(err)) from None


async def _collect(stream):
    """Wait for a batched request's result; cancel it if this handler is cancelled."""
    try:
        async for _ in stream:
            pass
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except ValueError as err:  # e.g. a session state over the cache budget
        raise HTTPException(400, _message(err)) from None
    return stream.result


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class RWKVServer:
    """One model per replica, with its batcher, tuned states and sessions."""

    def __init__(
        self,
        model: str,
        states_dir: str | None = None,
        model_name: str | None = None,
        dtype: str | None = None,
        session_bytes: int = 1 << 30,
        session_ttl_s: float = 3600.0,
        max_prompt_tokens: int = 16384,
        max_body_bytes: int = 1 << 20,
        max_batch_size: int = 8,
        steps_per_call: int = 4,
        mlflow_tracking_uri: str | None = None,
        state_cache_dir: str | None = None,
    ):
        from rwkv_ray.convert import load_model
        from rwkv_ray.generation.batcher import ContinuousBatcher
        from rwkv_ray.serve.mlflow_states import MlflowStates
        from rwkv_ray.tokenizer import WorldTokenizer

        self.model = load_model(model, dtype)
        self.model_name = model_name or Path(model).stem
        self.tokenizer = WorldTokenizer()
        mlflow = MlflowStates(self.model, mlflow_tracking_uri, state_cache_dir)
        self.states = StateRegistry(states_dir, self.model, mlflow)
        self.sessions = SessionCache(session_bytes, session_ttl_s)
        self.max_prompt_tokens, self.max_body_bytes = max_prompt_tokens, max_body_bytes
        self.batcher = ContinuousBatcher(
            self.model, max_batch_size, steps_per_call, MAX_NEW_TOKENS, self.tokenizer
        )
        self._in_flight: set[str] = set()  # sessions with a turn running
        self._session_lock = threading.Lock()

    # ---- routes ----------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models", dependencies=[Depends(_auth)])
    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "owned_by": "rwkv_ray"}
        return {"object": "list", "data": [card]}

    @api.get("/v1/states", dependencies=[Depends(_auth)])
    def list_states(self) -> dict:
        return {"states": self.states.describe()}

    @api.get("/v1/stats", dependencies=[Depends(_auth)])
    def stats(self) -> dict:
        with self._session_lock:
            busy = len(self._in_flight)
        return dict(self.batcher.describe(), sessions=len(self.sessions), busy_sessions=busy)

    @api.delete("/v1/sessions/{session}", dependencies=[Depends(_auth)])
    def delete_session(self, session: str) -> dict:
        _checked(check_name, session, "session")
        with self._session_lock:  # a turn in flight would store the session again at its end
            if session in self._in_flight:
                raise HTTPException(
                    409, f"session {session!r} has a request in flight; retry when it ends"
                )
            if not self.sessions.delete(session):
                raise HTTPException(404, f"unknown session {session!r}")
        return {"deleted": session}

    @api.post("/v1/generate", dependencies=[Depends(_auth)])
    async def generate(self, request: Request):
        req = await _read(request, GenerateRequest, self.max_body_bytes)
        ids = self._prompt(req.prompt, req.tokens)
        need_state = req.return_state or req.session is not None
        stream = await self._submit(ids, req.max_tokens, req, req.state, req.session, need_state)
        if req.stream:
            events = self._generate_events(stream, ids, req)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await _collect(stream)
        return GenerateResponse(
            text=result.text[0],
            tokens=result.tokens[0],
            finish_reason=result.finish_reason[0],
            usage=_usage(ids, result.tokens[0]),
            session=req.session,
            state=_state_b64(result.state, self.model) if req.return_state else None,
        )

    @api.post("/v1/completions", dependencies=[Depends(_auth)])
    async def completions(self, request: Request):
        req = await _read(request, CompletionRequest, self.max_body_bytes)
        if req.model is not None and req.model != self.model_name:
            raise HTTPException(
                404, f"unknown model {req.model!r}; this server has {self.model_name!r}"
            )
        ids = self._prompt(req.prompt, None)
        stream = await self._submit(ids, req.max_tokens, req, None, None, False)
        head = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if req.stream:
            events = self._completion_events(stream, ids, head)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await _collect(stream)
        choice = {
            "text": result.text[0],
            "index": 0,
            "logprobs": None,
            "finish_reason": _openai_reason(result.finish_reason[0]),
        }
        return dict(head, choices=[choice], usage=_usage(ids, result.tokens[0]).model_dump())

    # ---- helpers ---------------------------------------------------------------------

    def _prompt(self, prompt, tokens) -> list[int]:
        ids = self.tokenizer.encode(prompt) if prompt is not None else list(tokens)
        if len(ids) > self.max_prompt_tokens:
            raise HTTPException(
                413, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}"
            )
        return ids

    async def _submit(self, ids, max_tokens, req, state_name, session, need_state):
        """Queue the request on the batcher (from the event loop, so that its stream is
        async). Claims the session first: 409 while another turn of it is in flight. A
        named state is resolved on a thread: an MLflow lookup or download would stall every
        other stream of this replica."""
        if session is not None:
            with self._session_lock:
                if session in self._in_flight:
                    raise HTTPException(
                        409, f"session {session!r} has a request in flight; retry when it ends"
                    )
                self._in_flight.add(session)
        try:
            if state_name is None:
                state = self._start_state(state_name, session)
            else:
                state = await asyncio.to_thread(self._start_state, state_name, session)
            return _checked(
                self.batcher.submit,
                ids,
                max_tokens,
                seed=req.seed,
                state=state,
                need_state=need_state,
                on_finish=partial(self._finished, session),
                **req.sampling(),
            )
        except BaseException:
            self._release(session)
            raise

    def _start_state(self, state_name, session):
        """The session's state, or a tuned state (only to start a new session)."""
        state = self.sessions.get(session) if session is not None else None
        if state_name is None:
            return state
        if state is not None:
            raise HTTPException(
                409,
                f"session {session!r} continues from its own state; 'state' can only "
                "start a new session",
            )
        return _checked(self.states.get, state_name)

    def _finished(self, session, result) -> None:
        """On the batcher's thread when a turn ends (result None: cancelled or failed)."""
        try:
            if session is not None and result is not None:
                self.sessions.put(session, result.state)
        finally:
            self._release(session)

    def _release(self, session) -> None:
        if session is not None:
            with self._session_lock:
                self._in_flight.discard(session)

    async def _pieces(self, stream, stop):
        """("tokens", [(id, text), ...], None) per decode call, then ("done", result, rest
        of the text); the stream is cancelled (its slot freed) if the consumer stops early.
        One HTTP chunk per decode call: the events of a call's tokens travel together."""
        text = TextStream(self.tokenizer, stream.request.end_tokens, stop)
        try:
            async for tokens in stream:
                yield "tokens", [(token, text.push(token)) for token in tokens], None
            yield "done", stream.result, text.finish(stream.result.text[0])
        finally:
            stream.cancel()  # a no-op once the request has ended

    async def _generate_events(self, stream, ids, req: GenerateRequest):
        try:
            async for kind, value, piece in self._pieces(stream, req.stop):
                if kind == "tokens":
                    yield b"".join(_sse({"text": text, "token": token}) for token, text in value)
                    continue
                final = {
                    "text": piece,
                    "finish_reason": value.finish_reason[0],
                    "usage": _usage(ids, value.tokens[0]).model_dump(),
                    "session": req.session,
                }
                if req.return_state:
                    final["state"] = _state_b64(value.state, self.model)
                yield _sse(final)
        except Exception as err:  # the headers are sent: report in the stream
            yield _sse({"error": _message(err)})

    async def _completion_events(self, stream, ids, head: dict):
        def chunk(text, reason=None, **extra):
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
            return _sse(dict(head, choices=[choice], **extra))

        try:
            async for kind, value, piece in self._pieces(stream, stream.request.stop):
                if kind == "tokens":
                    texts = b"".join(chunk(text) for _, text in value if text)
                    if texts:
                        yield texts
                    continue
                reason = _openai_reason(value.finish_reason[0])
                yield chunk(piece, reason, usage=_usage(ids, value.tokens[0]).model_dump())
        except Exception as err:
            yield _sse({"error": {"message": _message(err), "type": "server_error"}})
        yield _sse("[DONE]")


ARGS = {
    "model",
    "states_dir",
    "model_name",
    "dtype",
    "session_bytes",
    "session_ttl_s",
    "max_prompt_tokens",
    "max_body_bytes",
    "max_batch_size",
    "steps_per_call",
    "mlflow_tracking_uri",
    "state_cache_dir",
}
OPTION_ARGS = {"num_replicas", "num_cpus", "num_gpus"}


def app_builder(args: dict):
    """Build the application from Serve config / `serve run` args (strings allowed).

    Args: model (required), states_dir, model_name, dtype, session_bytes, session_ttl_s,
    max_prompt_tokens, max_body_bytes, max_batch_size (batcher slots; 1 = serial),
    steps_per_call, mlflow_tracking_uri, state_cache_dir (MLflow states' downloads); and
    num_replicas, num_cpus, num_gpus per replica."""
    args = dict(args)
    unknown = set(args) - ARGS - OPTION_ARGS
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; known: {sorted(ARGS | OPTION_ARGS)}")
    if "model" not in args:
        raise ValueError("app args need 'model' (a converted model directory or a .pth)")
    numbers = {"session_bytes": int, "max_prompt_tokens": int, "max_body_bytes": int}
    numbers.update(max_batch_size=int, steps_per_call=int, session_ttl_s=float)
    numbers.update(num_replicas=int, num_cpus=float, num_gpus=float)
    for key, kind in numbers.items():
        if key in args:
            args[key] = kind(args[key])
    actor = {k: args.pop(k) for k in ("num_cpus", "num_gpus") if k in args}
    options = {"ray_actor_options": actor} if actor else {}
    if "num_replicas" in args:
        options["num_replicas"] = args.pop("num_replicas")
    return RWKVServer.options(**options).bind(**args)
