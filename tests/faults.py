"""Runs moelab commands in this one process against outputs that must be refused or
must fail cleanly, and prints one JSON object of what happened (tests/test_no_loss.py).

    python tests/faults.py SPEC.json          # inside `unshare -rm` where it works

SPEC: {"work": DIR, "inputs": [PATH, ...], "commands": {name: {"args": [... "{OUT}" ...],
"self": PATH, "overwrite": bool}}, "resume": {"args": [...], "run": RUN}}. For each command and case the driver records the exit code, the
last lines of stderr and whether a traceback escaped; the test judges them.

Cases: `--out` = the command's own input, a folder inside it, a file, a dangling
symbolic link; a read-only folder (a read-only bind mount, or chmod where that binds);
a full disk (a tmpfs with a few KiB free, or the file-size limit). Where the command
takes --overwrite, an earlier output is given and must come out byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path


def tree_hash(path: Path) -> str | None:
    """A hash of a file or folder tree (names, bytes, link targets); None when absent."""
    if not os.path.lexists(path):
        return None
    h = hashlib.sha256()
    items = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for p in items:
        h.update(str(p.relative_to(path) if p != path else ".").encode())
        if p.is_symlink():
            h.update(b"->" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def call(args: list[str]) -> dict:
    """moelab's CLI in this process: exit code, stderr's last lines, and whether it raised."""
    from moelab.cli import main

    err = io.StringIO()
    raised = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except BaseException:  # noqa: BLE001 - an escaped exception is what the test looks for
            rc, raised = None, traceback.format_exc()
    text = err.getvalue()
    return {"rc": rc, "tail": text.strip().splitlines()[-3:], "traceback": raised or ("Traceback" in text and text)}


def with_out(args: list[str], out: Path, overwrite: bool) -> list[str]:
    return [str(out) if a == "{OUT}" else a for a in args] + (["--overwrite"] if overwrite else [])


def earlier(folder: Path, marker: str | None = None) -> str | None:
    """An earlier output: a folder the command would replace with --overwrite (it holds the file that marks
    that command's kind of output)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("an earlier result\n" * 200)
    if marker:
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("{}\n")
    return tree_hash(folder)


def can_namespace() -> bool:
    return os.environ.get("MOELAB_IN_NAMESPACE") == "1"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def read_only_cases(name: str, spec: dict, work: Path) -> dict:
    ro = work / f"ro-{name}"
    before = earlier(ro / "earlier", spec.get("marker"))
    if can_namespace():
        sh("mount", "--bind", str(ro), str(ro))
        sh("mount", "-o", "remount,ro,bind", str(ro))
    else:
        os.chmod(ro / "earlier", 0o555)
        os.chmod(ro, 0o555)
    res = {
        "readonly_new": call(with_out(spec["args"], ro / "new", False)),
        "readonly_new_exists": os.path.lexists(ro / "new"),
    }
    if spec["overwrite"]:
        res["readonly_earlier"] = call(with_out(spec["args"], ro / "earlier", True))
        res["readonly_earlier_same"] = tree_hash(ro / "earlier") == before
    if can_namespace():
        sh("umount", "-l", str(ro))
    else:
        os.chmod(ro, 0o755)
        os.chmod(ro / "earlier", 0o755)
    return res


@contextlib.contextmanager
def full_disk(folder: Path):
    """Yield with `folder` on a file system that has a few KiB left (tmpfs), or else with
    a file-size limit of a few KiB for this process (writes fail with EFBIG)."""
    if can_namespace():
        sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder))
        yield lambda: sh("mount", "-o", f"remount,size={_used(folder) + 8192}", str(folder))
        sh("umount", "-l", str(folder))  # lazily: a writer thread may hold a file
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

        def fill():
            resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))

        try:
            yield fill
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)


def _used(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def full_disk_cases(name: str, spec: dict, work: Path) -> dict:
    full = work / f"full-{name}"
    full.mkdir()
    res: dict = {}
    with full_disk(full) as fill:
        before = earlier(full / "earlier", spec.get("marker")) if spec["overwrite"] else None
        fill()
        res["full_new"] = call(with_out(spec["args"], full / "new", False))
        res["full_new_exists"] = os.path.lexists(full / "new")
        if spec["overwrite"]:
            res["full_earlier"] = call(with_out(spec["args"], full / "earlier", True))
            res["full_earlier_same"] = tree_hash(full / "earlier") == before
        res["full_leftovers"] = sorted(p.name for p in full.iterdir() if p.name not in ("new", "earlier"))
    return res


def resume_on_full_disk(spec: dict, work: Path) -> dict:
    """`train --resume` of a copy of a run on a full disk: its checkpoints stay as they were."""
    full = work / "full-resume"
    full.mkdir()
    with full_disk(full) as fill:
        shutil.copytree(spec["run"], full / "run")
        before = tree_hash(full / "run" / "checkpoints")
        fill()
        res = call(with_out(spec["args"], full / "run", False))
        res["checkpoints_same"] = tree_hash(full / "run" / "checkpoints") == before
    return res


def path_cases(name: str, spec: dict, work: Path) -> dict:
    own = Path(spec["self"])
    afile = work / f"file-{name}"
    afile.write_text("not a folder\n")
    link = work / f"link-{name}"
    link.symlink_to(work / f"nowhere-{name}")
    ow = spec["overwrite"]
    return {
        "self": call(with_out(spec["args"], own, ow)),
        "inside": call(with_out(spec["args"], own / "sub", ow)),
        "file": call(with_out(spec["args"], afile, ow)),
        "file_same": afile.read_text() == "not a folder\n",
        "symlink": call(with_out(spec["args"], link, ow)),
        "symlink_still_dangling": link.is_symlink() and not link.exists(),
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work"])
    inputs = {p: tree_hash(Path(p)) for p in spec["inputs"]}
    out: dict = {"namespace": can_namespace(), "commands": {}}
    for name, cmd in spec["commands"].items():
        res = {}
        for cases in (path_cases, read_only_cases, full_disk_cases):
            res.update(cases(name, cmd, work))
        out["commands"][name] = res
    out["resume"] = resume_on_full_disk(spec["resume"], work)
    out["inputs_same"] = {p: tree_hash(Path(p)) == h for p, h in inputs.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
