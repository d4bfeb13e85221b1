"""Sphinx configuration for kvmlib.

The build is nitpicky (every cross-reference must resolve) and CI runs it with ``-n -W``. What
the API reference needs beyond configuration (references to re-exported names, hex constants,
``#:`` comments with a colon, the benchmark table) is the extension ``_ext/kvmlib_docs.py``.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# This tree's kvmlib (not an installed one), the benchmark runner the benchmark table reads
# with, and the docs' own extension.
sys.path[:0] = [str(DOCS.parent / "src"), str(DOCS.parent), str(DOCS / "_ext")]

import kvmlib  # noqa: E402

project = "kvmlib"
author = "kvmlib developers"
copyright = "2026, kvmlib developers"
release = kvmlib.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx.ext.graphviz",
    "kvmlib_docs",
]
exclude_patterns = ["_build"]
nitpicky = True

# -- autodoc ---------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Each object is documented once, in the module that defines it (whatever a module's __all__
# re-exports); references to re-exported names are resolved there (see resolve_where_defined).
# "members" is given per automodule in api.rst: a default would override those that list names.
autodoc_default_options = {"show-inheritance": True, "ignore-module-all": True}

# -- HTML: furo's layout lets wide code blocks and tables scroll instead of being cut off ----------
html_theme = "furo"
html_title = f"kvmlib {release}"
html_static_path = ["_static"]
html_css_files = ["kvmlib.css"]

# -- graphviz: the lifecycle diagram, drawn by `dot` at build time (CI installs graphviz) ----------
graphviz_output_format = "svg"

# -- intersphinx: links into Python's documentation ------------------------------------------------
# Links point at docs.python.org. The inventory (objects.inv, the list of what those pages
# document) is read from Debian's python3-doc package when it is installed (.ci/run installs it,
# as builds may have no network), and otherwise downloaded from docs.python.org.
PYTHON_DOCS = "https://docs.python.org/3"
LOCAL_PYTHON_INVENTORIES = [
    path for path in ("/usr/share/doc/python3/html/objects.inv",) if Path(path).is_file()
]
intersphinx_mapping = {"python": (PYTHON_DOCS, (*LOCAL_PYTHON_INVENTORIES, None))}

# -- references that cannot resolve, each for a reason outside this project ------------------------
nitpick_ignore = [
    # typing_extensions documents these on its own site, whose inventory is not available offline;
    # the standard library's equivalents are newer than Python 3.10.
    ("py:class", "typing_extensions.Buffer"),
    ("py:class", "typing_extensions.Unpack"),
    # The 3.11 inventory of Debian's python3-doc (what offline builds and CI read) has no class
    # entries for these: its re page describes them in sections ("Regular Expression Objects").
    ("py:class", "re.Pattern"),
    ("py:class", "re.Match"),
]
