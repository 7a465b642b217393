"""Outputs that are never half-written, never overwrite by accident and never touch the
command's own input; and the OS's write failures as one line that names the path.

Every command with `--out` goes through `guard_output` (directly, or through
`check_output` / `staged_output`): the output is never one of the command's inputs nor
inside one (nor holds one), never a file, never a dangling symbolic link, and its
folder must be writable - all checked before any work starts. `staged_output` builds a
result in a hidden sibling folder and renames it into place only when the command
succeeded; `set_aside` / `restore` keep a replaced run folder until its replacement has
a checkpoint. Writers of files that native code writes (safetensors, tokenizers) turn
that code's I/O errors back into `OSError`, which the CLI prints as one line
(`describe_os_error`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from ..errors import OutputExists

if TYPE_CHECKING:
    import torch


def _within(a: Path, b: Path) -> bool:
    """True when `a` is `b` or lies inside it."""
    return a == b or b in a.parents


def _is_path(src: str | Path) -> bool:
    """Inputs are named loosely (a recipe name, `stdlib`, a path): only paths that exist can be overwritten."""
    return os.path.lexists(src)


def guard_output(
    out: str | Path, *, protect: Sequence[str | Path | None] = (), flag: str = "--out", in_place: bool = False
) -> Path:
    """Check that `out` may be written at all, whatever it holds: not a file, not a
    dangling link, not under a file, not one of `protect` (the command's inputs) nor
    inside or around one, in a writable folder (`in_place`: only `out` itself is written,
    as a resumed run is). Returns `out` as a Path; OutputExists otherwise."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutputExists(
            f"{flag} {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
            "name a real folder, or remove the link"
        )
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{flag} {out} is a file; expected a folder path (new, or an existing folder)")
    real = out.resolve()
    for src in protect:
        if src is None or not _is_path(src):
            continue
        s = Path(src).resolve()
        if _within(real, s) or _within(s, real):
            raise OutputExists(
                f"{flag} {out} would overwrite or nest inside the input {src}; choose a folder outside it"
            )
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExists(f"{flag} {out}: {parent} is a file, so no folder can be made under it")
    folders = [real] if in_place and real.is_dir() else [parent, real] if real.is_dir() else [parent]
    for folder in folders:
        # staged outputs are made beside `out`, runs write inside it: both must be writable
        if _read_only(folder) or not os.access(folder, os.W_OK | os.X_OK):
            why = "on a read-only file system" if _read_only(folder) else "not writable by this user"
            raise OutputExists(f"{flag} {out}: the folder {folder} is {why}; choose a writable folder")
    return out


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# What an output folder is, read off the file that only that kind of output holds (earlier outputs included):
# --overwrite replaces an earlier output of the same kind, never a run with a report or a folder of one's own files.
KINDS = {
    "run": ("config.yaml", "run folder", "train, finetune, distill, import, upcycle, quantize, ..."),
    "hf": ("config.json", "Hugging Face folder", "moelab export"),
    "peft": ("adapter/adapter_config.json", "base model and peft adapter", "moelab export --peft"),
    "compare": ("summary.json", "compare report", "moelab compare"),
    "profile": ("profile.json", "profile", "moelab profile"),
    "experts": ("experts.json", "experts report", "moelab experts"),
    "scaling": ("grid.json", "scaling grid", "moelab scaling"),
}


def output_kind(folder: Path) -> str | None:
    """The kind of moelab output `folder` holds (a key of KINDS), or None: files moelab did not write."""
    return next((k for k, (marker, _, _) in KINDS.items() if (folder / marker).is_file()), None)


def check_output(
    out: str | Path,
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path | None] = (),
    flag: str = "--out",
    hint: str = "choose a new folder, or pass --overwrite to replace it",
    kind: str | None = None,
) -> Path:
    """`guard_output`, and an existing non-empty folder refused unless `overwrite` - and, when the command says what
    `kind` of output it writes, unless the folder holds an earlier output of that kind; return it as a Path."""
    out = guard_output(out, protect=protect, flag=flag)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExists(f"{flag} {out} already exists and is not empty: {hint}")
        found = output_kind(out)
        if kind is not None and found != kind:
            held = f"a {KINDS[found][1]} ({KINDS[found][2]})" if found else "files moelab did not write"
            raise OutputExists(
                f"{flag} {out} holds {held}, not an earlier {KINDS[kind][1]}: --overwrite replaces only an output "
                "of the same kind; choose another folder, or remove it yourself"
            )
    return out


def _public_path(e: BaseException, tmp: Path, out: Path) -> None:
    """An OSError about a file of the hidden staging folder names the output the user
    asked for (and one that named no file names the output)."""
    if not isinstance(e, OSError):
        return
    if not e.filename:
        e.filename = str(out)
    for attr in ("filename", "filename2"):
        name = getattr(e, attr)
        if name and str(name).startswith(str(tmp)):
            setattr(e, attr, str(out) + str(name)[len(str(tmp)) :])


@contextmanager
def staged_output(
    out: str | Path,
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path | None] = (),
    flag: str = "--out",
    kind: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it replaces `out` atomically
    (a rename); on failure it is removed and `out` is left as it was. `kind`: as `check_output`."""
    out = check_output(out, overwrite=overwrite, protect=protect, flag=flag, kind=kind)
    tmp = out.parent / f".{out.name}.tmp-{_HOST}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        old = set_aside(out)
        os.rename(tmp, out)  # onto nothing, or onto an empty folder
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _public_path(e, tmp, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_HOST = socket.gethostname().replace("/", "_")


def check_file_output(
    out: str | Path,
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path | None] = (),
    flag: str = "--out",
    magic: bytes | None = None,
) -> Path:
    """For an output that is one file: not a folder, not an input nor inside one, an existing file only with
    `overwrite` (and, given its format's `magic` first bytes, only a file of that format), in a writable folder.
    Returns it resolved; OutputExists otherwise."""
    out = Path(out)
    if out.is_dir():
        raise OutputExists(f"{flag} {out} is a folder; expected a file path")
    if out.is_symlink() and not out.exists():
        raise OutputExists(f"{flag} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    real = out.resolve()
    for src in protect:
        if src is not None and _is_path(src) and _within(real, Path(src).resolve()):
            raise OutputExists(f"{flag} {out} would overwrite or sit inside the input {src}; choose a path outside it")
    if out.exists() and not overwrite:
        raise OutputExists(f"{flag} {out} already exists: choose a new file, or pass --overwrite to replace it")
    if out.exists() and magic is not None and out.open("rb").read(len(magic)) != magic:
        raise OutputExists(
            f"{flag} {out} is not an earlier output of this command (it does not start with {magic!r}): "
            "--overwrite replaces only an output of the same kind; choose another path"
        )
    guard_output(real.parent, flag=flag, in_place=True)  # the folder it goes in: writable, not under a file
    return real


@contextmanager
def staged_file(
    out: str | Path,
    *,
    overwrite: bool = False,
    protect: Sequence[str | Path | None] = (),
    flag: str = "--out",
    magic: bytes | None = None,
) -> Iterator[Path]:
    """Yield a hidden sibling path of the file `out` to write; on success it replaces `out` (a rename), on
    failure it is removed and `out` is left as it was. Checked first as `check_file_output`."""
    real = check_file_output(out, overwrite=overwrite, protect=protect, flag=flag, magic=magic)
    out = Path(out)
    tmp = real.parent / f".{out.name}.tmp-{_HOST}-{os.getpid()}"
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(real)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (not e.filename or str(e.filename) == str(tmp)):
            e.filename = str(out)
        raise


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders (or files) of `out` that processes of this host no longer running left behind (a
    kill -9 mid command): each holds a half-made output that looked like nothing, but took its size on disk. Those of
    live processes and of other hosts (a shared file system) are left alone. Returns what was removed."""
    removed = []
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-{glob.escape(_HOST)}-*"):
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:  # a staged file (`staged_file`)
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def set_aside(folder: Path) -> Path | None:
    """Move an existing non-empty `folder` to a hidden sibling (returned) while its
    replacement is made; None when there is nothing to keep."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    aside = folder.parent / f".{folder.name}.replaced-{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(folder, aside)
    return aside


def restore(folder: Path, aside: Path | None) -> None:
    """Undo a replacement that failed: remove what was made in `folder`, put `aside` back."""
    shutil.rmtree(folder, ignore_errors=True)
    if aside is not None and aside.exists():
        os.rename(aside, folder)


@contextmanager
def removed_on_failure(folder: Path, scaffolding: Sequence[str] = ()) -> Iterator[Path]:
    """Make `folder` if it does not exist; if the block fails while the folder holds no
    file but `scaffolding` (the command's own bookkeeping), remove it again - only when
    this call made it - so a failed command leaves no empty folder and never loses a result."""
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    except BaseException:
        results = [p for p in folder.rglob("*") if p.is_file() and p.name not in scaffolding]
        if made and not results:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (a temp file, then a rename): readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- native writers
_OS_CODE = re.compile(r"(?:code: |os error )(\d+)")


def native_os_error(e: Exception, path: str | Path) -> OSError | None:
    """The OSError behind an I/O failure that Rust code (safetensors, tokenizers) reports
    as its own exception with the errno in the text; None when it is not one."""
    m = _OS_CODE.search(str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def probe_write(target: Path) -> OSError | None:
    """The OSError a write meets now (a full disk, a quota, the file-size limit), or None: the
    reason behind a library's failed write that lost the system's errno (numpy's tofile,
    torch's zip writer, which reports a full disk as "unexpected pos"). A file is probed by
    appending to it (then cut back), a folder by a new file in it (then removed)."""
    probe = target if target.is_file() else target / f".moelab-probe-{os.getpid()}"
    size = probe.stat().st_size if probe.is_file() else None
    try:
        with open(probe, "ab") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        e.filename = str(target)
        return e
    finally:
        with contextlib.suppress(OSError):
            if size is None:
                probe.unlink()
            else:
                os.truncate(probe, size)
    return None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, fsynced, with a full disk or a read-only folder raised as OSError naming `path`."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # SafetensorError carries the OS error in its text
        err = native_os_error(e, path)
        if err is None:
            raise
        raise err from None
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tokenizer(tok, path: Path) -> None:
    """Tokenizer.save with its I/O errors raised as OSError naming `path`."""
    try:
        tok.save(str(path))
    except Exception as e:
        err = native_os_error(e, path)
        if err is None:
            raise
        raise err from None


# ---------------------------------------------------------------- one line for the CLI
_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
    errno.EFBIG: "file too large for this file system or the file-size limit: write elsewhere",
    errno.EROFS: "read-only file system: write to a writable folder",
    errno.EACCES: "permission denied: choose a folder this user may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder this user may write",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder where a file was expected",
    errno.EEXIST: "already exists",
}


def describe_os_error(e: OSError, out: str | None = None) -> str:
    """One line for an OSError: the path, what went wrong and what to do. A copy that
    could not be written names its destination; an error without a path names `out`
    (the command's --out). Outputs are staged and checkpoints atomic, so a failed write
    leaves the earlier state."""
    write = e.errno in _WRITE
    if e.filename2 and write:
        path = str(e.filename2)
    elif e.filename:
        path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        path = f"--out {out}" if out else "(no path given)"
    what = _ADVICE.get(e.errno or -1, e.strerror or str(e))
    kept = " (nothing was replaced: earlier outputs and checkpoints are as they were)" if write else ""
    return f"{path}: {what}{kept}"


_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
