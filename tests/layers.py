"""The layer check: no import runs up moelab's layers, and no two packages import each
other. Run by `make lint` (`python tests/layers.py [SRC]`) and by tests/test_layers.py.

Layers, bottom up (docs: shared DESIGN, "Proposed layout"): errors/config -> model (ffn,
moe, transformer, lora, quant) -> store (checkpoint formats, run folder, staged
outputs) -> data -> parallel -> train -> convert / finetune / compress / analysis / serve -> cli.
An import inside a function counts like one at the top: running up the layers at call
time is still running up them. Inside analysis/, an instrument (measures one model, never
trains) never imports a study (runs trainings: compare, seeds, lr sweep, ...); and no two
modules of one package import each other, directly or round a loop.
"""

from __future__ import annotations

import ast
import sys
from itertools import combinations
from pathlib import Path

LAYERS: list[set[str]] = [
    {"errors", "config", "run_config", "runtime", "phases"},
    {"ffn", "moe", "model"},
    {"store"},
    {"data"},
    {"parallel"},
    {"train", "inference"},
    {"convert", "finetune", "compress", "analysis", "serve", "demo"},
    {"cli", "__main__", ""},  # "" = the package root, the public API
]


# Inside analysis/: instruments (memory/, profile/, experts/) measure one model and never train; studies (studies/)
# run trainings and use the instruments. An instrument never imports a study.
STUDIES = {"studies"}


def _is_study(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "analysis" and len(parts) > 1 and parts[1] in STUDIES


def _is_instrument(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "analysis" and len(parts) > 1 and parts[1] not in STUDIES


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise ValueError(f"moelab.{module}: in no layer; add it to tests/layers.py LAYERS")


def imports(src: Path) -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every moelab import under `src` (relative
    or absolute, at the top or inside a function), module names relative to the package."""
    found = []
    for f in sorted(src.rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        me = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    targets = [".".join([*base, node.module])]
                else:  # `from . import x`: a module of that package, or a name its __init__ defines
                    targets = [".".join([*base, a.name]) if _is_module(src, [*base, a.name]) else ".".join(base)
                               for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moelab":
                targets = [node.module.partition(".")[2]]  # type: ignore[union-attr]
            elif isinstance(node, ast.Import):
                targets = [a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "moelab"]
            else:
                continue
            found += [(me, t, node.lineno) for t in targets]
    return found


def _is_module(src: Path, parts: list[str]) -> bool:
    return src.joinpath(*parts).with_suffix(".py").is_file() or src.joinpath(*parts).is_dir()


def problems(src: Path) -> list[str]:
    """Every upward import and every pair of packages that import each other, one line each."""
    out, edges = [], set()
    for me, target, line in imports(src):
        if layer_of(target) > layer_of(me):
            out.append(f"moelab/{me.replace('.', '/') or '__init__'}.py:{line}: imports moelab.{target}, a higher layer")
        elif _is_instrument(me) and _is_study(target):
            out.append(f"moelab/{me.replace('.', '/')}.py:{line}: an instrument imports moelab.{target}, a study")
        a, b = me.split(".")[0], target.split(".")[0]
        if a != b:
            edges.add((a, b))
    for a, b in combinations(sorted({x for e in edges for x in e}), 2):
        if (a, b) in edges and (b, a) in edges:
            out.append(f"moelab.{a} and moelab.{b} import each other")
    return out + module_cycles(src)


def module_cycles(src: Path) -> list[str]:
    """Modules of one package that import each other, directly or round a longer loop (at the top or in a function):
    one line per loop, its modules in order."""
    graph: dict[str, set[str]] = {}
    for me, target, _ in imports(src):
        if me != target and me.rpartition(".")[0] == target.rpartition(".")[0] and "." in me:
            graph.setdefault(me, set()).add(target)
    out, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start and len(path) > 1:
                    loop = frozenset(path)
                    if loop not in seen:
                        seen.add(loop)
                        out.append("module cycle: " + " -> ".join(f"moelab.{m}" for m in [*path, start]))
                elif nxt not in path and nxt > start:  # each loop found once, from its smallest module
                    stack.append((nxt, [*path, nxt]))
    return out


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "src" / "moelab"
    found = problems(src)
    for p in found:
        print(p)
    print(f"layer check: {len(found)} problem(s) in {src}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
