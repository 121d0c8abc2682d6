"""The Serve application over real HTTP on 127.0.0.1 (tiny random checkpoint, CPU).

Checks generation through HTTP against the library call with the same seed and state,
streaming against non-streaming, sessions against one pass over the whole history, and that
bad input gets a 4xx while the server keeps answering.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import requests
from official import random_state_dict, torch_save

import rwkv_ray
from rwkv_ray.generation import generate, load_state, save_state

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65536  # the World tokenizer's ids go up to 65529
NO_PAD = [0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    sd = random_state_dict(5, vocab_size=VOCAB, num_layers=1, hidden_size=64, head_size=32)
    path = torch_save(sd, root / "tiny.pth")
    model = rwkv_ray.load_model(path)
    states = root / "states"
    states.mkdir()
    tuned = generate(model, ["A tuned start."], 4, token_ban=NO_PAD).state
    save_state(tuned, states / "tuned.npz", model)
    return model, path, states


@contextlib.contextmanager
def local_serve(app_args: dict):
    """A local Ray (2 CPUs) running the Serve app built from `app_args`; yields its URL."""
    from rwkv_ray.serve.app import app_builder

    env = {k: os.environ[k] for k in ("KERAS_BACKEND", "JAX_PLATFORMS") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Serve gives its HTTP proxy 60 s to come up, checking it every 5 s by default; on a
    # busy 2-core machine a check can take longer than that, and the start fails.
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
    if ray.is_initialized():  # another module's Ray without our runtime_env
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(app_args))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server(model_files):
    _, path, states = model_files
    args = dict(model=str(path), states_dir=str(states), model_name="tiny", num_cpus=0.1)
    with local_serve(dict(args, max_prompt_tokens=1000, max_body_bytes=65536)) as url:
        yield url


def post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kwargs)


def sse(response: requests.Response) -> list:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith(b"data: ") for line in lines), lines
    return [
        line[6:].decode() if line == b"data: [DONE]" else json.loads(line[6:]) for line in lines
    ]


def test_health_models_states(server):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    states = requests.get(f"{server}/v1/states", timeout=30).json()["states"]
    assert [s["name"] for s in states] == ["tuned"]


@pytest.mark.parametrize("state", [None, "tuned"])
def test_generate_equals_library(server, model_files, state):
    model, _, states = model_files
    sampling = dict(search_mode="topp", k=0.9, temperature=1.0, seed=7, token_ban=NO_PAD)
    body = dict(prompt="Hello world", max_tokens=8, state=state, **sampling)
    response = post(f"{server}/v1/generate", body)
    assert response.status_code == 200, response.text
    got = response.json()
    tuned = load_state(states / "tuned.npz", model) if state else None
    want = generate(model, ["Hello world"], 8, state=tuned, **sampling)
    assert got["tokens"] == want.tokens[0]
    assert got["text"] == want.text[0]
    assert got["finish_reason"] == want.finish_reason[0]
    assert got["usage"]["completion_tokens"] == len(want.tokens[0])


@pytest.mark.parametrize("stop", [None, ["e", "the"]])
def test_stream_concatenates_to_text(server, stop):
    body = dict(prompt="Once upon a time", max_tokens=12, search_mode="topk", k=20, seed=3)
    body["stop"] = stop
    whole = post(f"{server}/v1/generate", body).json()
    events = sse(post(f"{server}/v1/generate", dict(body, stream=True), stream=True))
    assert "".join(e["text"] for e in events) == whole["text"]
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert [e["token"] for e in events[:-1]] == whole["tokens"]


def test_completions_openai_subset(server, model_files):
    model = model_files[0]
    body = dict(prompt="The sky is", max_tokens=6, temperature=0)
    got = post(f"{server}/v1/completions", body).json()
    want = generate(model, ["The sky is"], 6)
    assert got["object"] == "text_completion" and got["model"] == "tiny"
    assert got["choices"][0]["text"] == want.text[0]
    events = sse(post(f"{server}/v1/completions", dict(body, stream=True), stream=True))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == want.text[0]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_session_two_turns_equal_one_pass(server, model_files):
    model = model_files[0]
    rng = np.random.default_rng(0)
    first, second = (rng.integers(1, VOCAB, n).tolist() for n in (5, 4))
    body = dict(max_tokens=5, token_ban=NO_PAD, session="chat-1")
    turn1 = post(f"{server}/v1/generate", dict(body, tokens=first)).json()
    turn2 = post(f"{server}/v1/generate", dict(body, tokens=second)).json()
    history = first + turn1["tokens"] + second
    assert turn2["tokens"] == generate(model, [history], 5, token_ban=NO_PAD).tokens[0]
    streamed = dict(body, tokens=second, session="chat-2", stream=True)
    post(f"{server}/v1/generate", dict(body, tokens=first, session="chat-2"))
    events = sse(post(f"{server}/v1/generate", streamed, stream=True))
    assert [e["token"] for e in events[:-1]] == turn2["tokens"]
    conflict = post(f"{server}/v1/generate", dict(body, tokens=second, state="tuned"))
    assert conflict.status_code == 409, conflict.text
    assert requests.delete(f"{server}/v1/sessions/chat-1", timeout=30).status_code == 200
    assert requests.delete(f"{server}/v1/sessions/chat-1", timeout=30).status_code == 404


def test_return_state_continues_like_the_library(server, model_files, tmp_path):
    model = model_files[0]
    body = dict(prompt="Tell me", max_tokens=4, token_ban=NO_PAD, return_state=True)
    got = post(f"{server}/v1/generate", body).json()
    path = tmp_path / "returned.npz"
    path.write_bytes(base64.b64decode(got["state"]))
    more = generate(model, [[]], 4, state=load_state(path, model), token_ban=NO_PAD)
    once = generate(model, ["Tell me"], 8, token_ban=NO_PAD)
    assert got["tokens"] + more.tokens[0] == once.tokens[0]


BAD = [
    ("malformed JSON", b'{"prompt": "hi", ', 400),
    ("unknown field", {"prompt": "hi", "temprature": 0.5}, 422),
    ("temperature < 0", {"prompt": "hi", "temperature": -1}, 422),
    ("temperature too big", {"prompt": "hi", "temperature": 1e9}, 422),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, 422),
    ("prompt and tokens", {"prompt": "hi", "tokens": [5]}, 422),
    ("no prompt", {"max_tokens": 3}, 422),
    ("token id too big", {"tokens": [VOCAB], "max_tokens": 2}, 400),
    ("bad k for topk", {"prompt": "hi", "search_mode": "topk", "k": 0.5}, 400),
    ("k true", {"prompt": "hi", "search_mode": "topk", "k": True}, 422),
    ("max_tokens 2.0", {"prompt": "hi", "max_tokens": 2.0}, 422),
    ("unknown state", {"prompt": "hi", "state": "nope"}, 404),
    ("state with a path", {"prompt": "hi", "state": "../tuned"}, 422),
    ("state with a slash", {"prompt": "hi", "state": "a/b"}, 422),
    ("bad session name", {"prompt": "hi", "session": "a/b"}, 422),
    ("session name with ..", {"prompt": "hi", "session": "a..b"}, 422),  # DELETE refused it
    ("overlong prompt", {"tokens": [5] * 1001, "max_tokens": 1}, 413),
    ("body too large", {"prompt": "x" * 70000}, 413),
]


@pytest.mark.parametrize("body,status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_4xx(server, body, status):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        r = requests.post(f"{server}/v1/generate", data=body, headers=headers, timeout=60)
    else:
        r = post(f"{server}/v1/generate", body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200


def test_top_p_then_top_k_list_over_http_equals_library(server, model_files):
    """k = [p, k] (top-k then top-p) as JSON [0.9, 40]: the 40 stays an int."""
    body = {"tokens": [5, 6], "max_tokens": 4, "search_mode": "topp", "k": [0.9, 40], "seed": 1}
    r = post(f"{server}/v1/generate", {**body, "token_ban": NO_PAD})
    assert r.status_code == 200, r.text
    want = generate(model_files[0], [[5, 6]], 4, search_mode="topp", k=[0.9, 40], seed=1,
                    token_ban=NO_PAD)  # fmt: skip
    assert r.json()["tokens"] == want.tokens[0]


def test_bad_completions_are_4xx(server):
    assert post(f"{server}/v1/completions", {"prompt": "hi", "n": 2}).status_code == 422
    assert post(f"{server}/v1/completions", {"prompt": "hi", "model": "x"}).status_code == 404
    assert post(f"{server}/v1/completions", {"prompt": "hi", "top_p": 0}).status_code == 422
    r = requests.delete(f"{server}/v1/sessions/..%2Fx", timeout=30)
    assert 400 <= r.status_code < 500


# ---- pieces without a server ---------------------------------------------------------


class ByteTokenizer:
    """Token id i decodes to the bytes in `table[i]`."""

    def __init__(self, table):
        self.table = table

    def decode_bytes(self, ids):
        return b"".join(self.table[i] for i in ids)


def test_text_stream_holds_back_cut_characters_and_stops():
    from rwkv_ray.generation.text_stream import TextStream

    table = {1: "é".encode()[:1], 2: "é".encode()[1:] + b"a", 3: b"bXc", 4: b"d", 0: b""}
    text = TextStream(ByteTokenizer(table), [0], None)
    assert [text.push(t) for t in (1, 2, 4, 0)] == ["", "éa", "d", ""]
    text = TextStream(ByteTokenizer(table), [0], ["Xc"])
    pieces = [text.push(t) for t in (2, 3, 4)]
    assert "".join(pieces) + text.finish("\ufffdab") == "\ufffdab"


def test_session_cache_lru_budget_expiry_delete():
    from rwkv_ray.serve.sessions import SessionCache, state_nbytes

    now = [0.0]
    piece = np.zeros((1, 1, 4), np.float32)  # 16 bytes
    state = (piece, piece, piece)
    assert state_nbytes(state) == 48
    cache = SessionCache(max_bytes=100, ttl_s=10, clock=lambda: now[0])
    cache.put("a", state)
    cache.put("b", state)
    assert cache.get("a") is state  # refreshes a: b is now the oldest
    cache.put("c", state)
    assert cache.get("b") is None and cache.get("a") is state and len(cache) == 2
    now[0] = 11.0
    assert cache.get("a") is None and cache.nbytes == 0
    cache.put("d", state)
    assert cache.delete("d") and not cache.delete("d")
    with pytest.raises(ValueError, match="exceeds"):
        SessionCache(max_bytes=10).put("big", state)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a..b", "x" * 200])
def test_state_names_without_paths_are_refused(name):
    from rwkv_ray.serve.states import check_name

    with pytest.raises(ValueError, match="invalid state name"):
        check_name(name)


def test_bearer_token(monkeypatch):
    from fastapi import HTTPException

    from rwkv_ray.serve.app import TOKEN_ENV, _auth

    class Req:
        def __init__(self, header):
            self.headers = {"authorization": header} if header else {}

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    _auth(Req(None))  # no token configured: open
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    _auth(Req("Bearer s3cret"))
    for header in (None, "Bearer nope", "s3cret"):
        with pytest.raises(HTTPException) as err:
            _auth(Req(header))
        assert err.value.status_code == 401


def test_serve_command_parses():
    from rwkv_ray.serve.cli_commands import add_serve_command, run_serve

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m.pth", "--port", "9000", "--states-dir", "s"])
    assert (args.model, args.port, args.states_dir, args.func) == ("m.pth", 9000, "s", run_serve)


def test_state_and_session_names_explain_themselves():
    """A registered model named by a job such as the demo's 'demo-state+shift' is a valid
    state name; a bad name's 422 says what a name may be (it showed the regex)."""
    from pydantic import ValidationError

    from rwkv_ray.serve.schemas import GenerateRequest

    for state in ("models:/demo-state+shift@candidate", "models:/a+b/3", "runs:/0123abcd/x.npz"):
        assert GenerateRequest(prompt="x", state=state).state == state
    with pytest.raises(ValidationError, match=r"'state' must be a state of the states direc"):
        GenerateRequest(prompt="x", state="../tuned")
    with pytest.raises(ValidationError, match=r"'session' must be a name of letters"):
        GenerateRequest(prompt="x", session="a/b")


def test_serve_refuses_bad_paths_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from rwkv_ray.serve.cli_commands import add_serve_command

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    for argv, message in (
        (["--model", str(tmp_path / "nope")], "no such file or directory"),
        (["--model", str(tmp_path / "half")], "no model.weights.h5 there"),
        (
            ["--model", str(tmp_path / "half" / "config.json"), "--states-dir", "statez"],
            "--states-dir statez: not a directory",
        ),
    ):
        args = parser.parse_args(["serve", *argv])
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            args.func(args)
