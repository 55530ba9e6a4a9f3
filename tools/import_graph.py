"""`python -m tools.import_graph`: how dinrec's packages import each other, read from the source.

Every `import` and `from … import` of a project module (embedding, trainer, launch, tools) in every
module under those packages, found by walking each file's AST. An import at a module's top level
and one inside a function are told apart: the CLI imports its heavy layers inside functions so
that `dinrec --help` stays fast. Imports under `if TYPE_CHECKING:` are not counted (they never run).

    python -m tools.import_graph            # package → package, with counts
    python -m tools.import_graph --modules  # module → module
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embedding", "trainer", "launch", "tools")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module, e.g. trainer.loop
    imported: str  # dotted module (a `from pkg import mod` names the module mod)
    line: int
    top_level: bool  # False: inside a function or class body


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that `name` refers to (a module, or a package's __init__)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports() -> list[Import]:
    """Every project import of every project module."""
    modules = project_modules()
    found: list[Import] = []
    for importer, path in modules.items():
        _visit(ast.parse(path.read_text(), str(path)), True, importer, path.name == "__init__.py", modules, found)
    return found


def _visit(node: ast.AST, top: bool, importer: str, is_package: bool, modules: dict, found: list[Import]) -> None:
    """The imports under `node` of module `importer`; `top`: still at the module's top level."""
    package = importer if is_package else importer.rpartition(".")[0]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            continue
        if isinstance(child, ast.Import):
            names = [a.name for a in child.names]
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:  # relative: up level − 1 packages from this module's package
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - child.level + 1], base]).strip(".")
            names = [f"{base}.{a.name}" for a in child.names]
        else:
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            _visit(child, nested, importer, is_package, modules, found)
            continue
        for target in dict.fromkeys(_resolve(n, modules) for n in names):
            if target is not None and target != importer:
                found.append(Import(importer, target, child.lineno, top))


def package(module: str) -> str:
    return module.split(".")[0]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Module-level import cycles (top-level and in-function imports alike), each once."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    found, state = [], {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.import_graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", action="store_true", help="module → module edges instead of packages")
    args = p.parse_args(argv)
    edges = imports()
    key = (
        (lambda e: (e.importer, e.imported)) if args.modules else (lambda e: (package(e.importer), package(e.imported)))
    )
    counts: dict[tuple[str, str], list[int]] = {}
    for e in edges:
        if not args.modules and package(e.importer) == package(e.imported):
            continue
        c = counts.setdefault(key(e), [0, 0])
        c[0 if e.top_level else 1] += 1
    width = max((len(a) for a, _ in counts), default=8)
    print(f"{'importer':<{width}}    imported          top-level  in-function")
    for (a, b), (top, inner) in sorted(counts.items()):
        print(f"{a:<{width}} -> {b:<18}{top:>9}  {inner:>11}")
    found = cycles(edges)
    print(f"module import cycles: {len(found)}")
    for c in found:
        print("  " + " -> ".join(c))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
