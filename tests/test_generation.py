"""`generate` / `stream_generate` on a tiny random checkpoint, against the official `rwkv`
package (CPU, fp32) and against themselves (chunked, batched, streamed).

Greedy token sequences must be identical; states are compared with a tolerance of 1e-4 of
the largest |value| (two fp32 implementations, see test_model_vs_official.py). Token id 0
is banned in the comparisons with the official package: it is end-of-text / padding for
us, an ordinary embedding row for the official model.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from official import OfficialModel, official_state_to_numpy, random_state_dict, torch_save

import rwkv_ray
from rwkv_ray.generation import (
    StateMismatchError,
    compile_counts,
    generate,
    import_peft_state,
    load_state,
    stream_generate,
)
from rwkv_ray.generation import engine as engine_module
from rwkv_ray.models import RWKV6State

VOCAB = 97
RTOL_OF_MAX = 1e-4
NO_PAD = (0,)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sd = random_state_dict(11, vocab_size=VOCAB, num_layers=2, hidden_size=128)
    path = torch_save(sd, tmp_path_factory.mktemp("gen") / "model.pth")
    return sd, path, OfficialModel(path), rwkv_ray.load_model(path)


def prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, VOCAB, length).tolist()


def official_greedy(official, tokens, steps, state=None):
    """Argmax continuation (id 0 excluded) step by step -> (tokens, final state)."""
    out = []
    logits, state = official.forward(tokens, state)
    for _ in range(steps):
        scores = logits[-1].copy()
        scores[0] = -np.inf
        out.append(int(np.argmax(scores)))
        logits, state = official.forward([out[-1]], state)
    return out, state


def assert_state_close(ours, ref, what):
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-12)
        assert err <= RTOL_OF_MAX, f"{what} state[{i}]: error {err:.2e} of max"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint with the World vocabulary, for `rwkv-ray generate` (its tokenizer)."""
    sd = random_state_dict(11, vocab_size=65536, num_layers=1, hidden_size=64, head_size=32)
    return torch_save(sd, tmp_path_factory.mktemp("world") / "world.pth")


def run_cli_generate(*argv: str) -> None:
    from rwkv_ray import cli

    args = cli.build_parser("generate").parse_args(["generate", *argv])
    args.func(args)


@pytest.fixture(params=[False, True], ids=["unpacked", "packed"])
def pack(request, ckpt):
    """Decode with and without packed projection kernels (the GPU default is packed)."""
    model = ckpt[3]
    saved = engine_module._ENGINES.get(model)
    engine_module._ENGINES[model] = engine_module.Engine(model, pack=request.param)
    yield request.param
    engine_module._ENGINES[model] = saved


def test_greedy_matches_official_and_state_covers_every_token(ckpt, pack):
    _, _, official, model = ckpt
    prompts = [prompt(9, 1), prompt(3, 2)]
    result = generate(model, prompts, 12, token_ban=NO_PAD)
    for b, p in enumerate(prompts):
        tokens, state = official_greedy(official, p, 12)
        assert result.tokens[b] == tokens
        assert result.finish_reason[b] == "length"
        # The official state after prompt + all 12 tokens (the last one fed, too).
        _, ref = official.forward(p + tokens)
        assert_state_close(result.state.to_official(b), official_state_to_numpy(ref), "final")


def test_greedy_with_time_state_matches_official(ckpt, tmp_path):
    """A PEFT time_state saved by torch (their layout [H, value, key]), merged into the base
    .pth for the official package and imported as our state."""
    sd, _, _, model = ckpt
    rng = np.random.default_rng(3)
    time_state = {
        f"blocks.{i}.att.time_state": (rng.standard_normal((2, 64, 64)) * 0.5).astype(np.float32)
        for i in range(2)
    }
    peft = tmp_path / "state.pth"
    torch.save({k: torch.from_numpy(v) for k, v in time_state.items()}, str(peft))
    official = OfficialModel(torch_save({**sd, **time_state}, tmp_path / "merged.pth"))
    p = prompt(6, 4)
    expected = [official_greedy(official, row, 10)[0] for row in (p, p[:2])]
    state = import_peft_state(peft, model)
    assert generate(model, [p, p[:2]], 10, state=state, token_ban=NO_PAD).tokens == expected
    # The same state as the model's own initial state (what loading the merged .pth or
    # state tuning gives); variables are arguments of the compiled functions: no recompile.
    variables = [block.time_mix.initial_wkv for block in model.backbone.blocks]
    saved = [np.asarray(v.numpy()) for v in variables]
    try:
        for variable, tuned in zip(variables, np.asarray(state.wkv)[:, 0], strict=True):
            variable.assign(tuned)
        assert generate(model, [p, p[:2]], 10, token_ban=NO_PAD).tokens == expected
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)


def test_chunked_generation_equals_one_pass(ckpt):
    _, _, _, model = ckpt
    prompts = [prompt(5, 5), prompt(11, 6)]
    whole = generate(model, prompts, 14, token_ban=NO_PAD)
    first = generate(model, prompts, 5, token_ban=NO_PAD)
    second = generate(model, [[], []], 6, state=first.state, token_ban=NO_PAD)
    third = generate(model, [[], []], 3, state=second.state, token_ban=NO_PAD)
    for b in range(2):
        assert first.tokens[b] + second.tokens[b] + third.tokens[b] == whole.tokens[b]
    for a, c in zip(third.state, whole.state, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-6)


def test_new_prompt_after_state_equals_concatenation(ckpt):
    _, _, _, model = ckpt
    p1, p2 = prompt(7, 7), prompt(4, 8)
    first = generate(model, [p1, p2], 4, token_ban=NO_PAD)
    after = generate(model, [p2, p1], 6, state=first.state, token_ban=NO_PAD)
    concatenated = generate(
        model, [p1 + first.tokens[0] + p2, p2 + first.tokens[1] + p1], 6, token_ban=NO_PAD
    )
    assert after.tokens == concatenated.tokens


def test_mixed_length_batch_rows_equal_single_rows(ckpt):
    _, _, _, model = ckpt
    prompts = [prompt(n, 20 + n) for n in (1, 16)]  # batch and prompt buckets of others
    batch = generate(model, prompts, 9, token_ban=NO_PAD)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], 9, token_ban=NO_PAD)
        assert batch.tokens[b] == alone.tokens[0], f"row {b}"
        assert_state_close(batch.state.to_official(b), alone.state.to_official(0), f"row {b}")


def test_end_token_stops_its_row_and_freezes_its_state(ckpt):
    _, _, _, model = ckpt
    prompts = [prompt(5, 30), prompt(8, 31)]
    free = generate(model, prompts, 12, token_ban=NO_PAD)
    end = free.tokens[0][3]
    if end in free.tokens[1]:
        pytest.fail("pick another seed: both rows produce the end token")
    result = generate(model, prompts, 12, token_ban=NO_PAD, end_token=end)
    stop_at = free.tokens[0].index(end) + 1
    assert result.tokens[0] == free.tokens[0][:stop_at]  # the end token is the last one
    assert result.finish_reason == ["end_token", "length"]
    assert result.tokens[1] == free.tokens[1]  # the other row continues
    # The finished row's state covers exactly its tokens (end token included).
    short = generate(model, prompts[:1], stop_at, token_ban=NO_PAD)
    assert_state_close(result.state.to_official(0), short.state.to_official(0), "frozen row")
    assert len(result.text[0]) == stop_at - 1  # ids 1..96 are one byte each; no end token


def test_stream_yields_what_generate_returns(ckpt, pack):
    _, _, _, model = ckpt
    prompts = [prompt(5, 40), prompt(2, 41)]
    reference = generate(model, prompts, 10, token_ban=NO_PAD, end_token=prompt(1, 9)[0])
    stream = stream_generate(model, prompts, 10, token_ban=NO_PAD, end_token=prompt(1, 9)[0])
    steps = list(stream)
    for b in range(2):
        assert [s[b] for s in steps if s[b] is not None] == reference.tokens[b]
    assert stream.result.tokens == reference.tokens
    assert stream.result.finish_reason == reference.finish_reason


def test_stop_string_cuts_text_and_keeps_state_consistent(ckpt):
    _, _, _, model = ckpt
    prompts = [prompt(5, 50), prompt(6, 51)]
    free = generate(model, prompts, 10, token_ban=NO_PAD)
    stop = bytes([free.tokens[0][4] - 1]).decode("latin-1")  # World ids 1..96 = bytes 0..95
    result = generate(model, prompts, 10, token_ban=NO_PAD, stop=stop)
    first = free.tokens[0].index(free.tokens[0][4]) + 1
    assert result.finish_reason[0] == "stop"
    assert result.tokens[0] == free.tokens[0][:first]
    assert stop not in result.text[0]
    short = generate(model, prompts[:1], first, token_ban=NO_PAD)
    assert_state_close(result.state.to_official(0), short.state.to_official(0), "stop row")


def test_new_prompt_lengths_inside_a_bucket_do_not_recompile(ckpt):
    _, _, _, model = ckpt
    generate(model, [prompt(3, 60), prompt(4, 61)], 5, token_ban=NO_PAD)
    before = compile_counts()
    for length, new in ((5, 9), (9, 16), (14, 3), (16, 11)):
        generate(model, [prompt(length, 62), prompt(2, 63)], new, token_ban=NO_PAD)
    assert compile_counts() == before


def test_seeded_sampling_with_every_control_is_reproducible(ckpt):
    _, _, _, model = ckpt
    settings = dict(
        search_mode="topp",
        k=[0.9, 20],
        temperature=0.8,
        penalty=1.3,
        penalty_window=4,
        max_penalty_range=[1, 3],
        alpha_frequency=0.2,
        alpha_presence=0.1,
        alpha_decay=0.99,
        token_ban=(0, 5),
    )
    prompts = [prompt(5, 70), prompt(3, 71)]
    a = generate(model, prompts, 12, seed=1, **settings)
    b = generate(model, prompts, 12, seed=1, **settings)
    c = generate(model, prompts, 12, seed=2, **settings)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert all(5 not in row and 0 not in row for row in a.tokens + c.tokens)


def test_seeds_past_32_bits_draw_their_own_streams(ckpt):
    """jax.random.key kept the low 32 bits: 2**32 drew seed 0's tokens, 2**32 + 1 seed 1's."""
    _, _, _, model = ckpt
    rows = [prompt(4, 72)]

    def tokens(seed):
        return generate(
            model, rows, 16, search_mode="topp", k=0.99, temperature=2.0, seed=seed
        ).tokens

    zero, one = tokens(0), tokens(1)
    assert tokens(2**32) != zero and tokens(2**32 + 1) != one and tokens(2**40) != zero
    assert tokens(2**40) == tokens(2**40)  # still reproducible


def test_a_window_past_the_sequence_is_no_window(ckpt, monkeypatch):
    """penalty_window W with 2 W >= prompt bucket + new tokens: every position's window
    starts at 0, so the same tokens as no window, without the [B, W] history (2**27 took
    2 GB of memory for 8 tokens; 2**31 - 1 raised OverflowError)."""
    generate_module = sys.modules[
        "rwkv_ray.generation.generate"
    ]  # the package exports the function
    _, _, _, model = ckpt
    rows = [prompt(6, 73), prompt(2, 74)]
    settings = dict(penalty=1.5, max_penalty_range=[1, 3])
    expected = generate(model, rows, 8, **settings).tokens
    seen = []
    original = generate_module._penalties
    monkeypatch.setattr(
        generate_module,
        "_penalties",
        lambda engine, request, vocab: (
            seen.append(request.features.penalty_window) or original(engine, request, vocab)
        ),
    )
    for window in (2**27, 2**31 - 1, 2**40):
        assert generate(model, rows, 8, penalty_window=window, **settings).tokens == expected
    assert generate(model, rows, 8, penalty_window=2, **settings).tokens != expected
    assert seen == [None, None, None, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts="abc"), "prompts"),
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, VOCAB]]), r"prompts\[0\]"),
        (dict(prompts=[[1, 0, 2]]), r"prompts\[0\]"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(end_token=VOCAB), "end_token"),
        (dict(stop=""), "stop"),
        (dict(seed=-1), "seed"),
        (dict(temperature=-1.0), "temperature"),
        (dict(prompts=[[]]), "empty"),
        (dict(state=RWKV6State.zeros(3, 1, 2, 64)), "state.att_shift"),
        (dict(prompts=[[1], [2]], state=RWKV6State.zeros(2, 3, 2, 64)), "batch 3"),
    ],
)
def test_bad_arguments_raise_before_any_compute(ckpt, kwargs, message):
    _, _, _, model = ckpt
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    before = compile_counts()
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert compile_counts() == before
    assert issubclass(StateMismatchError, ValueError)


def test_top_level_api_exports_generation():
    """`rwkv_ray.generate(model, prompts, ...)` as the issue and README spell it."""
    from rwkv_ray import generation

    for name in ("generate", "stream_generate", "GenerationResult", "load_state", "save_state"):
        assert getattr(rwkv_ray, name) is getattr(generation, name)
    assert "generate" in rwkv_ray.__all__


def test_cli_generate_prints_the_library_text_without_its_stop_string(world, capsys):
    """`rwkv-ray generate --stop S` prints the prompt and the library's text: the stop
    string and the rest of the token holding it never reach the terminal."""
    from rwkv_ray import cli

    path = world
    model = rwkv_ray.load_model(path)
    free = generate(model, ["Hello"], 12, token_ban=[0])
    stop = free.text[0][3:6]  # three characters from inside the continuation
    want = generate(model, ["Hello"], 12, token_ban=[0], stop=stop)
    assert want.finish_reason == ["stop"] and stop not in want.text[0]
    argv = ["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "12"]
    argv += ["--token-ban", "0", "--stop", stop]
    args = cli.build_parser("generate").parse_args(argv)
    capsys.readouterr()
    args.func(args)
    assert capsys.readouterr().out == "Hello" + want.text[0] + "\n"


def test_cli_generate_saves_its_state_into_a_directory_it_makes(world, tmp_path, capsys):
    """--save-state into a directory that does not exist yet: the directory is made before
    the run and the file holds the run's final state (the whole generation was printed,
    then `[Errno 2] No such file or directory` lost the state)."""
    want = generate(rwkv_ray.load_model(world), ["Hello"], 6, token_ban=[0])
    out = tmp_path / "new" / "states" / "hello.npz"
    argv = ["--model", str(world), "--prompt", "Hello", "--max-new-tokens", "6"]
    run_cli_generate(*argv, "--token-ban", "0", "--save-state", str(out))
    captured = capsys.readouterr()
    assert captured.out == "Hello" + want.text[0] + "\n"
    assert captured.err.splitlines()[-1] == f"wrote {out}"
    saved = load_state(out)
    for got, expected in zip((*saved, saved.logits), (*want.state, want.state.logits), strict=True):
        np.testing.assert_array_equal(got, np.asarray(expected))


def test_cli_generate_refuses_a_state_of_another_format(world, tmp_path, capsys):
    """A weights file or junk given as --state: one line saying it is not a state file
    (numpy's message suggested loading it with allow_pickle)."""
    from rwkv_ray import cli

    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    argv = ["generate", "--model", str(world), "--prompt", "Hello", "--state", str(weights)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"rwkv-ray generate: error: {weights} is not a state file (an .npz written by "
        "save_state; an RWKV-PEFT state is a .pth, read by import_peft_state)\n"
    )


def test_cli_generate_gives_the_wkv_fallback_notice_before_any_text(world, monkeypatch):
    """The 'auto' WKV fallback notice (stderr) comes before the prompt is printed, once
    for all chunks: it came from the first forward, in the middle of the printed text."""
    from rwkv_ray.generation import cli_commands
    from rwkv_ray.ops import wkv as wkv_module

    for name in ("RWKV_WKV_IMPL", "OPS_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(wkv_module, "_fallback_logged", False)
    # The same fallback on any machine (a GPU's kernel would need no notice).
    monkeypatch.setattr(wkv_module, "kernel_status", lambda: (False, "no kernel in this test"))
    events = []

    class Record(logging.Handler):
        def emit(self, record):
            events.append(("notice", record.getMessage()))

    monkeypatch.setattr(cli_commands, "_write", lambda text: events.append(("text", text)))
    handler = Record()
    wkv_module.logger.addHandler(handler)
    try:
        run_cli_generate(
            "--model", str(world), "--prompt", "Hello", "--max-new-tokens", "4", "--chunk", "2"
        )
    finally:
        wkv_module.logger.removeHandler(handler)
    notices = [event for event in events if event[0] == "notice"]
    assert notices == [("notice", "WKV impl 'auto' uses 'chunked': no kernel in this test")]
    assert events[0] == notices[0] and events[1] == ("text", "Hello")
