"""The package's layering: core code (``cachepolicy/``) never imports a plugin or an adapter, at module level or
inside a function; plugins and adapters reach the engine only through core's public modules."""

from __future__ import annotations

import ast
from pathlib import Path

import cachepolicy

CORE = Path(cachepolicy.__file__).parent
FORBIDDEN = ("cachepolicy.plugins", "cachepolicy.adapters")


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every name ``path`` (a module below the package folder ``root``) imports, as absolute dotted names
    (relative imports resolved against the module's package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    return [f"{path.relative_to(root.parent)}:{line} imports {name}"
            for path in sorted(root.rglob("*.py"))
            for line, name in imported_modules(path, root)
            if name.startswith(FORBIDDEN)]


def test_core_never_imports_a_plugin_or_an_adapter():
    assert violations(CORE) == []


def test_the_check_sees_a_lazy_import_inside_a_function(tmp_path):
    package = tmp_path / "cachepolicy"
    package.mkdir()
    (package / "core.py").write_text("def f():\n    from cachepolicy.plugins.forcing_kv import x\n    return x\n")
    (package / "other.py").write_text("from .plugins import tokentrim\nimport cachepolicy.adapters.wan\n")
    assert [v.split(" imports ")[1] for v in violations(package)] == [
        "cachepolicy.plugins.forcing_kv.x", "cachepolicy.plugins.tokentrim", "cachepolicy.adapters.wan"]
