"""Continuous batching, load, session conflicts, disconnects and MLflow states.

The batcher is checked against the library alone (`generate(model, [prompt], ...)`, same
seed): tokens, finish reasons and texts are equal exactly, states to float32 rounding.
The server part runs over real HTTP on 127.0.0.1 (tiny random checkpoint, CPU).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from official import random_state_dict, torch_save
from test_serve import NO_PAD, VOCAB, local_serve, post, sse

import rwkv_ray
from rwkv_ray.generation import engine as eng
from rwkv_ray.generation import generate, load_state, save_state
from rwkv_ray.generation.batcher import ContinuousBatcher
from rwkv_ray.models import RWKV6Config, RWKV6State

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

STATE_ATOL = 1e-5  # a row decoded in a batch vs alone: float32 rounding of the batched matmuls
SMALL = dict(slots=2, steps_per_call=4, max_new_tokens=4096)  # one compilation for all tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    sd = random_state_dict(5, vocab_size=VOCAB, num_layers=1, hidden_size=64, head_size=32)
    path = torch_save(sd, root / "tiny.pth")
    return rwkv_ray.load_model(path), path, root


def drain(stream) -> list[int]:
    return [token for tokens in stream for token in tokens]


def test_packed_decode_in_the_batcher_equals_the_library(tiny):
    """The batcher with packed projection kernels (the GPU default; vmapped over slots)
    gives the unpacked library's greedy tokens."""
    model = tiny[0]
    prompts = [np.random.default_rng(7).integers(1, VOCAB, n).tolist() for n in (4, 7)]
    want = [generate(model, [p], 10, token_ban=NO_PAD).tokens[0] for p in prompts]
    saved = eng._ENGINES[model]
    eng._ENGINES[model] = eng.Engine(model, pack=True)
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        assert batcher.engine.pack
        streams = [batcher.submit(p, 10, token_ban=NO_PAD) for p in prompts]
        got = [drain(s) for s in streams]
    finally:
        batcher.close()
        eng._ENGINES[model] = saved
    assert got == want


def test_batched_rows_equal_the_library_alone(tiny):
    model = tiny[0]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (3, 9, 6)]
    greedy = generate(model, [prompts[0]], 12, token_ban=NO_PAD).tokens[0]
    topk = dict(search_mode="topk", k=20, temperature=0.7, penalty=1.3, alpha_presence=0.3)
    cases = [  # (max_new_tokens, settings): 3 batched requests on 2 slots: one slot reused
        (12, dict(end_token=greedy[5])),  # ends on its 6th token
        (9, dict(search_mode="topp", k=0.9, seed=1)),
        (14, dict(topk, alpha_frequency=0.5, seed=3)),
    ]
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        streams = [
            batcher.submit(p, n, token_ban=NO_PAD, **s)
            for p, (n, s) in zip(prompts, cases, strict=True)
        ]
        got = [(drain(s), s.result) for s in streams]
        stats = batcher.describe()
    finally:
        batcher.close()
    for (tokens, result), prompt, (n, settings) in zip(got, prompts, cases, strict=True):
        want = generate(model, [prompt], n, token_ban=NO_PAD, **settings)
        assert tokens == result.tokens[0] == want.tokens[0], settings
        assert result.finish_reason == want.finish_reason and result.text == want.text
    assert got[0][1].finish_reason == ["end_token"] and len(got[0][0]) == 6
    assert (stats["admitted"], stats["finished"], stats["busy"]) == (3, 3, 0)
    assert stats["max_busy"] == 2  # rows did share decode calls


def test_penalty_window_runs_alone_like_the_library(tiny):
    model, prompt = tiny[0], [3, 1, 4, 1, 5]
    settings = dict(penalty=1.2, penalty_window=4, seed=5, token_ban=NO_PAD)
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        stream = batcher.submit(prompt, 7, **settings)
        tokens = drain(stream)
        stats = batcher.describe()
    finally:
        batcher.close()
    assert tokens == generate(model, [prompt], 7, **settings).tokens[0]
    assert (stats["alone"], stats["admitted"]) == (1, 0)


def test_stop_with_state_is_exact_and_continues(tiny):
    model = tiny[0]
    prompt = [101, 202, 303]
    settings = dict(search_mode="topk", k=30, seed=9, stop=["e", "a"], token_ban=NO_PAD)
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        other = batcher.submit([7, 8], 40, token_ban=NO_PAD)  # a neighbour the whole time
        stream = batcher.submit(prompt, 40, need_state=True, **settings)
        tokens = drain(stream)
        drain(other)
    finally:
        batcher.close()
    want = generate(model, [prompt], 40, **settings)
    assert want.finish_reason == ["stop"] and tokens == want.tokens[0]
    for got_piece, want_piece in zip(stream.result.state, want.state, strict=True):
        np.testing.assert_allclose(got_piece, want_piece, rtol=0, atol=STATE_ATOL)
    np.testing.assert_allclose(stream.result.state.logits, want.state.logits, atol=STATE_ATOL)
    more = generate(model, [[]], 6, state=stream.result.state, token_ban=NO_PAD)
    assert more.tokens == generate(model, [[]], 6, state=want.state, token_ban=NO_PAD).tokens


def test_the_batchers_token_cap_holds_for_numpy_integers(tiny):
    batcher = ContinuousBatcher(tiny[0], **SMALL)
    try:
        for count in (SMALL["max_new_tokens"] + 1, np.int64(SMALL["max_new_tokens"] + 1)):
            with pytest.raises(ValueError, match="max_new_tokens must be <="):
                batcher.submit([5, 6], count, token_ban=NO_PAD)
    finally:
        batcher.close()


def test_cancel_frees_the_slot(tiny):
    model = tiny[0]
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        stream = batcher.submit([5, 6], 4096, token_ban=NO_PAD)
        first = next(iter(stream))
        stream.cancel()
        rest = drain(stream)  # ends promptly, without the 4096 tokens
        after = batcher.submit([5, 6], 5, token_ban=NO_PAD)
        tokens = drain(after)
        stats = batcher.describe()
    finally:
        batcher.close()
    assert len(first) + len(rest) < 4096 and stream.result is None
    assert (stats["cancelled"], stats["busy"]) == (1, 0)
    assert tokens == generate(model, [[5, 6]], 5, token_ban=NO_PAD).tokens[0]


def favour(model, token: int) -> None:
    """Make `token` the most likely next token after any input: the final norm's output
    is steered to a constant (its beta), and the head's column of `token` points along it."""
    weights = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: v for v in model.weights}
    weights["ln_out/gamma"].assign(np.asarray(weights["ln_out/gamma"].value) * 0.05)
    weights["ln_out/beta"].assign(np.ones(model.config.hidden_size, np.float32))
    head = np.array(model.head.kernel.value)
    head[:, token] = 3.0
    model.head.kernel.assign(head)


def test_a_token_the_tokenizer_lacks_fails_nobody(tiny):
    """The model's ids 65530..65535 have no World tokenizer entry; sampling can draw one.
    Decoding it for a stop string raised, and the batcher failed every request of the
    call (a 400 for both); a response's text raised (a 500). Now it decodes to nothing."""
    model = rwkv_ray.load_model(tiny[1])
    favour(model, VOCAB - 1)
    batcher = ContinuousBatcher(model, **SMALL)
    try:
        odd = batcher.submit([9, 10], 6, token_ban=NO_PAD, stop=["xyz"])
        other = batcher.submit([5, 6, 7], 6, token_ban=[0, VOCAB - 1])
        tokens = drain(odd), drain(other)
    finally:
        batcher.close()
    assert tokens[0] == [VOCAB - 1] * 6 and odd.result.text == [""]
    alone = generate(model, [[5, 6, 7]], 6, token_ban=[0, VOCAB - 1])
    assert tokens[1] == alone.tokens[0] and other.result.text == alone.text
    assert generate(model, [[9, 10]], 3, token_ban=NO_PAD, stop=["xyz"]).text == [""]


def test_a_cancelled_request_waiting_to_run_alone_ends_at_once(tiny):
    """A penalty_window request queued behind another such request: its cancel ended it
    only once the one before had finished (and its session stayed claimed till then)."""
    batcher = ContinuousBatcher(tiny[0], **SMALL)
    try:
        alone = dict(token_ban=NO_PAD, penalty=1.2, penalty_window=8)
        first = batcher.submit([5, 6], 4096, **alone)
        next(iter(first))  # running alone
        waiting = batcher.submit([7, 8], 4, **alone)
        time.sleep(0.2)  # waiting for the first
        waiting.cancel()
        assert drain(waiting) == [] and waiting.result is None
        assert first.result is None  # ended while the first still runs
        first.cancel()
        drain(first)
        stats = batcher.describe()
    finally:
        batcher.close()
    assert (stats["cancelled"], stats["alone"], stats["admitted"]) == (2, 0, 0)


def test_a_model_version_registered_from_a_run_uses_the_configured_server(
    tiny, tmp_path, monkeypatch
):
    """models:/<name>/<version> whose source is runs:/<id>/export (what
    mlflow.register_model records) was downloaded through MLflow's global default store,
    not the server's tracking URI: "Run ... not found" (a 404)."""
    from mlflow.tracking import MlflowClient

    from rwkv_ray.serve.mlflow_states import MlflowStates

    model = tiny[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", str(tmp_path / "artifacts")))
    export = tmp_path / "export"
    export.mkdir()
    tuned = generate(model, [[5, 6]], 2, token_ban=NO_PAD).state
    save_state(tuned, export / "state.npz", model)
    client.log_artifacts(run.info.run_id, str(export), "export")
    client.create_registered_model("m")
    client.create_model_version("m", source=f"runs:/{run.info.run_id}/export")
    state = MlflowStates(model, uri, tmp_path / "cache").get("models:/m/1")
    np.testing.assert_array_equal(np.asarray(state.wkv), np.asarray(tuned.wkv))


# ---- over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    _, path, root = tiny
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = dict(model=str(path), model_name="tiny", num_cpus=0.1, max_batch_size=8)
    args.update(mlflow_tracking_uri=uri, state_cache_dir=str(root / "state_cache"))
    with local_serve(args) as url:
        yield url, uri


def stats(url: str) -> dict:
    return requests.get(f"{url}/v1/stats", timeout=30).json()


def test_32_concurrent_streams(server, tiny):
    url, model = server[0], tiny[0]
    bodies = [
        dict(tokens=[i + 1, 2 * i + 7], max_tokens=5, token_ban=NO_PAD, stream=True)
        | (dict(search_mode="topp", k=0.9, seed=i) if i % 2 else {})
        for i in range(32)
    ]

    def one(body):
        return sse(post(f"{url}/v1/generate", body, stream=True))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, bodies))
    for body, events in zip(bodies, answers, strict=True):
        assert not [e for e in events if "error" in e], events
        settings = {k: v for k, v in body.items() if k not in ("tokens", "max_tokens", "stream")}
        want = generate(model, [body["tokens"]], 5, **settings)
        assert [e["token"] for e in events[:-1]] == want.tokens[0]
    now = stats(url)
    assert now["busy"] == 0 and now["max_busy"] > 1, now


def test_session_conflict_and_client_disconnect(server, tiny):
    url, model = server[0], tiny[0]
    before = stats(url)["cancelled"]
    body = dict(tokens=[9, 10, 11], max_tokens=4096, token_ban=NO_PAD, session="busy")
    with requests.post(f"{url}/v1/generate", json=dict(body, stream=True), stream=True) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[6:])["token"] > 0
        conflict = post(f"{url}/v1/generate", dict(body, max_tokens=2))
        assert conflict.status_code == 409, conflict.text
        # Deleting it now would be undone when the turn ends (it stores its state).
        deleting = requests.delete(f"{url}/v1/sessions/busy", timeout=30)
        assert deleting.status_code == 409, deleting.text
    deadline = time.monotonic() + 30
    while (now := stats(url))["busy"] or now["busy_sessions"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now["cancelled"] == before + 1  # freed by the disconnect, not by finishing
    again = post(f"{url}/v1/generate", dict(body, max_tokens=4))
    assert again.status_code == 200, again.text
    # The cancelled turn left the session as it was (new): this turn starts from scratch.
    assert again.json()["tokens"] == generate(model, [[9, 10, 11]], 4, token_ban=NO_PAD).tokens[0]


def log_tuned_state(model_path, uri: str, export_dir: Path) -> str:
    """Log a state the way the state-tuning job does; return the run id."""
    from rwkv_ray.train.config import JobConfig
    from rwkv_ray.train.tracking import Tracker

    config = JobConfig.from_dict(
        dict(name="tuned-job", mode="state", model=dict(path=str(model_path)))
        | dict(mlflow=dict(tracking_uri=uri))
    )
    model = rwkv_ray.load_model(model_path)
    rng = np.random.default_rng(3)
    for block in model.backbone.blocks:  # a "tuned" initial state
        wkv = block.time_mix.initial_wkv
        wkv.assign(rng.normal(0, 0.5, wkv.shape).astype("float32"))
    tracker = Tracker(config)
    tracker.finish(model, config, export_dir)
    return tracker.run_id


def test_mlflow_states_by_run_and_alias(server, tiny, tmp_path):
    (url, uri), (model, path, _) = server, tiny
    run_id = log_tuned_state(path, uri, tmp_path / "export")
    tuned = load_state(tmp_path / "export" / "state.npz", model)
    sampling = dict(search_mode="topp", k=0.9, seed=11, token_ban=NO_PAD)
    want = generate(model, ["Hello"], 6, state=tuned, **sampling).tokens[0]
    assert want != generate(model, ["Hello"], 6, **sampling).tokens[0]
    for name in (f"runs:/{run_id}", f"mlflow:runs:/{run_id}/export", "models:/tuned-job@candidate"):
        got = post(f"{url}/v1/generate", dict(prompt="Hello", max_tokens=6, state=name, **sampling))
        assert got.status_code == 200, (name, got.text)
        assert got.json()["tokens"] == want, name
    # A state of another model: logged to the same run, refused with the reason.
    from mlflow.tracking import MlflowClient

    other = RWKV6Config.from_dict(dict(model.config.to_dict(), hidden_size=32))
    save_state(RWKV6State.zeros(1, 1, 1, 32), tmp_path / "other.npz", other)
    MlflowClient(uri).log_artifact(run_id, str(tmp_path / "other.npz"), "wrong")
    bad = post(f"{url}/v1/generate", dict(prompt="Hi", state=f"runs:/{run_id}/wrong/other.npz"))
    assert bad.status_code == 400 and "needs (1, 1, 64)" in bad.json()["detail"], bad.text
    missing = post(f"{url}/v1/generate", dict(prompt="Hi", state="models:/tuned-job@nope"))
    assert missing.status_code == 404, missing.text
    sneaky = post(f"{url}/v1/generate", dict(prompt="Hi", state=f"runs:/{run_id}/../x.npz"))
    assert sneaky.status_code in (400, 422), sneaky.text
