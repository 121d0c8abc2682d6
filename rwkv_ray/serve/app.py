"""The Ray Serve application: a FastAPI ingress deployment around `rwkv_ray.generation`.

Routes (JSON bodies; unknown fields, malformed JSON and out-of-range values -> 4xx):
  POST   /v1/generate          prompt or tokens, every sampling control, `state` (a tuned
                               state by name), `session`, `return_state`, `stream` (SSE)
  POST   /v1/completions       OpenAI-compatible subset (prompt, max_tokens, temperature,
                               top_p, stop, stream, n=1)
  DELETE /v1/sessions/{id}     drop a session's state
  GET    /v1/states, /v1/models, /healthz

Streaming (`stream: true`) answers `text/event-stream`: one `data: {...}` event per
generated token ({"text", "token"}; the text of a token that ends a multi-byte character or
may start a stop string is held back until it is certain), then a final event with
`finish_reason` and `usage`. The chunks' texts concatenate to the non-streamed `text`.
/v1/completions streams OpenAI `text_completion` chunks and ends with `data: [DONE]`.

A session holds the state after its last turn: a turn with `session` continues from it
(the new prompt is read on top of the whole history) and stores the new state. Requests run
one at a time per replica (a lock around the model). If the env var RWKV_RAY_API_TOKEN is
set, every route but /healthz needs `Authorization: Bearer <token>`.

    serve run rwkv_ray.serve.app:app_builder model=models/1b6 states_dir=states
"""

import asyncio
import base64
import codecs
import json
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from rwkv_ray.serve.schemas import CompletionRequest, GenerateRequest, GenerateResponse, Usage
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


class TextStream:
    """Token ids -> text pieces whose concatenation is the final text: a cut multi-byte
    character is held back, and so are the last characters that could start a stop string."""

    def __init__(self, tokenizer, end_tokens, stop):
        self.tokenizer, self.end_tokens = tokenizer, frozenset(end_tokens)
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        # A stop string found later starts at most its length - 1 characters back.
        self.hold = max((len(s.encode()) - 1 for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if token in self.end_tokens or self.stopped:
            return ""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        tail = self.text[max(0, self.sent - self.hold) :]
        if any(s in tail for s in self.stops):  # generation ends here: `finish` cuts it
            self.stopped = True
            return ""
        safe = len(self.text) - self.hold
        piece = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def finish(self, final_text: str) -> str:
        return final_text[self.sent :]


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


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(api)
class RWKVServer:
    """One model per replica, with its tuned states and its sessions."""

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
    ):
        from rwkv_ray.convert import load_model
        from rwkv_ray.tokenizer import WorldTokenizer

        self.model = load_model(model, dtype)
        self.model_name = model_name or Path(model).stem
        self.tokenizer = WorldTokenizer()
        self.states = StateRegistry(states_dir, self.model)
        self.sessions = SessionCache(session_bytes, session_ttl_s)
        self.max_prompt_tokens, self.max_body_bytes = max_prompt_tokens, max_body_bytes
        self.lock = threading.Lock()

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

    @api.delete("/v1/sessions/{session}", dependencies=[Depends(_auth)])
    def delete_session(self, session: str) -> dict:
        _checked(check_name, session)
        if not self.sessions.delete(session):
            raise HTTPException(404, f"unknown session {session!r}")
        return {"deleted": session}

    @api.post("/v1/generate", dependencies=[Depends(_auth)])
    async def generate(self, request: Request):
        req = await _read(request, GenerateRequest, self.max_body_bytes)
        ids, state = self._inputs(req.prompt, req.tokens, req.state, req.session)
        kwargs = dict(req.sampling(), seed=req.seed, state=state)
        if req.stream:
            stream = _checked(self._stream, ids, req.max_tokens, kwargs)
            events = self._generate_events(stream, ids, req)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await asyncio.to_thread(self._generate, ids, req.max_tokens, kwargs)
        self._remember(req.session, result)
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
        ids, _ = self._inputs(req.prompt, None, None, None)
        kwargs = dict(req.sampling(), seed=req.seed)
        head = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if req.stream:
            stream = _checked(self._stream, ids, req.max_tokens, kwargs)
            events = self._completion_events(stream, ids, head)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await asyncio.to_thread(self._generate, ids, req.max_tokens, kwargs)
        choice = {
            "text": result.text[0],
            "index": 0,
            "logprobs": None,
            "finish_reason": _openai_reason(result.finish_reason[0]),
        }
        return dict(head, choices=[choice], usage=_usage(ids, result.tokens[0]).model_dump())

    # ---- helpers ---------------------------------------------------------------------

    def _inputs(self, prompt, tokens, state_name, session):
        """Prompt ids and the state to start from (the session's, or a tuned state)."""
        ids = self.tokenizer.encode(prompt) if prompt is not None else list(tokens)
        if len(ids) > self.max_prompt_tokens:
            raise HTTPException(
                413, f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}"
            )
        state = self.sessions.get(session) if session is not None else None
        if state_name is not None:
            if state is not None:
                raise HTTPException(
                    409,
                    f"session {session!r} continues from its own state; 'state' can only "
                    "start a new session",
                )
            state = _checked(self.states.get, state_name)
        return ids, state

    def _generate(self, ids, max_tokens, kwargs):
        from rwkv_ray.generation import generate

        with self.lock:
            return _checked(
                generate, self.model, [ids], max_tokens, tokenizer=self.tokenizer, **kwargs
            )

    def _stream(self, ids, max_tokens, kwargs):
        from rwkv_ray.generation import stream_generate

        return stream_generate(self.model, [ids], max_tokens, tokenizer=self.tokenizer, **kwargs)

    def _remember(self, session, result) -> None:
        if session is not None:
            _checked(self.sessions.put, session, result.state)

    def _pieces(self, stream, stop):
        """Under the model lock: ("token", id, text) per step, then ("done", result, rest)."""
        with self.lock:
            text = TextStream(self.tokenizer, stream.request.end_tokens, stop)
            for step in stream:
                if step[0] is not None:
                    yield "token", step[0], text.push(step[0])
            yield "done", stream.result, text.finish(stream.result.text[0])

    def _generate_events(self, stream, ids, req: GenerateRequest):
        try:
            for kind, value, piece in self._pieces(stream, req.stop):
                if kind == "token":
                    yield _sse({"text": piece, "token": value})
                    continue
                self._remember(req.session, value)
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

    def _completion_events(self, stream, ids, head: dict):
        def chunk(text, reason=None, **extra):
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
            return _sse(dict(head, choices=[choice], **extra))

        try:
            for kind, value, piece in self._pieces(stream, stream.request.stop):
                if kind == "token":
                    if piece:
                        yield chunk(piece)
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
}
OPTION_ARGS = {"num_replicas", "num_cpus", "num_gpus"}


def app_builder(args: dict):
    """Build the application from Serve config / `serve run` args (strings allowed).

    Args: model (required), states_dir, model_name, dtype, session_bytes, session_ttl_s,
    max_prompt_tokens, max_body_bytes; and num_replicas, num_cpus, num_gpus per replica."""
    args = dict(args)
    unknown = set(args) - ARGS - OPTION_ARGS
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; known: {sorted(ARGS | OPTION_ARGS)}")
    if "model" not in args:
        raise ValueError("app args need 'model' (a converted model directory or a .pth)")
    numbers = {"session_bytes": int, "max_prompt_tokens": int, "max_body_bytes": int}
    numbers.update(session_ttl_s=float, num_replicas=int, num_cpus=float, num_gpus=float)
    for key, kind in numbers.items():
        if key in args:
            args[key] = kind(args[key])
    actor = {k: args.pop(k) for k in ("num_cpus", "num_gpus") if k in args}
    options = {"ray_actor_options": actor} if actor else {}
    if "num_replicas" in args:
        options["num_replicas"] = args.pop("num_replicas")
    return RWKVServer.options(**options).bind(**args)
