"""Prints the package's longest functions and which of its modules import which.

    python tests/_code_shape.py [--top N]

A development tool: ``tests/test_code_shape.py`` holds the package to what it measures.

Lines of code per function leave out the docstring, blank lines and comment lines. An
import edge ``X -> Y`` means module X imports from module Y of the package; the package
reads top-down when every edge points to a lower level (see the README's Development
section).
"""

import argparse
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "adamw_jax"


def _code_lines(lines: list[str], node: ast.FunctionDef) -> int:
    docstring = set()
    if ast.get_docstring(node, clean=False) is not None:
        first = node.body[0]
        docstring = set(range(first.lineno, first.end_lineno + 1))
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        text = lines[number - 1].strip()
        if number not in docstring and text and not text.startswith("#"):
            count += 1
    return count


def _sources() -> list[pathlib.Path]:
    """The package's modules, its subpackages' included."""
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    """``alias`` for alias.py, ``tuning`` for tuning/__init__.py, ``tuning._sweep`` for
    tuning/_sweep.py; the package's own ``__init__`` keeps that name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def function_lengths() -> list[tuple[int, str]]:
    """(lines of code, "module.py:line name") for every function, longest first."""
    rows = []
    for path in _sources():
        source = path.read_text()
        lines = source.splitlines()
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((_code_lines(lines, node), f"{where}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def _targets(node: ast.ImportFrom) -> set[str]:
    """The package's modules one ``from adamw_jax... import ...`` reads from."""
    base = ".".join(node.module.split(".")[1:])
    targets = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}" if base else alias.name
        targets.add(submodule if not base or _is_module(submodule) else base)
    return targets


def import_graph() -> dict[str, list[str]]:
    """module -> the package's modules it imports from."""
    graph = {}
    for path in _sources():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adamw_jax"):
                targets |= _targets(node)
        graph[_module_name(path)] = sorted(targets)
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12, help="how many functions to list")
    args = parser.parse_args()
    print("Longest functions (lines of code, docstring excluded):")
    for count, where in function_lengths()[: args.top]:
        print(f"  {count:4d}  {where}")
    print("\nImports within the package (X -> Y):")
    for module, targets in import_graph().items():
        print(f"  {module:20s} -> {', '.join(targets) or '-'}")


if __name__ == "__main__":
    main()
