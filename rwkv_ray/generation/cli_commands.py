"""`rwkv-ray generate`: stream a continuation to the terminal.

rwkv-ray generate --model models/1b6 --prompt "The Eiffel tower is in" --max-new-tokens 64
rwkv-ray generate --model m.pth --state tuned.pth --prompt "User: hi\\n\\nAssistant:" \\
    --search-mode topp --k 0.7 --temperature 1.0 --alpha-frequency 0.2 --end-token 261
rwkv-ray generate --model m.pth --prompt "Once upon a time" --max-new-tokens 60 --chunk 20

--state takes one of our state files (.npz, see `rwkv_ray.generation.state_io`) or an
RWKV-PEFT time_state .pth. --chunk N generates N tokens at a time, each chunk continuing
from the previous chunk's state with an empty prompt (exactly what one pass would give in
greedy mode without penalties: the penalties count per call, so they restart each chunk);
chunk boundaries are marked on stderr. --save-state writes the final state.

The command line is checked before the model loads (a run is never computed and then
refused), and the WKV implementation is chosen before any text is printed, so that its
fallback notice (stderr) does not land inside the generated text.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rwkv_ray.generation.sampling import SEARCH_MODES


def _k_value(text: str):
    """--k: an int (topk), a float p (topp) or 'p,k' (topp with top-k first)."""
    if "," in text:
        p, k = text.split(",", 1)
        return [float(p), int(k)]
    return float(text) if "." in text else int(text)


# What --k means in each search mode that takes it.
K_MEANING = {
    "topk": "the number of most likely tokens to sample from, e.g. 40",
    "topp": "the probability mass p of the most likely tokens to sample from, e.g. 0.7, "
    "or 'p,k' to keep the k most likely first",
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="converted model directory or .pth")
    parser.add_argument("--state", help="state to start from: our .npz or a PEFT .pth")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument(
        "--max-new-tokens", type=int, default=100, help="tokens to generate (default: %(default)s)"
    )
    parser.add_argument(
        "--search-mode",
        choices=SEARCH_MODES,
        default="greedy",
        help="greedy: always the most likely token (takes no --k, --seed or --temperature); "
        "topk / topp: sample, with --k (default: %(default)s)",
    )
    parser.add_argument(
        "--k",
        type=_k_value,
        help=f"required by topk and topp; topk: {K_MEANING['topk']}; topp: {K_MEANING['topp']}",
    )
    # None: not given (greedy refuses it), 1.0 for topk / topp.
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature for topk / topp (default: 1.0)"
    )
    parser.add_argument("--penalty", type=float, default=1.0, help="the seed's penalty")
    parser.add_argument("--penalty-window", type=int, help="the seed's penalty window")
    parser.add_argument("--max-penalty-range", type=int, nargs=2, metavar=("LO", "HI"))
    parser.add_argument(
        "--alpha-frequency",
        type=float,
        default=0.0,
        help="subtracted from a token's logit per time it was generated (the official "
        "pipeline's frequency penalty; default: %(default)s)",
    )
    parser.add_argument(
        "--alpha-presence",
        type=float,
        default=0.0,
        help="subtracted from the logit of every token generated so far (the official "
        "pipeline's presence penalty; default: %(default)s)",
    )
    parser.add_argument(
        "--alpha-decay",
        type=float,
        default=1.0,
        help="the --alpha-frequency counts are multiplied by this after each token, in "
        "[0, 1] (default: %(default)s)",
    )
    parser.add_argument("--token-ban", type=int, nargs="*", default=[], metavar="ID")
    parser.add_argument("--end-token", type=int, nargs="*", metavar="ID", help="e.g. 261")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="sampling seed for topk / topp (default: random)")
    parser.add_argument("--chunk", type=int, help="generate N tokens per chunk, from the state")
    parser.add_argument(
        "--save-state", help="write the final state (.npz) here (missing directories are made)"
    )
    parser.add_argument("--dtype", default=None, help="Keras dtype policy, e.g. bfloat16")


def _check_arguments(args) -> None:
    """Refuse what the command line alone gets wrong, before the model loads."""
    if args.max_new_tokens < 1:
        # The library generates at least one token (it has no prompt-only run).
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk is not None and args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.search_mode == "greedy":
        # Greedy search never samples: these would be ignored without a word.
        options = {"--k": args.k, "--seed": args.seed, "--temperature": args.temperature}
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise ValueError(
                "--search-mode greedy always takes the most likely token: "
                f"{' and '.join(given)} would be ignored (sample with --search-mode topk or topp)"
            )
    elif args.k is None:
        raise ValueError(
            f"--search-mode {args.search_mode} requires --k: {K_MEANING[args.search_mode]}"
        )


def _state_output(path: str) -> Path:
    """--save-state's file, its directory made now: a missing directory must not lose the
    state after the whole generation has run."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--save-state {path} is a directory, not a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or e
        raise OSError(f"--save-state: cannot create the directory {out.parent} ({reason})") from e
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"--save-state: the directory {out.parent} is not writable")
    return out


def _load_state(path: str, model):
    from rwkv_ray.generation.state_io import import_peft_state, load_state

    if path.endswith(".pth"):
        return import_peft_state(path, model)
    return load_state(path, model)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _sampling(args) -> dict:
    return dict(
        search_mode=args.search_mode,
        k=args.k,
        temperature=1.0 if args.temperature is None else args.temperature,
        penalty=args.penalty,
        penalty_window=args.penalty_window,
        max_penalty_range=args.max_penalty_range,
        alpha_frequency=args.alpha_frequency,
        alpha_presence=args.alpha_presence,
        alpha_decay=args.alpha_decay,
        token_ban=args.token_ban,
        end_token=args.end_token or None,
        stop=args.stop,
        seed=args.seed,
    )


def run_generate(args) -> None:
    from rwkv_ray.convert import load_model
    from rwkv_ray.generation.generate import stream_generate
    from rwkv_ray.generation.state_io import save_state
    from rwkv_ray.generation.text_stream import TextStream
    from rwkv_ray.ops import resolve_wkv_impl
    from rwkv_ray.tokenizer import WorldTokenizer

    _check_arguments(args)
    save_path = _state_output(args.save_state) if args.save_state else None
    model = load_model(args.model, dtype=args.dtype)
    tokenizer = WorldTokenizer()
    state = _load_state(args.state, model) if args.state else None
    # Chosen now, not in the first forward: a fallback notice then precedes the text.
    resolve_wkv_impl(model.backbone.wkv_impl)
    chunk = args.chunk or args.max_new_tokens
    left, prompt = args.max_new_tokens, args.prompt
    while left > 0:
        stream = stream_generate(
            model, [prompt], min(chunk, left), state=state, tokenizer=tokenizer, **_sampling(args)
        )
        _write(prompt if prompt else "")  # after validation
        # What is printed is the result's text: a cut character or the start of a possible
        # stop string waits for the tokens after it, and a stop string is never printed.
        text = TextStream(tokenizer, stream.request.end_tokens, args.stop)
        for tokens in stream:
            if tokens[0] is not None:
                _write(text.push(tokens[0]))
        result, left, prompt = stream.result, left - len(stream.result.tokens[0]), []
        _write(text.finish(result.text[0]))
        state = result.state
        if result.finish_reason[0] != "length":
            break
        if args.chunk and left > 0:
            print(f"\n[chunk: continuing from the state, {left} tokens left]", file=sys.stderr)
    _write("\n")
    if save_path is not None:
        print(f"wrote {save_state(state, save_path, model)}", file=sys.stderr)


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream a continuation of a prompt")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
