"""``--baseline-rev REV``: a previous commit's sources, extracted beside the live tree, so a
benchmark can run units of both trees side by side in one run and print new/old ratios.

The old tree is ``git archive REV | tar -x`` into a temporary directory: no worktree and no
checkout, so the live tree and git's state are untouched. A unit runs from a tree when its
``PYTHONPATH`` is that tree's ``src``: ``PYTHONPATH`` comes before the editable install's
``.pth`` entry on ``sys.path``, and every server's interpreter and dependencies are the same
``.venv``. :meth:`SourceTree.probe` checks that, with the same interpreter, environment and
working directory the units get, rather than trusting it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The restructure must not cost speed: new / old at least this, allowing for noise.
MIN_RATIO = 0.95

_PROBE = (
    "import blockmirror, blockmirror.cli;"
    " print(blockmirror.__file__); print(blockmirror.cli.__file__)"
)


@dataclass(frozen=True)
class SourceTree:
    """A tree whose ``src`` is put first on ``PYTHONPATH`` for the units started from it."""

    label: str  # "current", or the revision as given on the command line
    src: Path
    commit: str | None = None  # the full hash of a baseline; None for the live tree

    @property
    def baseline(self) -> bool:
        return self.commit is not None

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with ``PYTHONPATH`` = this ``src``.

        Replaced, not prepended to: a caller's ``PYTHONPATH`` must not put some other
        ``blockmirror`` between the tree and the editable install.
        """
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = str(self.src)
        return env

    @contextmanager
    def activated(self) -> Iterator[None]:
        """This process's ``PYTHONPATH`` set to the tree for the block, for helpers that start
        units with ``os.environ`` (``tests.support.unit_process.start_unit``), then restored.
        Benchmarks are single-threaded, so nothing else starts a process meanwhile."""
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(self.src)
        try:
            yield
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before

    def probe(self, cwd: Path | None = None) -> Path:
        """Where ``blockmirror`` resolves for a unit started from this tree (same interpreter,
        environment and working directory); fails unless both the package and its ``cli``
        module are inside :attr:`src`. Returns the package's ``__init__.py``."""
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{self.label}: cannot import blockmirror:\n{proc.stderr}")
        found = [Path(line).resolve() for line in proc.stdout.split()]
        root = self.src.resolve()
        if len(found) != 2 or not all(path.is_relative_to(root) for path in found):
            raise RuntimeError(
                f"{self.label}: blockmirror resolves to {found}, not inside {root}"
                " (the editable install or the working directory shadows PYTHONPATH)"
            )
        return found[0]

    def check_process(self, pid: int) -> None:
        """Fail unless the running process ``pid`` got this tree's ``PYTHONPATH``: the probe
        shows what that path resolves to, this that the unit was started with it."""
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return  # gone already: whoever waits for it reports that
        got = ""
        for item in raw.split(b"\0"):
            name, _eq, value = item.partition(b"=")
            if name == b"PYTHONPATH":
                got = value.decode(errors="replace")
        if got != str(self.src):
            raise RuntimeError(f"process {pid} runs with PYTHONPATH={got!r}, not {self.src}")

    def describe(self) -> str:
        where = f"{self.src}" if self.commit is None else f"{self.commit[:12]} in {self.src}"
        return f"{self.label} ({where})"


def current_tree() -> SourceTree:
    return SourceTree("current", REPO_ROOT / "src")


def resolve_revision(rev: str) -> str:
    """The full hash of the commit ``rev`` names; ValueError when it names none."""
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ValueError(f"--baseline-rev {rev}: not a commit in {REPO_ROOT}")
    return proc.stdout.strip()


def extract_tree(rev: str, parent: Path) -> SourceTree:
    """``git archive REV | tar -x -C parent/baseline-HASH``, run from the repository root."""
    commit = resolve_revision(rev)
    dest = parent / f"baseline-{commit[:12]}"
    dest.mkdir()
    archive = subprocess.Popen(
        ["git", "archive", "--format=tar", commit],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    try:
        untar = subprocess.run(
            ["tar", "-x", "-C", str(dest)],
            stdin=archive.stdout,
            capture_output=True,
            timeout=300,
            check=False,
        )
    finally:
        archive.stdout.close()
        _out, archive_err = archive.communicate(timeout=300)
    if archive.returncode != 0 or untar.returncode != 0:
        raise RuntimeError(
            f"git archive {commit} | tar -x -C {dest} failed:"
            f" {archive_err.decode(errors='replace')}{untar.stderr.decode(errors='replace')}"
        )
    src = dest / "src"
    if not (src / "blockmirror" / "cli.py").is_file():
        raise RuntimeError(f"{rev} has no src/blockmirror/cli.py")
    return SourceTree(rev, src, commit)


def ratio_mark(ratio: float | None) -> str:
    """The verdict on a new/old ratio: ``ok``, or ``BELOW 0.95`` to catch the eye."""
    if ratio is None:
        return "-"
    return "ok" if ratio >= MIN_RATIO else f"BELOW {MIN_RATIO:.2f}"
