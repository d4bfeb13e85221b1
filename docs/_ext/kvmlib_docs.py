"""The docs' own Sphinx extension: how kvmlib's API reference resolves, renders and tabulates.

- :func:`resolve_where_defined`: a reference to a re-exported name (``kvmlib.KvmVm``) or to a
  name a docstring's module imports (``VmFd.create_vcpu``) links to where the object is
  documented, the module that defines it (``kvmlib.vm.KvmVm``);
- :func:`public_bases`: private base classes stay out of "Bases:" lines;
- :func:`keep_attribute_docstring` / :func:`restore_attribute_docstring`: a ``#:`` comment with a
  colon ("COM1: the ports ...") is not read by napoleon as "type: description";
- :class:`HexPyVariable` / :class:`HexPyAttribute`: a constant the source writes in hex is shown
  in hex (``MMIO_GAP_START = 0xd0000000``, not ``3489660928``);
- :class:`BenchmarkTable`: ``.. benchmark-table:: _static/benchmarks.json`` renders a saved
  benchmark run as a table, with the columns of ``python -m benchmarks``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.domains.python import PyAttribute, PyVariable
from sphinx.environment import BuildEnvironment
from sphinx.errors import NoUri
from sphinx.util.docutils import SphinxDirective


@cache
def _imports(module: str) -> dict[str, str]:
    """``{name: module it is imported from}`` for ``module``'s top-level ``from X import name``.

    Imports under ``if TYPE_CHECKING:`` count: docstrings name what annotations name.
    """
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    except (ImportError, OSError, TypeError, SyntaxError):
        return {}
    package = module if hasattr(sys.modules[module], "__path__") else module.rpartition(".")[0]
    found: dict[str, str] = {}
    statements = list(tree.body)
    while statements:
        stmt = statements.pop(0)
        if isinstance(stmt, ast.If):
            statements[:0] = stmt.body
        elif isinstance(stmt, ast.ImportFrom) and stmt.module is not None:
            source = stmt.module
            if stmt.level:
                source = f"{package.rsplit('.', stmt.level - 1)[0]}.{source}"
            for alias in stmt.names:
                if alias.asname in (None, alias.name):
                    found[alias.name] = source
    return found


def _import(module: str) -> types.ModuleType | None:
    """The module (imported here: a build that reuses saved doctrees has not imported it), or None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _origin_module(module: str, name: str) -> str:
    """The module whose source assigns ``name``, following ``from X import name`` from ``module``."""
    source = _imports(module).get(name)
    return module if source is None else _origin_module(source, name)


def _lookup(scope: object, name: str) -> object:
    """``getattr(scope, name)``, or for a module, also a name it imports for type checking only."""
    if hasattr(scope, name):
        return getattr(scope, name)
    if isinstance(scope, types.ModuleType):
        source = _imports(scope.__name__).get(name)
        if source is not None:
            return getattr(importlib.import_module(source), name)
    raise AttributeError(name)


def _documented_name(dotted: str, module: str | None, cls: str | None) -> tuple[str, object] | None:
    """Where what ``dotted`` names is documented, and the object, found as Python finds it.

    ``dotted`` is looked up absolutely (``kvmlib.KvmVm.run``), then from the class, the module
    and the module's enclosing packages that the reference appears in (``VmFd.create_vcpu`` in a
    module that imports ``VmFd``, ``Intr`` in ``kvmlib.ioctl.vcpu``, whose package exports it).
    Each step that reaches a class, function or module continues from where that object is
    defined; a step that reaches a plain value (a constant, a property, a field) continues from
    where its name is assigned, following re-exports.
    """
    parts = dotted.split(".")
    starts: list[tuple[object, str, list[str]]] = []
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        try:
            starts.append((importlib.import_module(head), head, parts[i:]))
            break
        except ImportError:
            continue
    if module is not None and _import(module) is not None:
        if cls:
            scope: object = _import(module)
            for name in cls.split("."):
                scope = getattr(scope, name, None)
            where = _defined_at(scope)
            if where is not None:
                starts.append((scope, where, parts))
        enclosing = module.split(".")
        for i in range(len(enclosing), 0, -1):
            package = _import(".".join(enclosing[:i]))
            if package is not None:
                starts.append((package, package.__name__, parts))
    for start, path, rest in starts:
        try:
            return _follow(start, path, rest)
        except AttributeError:
            continue
    return None


def _follow(obj: object, path: str, names: list[str]) -> tuple[str, object]:
    """Follow ``names`` from ``obj`` (documented at ``path``); see :func:`_documented_name`."""
    for name in names:
        owner, obj = obj, _lookup(obj, name)
        where = _defined_at(obj)
        if where is not None and where.rpartition(".")[2] == name:
            path = where
        elif isinstance(owner, types.ModuleType):
            path = f"{_origin_module(owner.__name__, name)}.{name}"
        else:
            path = f"{path}.{name}"
    return path, obj


def _defined_at(obj: object) -> str | None:
    """Where a class, function or module is defined: ``module.qualname`` (None for other values)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        return f"{module}.{qualname}"
    return None


def resolve_where_defined(app: Sphinx, env: BuildEnvironment, node: pending_xref,
                          contnode: nodes.TextElement) -> nodes.Element | None:
    """Link ``kvmlib.KvmVm`` (a re-export) or ``VmFd.create_vcpu`` (a name in scope) to its docs.

    The API reference documents every object once, in the module that defines it. A reference
    that names it another way Python accepts (through a package's re-export, or through a name
    imported into the module whose docstring holds the reference) is resolved to that place.
    A type written as a string with its arguments (``"os.PathLike[str]"`` in a type alias) links
    to its base type. Type variables and kvmlib's private classes (``_Range``, in a public
    method's annotation) have no page by design: their names are shown as plain text.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    generic = re.fullmatch(r"([\w.]+)\[.*\]", target)
    if generic:
        base = node.deepcopy()
        base["reftarget"] = generic.group(1)
        resolved: nodes.Element | None = app.emit_firstresult("missing-reference", env, base, contnode,
                                                              allowed_exceptions=(NoUri,))
        return resolved
    found = _documented_name(target, node.get("py:module"), node.get("py:class"))
    if found is None:
        return None
    canonical, obj = found
    if isinstance(obj, TypeVar):
        return contnode
    if canonical.startswith("kvmlib.") and any(
            part.startswith("_") and not part.startswith("__") for part in canonical.split(".")):
        return contnode
    if canonical == target:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical,
                               node, contnode)


def public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list[type]) -> None:
    """Show a class's public ancestry: a private base (``_FdOwner``) is replaced by its own bases."""
    result: list[type] = []
    pending = list(bases)
    while pending:
        base = pending.pop(0)
        if base.__name__.startswith("_") and base.__module__.startswith("kvmlib"):
            pending[:0] = [b for b in base.__bases__ if b is not object]
        elif base not in result:
            result.append(base)
    bases[:] = result


_RAW_ATTRIBUTE_DOCSTRINGS: dict[str, list[str]] = {}


def keep_attribute_docstring(app: Sphinx, what: str, name: str, obj: object, options: object,
                             lines: list[str]) -> None:
    """Remember an attribute's docstring before napoleon reads it (see restore_attribute_docstring)."""
    if what in ("attribute", "data", "property"):
        _RAW_ATTRIBUTE_DOCSTRINGS[name] = list(lines)


def restore_attribute_docstring(app: Sphinx, what: str, name: str, obj: object, options: object,
                                lines: list[str]) -> None:
    """Undo napoleon's reading of an attribute docstring's first colon as "type: description".

    kvmlib's ``#:`` comments are prose ("COM1: the ports ..."); the type is the annotation's,
    which autodoc shows itself.
    """
    raw = _RAW_ATTRIBUTE_DOCSTRINGS.pop(name, None)
    if raw is not None:
        lines[:] = raw


@cache
def _hex_assignments(module: str) -> frozenset[str]:
    """Names assigned an int expression written with a hex literal in ``module``'s source."""
    try:
        source = inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return frozenset()
    names: set[str] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for stmt in body:
            if isinstance(stmt, ast.ClassDef):
                visit(stmt.body, f"{prefix}{stmt.name}.")
                continue
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            else:
                continue
            text = ast.get_source_segment(source, value) or ""
            if re.search(r"\b0[xX][0-9a-fA-F]", text):
                names.update(f"{prefix}{t.id}" for t in targets if isinstance(t, ast.Name))

    visit(ast.parse(source).body, "")
    return frozenset(names)


class _HexValue:
    """For ``py:data`` / ``py:attribute``: an int the source writes in hex is shown in hex.

    autodoc renders every value with ``repr``, so ``MMIO_GAP_START = 0xD0000000`` would read
    ``3489660928``. Addresses, magic numbers and protocol versions are read in hex.
    """

    options: dict[str, Any]
    env: BuildEnvironment
    arguments: list[str]

    def run(self) -> list[nodes.Node]:
        value = self.options.get("value")
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            module = self.options.get("module", self.env.ref_context.get("py:module"))
            cls = self.env.ref_context.get("py:class")
            name = self.arguments[0].strip()
            qualified = f"{cls}.{name}" if cls and not name.startswith(f"{cls}.") else name
            if module and qualified in _hex_assignments(module):
                self.options["value"] = hex(int(value))
        return super().run()  # type: ignore[misc,no-any-return]


class HexPyVariable(_HexValue, PyVariable):
    """``py:data`` with hex values (see _HexValue)."""


class HexPyAttribute(_HexValue, PyAttribute):
    """``py:attribute`` with hex values (see _HexValue)."""


class BenchmarkTable(SphinxDirective):
    """``.. benchmark-table:: PATH``: the cases of a saved run (``python -m benchmarks --json``).

    The cells are those ``python -m benchmarks`` prints (``benchmarks.runner.table_rows``), so the
    page and the terminal agree; a case whose C side measures something else says what under its
    name. The page is rebuilt when the JSON changes.
    """

    required_arguments = 1
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {"class": directives.class_option}

    def run(self) -> list[nodes.Node]:
        from benchmarks.runner import TABLE_HEADER, read_json, table_rows

        relative, path = self.env.relfn2path(self.arguments[0], self.env.docname)
        self.env.note_dependency(relative)
        cases = read_json(Path(path))
        widths = [34, 8, 16, 16, 8, 14]
        table = nodes.table(classes=["benchmark-table", *self.options.get("class", [])])
        group = nodes.tgroup(cols=len(TABLE_HEADER))
        table += group
        group.extend(nodes.colspec(colwidth=w) for w in widths)
        head, body = nodes.thead(), nodes.tbody()
        head += self._row(TABLE_HEADER)
        for case, cells in zip(cases, table_rows(cases), strict=True):
            body += self._row(cells, case.get("baseline"))
        group += head
        group += body
        return [table]

    @staticmethod
    def _row(cells: tuple[str, ...], baseline: str | None = None) -> nodes.row:
        row = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry()
            entry += nodes.paragraph(text=text)
            if i == 0 and baseline:
                entry += nodes.paragraph("", "", nodes.emphasis(text=f"C baseline: {baseline}"))
            row += entry
        return row


def setup(app: Sphinx) -> dict[str, object]:
    """Connect the hooks and register the directives."""
    app.connect("missing-reference", resolve_where_defined)
    app.connect("autodoc-process-bases", public_bases)
    # Around napoleon's own handler (priority 500).
    app.connect("autodoc-process-docstring", keep_attribute_docstring, priority=100)
    app.connect("autodoc-process-docstring", restore_attribute_docstring, priority=900)
    app.add_directive_to_domain("py", "data", HexPyVariable, override=True)
    app.add_directive_to_domain("py", "attribute", HexPyAttribute, override=True)
    app.add_directive("benchmark-table", BenchmarkTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
