"""The package's import graph points one way: utils <- data <- evaluation <- callbacks <- models <- retrieval <- deploy
<- serve <- apps.

A module may import its own layer or any layer below it, never one above (lazy imports inside functions
count too): a reader can then learn the tree bottom-up, and a low layer never drags in a high one.
The apps (``apps/``, one Hydra entry point each) and any subpackage not named here sit at the top; no module
sits beside ``__init__.py`` at the package root (the apps live in one place).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fashion_lightning

PACKAGE = Path(fashion_lightning.__file__).resolve().parent
LAYERS = ("utils", "data", "evaluation", "callbacks", "models", "retrieval", "deploy", "serve")  # bottom first
TOP = len(LAYERS)  # apps/


def layer(module: str) -> int | None:
    """Layer of a ``fashion_lightning`` module (None for other packages)."""
    parts = module.split(".")
    if parts[0] != "fashion_lightning":
        return None
    if len(parts) == 1:
        return TOP
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def imported_modules(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_layer_of_modules():
    assert layer("fashion_lightning.utils.atomic") == 0
    assert layer("fashion_lightning.callbacks.epoch_seed") == LAYERS.index("callbacks")
    assert layer("fashion_lightning.apps.train") == layer("fashion_lightning.apps.serve") == TOP
    assert layer("fashion_lightning.serve.app") == LAYERS.index("serve")
    assert layer("torch.nn") is None


def test_no_import_points_up_a_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("fashion_lightning", *path.relative_to(PACKAGE).with_suffix("").parts))
        own = layer(module)
        assert own is not None
        for target in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            other = layer(target)
            if other is not None and other > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up a layer (" + " <- ".join(LAYERS) + " <- apps):\n" + "\n".join(upward)


def test_the_apps_live_in_one_place():
    beside_init = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not beside_init, f"modules at the package root (apps go in apps/, library code in a layer): {beside_init}"


def test_no_module_imports_another_modules_private_name():
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashion_lightning"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [f"{path.relative_to(PACKAGE)}: {node.module}.{name}" for name in names]
    assert not private, "private names imported across modules (make them public):\n" + "\n".join(private)


def test_readme_layout_names_every_subpackage_in_layer_order():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    first_words = [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.strip()]
    rooms = [word[:-1] for word in first_words if word.endswith("/")]
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(rooms) == subpackages, f"README's Layout lists {sorted(rooms)}, the package has {sorted(subpackages)}"
    assert [room for room in rooms if room in LAYERS] == list(LAYERS)
