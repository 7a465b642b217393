"""Output folders that are never half-written and never overwrite by accident.

Every command that writes a folder goes through `staged_output`: it refuses an existing
non-empty folder unless `overwrite`, refuses to write over (or inside) its own input,
builds the result in a hidden sibling folder and renames it into place only when the
command succeeded - so a crash leaves either the old folder or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExists


def _within(a: Path, b: Path) -> bool:
    """True when `a` is `b` or lies inside it."""
    return a == b or b in a.parents


def check_output(
    out: str | Path,
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
    flag: str = "--out",
    hint: str = "choose a new folder, or pass --overwrite to replace it",
) -> Path:
    """Validate an output folder path before any work starts; return it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{flag} {out} is a file; expected a folder path (new, or existing and empty)")
    real = out.resolve()
    for src in protect:
        s = Path(src).resolve()
        if _within(real, s) or _within(s, real):
            raise OutputExists(
                f"{flag} {out} would overwrite or nest inside the input {src}; choose a folder outside it"
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{flag} {out} already exists and is not empty: {hint}")
    return out


@contextmanager
def staged_output(
    out: str | Path, *, overwrite: bool = False, protect: Sequence[str | Path] = (), flag: str = "--out"
) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it replaces `out` atomically
    (a rename); on failure it is removed and `out` is left as it was."""
    out = check_output(out, overwrite=overwrite, protect=protect, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
