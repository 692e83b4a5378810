"""Journal consumers: modes through the transition table, cursors, tracking, attaching."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.journal.checkpoint import Checkpoint, ConsumerState, encode_slot
from blockmirror.journal.checkpoint import decode_slot as decode
from blockmirror.journal.consumers import DIRTY_REGION, Consumer, attach, bind, first_after
from blockmirror.journal.dirtymap import DirtyMap
from blockmirror.journal.format import Kind
from blockmirror.journal.record import Record
from blockmirror.state import ConsumerMode, StateTransitionError

VOLUME = 16 * DIRTY_REGION


@pytest.fixture
def consumer(tmp_path: Path) -> Consumer:
    dirty = DirtyMap.create(tmp_path / "c.dirty", volume_size=VOLUME, region_size=DIRTY_REGION)
    return Consumer("peer", 0, ConsumerMode.TRACKING, False, dirty)


def records(*kinds_offsets: tuple[Kind, int]) -> list[Record]:
    return [
        Record(kind=kind, offset=offset, length=4096, seq=i + 1, size=64 + 4096, lpos=i * 4160)
        for i, (kind, offset) in enumerate(kinds_offsets)
    ]


def empty_checkpoint(consumers: dict[str, ConsumerState]) -> Checkpoint:
    """The checkpoint of an empty journal with these consumers."""
    return Checkpoint(
        journal_id="ab",
        volume_size=VOLUME,
        capacity=65536,
        head_lpos=0,
        head_seq=1,
        next_seq=1,
        applied_seq=0,
        boot_id="",
        consumers=consumers,
    )


def test_modes_change_through_the_table(consumer: Consumer) -> None:
    consumer.set_mode(ConsumerMode.JOURNAL)
    assert consumer.state() == ConsumerState(0, ConsumerMode.JOURNAL)
    with pytest.raises(StateTransitionError, match="consumer peer: ConsumerMode cannot change"):
        consumer.set_mode(ConsumerMode.JOURNAL)
    assert consumer.mode is ConsumerMode.JOURNAL
    consumer.set_mode(ConsumerMode.TRACKING)
    consumer.set_mode(ConsumerMode.TRACKING)  # more regions dirty meanwhile: allowed
    # A plain string someone assigned is read as the mode it names.
    consumer.mode = "journal"  # type: ignore[assignment]
    consumer.set_mode(ConsumerMode.TRACKING)
    assert consumer.mode is ConsumerMode.TRACKING


def test_a_checkpoint_stores_the_mode_as_its_string_and_decodes_the_enum() -> None:
    cp = empty_checkpoint(
        {"a": ConsumerState(3, ConsumerMode.TRACKING), "b": ConsumerState(4, "journal")}  # type: ignore[arg-type]
    )
    assert b'"mode":"tracking"' in cp.to_json() and b'"mode":"journal"' in cp.to_json()
    decoded = decode(encode_slot(cp, 2))
    assert decoded is not None
    modes = {name: c.mode for name, c in decoded[1].consumers.items()}
    assert modes == {"a": ConsumerMode.TRACKING, "b": ConsumerMode.JOURNAL}
    assert all(type(m) is ConsumerMode for m in modes.values())


def test_acknowledge_and_backlog_count_only_in_journal_mode(consumer: Consumer) -> None:
    live = records((Kind.WRITE, 0), (Kind.WRITE, 4096), (Kind.FLUSH, 0))
    consumer.acknowledge(2, 3)
    assert consumer.acked_seq == 0 and consumer.backlog(live) == (0, 0)
    consumer.set_mode(ConsumerMode.JOURNAL)
    assert consumer.backlog(live) == (3 * 4160, 3)
    consumer.acknowledge(9, 3)  # never past the newest record
    assert consumer.acked_seq == 3 and consumer.backlog(live) == (0, 0)


@given(
    st.lists(st.integers(1, 1 << 20), min_size=1, max_size=60),
    st.integers(0, 70),
    st.integers(0, 59),
    st.booleans(),
)
def test_backlog_by_running_totals_equals_the_sum(
    sizes: list[int], acked: int, freed: int, totals: bool
) -> None:
    """The backlog from the records' running totals (as the journal numbers them) is the sum
    of the sizes after the cursor, whatever was freed from the front; so is the fallback."""
    live: deque[Record] = deque()
    cum = 0
    for i, size in enumerate(sizes):
        cum += size
        live.append(Record(kind=Kind.WRITE, offset=0, length=1, seq=i + 1, size=size))
        if totals:
            live[-1].cum = cum
    for _ in range(min(freed, len(live) - 1)):
        live.popleft()
    dirty = DirtyMap.__new__(DirtyMap)  # backlog never touches the map
    c = Consumer("peer", acked, ConsumerMode.JOURNAL, False, dirty)
    after = [r for r in live if r.seq > acked]
    assert c.backlog(live) == (sum(r.size for r in after), len(after))
    start = first_after(live, acked)
    assert (start is None) == (not after)
    if start is not None:
        assert live[start] is after[0]


def test_tracking_turns_the_records_it_lacks_into_dirty_bits(consumer: Consumer) -> None:
    consumer.set_mode(ConsumerMode.JOURNAL)
    live = records((Kind.WRITE, 0), (Kind.FLUSH, 0), (Kind.WRITE, 5 * DIRTY_REGION))
    consumer.track(live, 2, newest=3)  # up to 2 of 3: stays in journal mode, cursor moved
    assert consumer.state() == ConsumerState(2, ConsumerMode.JOURNAL)
    assert list(consumer.dirty.dirty_regions()) == [(0, DIRTY_REGION)]
    consumer.track(live, 3, newest=3)
    assert consumer.state() == ConsumerState(2, ConsumerMode.TRACKING)
    assert consumer.generation == 2
    assert consumer.dirty.dirty_bytes() == 2 * DIRTY_REGION
    consumer.dirty.close()


def test_attach_new_damaged_and_known_consumers(tmp_path: Path) -> None:
    known = {"old": ConsumerState(7, ConsumerMode.JOURNAL), "lost": ConsumerState(7)}
    first = attach(
        ["old"],
        state_dir=tmp_path,
        volume_name="vol",
        volume_size=VOLUME,
        known={},
        next_seq=8,
        head_seq=8,
        full_resync=False,
    )
    # New to the journal: it has never seen the volume, so all of it differs.
    assert first["old"].mode is ConsumerMode.TRACKING and first["old"].acked_seq == 7
    assert first["old"].dirty.dirty_bytes() == VOLUME
    first["old"].dirty.clear_all()
    first["old"].dirty.sync()
    first["old"].dirty.close()
    again = attach(
        ["old", "lost"],
        state_dir=tmp_path,
        volume_name="vol",
        volume_size=VOLUME,
        known=known,
        next_seq=10,
        head_seq=8,
        full_resync=False,
    )
    try:
        assert again["old"].mode is ConsumerMode.JOURNAL and again["old"].dirty.is_clean()
        # Known to the checkpoint, its map missing: everything dirty, tracking.
        assert again["lost"].mode is ConsumerMode.TRACKING
        assert again["lost"].dirty.dirty_bytes() == VOLUME
    finally:
        for c in again.values():
            c.dirty.close()
    behind = attach(
        ["old"],
        state_dir=tmp_path,
        volume_name="vol",
        volume_size=VOLUME,
        known=known,
        next_seq=20,
        head_seq=15,  # the records after its cursor are gone
        full_resync=False,
    )
    assert behind["old"].mode is ConsumerMode.TRACKING
    assert behind["old"].dirty.dirty_bytes() == VOLUME
    behind["old"].dirty.close()


def _attach(
    tmp_path: Path, names: list[str], known: dict[str, ConsumerState]
) -> dict[str, Consumer]:
    return attach(
        names,
        state_dir=tmp_path,
        volume_name="vol",
        volume_size=VOLUME,
        known=known,
        next_seq=10,
        head_seq=5,
        full_resync=False,
    )


def _with_map(tmp_path: Path, name: str, dirty_regions: list[int]) -> None:
    """A durable map for consumer ``name`` with exactly these regions dirty."""
    path = tmp_path / f"vol.{name.replace(':', '_')}.dirty"
    with DirtyMap.create(path, volume_size=VOLUME, region_size=DIRTY_REGION) as m:
        for region in dirty_regions:
            m.mark(region * DIRTY_REGION, DIRTY_REGION)
        m.sync()


def test_a_peer_at_a_new_address_takes_its_old_cursor(tmp_path: Path) -> None:
    """Must not be lost: the peer's position (journal mode, acked 7) and its dirty regions."""
    _with_map(tmp_path, "10.0.0.1:7800", [3])
    known = {"10.0.0.1:7800": ConsumerState(7, ConsumerMode.JOURNAL, True, "site-b")}
    consumers = _attach(tmp_path, ["site-b.example:7800"], known)
    try:
        # Kept although not configured, because the new address has not said who it is.
        assert consumers["10.0.0.1:7800"].detached
        new = consumers["site-b.example:7800"]
        assert new.mode is ConsumerMode.TRACKING and new.dirty.dirty_bytes() == VOLUME
        done, dropped = bind(consumers, "site-b.example:7800", "site-b")
        assert "known as 10.0.0.1:7800" in done
        assert [c.name for c in dropped] == ["10.0.0.1:7800"]
        assert set(consumers) == {"site-b.example:7800"}
        assert (new.acked_seq, new.mode, new.paused, new.peer) == (
            7,
            ConsumerMode.JOURNAL,
            True,
            "site-b",
        )
        assert list(new.dirty.dirty_regions()) == [(3 * DIRTY_REGION, DIRTY_REGION)]
        assert new.state() == ConsumerState(7, ConsumerMode.JOURNAL, True, "site-b")
        # Binding again changes nothing.
        assert bind(consumers, "site-b.example:7800", "site-b") == ("", [])
    finally:
        for c in [*consumers.values(), *dropped]:
            c.dirty.close(sync=False)


def test_a_first_connection_names_the_peer_and_drops_stale_cursors(tmp_path: Path) -> None:
    _with_map(tmp_path, "10.0.0.9:7800", [1])
    known = {"10.0.0.9:7800": ConsumerState(7, ConsumerMode.JOURNAL, False, "site-z")}
    consumers = _attach(tmp_path, ["10.0.0.2:7800"], known)
    try:
        assert consumers["10.0.0.9:7800"].detached
        done, dropped = bind(consumers, "10.0.0.2:7800", "site-c")
        assert done == "the peer is unit site-c"
        # Every configured peer is identified now: site-z was removed from the configuration.
        assert [c.name for c in dropped] == ["10.0.0.9:7800"]
        assert consumers["10.0.0.2:7800"].peer == "site-c"
        assert set(consumers) == {"10.0.0.2:7800"}
    finally:
        for c in [*consumers.values(), *dropped]:
            c.dirty.close(sync=False)


def test_another_unit_at_a_known_address_gets_everything(tmp_path: Path) -> None:
    """Must not happen: a cursor handed to a unit it does not describe (a clean map there)."""
    _with_map(tmp_path, "10.0.0.2:7800", [])
    known = {"10.0.0.2:7800": ConsumerState(9, ConsumerMode.JOURNAL, False, "site-b")}
    consumers = _attach(tmp_path, ["10.0.0.2:7800"], known)
    try:
        c = consumers["10.0.0.2:7800"]
        assert c.mode is ConsumerMode.JOURNAL and c.dirty.is_clean()
        done, _ = bind(consumers, "10.0.0.2:7800", "site-q")
        assert "full resync" in done
        assert c.peer == "site-q"
        assert c.state().mode is ConsumerMode.TRACKING  # (read again: bind changed it)
        assert c.dirty.dirty_bytes() == VOLUME
    finally:
        for x in consumers.values():
            x.dirty.close(sync=False)


def test_identified_peers_keep_no_detached_cursor(tmp_path: Path) -> None:
    _with_map(tmp_path, "a:1", [])
    _with_map(tmp_path, "b:1", [])
    known = {
        "a:1": ConsumerState(9, ConsumerMode.JOURNAL, False, "site-a"),
        "b:1": ConsumerState(9, ConsumerMode.JOURNAL, False, "site-b"),
    }
    consumers = _attach(tmp_path, ["a:1"], known)
    try:
        assert set(consumers) == {"a:1"}  # b was removed from the configuration
    finally:
        for c in consumers.values():
            c.dirty.close(sync=False)


def test_the_peer_survives_a_checkpoint_and_old_checkpoints_have_none() -> None:
    cp = empty_checkpoint(
        {"x": ConsumerState(3, ConsumerMode.JOURNAL, False, "site-b"), "y": ConsumerState(1)}
    )
    raw = cp.to_json()
    assert b'"peer":"site-b"' in raw and raw.count(b'"peer"') == 1
    decoded = decode(encode_slot(cp, 2))
    assert decoded is not None
    consumers = decoded[1].consumers
    assert consumers["x"].peer == "site-b" and consumers["y"].peer is None
