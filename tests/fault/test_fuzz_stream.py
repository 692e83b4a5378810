"""Live fuzzing of the export: hundreds of connections of random and mutated bytes.

Each round opens a connection and sends either random bytes, a valid handshake followed by random
bytes, or a valid read-only session (options, GO, READs, FLUSH, CACHE, BLOCK_STATUS, DISC) with a
few mutations (bit flips, cuts, duplicated or deleted slices, interesting integers). The client then
either half-closes and reads until the server hangs up (which it must do promptly: it has nothing
left to answer), or resets the connection.

Mutations can forge a valid WRITE, so the "volume unchanged" check is only sound on a read-only
volume; the same fuzz against a writable volume checks that the unit survives and still serves.
Rounds are seeded: a failure names its seed and round, and replays exactly.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable

import pytest

from tests.fault.conftest import MakeTarget
from tests.fault.rawnbd import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    NBDMAGIC,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REQUEST_MAGIC,
    Closed,
    MiB,
    info_request,
    meta_context_request,
    option,
    request,
)
from tests.fault.target import Target

pytestmark = pytest.mark.fault

SEED = 20261124
ROUNDS = 3000
TIME_BUDGET = 8.0  # seconds per volume; the rounds stop early rather than slow the suite
SIZE = 4 * MiB

# Integers that sit on bounds the server checks: lengths, the volume's end, sign and wrap points.
INTERESTING = [
    0,
    1,
    0x7F,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    4096,
    64 * 1024,
    64 * 1024 + 1,
    32 * MiB,
    32 * MiB + 1,
    64 * MiB + 1,
    SIZE - 1,
    SIZE,
    2**63,
    2**64 - 1,
]


def valid_session(rng: random.Random) -> tuple[bytes, int]:
    """A session that only reads, and the length of its handshake (flags and options)."""
    parts = [struct.pack(">I", rng.choice([1, 3]))]
    structured = rng.random() < 0.5
    if structured:
        parts.append(option(OPT_STRUCTURED_REPLY))
        if rng.random() < 0.6:
            parts.append(
                option(OPT_SET_META_CONTEXT, meta_context_request("vol", "base:allocation"))
            )
    if rng.random() < 0.3:
        parts.append(option(OPT_INFO, info_request("vol", INFO_BLOCK_SIZE)))
    if rng.random() < 0.2:
        parts.append(option(OPT_LIST))
    infos = rng.sample([INFO_NAME, INFO_BLOCK_SIZE, INFO_DESCRIPTION], rng.randint(0, 3))
    parts.append(option(OPT_GO, info_request("vol", *infos)))
    handshake = sum(len(x) for x in parts)
    for cookie in range(rng.randint(1, 12)):
        length = rng.choice([1, 512, 4096, 65536])
        offset = rng.randrange(0, SIZE - length + 1)
        kind = rng.random()
        if kind < 0.7:
            flags = CMD_FLAG_DF if structured and rng.random() < 0.3 else 0
            parts.append(request(CMD_READ, offset, length, flags=flags, cookie=cookie))
        elif kind < 0.8:
            parts.append(request(CMD_FLUSH, cookie=cookie))
        elif kind < 0.9:
            parts.append(request(CMD_CACHE, offset, length, cookie=cookie))
        else:
            flags = CMD_FLAG_REQ_ONE if rng.random() < 0.5 else 0
            parts.append(request(CMD_BLOCK_STATUS, offset, length, flags=flags, cookie=cookie))
    if rng.random() < 0.7:
        parts.append(request(CMD_DISC))
    return b"".join(parts), handshake


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation."""
    buf = bytearray(data)
    if not buf:
        return bytes(rng.randbytes(rng.randint(1, 64)))
    pos = rng.randrange(len(buf))
    kind = rng.randrange(7)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # cut short
        del buf[pos:]
    elif kind == 2:  # duplicate a slice in place
        end = min(len(buf), pos + rng.randint(1, 64))
        buf[pos:pos] = buf[pos:end]
    elif kind == 3:  # delete a slice
        del buf[pos : pos + rng.randint(1, 32)]
    elif kind == 4:  # insert random bytes
        buf[pos:pos] = rng.randbytes(rng.randint(1, 32))
    elif kind == 5:  # overwrite a field with an interesting integer
        width = rng.choice([2, 4, 8])
        value = rng.choice(INTERESTING) % (1 << (8 * width))
        buf[pos : pos + width] = value.to_bytes(width, "big")
    else:  # splice in a magic number where it does not belong
        magic = rng.choice([IHAVEOPT, NBDMAGIC, REQUEST_MAGIC << 32])
        buf[pos:pos] = magic.to_bytes(8, "big")
    return bytes(buf)


def round_input(rng: random.Random) -> tuple[str, bytes]:
    """What one connection sends, and a label for failure messages."""
    roll = rng.random()
    if roll < 0.15:
        return "random", rng.randbytes(rng.randint(0, 2000))
    session, handshake = valid_session(rng)
    if roll < 0.3:
        return "handshake+random", session[:handshake] + rng.randbytes(rng.randint(1, 2000))
    keep = handshake if roll < 0.8 else 0  # mostly leave the handshake intact, to reach requests
    tail = session[keep:]
    for _ in range(rng.randint(1, 4)):
        tail = mutate(rng, tail)
    return ("mutated-session" if keep else "mutated-handshake"), session[:keep] + tail


def one_round(target: Target, rng: random.Random, sent: bytes) -> None:
    with target.connect(timeout=5.0) as conn:
        try:
            conn.send(sent)
        except Closed:
            return  # the server already hung up on an early byte: that is a fine answer
        if rng.random() < 0.7:
            conn.half_close()
            # Nothing more will come, so the server must answer what it has, then hang up.
            conn.expect_closed(timeout=5.0)
        else:
            conn.abort()


def fuzz(target: Target, seed: int, log: Callable[[str], None]) -> int:
    """Run the rounds; a well-behaved client stays connected throughout and is served between
    rounds, so one connection's garbage is shown not to disturb another's service."""
    rng = random.Random(seed)
    deadline = time.monotonic() + TIME_BUDGET
    done = 0
    with target.session() as bystander:
        expected = bystander.read(0, 4096)
        for n in range(ROUNDS):
            if time.monotonic() > deadline:
                break
            label, sent = round_input(rng)
            try:
                one_round(target, rng, sent)
                if n % 50 == 0:
                    assert bystander.read(0, 4096, cookie=n) == expected, "bystander misserved"
            except Exception as exc:
                raise AssertionError(
                    f"seed {seed} round {n} ({label}, {len(sent)} bytes: "
                    f"{sent[:96].hex()}...): {exc}"
                ) from exc
            assert target.alive(), f"unit died at seed {seed} round {n}:\n{target.unit.log()}"
            done += 1
    counters = target.counters()
    log(f"{done} fuzz rounds, seed {seed}: {counters}")
    # The mutated sessions must reach the transmission phase, or the fuzz tests only the handshake.
    assert counters["connections_total"] > done // 4, counters
    assert counters["reads"] > done // 4, counters
    return done


def test_fuzz_read_only_volume_never_changes(make_target: MakeTarget) -> None:
    target = make_target(size=SIZE, read_only=True)
    done = fuzz(target, SEED, print)
    assert done >= 100, f"only {done} rounds fitted in {TIME_BUDGET}s"
    target.assert_healthy(unchanged=True)


def test_fuzz_writable_volume_keeps_serving(make_target: MakeTarget) -> None:
    target = make_target(size=SIZE)
    done = fuzz(target, SEED + 1, print)
    assert done >= 100, f"only {done} rounds fitted in {TIME_BUDGET}s"
    # Mutations may forge valid WRITEs here, so only liveness and service are checked.
    target.assert_healthy(unchanged=False)
