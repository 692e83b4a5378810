"""A fault-injecting store: EIO and ENOSPC on chosen calls, writeback failure, and power cuts.

This is a test tool shipped with the product, the way a sanitizer is: nothing in a running unit
uses it, but every crash test of the journal, the volume and the replica runs on it, because
``kill -9`` cannot show what it shows (the page cache survives a killed process, not a power
cut). :class:`FaultyStore` wraps another :class:`~blockmirror.store.base.Store` and implements
the same interface, so it goes wherever a volume or a journal ring goes.

The model (:mod:`blockmirror.store.power`). The wrapped store holds what a reader sees (the
page cache); the wrapper remembers, per 4 KiB page, what the disk *durably* holds: the content
the page had when the last flush that covered it started. From that it can

- fail a chosen operation (``pwrite`` for pwrite and pwritev, ``flush``, ``trim``,
  ``write_zeroes``, ``pread`` for pread and preadinto) with an errno, a number of times or from
  then on, optionally after letting N calls through (:meth:`FaultyStore.fail`). A failed change
  changes nothing;
- model Linux's writeback failure: a failed flush *loses* the pages it should have written (the
  kernel marks them clean; they read back until evicted, :meth:`FaultyStore.evict_lost`, and
  are gone at a power cut), and every later flush fails too (the interface's ``sync_error``);
- cut the power (:meth:`Power.cut`, or armed to strike during the N-th change or flush with
  :meth:`Power.arm`): every page not durable goes back to its durable content, except those a
  seeded random choice keeps (``keep``: the kernel happened to write them back). A change in
  flight at the cut (started and not returned, say in a worker thread) is torn at a random page
  boundary: the pages before it may have reached the disk, the rest did not. Every store on the
  same :class:`Power` loses power at the same instant; afterwards each of them refuses every
  call with EIO (they belong to the process that died) and the wrapped stores hold what a
  restarted machine would read. Reopen them, wrap them again, and recover;
- slow down flushes (``slow_flush`` seconds), to widen race windows.

A flush persists only what was written before it started: a page changed while a flush runs
stays dirty, its durable content being what it held when the flush started. Everything is
thread-safe (syncs run in worker threads) and, for the same sequence of calls, deterministic
under the seed. Two changes in flight at once on the same page are not modelled; blockmirror
never makes them (the volume changes in journal order, the ring is written from one thread).
Closing a store is no sync: its pages at risk stay at risk until a power cut or the next open
of the file, which takes them over (``takes_over=``). :meth:`FaultyStore.pwrite_durable`
makes only its own range durable, as RWF_DSYNC does (the journal's checkpoint slots).

Typical use, a volume and its journal on one machine::

    power = Power(seed)
    volume = FaultyStore(Volume.open(path, size=size), power=power)
    journal = Journal.open(..., volume=volume,
                           open_ring=lambda p, n: FaultyStore(open_journal_file(p, n), power=power))
    volume.fail("flush", errno.EIO)   # the next volume sync fails
    power.arm(40, keep=0.5)           # the power goes during the 41st write or sync
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from blockmirror.errors import OutOfRangeError, ReadOnlyError, VolumeError
from blockmirror.io.closing import Closing
from blockmirror.store.base import Buffer, Capabilities, Extent, Store
from blockmirror.store.power import PAGE, Change, PageModel, Power

__all__ = ["CHANGES", "PAGE", "Fault", "FaultyStore", "Op", "Power"]

Op = Literal["pwrite", "trim", "write_zeroes", "flush", "pread"]
# Every operation that changes content: what a full disk refuses.
CHANGES: tuple[Op, ...] = ("pwrite", "trim", "write_zeroes")


def _power_off(path: Path) -> OSError:
    return OSError(errno.EIO, "injected: the power is off", str(path))


@dataclass
class Fault:
    """An armed failure: ``err`` on matching calls once ``after`` of them went through."""

    ops: frozenset[Op]
    err: int
    after: int = 0
    times: int | None = 1  # None: every matching call from then on
    seen: int = 0
    fired: int = 0

    def hit(self, op: Op) -> bool:
        if op not in self.ops:
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class FaultyStore(Closing):
    """A :class:`~blockmirror.store.base.Store` that fails on request and loses power."""

    path: Path
    size: int
    read_only: bool
    sync_error: OSError | None

    def __init__(
        self,
        inner: Store,
        *,
        power: Power | None = None,
        seed: int = 0,
        faults: list[Fault] | None = None,
        takes_over: FaultyStore | None = None,
    ) -> None:
        """``power``: the supply shared with other stores (a new one, seeded, by default).
        ``faults``: the armed faults, shared with other opens of the same file (a full disk
        stays full when the unit restarts); a new list by default. ``takes_over``: the closed
        store of an earlier open of the same file, on the same power: what it held at risk
        stays at risk here (the page cache outlives a descriptor)."""
        self.inner = inner
        self.path = inner.path
        self.size = inner.size
        self.read_only = inner.read_only
        self.sync_error = None
        self.power = power if power is not None else Power(seed)
        self.faults: list[Fault] = faults if faults is not None else []
        self.calls: Counter[Op] = Counter()
        # Seconds every flush waits before syncing (widens the window of a race).
        self.slow_flush = 0.0
        self._lock = self.power.lock
        self._closed = False
        self._model = PageModel(inner)
        with self._lock:
            self.power.attach(self._model)
        if takes_over is not None:
            self._take_over(takes_over)

    def __repr__(self) -> str:
        return f"<FaultyStore {self.inner!r}>"

    # --- configuration --------------------------------------------------------------------

    def fail(
        self,
        op: Op | Iterable[Op],
        err: int = errno.EIO,
        *,
        after: int = 0,
        times: int | None = 1,
    ) -> Fault:
        """Fail ``op`` (one or several) with ``err``, ``times`` times (None: from then on),
        once ``after`` matching calls went through."""
        ops = frozenset((op,) if isinstance(op, str) else op)
        fault = Fault(ops, err, after, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def heal(self) -> None:
        """Disarm every fault (space came back, the disk was replaced). ``sync_error`` stays:
        it belongs to this open store, as the kernel's error state to an open file."""
        with self._lock:
            self.faults.clear()

    @property
    def dead(self) -> bool:
        """The power was cut under this store: every call fails."""
        return self._model.dead

    def power_cut(self, *, keep: float = 0.0) -> int:
        """Cut the power of this store and every other on its :class:`Power`."""
        return self.power.cut(keep=keep)

    def unsynced_pages(self) -> int:
        """Pages a power cut now would take back (changed and not durable, or lost)."""
        with self._lock:
            return self._model.at_risk

    def durable(self, offset: int, length: int) -> bytes:
        """What the disk durably holds at ``[offset, offset+length)``: what a power cut now,
        keeping nothing, would leave."""
        with self._lock:
            self._check_range(offset, length)
            return self._model.durable(offset, length)

    def evict_lost(self) -> int:
        """The kernel drops the pages whose writeback failed; returns how many. Reads then
        see what the disk holds (no power cut needed). Also on a closed store."""
        with self._lock:
            if self._model.dead or (self._closed and not self._model.closed):
                return 0
            return self._model.evict_lost()

    # --- the Store interface --------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        self._before_read(offset, length)
        return self.inner.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview | bytearray) -> None:
        self._before_read(offset, memoryview(buf).nbytes)
        self.inner.preadinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        with self._changing("pwrite", offset, memoryview(data).nbytes):
            self.inner.pwrite(offset, data)

    def pwritev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        length = sum(memoryview(b).nbytes for b in buffers)
        with self._changing("pwrite", offset, length):
            self.inner.pwritev(offset, buffers)

    def pwrite_durable(self, offset: int, data: Buffer) -> None:
        """Write ``data`` and make only the pages it covers durable, as a write with RWF_DSYNC
        does (the journal's checkpoint slots): other dirty pages stay at risk."""
        with self._lock:
            if self.sync_error is not None:
                raise self.sync_error  # no sync of this store is trusted any more
        changing = self._changing("pwrite", offset, memoryview(data).nbytes)
        with changing:
            self.inner.pwrite(offset, data)
        with self._lock:
            if changing.change is not None and not self._model.dead:
                self._model.written_durably(changing.change)

    def trim(self, offset: int, length: int) -> None:
        with self._changing("trim", offset, length):
            self.inner.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        with self._changing("write_zeroes", offset, length):
            self.inner.write_zeroes(offset, length, may_trim=may_trim)

    def flush(self) -> None:
        model = self._model
        with self._lock:
            self._check_open()
            if self.sync_error is not None:
                raise OSError(
                    self.sync_error.errno or errno.EIO,
                    f"an earlier sync of this store failed ({self.sync_error.strerror}); "
                    "nothing is durable until the unit restarts and replays its journal",
                    str(self.path),
                )
            self._check_alive()
            self.calls["flush"] += 1
            strike = self.power.event()
            if strike is not None:
                # The power went while the flush ran: nothing it was to persist is promised.
                self.power.cut_locked(strike, None)
                raise _power_off(self.path)
            started = model.snapshot()
            injected = self._injected("flush")
            if injected is not None:
                self.sync_error = injected
                model.writeback_failed(started)
                raise injected
        if self.slow_flush:
            time.sleep(self.slow_flush)
        try:
            self.inner.flush()
        except OSError as exc:
            with self._lock:
                if not model.dead:
                    self.sync_error = self.sync_error or exc
                    model.writeback_failed(started)
            raise
        with self._lock:
            if model.dead:
                raise _power_off(self.path)
            model.flushed(started)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._before_read(offset, length, op=None)
        return self.inner.extents(offset, length)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def can_fast_zero(self) -> bool:
        """For callers written against :class:`~blockmirror.store.volume.Volume`."""
        return self.capabilities().fast_zero

    def advise_willneed(self, offset: int, length: int) -> None:
        self._before_read(offset, length, op=None)
        self.inner.advise_willneed(offset, length)

    def read_cached(self, offset: int, buffers: Sequence[bytearray]) -> bool:
        try:
            self._before_read(offset, sum(len(b) for b in buffers))
        except OSError:
            return False  # a failing disk answers nothing from its cache either
        return self.inner.read_cached(offset, buffers)

    def close(self) -> None:
        """Refuse every later call. While pages are at risk the wrapped store stays open, as
        the page cache outlives the descriptor: a power cut (which then closes it) or a store
        that takes the file over settles them; :meth:`Power.close` drops them at the end of a
        test."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            model = self._model
            model.closed = not model.dead and model.at_risk > 0
            if not model.closed:
                self.power.detach(model)
        if not model.closed:
            self.inner.close()

    def _take_over(self, old: FaultyStore) -> None:
        if old.power is not self.power:
            raise ValueError("a store takes over only from a store on the same power")
        with self._lock:
            if not old._model.closed or not self.power.detach(old._model):
                return  # open still, dead, or nothing was at risk
            self._model.take_over(old._model)
        old.inner.close()

    # --- checks ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise VolumeError(f"{self.path}: store is closed")

    def _check_alive(self) -> None:
        if self._model.dead:
            raise _power_off(self.path)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"{self.path}: range [{offset}, {offset}+{length}) is outside the store "
                f"of {self.size} bytes"
            )

    def _injected(self, op: Op) -> OSError | None:
        for fault in self.faults:
            if fault.hit(op):
                return OSError(fault.err, f"injected: {os.strerror(fault.err)}", str(self.path))
        return None

    def _before_read(self, offset: int, length: int, op: Op | None = "pread") -> None:
        with self._lock:
            self._check_open()
            self._check_range(offset, length)
            self._check_alive()
            if op is not None:
                self.calls[op] += 1
                injected = self._injected(op)
                if injected is not None:
                    raise injected

    def _changing(self, op: Op, offset: int, length: int) -> _Changing:
        with self._lock:
            self._check_open()
            if self.read_only:
                raise ReadOnlyError(f"{self.path}: store is read-only")
            self._check_range(offset, length)
            self._check_alive()
            self.calls[op] += 1
            injected = self._injected(op)
            if injected is not None:
                raise injected
            if length == 0:
                return _Changing(self, None, None)
            strike = self.power.event()
            return _Changing(self, self._model.begin(offset, length), strike)

    def _finished(self, change: Change, strike: float | None) -> None:
        """The wrapped store returned from ``change`` (whether or not it raised)."""
        with self._lock:
            model = self._model
            if strike is not None and not model.dead:
                self.power.cut_locked(strike, change)
            model.inflight.remove(change)
            self._lock.notify_all()
            if model.dead:
                # Cut while in flight: it was torn, and the caller may not believe it done.
                raise _power_off(self.path)


class _Changing:
    """The span of one change: registered on entry, torn or completed on exit."""

    def __init__(self, store: FaultyStore, change: Change | None, strike: float | None) -> None:
        self._store = store
        self.change = change
        self._strike = strike  # the keep of an armed cut that strikes this change

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.change is not None:
            self._store._finished(self.change, self._strike)
