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


def function_lengths() -> list[tuple[int, str]]:
    """(lines of code, "module.py:line name") for every function, longest first."""
    rows = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((_code_lines(lines, node), f"{path.name}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def import_graph() -> dict[str, list[str]]:
    """module -> the package's modules it imports from."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adamw_jax"):
                if node.module == "adamw_jax":
                    targets.update(alias.name for alias in node.names)
                else:
                    targets.add(node.module.split(".")[1])
        graph[path.stem] = sorted(targets)
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
        print(f"  {module:16s} -> {', '.join(targets) or '-'}")


if __name__ == "__main__":
    main()
