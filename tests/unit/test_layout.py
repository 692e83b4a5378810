"""Layout facts of ``src/blockmirror``, checked by reading the source with ``ast`` (nothing runs).

1. Size. No module is longer than :data:`MAX_LINES` lines unless its module docstring says why,
   in a paragraph that starts with the marker ``Why one module:`` followed by the reason (at
   least :data:`MIN_REASON_CHARS` characters of it), for example::

       Why one module: the bitmap, its pending pages and the sync share one lock protocol;
       splitting them would spread one invariant over several files.

   A long module is usually two concepts; the marker makes the exception a stated decision.
2. Layers. Every module has a layer (:data:`LAYERS`, lowest first) and may import only modules
   of its own layer or lower ones. Every import counts: at module level, inside functions, under
   ``if TYPE_CHECKING:``, ``from blockmirror import x`` (``x`` resolved to the submodule when it
   is one) and relative imports. A package's ``__init__`` belongs to the package's layer. A
   module missing from the table fails, so that a new module is placed on purpose.
3. Names. No two modules share a file name anywhere in the package (``__init__.py`` aside), so
   that a name says which module it is (``writepath.py`` once sat beside ``journal/writepath.py``).
4. Codecs. The wire and disk codecs (:data:`CODECS`) are sans-I/O: they import none of
   :data:`IO_MODULES`. Their asyncio or socket adapters live in other modules.

Each failure lists every offending file (and line, for imports) and says what to change.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "blockmirror"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE
ROOT = SRC.parents[1]

MAX_LINES = 500
MARKER = "Why one module:"
MIN_REASON_CHARS = 40

# Lowest layer first. Names are relative to the package; "x.*" is the package x (its __init__)
# and every module under it. Keep docs/architecture.md's module map in step with this table.
LAYERS: dict[int, tuple[str, ...]] = {
    0: (
        PACKAGE,  # the package's own __init__
        "errors",
        "units",
        "state",
        "alerts",
        "events",
        "counters",
        "statedir",
        "addresses",
        "io.*",
    ),
    1: ("store.*",),
    2: ("journal.*", "history.*"),
    3: ("blockdev.*",),
    4: ("link.*", "frontend.*"),
    5: (
        "config",
        "config_table",
        "config_paths",
        "conditions",
        "config_diff",
        "config_alerts",
        "config_iscsi",
        "config_link",
        "config_archive",
        "notify.*",
        "admin.*",
        "offline.*",
        "archive.*",
        "drills",
    ),
    6: (
        "daemon",
        "failover",
        "runtime",
        "split_brain",
        "history_attach",
        "monitor",
        "volume_open",
        "iscsi_attach",
        "reconfigure",
        "config_store",
        "config_sharing",
        "archive_attach",
    ),
    7: (
        "cli",
        "cli_roles",
        "cli_history",
        "cli_controls",
        "cli_config",
        "cli_archive",
        "demo",
        "lifecycle",
    ),
}

CODECS = (
    "journal.format",
    "journal.record",
    "journal.ring",
    "journal.lineage",
    "history.undo_format",
    "history.index",
    "link.protocol",
    "link.handshake",
    "link.compression",
    "link.windows",
    "link.flight",
    "link.background",
    "archive.keys",
    "archive.claim",
    "archive.segment_object",
    "archive.base_image",
    "archive.objects",
    "archive.retention",
    "archive.chain",
    "frontend.nbd_protocol",
    "frontend.nbd_negotiation",
    "frontend.iscsi_pdu",
    "frontend.iscsi_bhs",
    "frontend.iscsi_framing",
    "frontend.iscsi_serial",
    "frontend.iscsi_text",
    "frontend.iscsi_keys",
    "frontend.iscsi_chap",
    "frontend.iscsi_login",
    "frontend.iscsi_discovery",
    "frontend.scsi_sense",
    "frontend.scsi_cdb",
    "frontend.scsi_pages",
    "frontend.scsi_pr",
)
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "selectors"})


# -- reading the tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted, with the package prefix: "blockmirror.journal.dirtymap"
    path: Path
    is_package: bool  # an __init__.py
    source: str

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def short(self) -> str:
        """The name as LAYERS and CODECS spell it."""
        return short_name(self.name)


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted module name as resolved (a submodule where "from x import y" names one)


def short_name(name: str) -> str:
    return PACKAGE if name == PACKAGE else name.removeprefix(PACKAGE + ".")


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def load_modules() -> list[Module]:
    assert SRC.is_dir(), f"{SRC} not found: the layout test expects the src/ layout"
    modules = []
    for path in sorted(SRC.rglob("*.py")):
        name, is_package = module_name(path)
        modules.append(Module(name, path, is_package, path.read_text(encoding="utf-8")))
    return modules


def imports_of(source: str, name: str, *, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in ``source`` (module ``name``), wherever it sits in the tree.

    ``from a import b`` yields ``a.b`` when that is a module in ``known`` and ``a`` otherwise
    (``b`` is then an attribute of ``a``), so ``from blockmirror import config`` is an import of
    the config module, not of the package ``__init__``.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if alias.name != "*" and candidate in known else base
                found.append(Import(node.lineno, target))
    return found


def layer_of(short: str) -> int | None:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if pattern.endswith(".*"):
                stem = pattern[:-2]
                if short == stem or short.startswith(stem + "."):
                    return layer
            elif short == pattern:
                return layer
    return None


def layer_names(layer: int) -> str:
    return ", ".join(LAYERS[layer])


# -- the checks, as functions returning their complaints -----------------------------------


def size_violations(modules: list[Module]) -> list[str]:
    complaints = []
    for m in modules:
        lines = len(m.source.splitlines())
        if lines <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(m.source)) or ""
        if has_reason(docstring):
            continue
        complaints.append(f"{m.rel}: {lines} lines, and no {MARKER!r} paragraph")
    return complaints


def has_reason(docstring: str) -> bool:
    for paragraph in re.split(r"\n\s*\n", docstring):
        text = " ".join(paragraph.split())
        if text.startswith(MARKER) and len(text) - len(MARKER) > MIN_REASON_CHARS:
            return True
    return False


def layer_violations(modules: list[Module]) -> list[str]:
    known = {m.name for m in modules}
    complaints = []
    for m in modules:
        own = layer_of(m.short)
        if own is None:
            complaints.append(
                f"{m.rel}: module {m.short!r} is in no layer. Add it to LAYERS in "
                f"tests/unit/test_layout.py at the lowest layer that holds everything it "
                f"imports (and to the module map in docs/architecture.md)."
            )
            continue
        for imp in imports_of(m.source, m.name, is_package=m.is_package, known=known):
            if imp.target != PACKAGE and not imp.target.startswith(PACKAGE + "."):
                continue
            if imp.target not in known:
                complaints.append(
                    f"{m.rel}:{imp.line}: imports {imp.target}, which is no module of the "
                    f"package (a stale name after a move?). Import it from where it lives now."
                )
                continue
            target = short_name(imp.target)
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                complaints.append(
                    f"{m.rel}:{imp.line}: {m.short} (layer {own}: {layer_names(own)}) imports "
                    f"{target} (layer {theirs}: {layer_names(theirs)}). A module may import only "
                    f"its own layer and lower ones: move what it needs down to layer {own} or "
                    f"lower, or have the upper layer pass it in (a callback, a protocol)."
                )
    return complaints


def name_violations(modules: list[Module]) -> list[str]:
    by_name: dict[str, list[Module]] = defaultdict(list)
    for m in modules:
        if m.path.name != "__init__.py":
            by_name[m.path.name].append(m)
    return [
        f"{filename} is the file name of {len(ms)} modules: "
        f"{', '.join(m.rel for m in ms)}. Rename all but one so that each name says which "
        f"module it is (and rename their tests under tests/unit/ with them)."
        for filename, ms in sorted(by_name.items())
        if len(ms) > 1
    ]


def codec_violations(modules: list[Module]) -> list[str]:
    by_short = {m.short: m for m in modules}
    complaints = []
    for codec in CODECS:
        m = by_short.get(codec)
        if m is None:
            complaints.append(
                f"codec {codec} not found: if it moved or was renamed, update CODECS in "
                f"tests/unit/test_layout.py."
            )
            continue
        for imp in imports_of(m.source, m.name, is_package=m.is_package, known=set()):
            top = imp.target.partition(".")[0]
            if top in IO_MODULES:
                complaints.append(
                    f"{m.rel}:{imp.line}: the codec {codec} imports {imp.target}. Codecs are "
                    f"sans-I/O (bytes in, events and bytes out): move the code that needs "
                    f"{top} into the adapter that drives the codec."
                )
    return complaints


def report(complaints: list[str], what: str, fix: str = "") -> None:
    if complaints:
        pytest.fail(
            f"{len(complaints)} {what}:\n"
            + "\n".join(f"  {c}" for c in complaints)
            + (f"\n{fix}" if fix else ""),
            pytrace=False,
        )


# -- the layout facts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return load_modules()


def test_no_long_module_without_a_stated_reason(modules: list[Module]) -> None:
    report(
        size_violations(modules),
        f"module(s) over {MAX_LINES} lines without a stated reason",
        "Split each into modules with one concept apiece or, if it really is one concept, add "
        f"a paragraph to its module docstring that starts with {MARKER!r} and says why.",
    )


def test_no_import_from_a_lower_layer_to_a_higher_one(modules: list[Module]) -> None:
    report(layer_violations(modules), "layer violation(s)")


def test_no_two_modules_share_a_name(modules: list[Module]) -> None:
    report(name_violations(modules), "shared module name(s)")


def test_codecs_are_sans_io(modules: list[Module]) -> None:
    report(codec_violations(modules), "codec(s) importing I/O modules")


# -- the checker itself ------------------------------------------------------------------------


def test_imports_are_found_wherever_they_are() -> None:
    source = """
from typing import TYPE_CHECKING
import blockmirror.errors
from blockmirror import config, units as u
from blockmirror.journal import dirtymap
from blockmirror.journal.dirtymap import DirtyMap
from . import ring
from .. import daemon
from ..store.volume import Volume
if TYPE_CHECKING:
    from blockmirror.link.sender import PeerSender
def late() -> None:
    import blockmirror.cli
"""
    known = {
        "blockmirror",
        "blockmirror.errors",
        "blockmirror.config",
        "blockmirror.units",
        "blockmirror.daemon",
        "blockmirror.cli",
        "blockmirror.journal",
        "blockmirror.journal.dirtymap",
        "blockmirror.journal.ring",
        "blockmirror.store",
        "blockmirror.store.volume",
        "blockmirror.link",
        "blockmirror.link.sender",
    }
    found = imports_of(source, "blockmirror.journal.scan", is_package=False, known=known)
    assert sorted(i.target for i in found if i.target.startswith(PACKAGE)) == sorted(
        [
            "blockmirror.errors",
            "blockmirror.config",
            "blockmirror.units",
            "blockmirror.journal.dirtymap",
            "blockmirror.journal.dirtymap",
            "blockmirror.journal.ring",
            "blockmirror.daemon",
            "blockmirror.store.volume",
            "blockmirror.link.sender",
            "blockmirror.cli",
        ]
    )
    # In a package's __init__, "." is the package itself.
    init = imports_of("from . import ring", "blockmirror.journal", is_package=True, known=known)
    assert [i.target for i in init] == ["blockmirror.journal.ring"]


def test_layers_cover_packages_and_their_modules() -> None:
    assert layer_of(PACKAGE) == 0
    assert layer_of("io") == layer_of("io.fileio") == 0
    assert layer_of("journal") == layer_of("journal.dirtymap") == 2
    assert layer_of("daemon") == 6
    assert layer_of("cli") == 7
    assert layer_of("journalx") is None  # "journal.*" is not a prefix match on the name
    assert layer_of("nowhere") is None
    every = [p for patterns in LAYERS.values() for p in patterns]
    assert len(every) == len(set(every)), "a name sits in two layers"


def test_the_reason_marker_needs_a_reason() -> None:
    assert has_reason(
        "Summary.\n\nWhy one module: the bitmap and its sync share one lock protocol, and\n"
        "splitting them would spread one invariant over two files.\n"
    )
    assert not has_reason("Summary.\n\nWhy one module: because.\n")
    assert not has_reason("Summary. Why one module: it is mentioned, not a paragraph of its own.")
