"""The build config lists every package explicitly (the top-level folders are mapped into
``fedtune.*``), so a new subpackage must be listed too, or a non-editable install (the Docker
images: ``pip install .``) ships without it and fails at import."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_in_the_build_config():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    folders = {f"fedtune.{top}": REPO / top for top in ("common", "client", "server", "simulations")}
    assert {name: str(path.relative_to(REPO)) for name, path in folders.items()} == {
        name: tool["package-dir"][name] for name in folders
    }
    found = set()
    for name, root in folders.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" not in rel.parts:
                found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "not in pyproject.toml's [tool.setuptools] packages"
    assert {"fedtune.common.methods", "fedtune.common.secagg"} <= found
