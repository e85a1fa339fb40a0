"""The package's shape: no import cycle between its modules (module-level or inside functions), the exact
model files hold no CPU fast-path code, and every module opens with a docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import paligemma

PACKAGE = Path(paligemma.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return lines


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in its code (TYPE_CHECKING blocks aside)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("paligemma")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("paligemma"):
                continue
            for alias in node.names:  # `from . import kernels` names a module; `from .x import f` a name
                sub = f"{base}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in modules} for name, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    edges = graph()
    # a submodule importing the package root (e.g. for SHAPES_TINY) is fine as long as the root does not
    # import it back; the root's own imports are edges like any other
    assert len(edges) > 30
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_exact_model_knows_nothing_of_the_fast_path():
    for name in ("modeling_gemma", "modeling_siglip", "modeling_paligemma", "masks", "generation"):
        text = (PACKAGE / f"{name}.py").read_text()
        assert "cpu" not in imports_of(PACKAGE / f"{name}.py") and ".cpu" not in text, name
        assert "hasattr(" not in text and "row_chunk" not in text, name


def test_every_module_opens_with_a_docstring():
    missing = [module_name(p) for p in PACKAGE.rglob("*.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, missing
