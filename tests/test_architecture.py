"""The package's structure, checked from its source: no import cycle, no import of another
module's private name, every package importing only the layers below it, small modules and
functions.

The allowed edges between the parts of ``bio_ext`` are written down once, in ``LAYERS``: a part
may import itself and the parts listed for it, nothing else. Imports inside functions count
as much as top-level ones (a function-level import is how a cycle hides).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "bio_ext"

#: part of the package -> the parts it may import (besides itself). A part is a top-level module
#: or subpackage of bio_ext; ``__init__`` (the package's public face) may import everything.
LAYERS: Dict[str, Set[str]] = {
    "errors": set(),
    "registry": {"errors"},
    "_utils": {"errors"},
    "functional": {"errors"},
    "config": {"errors", "registry"},
    "session": {"errors", "registry", "functional", "_utils"},
    "distributed": {"errors"},
    "modes": {"errors", "registry", "functional", "session", "_utils", "distributed"},
    "layers": {"errors", "registry", "functional", "session", "modes", "_utils"},
    "points": {"errors", "registry", "functional", "session", "modes", "_utils"},
    "output": {"errors", "registry", "config", "session", "modes", "layers", "_utils"},
    "audit": {"errors", "config", "_utils"},
    "convert": {"errors", "registry", "config", "session", "modes", "layers", "points", "output", "audit", "_utils"},
    "inspection": {"errors", "registry", "convert", "layers", "_utils"},
    "blockwise": {"errors", "registry", "config", "functional", "session", "modes", "points", "convert", "_utils"},
    # old import paths kept as re-exports
    "autograd": {"layers"},
    "attention": {"layers"},
    "grape": {"modes"},
    # applications on top of the library
    "benchmark": {"errors", "registry", "config", "convert", "inspection", "blockwise", "_utils", "layers", "modes",
                  "session"},
    "quickstart": {"errors", "registry", "convert", "benchmark"},
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: functions that mirror a torch function line for line and may be longer
LONG_FUNCTIONS = {"bio_ext/layers/attention.py:ExplicitMultiheadAttention.forward"}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> List[Tuple[str, str, int]]:
    """``(imported bio_ext module, imported name or '', line)`` for every import in ``module``,
    function-level ones included. ``from a import b`` where ``a.b`` is a module counts as
    importing ``a.b`` (not the package ``a``)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "bio_ext"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "bio_ext":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> Dict[str, Set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_part_of_the_package_has_its_layer_written_down():
    parts = {_part(m) for m in MODULES} - {"__init__", "__main__"}
    assert parts <= set(LAYERS), f"add these parts of bio_ext to LAYERS: {sorted(parts - set(LAYERS))}"


def test_no_import_cycle():
    graph = _graph()
    state: Dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_of_another_modules_private_name():
    bad = []
    for m in MODULES:
        for target, name, line in _imports(m):
            if name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {name} from {target}")
    assert not bad, "private names imported from other modules:\n" + "\n".join(bad)


def test_no_private_attribute_of_an_imported_bio_ext_module():
    """``from . import convert as c; c._root_hook`` is the same coupling as importing the name."""
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(m, node).startswith("bio_ext"):
                target = _resolve(m, node)
                aliases |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("bio_ext")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_each_part_imports_only_the_layers_below_it():
    bad = []
    for m in MODULES:
        part = _part(m)
        if part in ("__init__", "__main__"):
            continue
        allowed = LAYERS.get(part, set()) | {part}
        for target, _, line in _imports(m):
            if target in MODULES and _part(target) not in allowed and _part(target) != "__init__":
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {part} imports {_part(target)} ({target})")
            if _part(target) == "__init__" and m != "bio_ext":
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: imports the package root (import the module)")
    assert not bad, "\n".join(bad)


def test_the_registry_imports_nothing_but_the_errors():
    targets = {t for t, _, _ in _imports("bio_ext.registry")}
    assert targets <= {"bio_ext.errors"}, targets


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines (at most {MAX_MODULE_LINES}): split it"


def test_functions_are_short():
    long = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls_name, fn in _functions(tree):
            n = fn.end_lineno - fn.lineno + 1
            key = f"{path.relative_to(ROOT)}:{cls_name + '.' if cls_name else ''}{fn.name}"
            if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                long.append(f"{key} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _functions(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield "", node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, sub


def test_public_names_are_listed_once():
    import bio_ext
    assert len(bio_ext.__all__) == len(set(bio_ext.__all__))
    missing = [n for n in bio_ext.__all__ if not hasattr(bio_ext, n)]
    assert not missing


@pytest.mark.parametrize("old", ["bio_ext.session", "bio_ext.modes", "bio_ext.grape", "bio_ext.autograd",
                                 "bio_ext.attention", "bio_ext.layers", "bio_ext.functional"])
def test_old_import_paths_keep_working(old):
    import importlib
    mod = importlib.import_module(old)
    expected = {"bio_ext.session": ["FeedbackSession", "FeedbackBank", "ErrorTap", "current_session"],
                "bio_ext.modes": ["FeedbackRule", "register_mode", "get_mode", "available_modes", "ModeSpec",
                                  "FeedbackSpec", "random_feedback", "init_bound"],
                "bio_ext.grape": ["GradientAlignedProjectedError", "DEFAULTS", "batch_cosine"],
                "bio_ext.autograd": ["LinearDirectFn", "LinearLocalFn", "Conv2dDirectFn", "Conv2dLocalFn"],
                "bio_ext.attention": ["ExplicitMultiheadAttention"],
                "bio_ext.layers": ["FeedbackLayer", "FeedbackLinear", "FeedbackConv2d"],
                "bio_ext.functional": ["linear_param_grads", "spread_projection"]}[old]
    assert [n for n in expected if not hasattr(mod, n)] == []


def test_no_autograd_function_defines_setup_context():
    """torch binds a ``setup_context`` Function's arguments with ``inspect.signature`` on every call (55 µs per
    layer per step on the 2-core CPU): bio_ext's Functions take ``ctx`` in ``forward`` instead."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found += [f"{name}.{node.name}" for sub in node.body
                          if isinstance(sub, ast.FunctionDef) and sub.name == "setup_context"]
    assert found == []
