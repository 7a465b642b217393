"""`make lint` (ruff check, ruff format --check, mypy) fails on a file that is mis-formatted, imports something
unused, or mistypes a call. That it passes on the package is CI's own `make lint`, run before the tests."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_lint(paths: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "lint", f"LINT_PATHS={paths}"], capture_output=True,
                          text=True, timeout=300)


def test_make_lint_fails_on_bad_files(tmp_path):
    misformatted = tmp_path / "misformatted.py"
    misformatted.write_text('"""Module."""\n\n\ndef f( a,b ):\n    """Pair."""\n    return {"x":a,  "y":b}\n')
    r = make_lint(str(misformatted))
    assert r.returncode != 0 and "would be reformatted" in r.stdout + r.stderr
    unused = tmp_path / "unused.py"
    unused.write_text('"""Module."""\n\nimport os\n')
    r = make_lint(str(unused))
    assert r.returncode != 0 and "F401" in r.stdout + r.stderr
    mistyped = tmp_path / "mistyped.py"
    mistyped.write_text('"""Module."""\n\n\ndef f(x: int) -> int:\n    """Double."""\n    return x * 2\n\n\nf("a")\n')
    r = make_lint(str(mistyped))
    assert r.returncode != 0 and "arg-type" in r.stdout + r.stderr
