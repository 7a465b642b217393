"""The command line's surface is frozen in tests/cli_surface.json: every command's --help
(flags, positionals, metavars, choices, defaults, help texts) as words, box drawing and
line wrapping left out, so a change to the surface is deliberate: rewrite the file with
`python tests/test_cli_surface.py --write` and let the diff show it. The parser is derived
from each `cmd_*` function, so these tests also hold that derivation to what users type."""
import contextlib
import inspect
import io
import json
import re
import sys
from pathlib import Path

import pytest

from moelab.cli import COMMANDS, TAKES_OVERRIDES, main, parse

FROZEN = Path(__file__).parent / "cli_surface.json"


def help_words(argv: list[str]) -> str:
    """`moelab ARGV` (a --help) as its words, at a fixed width."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as env, pytest.raises(SystemExit) as done:
        env.setenv("COLUMNS", "100")
        parse(argv)
    assert done.value.code == 0, argv
    return " ".join(re.sub(r"[│╭╮╰╯─•]|-{3,}", " ", out.getvalue()).split())


def surface() -> dict:
    return {"moelab": help_words(["--help"])} | {name: help_words([name, "--help"]) for name in COMMANDS}


def test_the_cli_surface_is_the_frozen_one():
    assert surface() == json.loads(FROZEN.read_text()), (
        "the command line changed: if on purpose, run `python tests/test_cli_surface.py --write` and commit the diff")


def test_every_parameter_is_documented_and_shown():
    """The docstring is the help: a parameter without an `Args:` line would show no help."""
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        shown = help_words([name, "--help"])
        assert f"usage: moelab {name}" in shown
        for p in inspect.signature(fn).parameters:
            assert re.search(rf"^    {p}: \S", doc, re.M), f"moelab {name}: parameter {p} has no help line"
        assert doc.splitlines()[0] in shown, name


@pytest.mark.parametrize("argv,expected", [
    (["train", "tiny-moe", "a.b=1", "--out", "r", "c.d=2", "--quiet", "e.f=3"],
     {"recipe": "tiny-moe", "out": "r", "overrides": ("a.b=1", "c.d=2", "e.f=3"), "quiet": True, "resume": False}),
    (["eval", "R", "--data", "d", "--json", "--split", "all", "--max-tokens", "5"],
     {"run": "R", "data": "d", "as_json": True, "split": "all", "max_tokens": 5, "threads": None}),
    (["compare", "a", "b", "--out", "o", "--set", "x=1", "--set", "y=2", "--tokens", "9"],
     {"items": ("a", "b"), "overrides": ("x=1", "y=2"), "tokens": 9, "steps": None}),
    (["prune-experts", "R", "--keep", "4", "--calib", "c", "--out", "o"], {"keep": 4, "max_tokens": 32768}),
    (["memory", "tiny-moe", "--zero", "3", "--dtype", "bf16"], {"zero": 3, "dtype": "bf16", "devices": 1}),
    (["finetune-report", "--out", "o", "--ft-set", "a=1", "--set", "b=2"],
     {"ft_overrides": ("a=1",), "overrides": ("b=2",), "bases": "small-dense,small-moe", "steps": 100}),
])
def test_arguments_reach_their_parameters(argv, expected):
    name, fn, kwargs = parse(argv)
    assert fn is COMMANDS[argv[0]] and name == argv[0]
    assert {k: kwargs[k] for k in expected} == expected
    assert set(kwargs) == set(inspect.signature(fn).parameters)  # every parameter set, none invented


@pytest.mark.parametrize("argv", [
    ["train", "tiny-moe", "--out", "r", "--resume", "--overwrite"],  # exclusive
    ["compare", "a", "--out", "o", "--steps", "1", "--tokens", "2"],  # exclusive
    ["eval", "R", "--data", "d", "--split", "test"],  # not a choice
    ["eval", "R", "--data", "d", "extra=1"],  # overrides only where a command takes them
    ["train", "tiny-moe", "--out", "r", "--no-such-flag"],
    ["generate", "R", "--prompt", "p", "--top-k", "many"],
    ["quantize", "R", "--out", "o"],  # --bits is required
])
def test_a_bad_command_line_exits_2_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.strip()


def test_overrides_only_for_commands_that_take_them():
    for name, fn in COMMANDS.items():
        assert ("overrides" in inspect.signature(fn).parameters) >= (name in TAKES_OVERRIDES), name


def test_help_and_a_bad_command_line_answer_without_importing_torch():
    """torch takes seconds to import on a small machine: --help and usage errors do not wait for it."""
    import subprocess

    code = ("import sys\nfrom moelab.cli import main\nfor argv in (['--help'], ['train', '--help'], ['eval']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout[-500:] + r.stderr[-500:]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FROZEN.write_text(json.dumps(surface(), indent=1, ensure_ascii=False) + "\n")
