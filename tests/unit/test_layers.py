"""The layers hold, read from the source with `ast` (no Ray, no torch imported).

- the core (`cai_ray` outside `pipeline/`, `serve/`, `cli/`) imports no `actors` and no driver;
- `actors` (the Ray roles) import no driver (`cai_ray.pipeline`, `cai_ray.serve`, `cai_ray.cli`);
- `cai_ray.config` imports nothing of the project but `cai_ray.errors`;
- no import circle between modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ("cai_ray.pipeline", "cai_ray.serve", "cai_ray.cli", "cai_ray.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("cai_ray", "actors"):
        for path in sorted((ROOT / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a module, or the package holding an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Project modules `module` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], exclude: tuple[str, ...], forbidden) -> list[str]:
    bad = []
    for module, targets in sorted(GRAPH.items()):
        if not _under(module, sources) or _under(module, exclude):
            continue
        bad += [f"{module} imports {t}" for t in sorted(targets) if forbidden(t)]
    return bad


def test_the_graph_was_read():
    # a walk that found nothing would pass every rule below
    assert len(MODULES) > 80
    assert "cai_ray.config" in GRAPH["cai_ray.pipeline.runner"]


def test_the_core_imports_no_actors_and_no_driver():
    bad = _violations(("cai_ray",), DRIVERS, lambda t: _under(t, ("actors", *DRIVERS)))
    assert not bad, "the core must not import the Ray roles or the drivers:\n" + "\n".join(bad)


def test_actors_import_no_driver():
    bad = _violations(("actors",), (), lambda t: _under(t, DRIVERS))
    assert not bad, "actors must not import the drivers:\n" + "\n".join(bad)


def test_config_imports_only_the_errors_module():
    bad = _violations(
        ("cai_ray.config",), (), lambda t: not _under(t, ("cai_ray.config", "cai_ray.errors"))
    )
    assert not bad, "cai_ray.config may import only cai_ray.errors:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "graph, expected",
    [({"a": {"b"}, "b": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_the_circle_finder_finds_circles(graph, expected):
    assert _cycles(graph) == expected
