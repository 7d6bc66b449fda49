"""Sphinx configuration for the adamw_jax documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors). The build
needs no network: the notebooks are rendered from their committed outputs (nothing is
executed), MathJax is copied into the output from the ``sphinx-mathjax-offline`` package, and
there is no intersphinx (Optax and JAX are named in plain text, not linked).
"""

import importlib
import pathlib
import re
import shutil
import types

import chex
import optax
from sphinx.util.typing import stringify_annotation

import adamw_jax

project = "adamw_jax"
author = "adamw_jax developers"
copyright = "adamw_jax developers"
release = adamw_jax.__version__
version = release

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _copy_notebooks() -> None:
    """Copies the committed notebooks and their README into docs/notebooks (not tracked).

    Sphinx reads sources only under docs/, and the README's links (``01_....ipynb``) must
    resolve next to the notebooks, so the directory is mirrored, stale copies removed.
    """
    source, target = ROOT / "notebooks", ROOT / "docs" / "notebooks"
    target.mkdir(exist_ok=True)
    wanted = {p.name: p for p in [*source.glob("*.ipynb"), source / "README.md"]}
    for stale in target.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for name, path in wanted.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)


_copy_notebooks()

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # serves MathJax 3 from _static/mathjax instead of a CDN
    "myst_nb",  # MyST Markdown pages and notebooks (it loads myst_parser itself)
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "notebooks/.ipynb_checkpoints"]

# Markdown: $...$ and $$...$$ math, ::: fences for admonitions.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# Notebooks are shown with the outputs committed to the repository, never executed here.
nb_execution_mode = "off"
nb_merge_streams = True

# API reference: Google-style docstrings; signatures keep the aliases' names short.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # the Attributes sections say what each field holds
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autosummary_generate = False


def _skip_reexported(app, what, name, obj, skip, options):
    """In a submodule's page, leaves out the names documented under ``adamw_jax.<name>``.

    A transformation such as ``scale_by_adam`` lives in ``adamw_jax.moments`` but is used as
    ``adamw_jax.scale_by_adam``; its page shows it once, under the name users write.
    """
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field"):
        return True  # a NamedTuple's field: its docstring's Attributes section describes it
    if what == "module" and name in adamw_jax.__all__ and getattr(adamw_jax, name) is obj:
        return True
    return None


def _alias_names() -> list[tuple[str, str]]:
    """(expanded, name) for the type aliases of the public signatures, longest first.

    Python expands an alias such as ``optax.ScalarOrSchedule`` into its union before Sphinx
    sees it; the signatures show the alias's name again instead of a four-line union.
    """
    aliases = {
        "optax.ScalarOrSchedule": optax.ScalarOrSchedule,
        "optax.Schedule": optax.Schedule,
        "chex.ArrayTree": chex.ArrayTree,
        "chex.Numeric": chex.Numeric,
        "chex.Array": chex.Array,
    }
    pairs = [(stringify_annotation(a, "smart"), name) for name, a in aliases.items()]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _shorten_aliases(app, what, name, obj, options, signature, return_annotation):
    """Puts the aliases' names back into an autodoc signature and its return annotation."""
    for expanded, alias in _alias_names():
        signature = signature and signature.replace(expanded, alias)
        return_annotation = return_annotation and return_annotation.replace(expanded, alias)
    return signature, return_annotation


_AUTOMODULE = re.compile(r"^\.\. automodule:: (\S+)\n((?:   .*\n|\n(?=   ))*)", re.MULTILINE)


def _exported_entries(module_name: str) -> list[str]:
    """The directives of a module's names that are documented as ``adamw_jax.<name>``.

    For a submodule, the names of its ``__all__`` that the package re-exports; for the
    package, the names of its ``__all__`` that no public submodule's ``__all__`` holds.
    """
    module = importlib.import_module(module_name)
    if module is adamw_jax:
        elsewhere = {
            id(getattr(sub, n))
            for sub in vars(adamw_jax).values()
            if isinstance(sub, types.ModuleType) and hasattr(sub, "__all__")
            for n in sub.__all__
        }
        names = [
            n
            for n in adamw_jax.__all__
            if not isinstance(getattr(adamw_jax, n), types.ModuleType)
            and id(getattr(adamw_jax, n)) not in elsewhere
        ]
    else:
        names = [
            n
            for n in module.__all__
            if n in adamw_jax.__all__ and getattr(adamw_jax, n) is getattr(module, n)
        ]
    kinds = {True: "autoclass", False: "autofunction"}
    return [
        f".. {kinds[isinstance(getattr(module, n), type)]}:: adamw_jax.{n}"
        if callable(getattr(module, n))
        else f".. autodata:: adamw_jax.{n}"
        for n in names
    ]


def _add_exported_entries(app, docname, source):
    """On an API page, adds the entries of its modules' names used as ``adamw_jax.<name>``.

    Each page holds ``.. automodule:: adamw_jax.<module>`` with ``:members:``: autodoc
    documents the module's ``__all__`` (and nothing else), less the names skipped by
    :func:`_skip_reexported`, which are added here, under the name users write, so that
    the page lists exactly the module's ``__all__``.
    """
    if not docname.startswith("api/"):
        return

    def expand(match: re.Match) -> str:
        entries = "".join(f"   {entry}\n\n" for entry in _exported_entries(match.group(1)))
        return f"{match.group(0).rstrip()}\n\n{entries}"

    source[0] = _AUTOMODULE.sub(expand, source[0])


def setup(app):
    app.connect("source-read", _add_exported_entries)
    app.connect("autodoc-skip-member", _skip_reexported)
    app.connect("autodoc-process-signature", _shorten_aliases)


# HTML: furo, with the sources' links to GitHub left out (the site is read offline too).
html_theme = "furo"
html_title = f"adamw_jax {release}"
html_static_path = []
html_show_sourcelink = False
html_copy_source = False
pygments_style = "friendly"
pygments_dark_style = "monokai"
