"""The layer check (tests/layers.py, also run by `make lint`) passes on moelab and fails
on a planted upward import (at the top of a module or inside a function) and on two
packages that import each other."""
import shutil
import subprocess
import sys
from pathlib import Path

from layers import problems

SRC = Path(__file__).parents[1] / "src" / "moelab"


def test_no_import_runs_up_the_layers():
    assert problems(SRC) == []


def test_a_planted_upward_import_or_package_cycle_is_found(tmp_path):
    src = tmp_path / "moelab"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "moe" / "layer.py", "a") as f:  # the model reaching up into training, at call time
        f.write("\n\ndef _planted():\n    from ..train.trainer import train\n\n    return train\n")
    with open(src / "store" / "run.py", "a") as f:  # the store reaching up into data, absolute import
        f.write("\nimport moelab.data.sources  # noqa\n")
    with open(src / "serve" / "bench.py", "a") as f:  # same layer, but analysis (compare) already imports serve
        f.write("\nfrom ..analysis.studies import compare  # noqa\n")
    found = problems(src)
    assert any(p.startswith("moelab/moe/layer.py:") and "moelab.train.trainer" in p for p in found), found
    assert any(p.startswith("moelab/store/run.py:") and "moelab.data.sources" in p for p in found), found
    # each upward import also closes a loop with the imports that already run down
    assert {p for p in found if p.endswith("import each other")} == {
        "moelab.analysis and moelab.serve import each other",
        "moelab.data and moelab.store import each other",
        "moelab.moe and moelab.train import each other",
    }
    assert len(found) == 5, found
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "layers.py"), str(src)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "5 problem(s)" in r.stdout  # what `make lint` runs fails too


def test_an_instrument_importing_a_study_and_a_module_cycle_are_found(tmp_path):
    src = tmp_path / "moelab"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "analysis" / "memory" / "skew.py", "a") as f:  # an instrument reaching into a study, at call time
        f.write("\n\ndef _planted():\n    from ..studies.compare import compare\n\n    return compare\n")
    with open(src / "moe" / "router.py", "a") as f:  # router -> layer -> router: a loop inside one package
        f.write("\nfrom .layer import MoE  # noqa\n")
    found = problems(src)
    assert any(p.startswith("moelab/analysis/memory/skew.py:") and "an instrument imports moelab.analysis.studies.compare" in p
               for p in found), found
    assert [p for p in found if p.startswith("module cycle:")] == [
        "module cycle: moelab.moe.layer -> moelab.moe.router -> moelab.moe.layer"], found
    assert len(found) == 2, found
