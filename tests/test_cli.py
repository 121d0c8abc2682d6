"""The `rwkv-ray` parser: fast to build (no Keras, JAX, Ray or MLflow imported) and complete
for every command, the lazily registered ones included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_ray import cli

HEAVY = ("jax", "keras", "ray", "mlflow", "tensorflow")


def subcommand_lines(parser) -> dict[str, str]:
    """The command -> help line table that `rwkv-ray --help` prints."""
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return {a.dest: a.help for a in sub._choices_actions}


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from rwkv_ray import cli\n"
        "cli.build_parser().format_help()\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_commands_are_listed_with_their_own_help_line():
    lines = subcommand_lines(cli.build_parser())
    for name in cli.LAZY_COMMANDS:
        full = subcommand_lines(cli.build_parser(name))
        assert lines == full, name  # same order, same help lines


def test_chosen_command_gets_its_full_parser():
    assert cli.chosen_command(["generate", "--model", "m"]) == "generate"
    assert cli.chosen_command(["-h"]) is None
    argv = ["generate", "--model", "m", "--prompt", "hi", "--search-mode", "topp", "--k", "0.7"]
    args = cli.build_parser(cli.chosen_command(argv)).parse_args(argv)
    assert (args.search_mode, args.k, args.func.__name__) == ("topp", 0.7, "run_generate")


def test_user_errors_are_one_line_and_exit_status_2(tmp_path, capsys):
    """A broken YAML config, a directory where a checkpoint file is expected, an output
    that exists as a file: `rwkv-ray X: error: ...` and status 2, not a traceback (after
    the stage lines of convert, `[  0.0 s] reading ...`)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("inputs: [a.jsonl,\n")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        ["prepare", "--config", str(broken)],
        ["convert", str(tmp_path / "somedir"), str(tmp_path / "out")],
        ["convert", str(broken), str(tmp_path / "afile")],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not re.match(r"\[ *[0-9.]+ s\] ", line)]
        assert lines[0].startswith(f"rwkv-ray {argv[0]}: error: "), err
        assert "Traceback" not in err, err


GREEDY_IGNORES = (
    "--search-mode greedy always takes the most likely token: {} would be ignored (sample "
    "with --search-mode topk or topp)"
)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "5", "--chunk", "0"], "--chunk must be >= 1, got 0"),
        (
            ["--search-mode", "topp"],
            "--search-mode topp requires --k: the probability mass p of the most likely "
            "tokens to sample from, e.g. 0.7, or 'p,k' to keep the k most likely first",
        ),
        (
            ["--search-mode", "topk"],
            "--search-mode topk requires --k: the number of most likely tokens to sample "
            "from, e.g. 40",
        ),
        (["--k", "5", "--seed", "1"], GREEDY_IGNORES.format("--k and --seed")),
        (["--search-mode", "greedy", "--seed", "1"], GREEDY_IGNORES.format("--seed")),
        (["--temperature", "0.5"], GREEDY_IGNORES.format("--temperature")),
    ],
)
def test_generate_options_are_refused_before_the_model_loads(tmp_path, capsys, options, message):
    """Each mistake named by its own option, before the (here missing) model is read:
    --max-new-tokens 0 blamed --chunk, topp without --k said `k (top-p) must be a number,
    got None`, --k / --seed / --temperature with greedy search were silently ignored."""
    argv = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", *options]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"rwkv-ray generate: error: {message}\n"


def test_generate_save_state_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--save-state's directory is made (or refused) first: a missing one lost the state
    after the whole generation had run."""
    from rwkv_ray.generation import cli_commands

    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--save-state"]
    cases = [
        (afile / "s.npz", f"--save-state: cannot create the directory {afile} (File exists)"),
        (tmp_path, f"--save-state {tmp_path} is a directory, not a file name"),
    ]
    for out, message in cases:
        assert cli.main([*base, str(out)]) == 2
        assert capsys.readouterr().err == f"rwkv-ray generate: error: {message}\n"
    new = tmp_path / "new" / "dir"
    assert cli.main([*base, str(new / "s.npz")]) == 2  # the missing model, found after
    err = capsys.readouterr().err  # the model's own error: the directory came first
    assert new.is_dir() and err.startswith("rwkv-ray generate: error: ") and "--save" not in err
    monkeypatch.setattr(cli_commands.os, "access", lambda path, mode: False)
    assert cli.main([*base, str(new / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert err == f"rwkv-ray generate: error: --save-state: the directory {new} is not writable\n"


def test_generate_help_explains_the_sampling_options_and_their_defaults(capsys, monkeypatch):
    """`generate --help` showed no help and no default for --search-mode, --temperature and
    the --alpha-* options."""
    monkeypatch.setenv("COLUMNS", "200")  # no option name broken at its hyphens
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for line in [
        "--max-new-tokens MAX_NEW_TOKENS tokens to generate (default: 100)",
        "--search-mode {greedy,topk,topp} greedy: always the most likely token (takes no --k, "
        "--seed or --temperature); topk / topp: sample, with --k (default: greedy)",
        "--k K required by topk and topp; topk: the number of most likely tokens to sample "
        "from, e.g. 40; topp: the probability mass p of the most likely tokens to sample "
        "from, e.g. 0.7, or 'p,k' to keep the k most likely first",
        "--temperature TEMPERATURE sampling temperature for topk / topp (default: 1.0)",
        "--alpha-frequency ALPHA_FREQUENCY subtracted from a token's logit per time it was "
        "generated (the official pipeline's frequency penalty; default: 0.0)",
        "--alpha-presence ALPHA_PRESENCE subtracted from the logit of every token generated "
        "so far (the official pipeline's presence penalty; default: 0.0)",
        "--alpha-decay ALPHA_DECAY the --alpha-frequency counts are multiplied by this after "
        "each token, in [0, 1] (default: 1.0)",
        "--seed SEED sampling seed for topk / topp (default: random)",
    ]:
        assert line in text, line
