"""The `rwkv-ray` parser: fast to build (no Keras, JAX, Ray or MLflow imported) and complete
for every command, the lazily registered ones included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    that exists as a file: `rwkv-ray X: error: ...` and status 2, not a traceback."""
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
        assert err.startswith(f"rwkv-ray {argv[0]}: error: ") and "Traceback" not in err, err
