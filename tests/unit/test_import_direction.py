"""The arrows go one way: server and client import common, never each other; common imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "server": {"fedtune.client", "fedtune.simulations"},
    "client": {"fedtune.server", "fedtune.simulations"},
    "common": {"fedtune.client", "fedtune.server", "fedtune.simulations"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = ["fedtune", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of everything a file imports (relative imports resolved, dynamic ones with constant names too)."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _violations(folder: str) -> list[str]:
    out = []
    for f in _files(folder):
        for mod in imported_modules(f):
            for bad in FORBIDDEN[folder]:
                if mod == bad or mod.startswith(bad + "."):
                    out.append(f"{f.relative_to(REPO)} imports {mod}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_direction(folder):
    assert _files(folder), f"no Python files under {folder}/"
    assert _violations(folder) == []


def test_the_checker_sees_relative_and_absolute_imports():
    # The checker itself must be able to fail: a (virtual) client file importing the server, both ways.
    fake = REPO / "client" / "probe.py"
    src = (
        "from ..server import aggregation\nimport fedtune.server.app\nfrom .trainer import train_round\n"
        "def f():\n    import importlib\n    return importlib.import_module('fedtune.server.report')\n"
    )
    mods = imported_modules(fake, src)
    assert "fedtune.server.report" in mods
    assert {"fedtune.server", "fedtune.server.aggregation", "fedtune.server.app", "fedtune.client.trainer"} <= mods


def test_client_really_uses_common():
    mods = set().union(*(imported_modules(f) for f in _files("client")))
    assert any(m.startswith("fedtune.common") for m in mods)
