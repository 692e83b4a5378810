"""The disk model under the fault-injecting store (:mod:`blockmirror.store.faulty`).

A :class:`PageModel` belongs to one open store. The store it wraps holds what a reader sees
(the page cache); the model remembers, per 4 KiB page, what the disk *durably* holds:

- a page changed since the disk last held it keeps its durable content and its *version* (the
  changes begun on it), so that a flush can tell whether the page changed while it ran;
- a flush persists each dirty page as it was when the flush *started*: a page changed during
  the flush stays dirty, with that content as its durable one; a page under a change still in
  flight gives its content from before that change, as a writeback racing it could;
- a failed flush *loses* the pages it was writing (Linux marks them clean: they read back until
  evicted, and are gone at a power cut);
- at a power cut every page not durable goes back to its durable content, unless a seeded
  random choice keeps it (it was written back anyway), and a change in flight is first torn at
  a random page boundary (the pages before it reached the cache, the rest did not).

A :class:`Power` is the supply of a machine's stores: a cut strikes all of them at one instant,
from outside or armed to strike during the N-th change or flush. Its one lock guards every model
on it; the models' methods are called with it held.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from blockmirror.store.base import Store

__all__ = ["PAGE", "Change", "PageModel", "Power", "Started"]

PAGE = 4096
# page -> (its content when a flush started, its version then)
Started = dict[int, tuple[bytes, int]]


@dataclass(eq=False)
class Change:
    """A change between its start and its return, with what its pages held before it."""

    first: int  # first page
    end: int  # one past the last page
    before: bytes  # pages [first, end) before the change (shorter at the end of the store)
    base: list[int]  # each page's version before this change


@dataclass
class _Cut:
    keep: float
    after: int


class PageModel:
    """What the disk of one open store durably holds (see the module's rules)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.size = inner.size
        # page -> (durable content, its version), for pages changed since the disk held them.
        self.shadow: dict[int, tuple[bytes, int]] = {}
        # The same, for pages whose writeback failed: clean in the cache, not on the disk.
        self.lost: dict[int, tuple[bytes, int]] = {}
        self.versions: dict[int, int] = {}  # page -> changes begun on it
        self.inflight: list[Change] = []
        self.torn: list[Change] = []  # in flight when the power went
        self.dead = False  # the power was cut under it
        self.closed = False  # its store was closed; it lingers while pages are at risk

    @property
    def at_risk(self) -> int:
        """Pages a power cut now would take back."""
        return len(self.shadow) + len(self.lost)

    def begin(self, offset: int, length: int) -> Change:
        """A change of ``[offset, offset+length)`` starts (``length`` > 0)."""
        first, end = offset // PAGE, (offset + length - 1) // PAGE + 1
        start, stop = first * PAGE, min(end * PAGE, self.size)
        before = self.inner.pread(start, stop - start)
        base = [self.versions.get(page, 0) for page in range(first, end)]
        change = Change(first, end, before, base)
        for i, (page, version) in enumerate(zip(range(first, end), base, strict=True)):
            self.versions[page] = version + 1
            if page in self.lost:
                self.shadow[page] = self.lost.pop(page)
            elif page not in self.shadow:
                self.shadow[page] = (before[i * PAGE : (i + 1) * PAGE], version)
        self.inflight.append(change)
        return change

    def written_durably(self, change: Change) -> None:
        """``change`` was a durable write (RWF_DSYNC): its own pages are durable now."""
        for page, version in zip(range(change.first, change.end), change.base, strict=True):
            if self.versions.get(page) == version + 1:  # nothing changed it since
                self.shadow.pop(page, None)

    def snapshot(self) -> Started:
        """Each dirty page as a flush starting now would write it."""
        busy: Started = {}
        for change in self.inflight:
            for i, page in enumerate(range(change.first, change.end)):
                busy.setdefault(page, (change.before[i * PAGE : (i + 1) * PAGE], change.base[i]))
        started: Started = {}
        for first, end in _runs(p for p in self.shadow if p not in busy):
            data = self.inner.pread(first * PAGE, min(end * PAGE, self.size) - first * PAGE)
            for i, page in enumerate(range(first, end)):
                started[page] = (data[i * PAGE : (i + 1) * PAGE], self.versions.get(page, 0))
        started.update((page, busy[page]) for page in self.shadow if page in busy)
        return started

    def flushed(self, started: Started) -> None:
        """A flush that started at ``started`` succeeded."""
        for page, (content, version) in started.items():
            durable = self.shadow.get(page)
            if durable is None or durable[1] >= version:
                continue  # as new on the disk already (a racing flush)
            if self.versions.get(page, 0) == version:
                del self.shadow[page]  # the disk holds what the cache does
            else:
                self.shadow[page] = (content, version)  # changed since: dirty again

    def writeback_failed(self, started: Started) -> None:
        """Linux's rule: the pages the failed sync was writing are marked clean, not written."""
        for page, (_, version) in started.items():
            if self.versions.get(page, 0) == version and page in self.shadow:
                self.lost[page] = self.shadow.pop(page)

    def durable(self, offset: int, length: int) -> bytes:
        data = bytearray(self.inner.pread(offset, length))
        for page, (content, _) in (*self.shadow.items(), *self.lost.items()):
            lo, hi = max(offset, page * PAGE), min(offset + length, page * PAGE + len(content))
            if lo < hi:
                data[lo - offset : hi - offset] = content[lo - page * PAGE : hi - page * PAGE]
        return bytes(data)

    def evict_lost(self) -> int:
        lost, self.lost = self.lost, {}
        self._restore({page: content for page, (content, _) in lost.items()})
        return len(lost)

    def take_over(self, old: PageModel) -> None:
        """What ``old`` (an earlier open of the same file) held at risk stays at risk here."""
        self.shadow, old.shadow = old.shadow, {}
        self.lost, old.lost = old.lost, {}
        self.versions, old.versions = old.versions, {}

    def lose_power(self, keep: float, rng: random.Random) -> int:
        """The cut itself; returns the pages lost."""
        torn, self.torn = self.torn, []
        for change in torn:
            tear = rng.randint(change.first, change.end)
            at = (tear - change.first) * PAGE
            if at < len(change.before):
                self.inner.pwrite(tear * PAGE, change.before[at:])
        back = {page: content for page, (content, _) in self.lost.items()}
        for page in sorted(self.shadow):
            if keep and rng.random() < keep:
                continue  # written back before the power went
            back[page] = self.shadow[page][0]
        self._restore(back)
        self.shadow.clear()
        self.lost.clear()
        self.versions.clear()
        return len(back)

    def _restore(self, pages: dict[int, bytes]) -> None:
        for first, end in _runs(pages):
            self.inner.pwritev(first * PAGE, [pages[p] for p in range(first, end)])


class Power:
    """The power supply of a machine's stores: a cut strikes all of them at the same instant.

    ``seed`` makes the random choices (where a change in flight tears, which pages survive)
    repeatable. ``cuts`` counts the cuts made, ``events`` the changes and flushes begun.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.cuts = 0
        self.events = 0
        # One lock for every store on this supply: a cut must see all of them at one instant.
        self.lock = threading.Condition(threading.Lock())
        self._models: list[PageModel] = []
        self._armed: _Cut | None = None

    def arm(self, after: int, *, keep: float = 0.0) -> None:
        """Cut the power during the change or flush that comes after ``after`` more of them.

        The victim is torn like any change in flight and fails with EIO, as does every later
        call on these stores. A change struck in a worker thread cuts as it returns: wait for
        :attr:`cuts` to grow.
        """
        with self.lock:
            self._armed = _Cut(keep, self.events + after)

    def disarm(self) -> bool:
        """Take back an armed cut; False if there was none (it may have struck already)."""
        with self.lock:
            armed, self._armed = self._armed, None
            return armed is not None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def cut(self, *, keep: float = 0.0) -> int:
        """Cut the power now; returns the pages lost (each unsynced page is kept with
        probability ``keep``)."""
        with self.lock:
            return self.cut_locked(keep, None)

    def close(self) -> None:
        """The end of a test: drop what closed stores still held at risk, close what they
        wrap (see :meth:`FaultyStore.close <blockmirror.store.faulty.FaultyStore.close>`)."""
        with self.lock:
            lingering = [m for m in self._models if m.closed]
            for model in lingering:
                self._models.remove(model)
        for model in lingering:
            model.inner.close()

    # --- for the stores, with the lock held ---------------------------------------------------

    def attach(self, model: PageModel) -> None:
        self._models.append(model)

    def detach(self, model: PageModel) -> bool:
        """Forget ``model``; False if it was not attached (dead, or detached already)."""
        if model not in self._models:
            return False
        self._models.remove(model)
        return True

    def event(self) -> float | None:
        """Count a change or flush beginning; if the armed cut strikes this one, its ``keep``
        (the caller cuts with :meth:`cut_locked` once the change is done)."""
        self.events += 1
        armed = self._armed
        if armed is not None and self.events > armed.after:
            self._armed = None
            return armed.keep
        return None

    def cut_locked(self, keep: float, current: Change | None) -> int:
        self.cuts += 1
        models, self._models = self._models, []
        for model in models:
            model.dead = True
            model.torn = list(model.inflight)
        # Changes in flight finish their call into the wrapped store (it cannot be stopped
        # half way), then are torn. ``current`` is the caller's own, already complete.
        while any(c is not current for m in models for c in m.inflight):
            self.lock.wait()
        lost = 0
        for model in models:
            lost += model.lose_power(keep, self.rng)
            if model.closed:
                model.inner.close()  # it lingered for this
        self.lock.notify_all()
        return lost


def _runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted pages as ``[first, end)`` runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][1] == page:
            runs[-1] = (runs[-1][0], page + 1)
        else:
            runs.append((page, page + 1))
    return runs
