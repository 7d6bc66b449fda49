"""The documentation: every guide's code runs, and the site builds with every public name in it.

Each guide in ``docs/`` (and the README) is run top to bottom as one script: its ```` ```python ````
blocks are executed in order in one namespace, its ```` ```pycon ```` blocks checked as
doctests in that namespace, so no example in the docs can rot. The site is built once per
session with ``sphinx-build -W`` (warnings are errors) into a temporary directory, and the
built pages are checked for what a reader needs: each API page lists exactly its modules'
``__all__``, the notebooks' figures, math served from the build itself (the site is read offline).
"""

from __future__ import annotations

import doctest
import html
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import pytest

import adamw_jax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Guides whose code needs several devices run in a subprocess with that many CPU devices.
DEVICES = {"sharding.md": 8}
FENCE = re.compile(r"^([ \t]*)```(\w+)[^\n]*\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)
DOCTEST_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, first line, code) of each fenced block of a Markdown page, dedented."""
    text = page.read_text()
    return [
        (m.group(2), text.count("\n", 0, m.start(3)) + 1, textwrap.dedent(m.group(3)))
        for m in FENCE.finditer(text)
    ]


def run_page(page: Path) -> None:
    """Runs a page's python blocks in order and checks its pycon blocks, in one namespace.

    As a reader runs them: with JAX's default dtype promotion, not the suite's strict one
    (Optax's own schedules mix Python floats with int32 step counts).
    """
    module = types.ModuleType(f"_docs_{page.stem}")
    module.__file__ = str(page)
    sys.modules[module.__name__] = module  # dataclasses (Flax modules) look their module up
    try:
        with jax.numpy_dtype_promotion("standard"):
            for language, line, code in _blocks(page):
                if language == "python":
                    exec(compile(code, f"{page}:{line}", "exec"), module.__dict__)
                elif language == "pycon":
                    _check_doctest(code, module.__dict__, page, line)
    finally:
        del sys.modules[module.__name__]


def _check_doctest(code: str, namespace: dict, page: Path, line: int) -> None:
    test = doctest.DocTestParser().get_doctest(code, namespace, page.name, str(page), line - 1)
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    namespace.update(test.globs)  # DocTest ran in a copy; later blocks see its names
    assert not runner.failures, f"{page.name}, block at line {line}:\n" + "".join(report)


def test_guides_are_found_and_hold_code():
    blocks = {p.name: [lang for lang, _, _ in _blocks(p)] for p in GUIDES}
    for name in ("README.md", "getting_started.md", "concepts.md", *DEVICES):
        assert "python" in blocks[name], name
    assert sum(langs.count("python") for langs in blocks.values()) >= 20
    assert sum(langs.count("pycon") for langs in blocks.values()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in GUIDES if p.name not in DEVICES], ids=lambda p: p.name)
def test_guide_code_runs(page):
    run_page(page)


@pytest.mark.slow
@pytest.mark.parametrize("page", [DOCS / name for name in DEVICES], ids=lambda p: p.name)
def test_multi_device_guide_code_runs(page):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES[page.name]}"
    )
    result = subprocess.run(
        [sys.executable, __file__, str(page)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_readme_keeps_the_two_commands_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    commands = 'pip install -e ".[examples]" && python examples/train_digits.py\n'
    commands += 'pip install -e ".[all]" && pytest\n'
    assert f"```bash\n{commands}```" in readme.split("\n## ", 1)[0]
    assert commands in (DOCS / "getting_started.md").read_text()
    assert len(readme.splitlines()) <= 220
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


# ------------------------------------------------------------------------------ the site
@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    result = subprocess.run(
        [*cmd, str(DOCS), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return out


def _public_modules() -> list[str]:
    """The names of the package's public modules: no part of the name starts with ``_``."""
    found = pkgutil.walk_packages(adamw_jax.__path__, "adamw_jax.")
    return sorted(m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))


def test_every_public_module_defines_its_public_names():
    modules = ["adamw_jax", *_public_modules()]
    assert len(modules) >= 12  # the package and its modules, not an empty list
    for name in modules:
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
        for public in module.__all__:
            assert not public.startswith("_"), f"{name}.__all__ lists the private {public}"
            assert hasattr(module, public), f"{name}.__all__ lists {public}, which it lacks"


def _anchor(module, name: str) -> str:
    """The HTML id of a public name's entry: ``adamw_jax.<name>`` where the package exports it."""
    obj = getattr(module, name)
    if isinstance(obj, types.ModuleType):
        return f"module-{obj.__name__}"
    if name in adamw_jax.__all__ and getattr(adamw_jax, name) is obj:
        return f"adamw_jax.{name}"
    return f"{module.__name__}.{name}"


def _entries(page: str) -> set[str]:
    """The ids of a built page's object entries, less the members nested in a documented class."""
    ids = {
        html.unescape(i) for i in re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page)
    }
    return {i for i in ids if i.rsplit(".", 1)[0] not in ids}


@pytest.mark.slow
def test_each_api_page_lists_exactly_its_modules_all(site):
    """A module's page holds an entry for each name of its ``__all__``, and for nothing else.

    The package's own ``__all__`` is documented with the modules that define its names:
    a name the package re-exports from a public module is on that module's page (under
    ``adamw_jax.<name>``), the others on the package's page.
    """
    pages = {page.stem: page.read_text() for page in (site / "api").glob("*.html")}
    expected: dict[str, set[str]] = {stem: set() for stem in pages}
    elsewhere = set()
    for name in _public_modules():
        module = importlib.import_module(name)
        stem = next((s for s, text in pages.items() if f'id="module-{name}"' in text), None)
        assert stem is not None, f"no API page documents {name} (add it to docs/api/)"
        expected[stem] |= {_anchor(module, n) for n in module.__all__}
        elsewhere |= {_anchor(module, n) for n in module.__all__}
    package = next(s for s, text in pages.items() if 'id="module-adamw_jax"' in text)
    expected[package] |= {_anchor(adamw_jax, n) for n in adamw_jax.__all__} - elsewhere
    assert sum(map(len, expected.values())) > 60  # every public name, not an empty list
    for stem, text in pages.items():
        expected[stem] = {a for a in expected[stem] if not a.startswith("module-")}
        assert _entries(text) == expected[stem], (
            f"api/{stem}: entries not in __all__: {sorted(_entries(text) - expected[stem])}; "
            f"names of __all__ without an entry: {sorted(expected[stem] - _entries(text))}"
        )


@pytest.mark.slow
def test_every_guide_and_notebook_is_a_page(site):
    for page in DOCS.glob("*.md"):
        assert (site / f"{page.stem}.html").is_file(), page.name
    total = 0
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        built = (site / "notebooks" / f"{notebook.stem}.html").read_text()
        cells = json.loads(notebook.read_text())["cells"]
        images = sum(
            "image/png" in out.get("data", {}) for c in cells for out in c.get("outputs", [])
        )
        assert built.count('<img alt="../_images/') >= images, notebook.name  # figures shown
        total += images
    assert total >= 4  # the committed notebooks' plots, not an empty check


@pytest.mark.slow
def test_math_and_assets_are_served_from_the_site_itself(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    concepts = (site / "concepts.html").read_text()
    assert 'src="_static/mathjax/tex-chtml.js' in concepts
    assert r"\hat m_t" in concepts  # the update's math, left for MathJax to typeset
    for page in site.rglob("*.html"):
        text = page.read_text()
        remote = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(?:https?:)?//', text)
        assert not remote, f"{page.relative_to(site)} loads {len(remote)} remote assets"


if __name__ == "__main__":  # the subprocess of test_multi_device_guide_code_runs
    run_page(Path(sys.argv[1]))
