"""`moelab` command line. Each subcommand is a plain typed function whose signature and
docstring are its whole declaration: tyro derives the parser (flags, positionals, types,
choices, defaults, help) from them. Expected failures print one clear line instead of a
traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, Union

from ..cli import args as _args
from ..errors import MoelabError
from .convert import (
    cmd_consolidate,
    cmd_distill,
    cmd_export,
    cmd_import,
    cmd_merge_experts,
    cmd_prune_experts,
    cmd_quantize,
    cmd_upcycle,
)
from .run import cmd_demo, cmd_eval, cmd_experts, cmd_memory, cmd_profile, cmd_train
from .serve import cmd_bench_infer, cmd_generate
from .study import (
    cmd_compare,
    cmd_finetune,
    cmd_finetune_report,
    cmd_lr_fit,
    cmd_lr_sweep,
    cmd_scaling,
    cmd_tokenize,
)

COMMANDS: dict[str, Callable[..., Any]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "compare": cmd_compare,
    "lr-sweep": cmd_lr_sweep,
    "lr-fit": cmd_lr_fit,
    "scaling": cmd_scaling,
    "finetune": cmd_finetune,
    "finetune-report": cmd_finetune_report,
    "tokenize": cmd_tokenize,
    "consolidate": cmd_consolidate,
    "quantize": cmd_quantize,
    "prune-experts": cmd_prune_experts,
    "merge-experts": cmd_merge_experts,
    "distill": cmd_distill,
    "import": cmd_import,
    "export": cmd_export,
    "upcycle": cmd_upcycle,
    "memory": cmd_memory,
    "profile": cmd_profile,
    "experts": cmd_experts,
    "bench-infer": cmd_bench_infer,
    "demo": cmd_demo,
}
# Commands whose positional `overrides` may also come after the options (`moelab train
# tiny-moe --out r model.d_model=64`), as users write them.
TAKES_OVERRIDES = ("train", "finetune", "distill", "profile", "bench-infer")
DESCRIPTION = "Train, measure and convert MoE language models."


def _parsed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in with `fn`'s signature and docstring that returns what the parser read
    instead of running `fn`: main() still has to add the overrides given after the options."""

    @functools.wraps(fn)
    def record(**kwargs):
        return fn, kwargs

    return record


def parse(argv: list[str]) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    """(command name, its function, its keyword arguments) for `argv`; SystemExit(2) with
    a message on a bad command line, SystemExit(0) after --help."""
    import tyro

    # a runtime Union of Annotated members is how tyro reads a set of subcommands
    commands: Any = Union[  # noqa: UP007
        tuple(Annotated[Any, tyro.conf.subcommand(name, constructor=_parsed(fn))] for name, fn in COMMANDS.items())
    ]
    (fn, kwargs), extra = tyro.cli(
        commands,
        prog="moelab",
        description=DESCRIPTION,
        args=argv,
        return_unknown_args=True,
        config=(tyro.conf.FlagCreatePairsOff,),
    )
    name = next(n for n, f in COMMANDS.items() if f is fn)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or name not in TAKES_OVERRIDES]
    if bad:
        print(f"usage: moelab {name} --help\nmoelab {name}: error: unrecognized arguments: {' '.join(bad)}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    if extra:
        kwargs["overrides"] = (*kwargs.get("overrides", ()), *extra)
    return name, fn, kwargs


def main(argv: list[str] | None = None) -> int:
    """Run `moelab` with `argv` (default: sys.argv). Returns the exit code: 0, or 2 after
    printing a MoelabError as one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from .. import __version__

        print(f"moelab {__version__}")
        return 0
    _args.INVOCATION[:] = argv
    name, fn, kwargs = parse(argv)
    try:
        fn(**kwargs)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:  # `moelab memory --json | head -c 300`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    except (MoelabError, OSError) as e:
        return _fail(name, e, kwargs.get("out"))
    return 0


def _fail(command: str, e: MoelabError | OSError, out: str | None = None) -> int:
    """An expected failure: one line on stderr, exit code 2. Under torchrun the line also goes
    to the launcher's error file, so its summary names it as the root cause."""
    from ..parallel.failures import report_failure
    from ..store.outputs import describe_os_error

    text = describe_os_error(e, out) if isinstance(e, OSError) else str(e)
    line = f"moelab {command}: error: {text}"
    report_failure(line)  # on stderr; under torchrun also for the launcher's summary and the other ranks
    return 2


if __name__ == "__main__":
    sys.exit(main())
