"""A fault-injecting disk for the files that are not stores, and the machine of crash tests.

Volumes, replicas and journal files are stores: their faults and power cuts are modelled by
:class:`blockmirror.store.faulty.FaultyStore`, which :class:`Machine` puts under them. What is
left are the files blockmirror opens with ``os`` directly, the consumers' dirty maps: for those
:class:`FaultyDisk` interposes on the ``os`` calls blockmirror makes on files (and on the
volume's ``fallocate``) for every file under one directory (``skip`` names the files a store
models instead). It keeps, per file and per 4 KiB
page, what the disk durably holds: the content at the last sync that covered the page. So it
can

- fail a chosen write, sync or fallocate with an errno (ENOSPC, EIO), leaving the file as it was;
- model Linux's writeback failure: when an ``fdatasync`` fails, the pages it should have written
  are *lost* (a later successful sync does not bring them back, because the kernel marked them
  clean), unless they are written again;
- cut the power: every page not durable goes back to its durable content (``keep`` chooses
  pages the kernel happened to write back anyway, for random partial writeback).

A sync persists the content a page had when the sync *started*: writes racing with a sync (the
journal's group commit runs syncs in threads) are not counted as durable by it.

This is a test tool for the durability invariants; it is not a mock of blockmirror code.
:class:`Machine` cuts the power of both models at once.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from blockmirror.journal.storage import open_journal_file
from blockmirror.store import volume as volume_module
from blockmirror.store.base import Store
from blockmirror.store.faulty import Fault as StoreFault
from blockmirror.store.faulty import FaultyStore, Power
from blockmirror.store.faulty import Op as StoreOp
from blockmirror.store.volume import Volume

PAGE = 4096
Op = Literal["write", "sync", "fallocate"]


@dataclass
class _File:
    fd: int  # our own descriptor, for restoring content
    # page -> durable content (PAGE bytes, or fewer at the end of the file)
    shadow: dict[int, bytes] = field(default_factory=dict)
    lost: dict[int, bytes] = field(default_factory=dict)
    writes: dict[int, int] = field(default_factory=dict)  # page -> write counter
    synced_size: int = 0


@dataclass
class Fault:
    op: Op
    match: str  # substring of the file's path
    err: int
    after: int = 0  # let this many matching calls through first
    times: int | None = 1  # None: every call from then on
    seen: int = 0
    fired: int = 0

    def hit(self, op: Op, path: str) -> bool:
        if op != self.op or self.match not in path:
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class FaultyDisk:
    def __init__(self, root: Path, *, skip: Sequence[str] = ()) -> None:
        self.root = str(root.resolve())
        self.skip = tuple(skip)  # substrings of the paths of files a store models
        self._files: dict[tuple[int, int], _File] = {}
        self._fds: dict[int, tuple[tuple[int, int], str]] = {}
        self._lock = threading.RLock()
        self.faults: list[Fault] = []
        self.calls: dict[Op, int] = {"write": 0, "sync": 0, "fallocate": 0}
        self._real: dict[str, Callable[..., Any]] = {}
        # substring of a path -> seconds every sync of it takes (widens race windows)
        self.slow_syncs: dict[str, float] = {}

    # --- configuration ---------------------------------------------------------------------

    def fail(
        self, op: Op, match: str, err: int = errno.EIO, *, after: int = 0, times: int | None = 1
    ) -> Fault:
        fault = Fault(op, match, err, after, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _delay_for(self, path: str) -> float:
        return max((s for m, s in self.slow_syncs.items() if m in path), default=0.0)

    def heal(self) -> None:
        with self._lock:
            self.faults.clear()

    # --- power ------------------------------------------------------------------------------

    def power_cut(self, *, keep: float = 0.0, rng: random.Random | None = None) -> int:
        """Lose every page not durable (each kept with probability ``keep``); returns pages lost.

        The caller drops every object holding descriptors (as a crash would) and reopens.
        """
        rng = rng or random.Random(0)
        lost = 0
        with self._lock:
            for f in self._files.values():
                pages = {**f.shadow, **f.lost}
                size = os.fstat(f.fd).st_size
                for page, content in sorted(pages.items()):
                    if page in f.shadow and keep and rng.random() < keep:
                        continue
                    # What lay past the end of the file then reads as zeros now.
                    span = max(0, min(PAGE, size - page * PAGE))
                    restored = content[:span].ljust(span, b"\0")
                    self._real["pwrite"](f.fd, restored, page * PAGE)
                    lost += 1
                if not keep and os.fstat(f.fd).st_size > f.synced_size:
                    self._real["ftruncate"](f.fd, f.synced_size)
                f.shadow.clear()
                f.lost.clear()
                f.writes.clear()
                f.synced_size = os.fstat(f.fd).st_size
        return lost

    def evict_lost(self) -> int:
        """The kernel drops pages whose writeback failed (no power cut); returns how many."""
        n = 0
        with self._lock:
            for f in self._files.values():
                for page, content in f.lost.items():
                    size = os.fstat(f.fd).st_size
                    span = max(0, min(PAGE, size - page * PAGE))
                    self._real["pwrite"](f.fd, content[:span].ljust(span, b"\0"), page * PAGE)
                    n += 1
                f.lost.clear()
        return n

    def unsynced_pages(self, match: str = "") -> int:
        with self._lock:
            return sum(
                len(f.shadow) + len(f.lost)
                for key, f in self._files.items()
                if match in self._path_of(key)
            )

    # --- installation -----------------------------------------------------------------------

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyDisk]:
        for name in ("open", "close", "pwrite", "pwritev", "fdatasync", "fsync", "ftruncate"):
            self._real[name] = getattr(os, name)
        self._real["posix_fallocate"] = os.posix_fallocate
        self._real["fallocate"] = volume_module._fallocate
        monkeypatch.setattr(os, "open", self._open)
        monkeypatch.setattr(os, "close", self._close)
        monkeypatch.setattr(os, "pwrite", self._pwrite)
        monkeypatch.setattr(os, "pwritev", self._pwritev)
        monkeypatch.setattr(os, "fdatasync", self._fdatasync)
        monkeypatch.setattr(os, "fsync", self._fsync)
        monkeypatch.setattr(os, "ftruncate", self._ftruncate)
        monkeypatch.setattr(os, "posix_fallocate", self._posix_fallocate)
        monkeypatch.setattr(volume_module, "_fallocate", self._fallocate)
        try:
            yield self
        finally:
            monkeypatch.undo()
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()
            self._fds.clear()

    # --- interposed calls --------------------------------------------------------------------

    def _path_of(self, key: tuple[int, int]) -> str:
        for k, path in self._fds.values():
            if k == key:
                return path
        return ""

    def _tracked(self, fd: int) -> tuple[_File, str] | None:
        entry = self._fds.get(fd)
        if entry is None:
            return None
        return self._files[entry[0]], entry[1]

    def _check(self, op: Op, path: str) -> None:
        self.calls[op] += 1
        for fault in self.faults:
            if fault.hit(op, path):
                raise OSError(fault.err, f"injected: {os.strerror(fault.err)}", path)

    def _open(self, path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd: int = self._real["open"](path, flags, mode, **kw)
        full = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
        tracked = full.startswith(self.root + os.sep) and not any(s in full for s in self.skip)
        if tracked and not flags & os.O_DIRECTORY:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with self._lock:
                if key not in self._files:
                    own = self._real["open"](f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                    self._files[key] = _File(own, synced_size=st.st_size)
                self._fds[fd] = (key, full)
        return fd

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
        self._real["close"](fd)

    def _before_change(self, f: _File, pos: int, length: int) -> None:
        """Remember the durable content of every page [pos, pos+length) touches."""
        if length <= 0:
            return
        for page in range(pos // PAGE, (pos + length - 1) // PAGE + 1):
            f.writes[page] = f.writes.get(page, 0) + 1
            if page in f.shadow:
                continue
            if page in f.lost:
                f.shadow[page] = f.lost.pop(page)
            else:
                f.shadow[page] = os.pread(f.fd, PAGE, page * PAGE)

    def _pwrite(self, fd: int, data: Any, pos: int) -> int:
        return self._pwritev(fd, [data], pos)

    def _pwritev(self, fd: int, buffers: Sequence[Any], pos: int, flags: int = 0) -> int:
        with self._lock:
            tracked = self._tracked(fd)
            if tracked is None:
                if flags:
                    return int(self._real["pwritev"](fd, buffers, pos, flags))
                return int(self._real["pwritev"](fd, buffers, pos))
            f, path = tracked
            self._check("write", path)
            length = sum(memoryview(b).nbytes for b in buffers)
            self._before_change(f, pos, length)
            # Writes go through without the sync flag, which is modelled here instead.
            n = int(self._real["pwritev"](fd, buffers, pos))
            if flags & getattr(os, "RWF_DSYNC", 0):
                for page in range(pos // PAGE, (pos + max(n, 1) - 1) // PAGE + 1):
                    f.shadow.pop(page, None)
                    f.lost.pop(page, None)
            return n

    def _fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def _sync(self, fd: int, real: str) -> None:
        with self._lock:
            tracked = self._tracked(fd)
            if tracked is None:
                self._real[real](fd)
                return
            f, path = tracked
            started = {p: os.pread(f.fd, PAGE, p * PAGE) for p in f.shadow}
            counters = {p: f.writes.get(p, 0) for p in started}
            size_at_start = os.fstat(fd).st_size
            try:
                self._check("sync", path)
            except OSError:
                # Writeback failed: those pages are clean in the cache but not on the disk.
                for page in started:
                    f.lost[page] = f.shadow.pop(page)
                raise
            delay = self._delay_for(path)
        if delay:
            time.sleep(delay)
        self._real[real](fd)
        with self._lock:
            for page, content in started.items():
                if f.writes.get(page, 0) == counters[page]:
                    f.shadow.pop(page, None)
                else:
                    f.shadow[page] = content
            f.synced_size = max(f.synced_size, size_at_start)

    def _ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            tracked = self._tracked(fd)
            if tracked is not None:
                f, path = tracked
                self._check("write", path)
                size = os.fstat(fd).st_size
                lo, hi = sorted((size, length))
                self._before_change(f, lo, hi - lo)
            self._real["ftruncate"](fd, length)

    def _posix_fallocate(self, fd: int, pos: int, length: int) -> None:
        with self._lock:
            tracked = self._tracked(fd)
            if tracked is not None:
                self._check("fallocate", tracked[1])
            self._real["posix_fallocate"](fd, pos, length)

    def _fallocate(self, fd: int, mode: int, pos: int, length: int) -> None:
        with self._lock:
            tracked = self._tracked(fd)
            if tracked is not None:
                f, path = tracked
                self._check("fallocate", path)
                self._before_change(f, pos, length)
            self._real["fallocate"](fd, mode, pos, length)


class Machine:
    """The disks of a machine under test, on one power supply.

    Volumes and journal files open as :class:`FaultyStore` over the real ones (every store of
    one file shares that file's armed faults across reopens, as a full disk stays full when a
    unit restarts); the dirty maps live on the :class:`FaultyDisk` ``disk``, when there is one.
    :meth:`power_cut` cuts both at once.
    """

    def __init__(self, disk: FaultyDisk | None = None, *, seed: int = 0) -> None:
        self.disk = disk
        self.power = Power(seed)
        self.faults: dict[str, list[StoreFault]] = {}  # file name -> its armed faults
        self.stores: dict[str, FaultyStore] = {}  # file name -> the store open on it last
        self.slow_flush: dict[str, float] = {}  # file name -> seconds every flush waits

    def _wrap(self, inner: Store) -> FaultyStore:
        name = inner.path.name
        store = FaultyStore(
            inner,
            power=self.power,
            faults=self.faults.setdefault(name, []),
            takes_over=self.stores.get(name),
        )
        store.slow_flush = self.slow_flush.get(name, 0.0)
        self.stores[name] = store
        return store

    def open_volume(self, path: Path, *, size: int) -> FaultyStore:
        return self._wrap(Volume.open(path, size=size))

    def open_journal_file(self, path: Path, size: int) -> Store:
        """Opens the journal file for ``Journal.open(open_ring=...)``."""
        return self._wrap(open_journal_file(path, size))

    def store(self, name: str) -> FaultyStore:
        """The store open on the file ``name`` (say ``"vol.img"``) last."""
        return self.stores[name]

    def fail(
        self, name: str, op: StoreOp | Sequence[StoreOp], err: int = errno.EIO, **kw: Any
    ) -> StoreFault:
        """Arm a fault on the file ``name``: on the store open now and on later opens."""
        faults = self.faults.setdefault(name, [])
        store = self.stores.get(name)
        if store is not None and not store.dead:
            return store.fail(op, err, **kw)
        fault = StoreFault(frozenset((op,) if isinstance(op, str) else op), err, **kw)
        faults.append(fault)
        return fault

    def heal(self) -> None:
        for faults in self.faults.values():
            faults.clear()
        if self.disk is not None:
            self.disk.heal()

    def power_cut(self, *, keep: float = 0.0, rng: random.Random | None = None) -> int:
        """Every store and the disk lose what they had not made durable, at once."""
        lost = self.power.cut(keep=keep)
        if self.disk is not None:
            lost += self.disk.power_cut(keep=keep, rng=rng)
        return lost

    def evict_lost(self) -> int:
        """The kernel drops the pages whose writeback failed, on every disk."""
        n = sum(s.evict_lost() for s in self.stores.values())
        if self.disk is not None:
            n += self.disk.evict_lost()
        return n

    def unsynced_pages(self, name: str) -> int:
        return self.stores[name].unsynced_pages()

    def close(self) -> None:
        """The end of a test: what closed stores held at risk is dropped."""
        self.power.close()
