"""The package's layers import only downwards: errors <- methods <- models <- runtime <- api <- evaluation <- cli.

Every import in ``src/relcache`` (module level or inside a function, absolute or relative) is resolved to the
layer it names; an import of a higher layer, or of the top-level ``relcache`` package (whose names import every layer),
from inside a layer fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relcache

PACKAGE = Path(relcache.__file__).parent
LAYERS = ["errors", "methods", "models", "runtime", "api", "evaluation", "cli"]


def _module_name(path: Path) -> list[str]:
    parts = ["relcache", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``path``."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None or target == "relcache":  # ``from . import x``: the names are modules
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _layer(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "relcache":
        return None
    if len(parts) == 1 or parts[1] not in LAYERS:
        return len(LAYERS)  # the top-level package, or a name it defines: above every layer
    return LAYERS.index(parts[1])


def test_resolver_sees_relative_and_function_level_imports():
    """The walker itself: a relative import two levels up inside a function resolves to its absolute name."""
    src = PACKAGE / "evaluation" / "bench.py"
    names = {name for _, name in _imports(src)}
    assert "relcache.api" in names and "relcache.methods.config" in names


def test_no_upward_import():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        own = _layer(".".join(_module_name(path)))
        for line, name in _imports(path):
            layer = _layer(name)
            if layer is not None and layer > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


#: inside ``cli``, lowest first: a module imports only from the rows below its own
CLI_LAYERS = [{"options", "reference"}, {"demo", "bench", "analyze", "calibrate"}, {"__init__"}, {"__main__"}]


def _cli_rank(name: str) -> int:
    """The row of ``relcache.cli.<name>``; a name the package defines (``main``) is the package's."""
    return next((i for i, row in enumerate(CLI_LAYERS) if name in row), 2)


def test_cli_commands_import_only_down():
    """The package (parser and ``main``) over the commands, each command over options.py and reference.py; no command
    imports another, nothing below imports a command or the package."""
    upward = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        own = _cli_rank(path.stem)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["relcache", "cli"] and _cli_rank(parts[2] if len(parts) > 2 else "__init__") >= own:
                upward.append(f"cli/{path.name}:{line} imports {name}")
    assert not upward, "imports inside cli not pointing down:\n" + "\n".join(upward)


def test_the_type_checkers_imports_are_the_lazy_table():
    """``relcache/__init__.py`` imports its public names on first use from ``_LAZY`` and shows type checkers the same
    names under ``TYPE_CHECKING``: each name from the same module in both, and the literal ``__all__`` lists them."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "_TYPE_CHECKING")
    shown = {alias.name: "." + (node.module or "") for node in block.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert shown == relcache._LAZY
    assert sorted(relcache.__all__) == sorted(relcache._LAZY)
