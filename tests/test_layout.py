"""The package's layout rules: small modules, no import cycle, no private name used across modules."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lora_jax"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The lora_jax module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Imports that run when the module is imported (not inside functions or ``if TYPE_CHECKING``)."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.Try):
            out += [n for n in node.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return out


def _imported(module: str, node: ast.stmt) -> list[tuple[str, str | None]]:
    """``(module, name)`` pairs an import statement brings in (name None for ``import x``)."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    return [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, a.name) for a in node.names]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_the_size_limit(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it along its concepts (limit {MAX_LINES})"


def test_no_import_cycle():
    graph = {}
    for module, f in MODULES.items():
        tree = ast.parse(f.read_text())
        deps = set()
        for node in _top_level_imports(tree):
            for target, _ in _imported(module, node):
                dep = _resolve(target) if target.startswith("lora_jax") else None
                if dep and dep != module:
                    deps.add(dep)
        graph[module] = deps
    # A package importing its own submodules is not a cycle through them.
    for module in graph:
        graph[module] = {d for d in graph[module] if not module.startswith(d + ".")}

    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_imported_across_modules():
    bad = []
    for module, f in MODULES.items():
        tree = ast.parse(f.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                for (target, name), alias in zip(_imported(module, node), node.names):
                    if not target.startswith("lora_jax"):
                        continue
                    if name is not None and target in MODULES and target.endswith("." + name):
                        aliases[alias.asname or name] = target  # a module imported by name
                    elif name is not None and _private(name) and _resolve(target) != module:
                        bad.append(f"{module}: from {target} import {name}")
                    elif name is None:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                bad.append(f"{module}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules (make them public in their one home):\n" + "\n".join(bad)
