"""The command line's surface is frozen in tests/cli_surface.json (every command, argument,
flag, default, type and choice), so a change to it is deliberate: rewrite the file with
`python tests/test_cli_surface.py --write` and let the diff show it. And what the parser
declares must meet the `cmd_*` function it feeds: every option a parameter, every
parameter an option, the same defaults - `main()` no longer may fall back silently."""
import argparse
import inspect
import json
import sys
from pathlib import Path

from moelab.cli import COMMANDS, TAKES_OVERRIDES
from moelab.cli_parser import build_parser

FROZEN = Path(__file__).parent / "cli_surface.json"
MAIN_ONLY = {"command_line"}  # set by main() itself (finetune-report records how it was run)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def surface() -> dict:
    out = {}
    for name, p in subparsers().items():
        args = []
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            args.append({
                "flags": list(a.option_strings) or [a.dest],
                "dest": a.dest,
                "default": a.default if isinstance(a.default, (str, int, float, bool, type(None), list)) else repr(a.default),
                "type": getattr(a.type, "__name__", None),
                "choices": list(a.choices) if a.choices else None,
                "required": a.required,
                "nargs": a.nargs,
                "action": type(a).__name__,
                "help": a.help,
            })
        out[name] = {"help": p.description, "arguments": args, "fixed": dict(p._defaults)}
    return out


def test_the_cli_surface_is_the_frozen_one():
    assert surface() == json.loads(FROZEN.read_text()), (
        "the command line changed: if on purpose, run `python tests/test_cli_surface.py --write` and commit the diff")


def test_every_option_feeds_its_function_with_the_functions_default():
    for name, p in subparsers().items():
        params = inspect.signature(COMMANDS[name]).parameters
        dests = {a.dest: a for a in p._actions if not isinstance(a, argparse._HelpAction)}
        if name in TAKES_OVERRIDES:
            assert "overrides" in params, name
        fixed = set(p._defaults)  # set_defaults: a command that fixes a parameter (prune-experts: method)
        missing = set(params) - set(dests) - fixed - MAIN_ONLY - ({"overrides"} if name in TAKES_OVERRIDES else set())
        assert not missing, f"moelab {name}: parameters no option sets: {sorted(missing)}"
        assert not set(dests) - set(params), f"moelab {name}: options no parameter takes: {sorted(set(dests) - set(params))}"
        for dest, a in dests.items():
            default = params[dest].default
            if default is inspect.Parameter.empty or a.required or a.nargs in ("+", "*"):
                continue
            parsed = a.default if a.default is not None else None
            assert parsed == default or (default is None and parsed in (None, [])), (
                f"moelab {name} {a.option_strings or dest}: parser default {parsed!r}, function default {default!r}")


def test_every_command_has_help(capsys):
    import pytest

    for name in subparsers():
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0 and f"usage: moelab {name}" in capsys.readouterr().out, name


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FROZEN.write_text(json.dumps(surface(), indent=1) + "\n")
    print(f"wrote {FROZEN}")
