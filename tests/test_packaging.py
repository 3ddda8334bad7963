"""setup.py ships every package of the tree (the Debian package is built from it)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_lists_every_package():
    """Each openaigw directory with an __init__.py is in setup.py's packages."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (packages,) = [k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                   for k in node.keywords if k.arg == "packages"]
    listed = set(ast.literal_eval(packages))
    found = {
        os.path.relpath(directory, ROOT).replace(os.sep, ".")
        for directory, _, files in os.walk(os.path.join(ROOT, "openaigw"))
        if "__init__.py" in files and "__pycache__" not in directory
    }
    assert found <= listed, f"missing from setup.py packages: {sorted(found - listed)}"
