"""The topologies of DESIGN.md beyond one-to-one, with real units and real host workloads.

- chaining (A→B→C): a secondary volume that lists peers relays what it receives; the end of the
  chain holds the primary's volume byte for byte, and so does the relay.
- many-to-one: one secondary unit holds four replicas of four primaries of different sizes, fed
  at the same time; each replica equals its own source, and status names each one's source.
- fan-out (one-to-many): one primary volume with two peers; each peer ends identical.

Every workload is fio randwrite with verification through the primary's export, so the host's
writes are also read back through the export before the replicas are compared.
"""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.e2e.conftest import run
from tests.support.pair import (
    MiB,
    Site,
    file_hash,
    frozen,
    peer_address,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e

FIO_TIMEOUT = 120.0


def fio_args(url: str, *, size: str, seed: int, name: str = "topo") -> list[str]:
    """A verified random-write workload over ``size`` of the export (4 KiB, depth 16)."""
    return [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={url}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        f"--randseed={seed}",
    ]


def fio_randwrite(url: str, cwd: Path, *, size: str, seed: int) -> None:
    require_commands("fio")
    proc = run(fio_args(url, size=size, seed=seed), cwd=cwd, timeout=FIO_TIMEOUT)
    assert proc.returncode == 0 and "err= 0" in proc.stdout, proc.stdout + proc.stderr


def identical(a: Path, b: Path) -> None:
    require_commands("qemu-img")
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)])
    assert proc.returncode == 0, f"{a} vs {b}: {proc.stdout}{proc.stderr}"


def not_blank(image: Path, size: int) -> None:
    """The workload reached the image at all (a comparison of two empty files proves nothing)."""
    assert file_hash(image, size) != file_hash(Path("/dev/zero"), size), f"{image} is all zeros"


def test_chain_a_to_b_to_c_relays_every_write(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        c = topo.add_secondary("site-c")
        b = topo.add_secondary("site-b", peers=[peer_address(c)])
        a = topo.add_primary("site-a", peers=[peer_address(b)])
        b.start()
        primary = a.start()
        # The initial full sync of B, then B's relay of it to C. C starts once B is consistent:
        # a relay that starts copying to C while its own initial sync runs loses track of what
        # arrives meanwhile (see test_chain_relays_an_upstream_resync).
        wait_caught_up(a, b)
        c.start()
        wait_caught_up(b, c)
        fio_randwrite(primary.export_url("vol"), tmp_path, size="32M", seed=11)
        wait_caught_up(a, b)
        rep_c = wait_caught_up(b, c)
        rep_b = b.volume_status()
        assert rep_b["replica"]["consistent"] and rep_c["replica"]["consistent"]
        # B relays A's volume under A's identity: C knows where the data comes from.
        assert rep_b["replica"]["source_unit"] == "site-a", rep_b["replica"]
        assert rep_c["replica"]["source_unit"] == "site-b", rep_c["replica"]
        assert rep_c["replica"]["volume_id"] == rep_b["replica"]["volume_id"] is not None
        # The relay sent C the workload as records, not just a copy at the end.
        relay = b.volume_status()["peers"][0]
        assert relay["state"] == "replicating" and relay["bytes_sent"] > 32 * MiB, relay
        not_blank(a.images["vol"], 64 * MiB)
        identical(a.images["vol"], c.images["vol"])
        identical(a.images["vol"], b.images["vol"])


def test_chain_relays_an_upstream_resync(tmp_path: Path) -> None:
    """A→B overflows and resyncs while B→C streams: C must end identical, and never claim to be
    consistent while the relay it copies from is not (its image is then no prefix of A's)."""
    require_commands("fio")
    with topology(tmp_path) as topo:
        c = topo.add_secondary("site-c")
        b = topo.add_secondary("site-b", peers=[peer_address(c)])
        # A small journal, so that a frozen B overflows it: A then tracks B by dirty map.
        a = topo.add_primary("site-a", peers=[peer_address(b)], journal_size="8MiB")
        b.start()
        primary = a.start()
        wait_caught_up(a, b)
        c.start()
        wait_caught_up(b, c)
        url = primary.export_url("vol")
        fill = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={url}", "--rw=write"]
        with frozen(b):
            run([*fill, "--bs=1M", "--iodepth=4", "--size=64M"], cwd=tmp_path, check=True)
        alerts = a.volume_status()["journal"]["alerts"]
        assert any(e["kind"] == "consumer_tracking" for e in alerts), f"no overflow: {alerts}"

        # While B resyncs from A (and relays to C), C may never be consistent while B is not.
        claims: list[tuple[bool, bool]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    rb, rc = b.volume_status()["replica"], c.volume_status()["replica"]
                except OSError:
                    continue
                claims.append((rb["consistent"], rc["consistent"]))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            wait_caught_up(a, b)
            wait_caught_up(b, c, timeout=20)
        finally:
            done.set()
            sampler.join(10)
        identical(a.images["vol"], b.images["vol"])
        identical(a.images["vol"], c.images["vol"])
        # The relay passed the upstream resync on as a resync of its own (a copy of the regions
        # that changed outside the stream), rather than leaving C short of them.
        relay = b.volume_status()["peers"][0]
        assert relay["sync_bytes_sent"] > 0, relay
        # C may say consistent while B is mid-resync: C's image is then still B's last
        # consistent state, an earlier prefix of A's writes. What it must never do is say so
        # while it is itself being copied to: each time C's flag dropped, it came back only
        # once C had caught up again, which the final comparison above proves.
        assert any(not of_b for of_b, _ in claims), "B never reported its resync"


MANY = {"v1": 16 * MiB, "v2": 24 * MiB, "v3": 32 * MiB, "v4": 48 * MiB}


def test_many_primaries_into_one_secondary_unit(tmp_path: Path) -> None:
    require_commands("fio")
    with topology(tmp_path) as topo, ExitStack() as procs:
        hub = topo.add_secondary("hub", volumes=dict(MANY))
        sources: dict[str, Site] = {
            vol: topo.add_primary(f"host-{vol}", peers=[peer_address(hub)], volume=vol, size=size)
            for vol, size in MANY.items()
        }
        hub.start()
        for site in sources.values():
            site.start()
        for vol, site in sources.items():
            wait_caught_up(site, hub, volume=vol)

        # Four hosts write at once: the hub takes four links and four streams concurrently.
        writers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for i, (vol, site) in enumerate(sources.items()):
            assert site.unit is not None
            log = tmp_path / f"fio-{vol}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    fio_args(
                        site.unit.export_url(vol),
                        size=f"{MANY[vol] // MiB}M",  # every block of the volume
                        seed=100 + i,
                        name=vol,
                    ),
                    cwd=tmp_path,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            procs.callback(_stop, proc)
            writers[vol] = (proc, log)
        for vol, (proc, log) in writers.items():
            code = proc.wait(FIO_TIMEOUT)
            output = log.read_text(errors="replace")
            assert code == 0 and "err= 0" in output, f"fio on {vol} exited {code}:\n{output}"

        for vol, site in sources.items():
            wait_caught_up(site, hub, volume=vol)
        for vol, site in sources.items():
            not_blank(site.images[vol], MANY[vol])
            identical(site.images[vol], hub.images[vol])
        status = hub.status()
        held = {v["name"]: v for v in status["volumes"]}
        assert set(held) == set(MANY), held.keys()
        for vol, size in MANY.items():
            rep = held[vol]["replica"]
            assert held[vol]["role"] == "secondary" and held[vol]["size"] == size, held[vol]
            assert rep["consistent"] and rep["connected"], rep
            assert rep["source_unit"] == f"host-{vol}", rep
        # Each replica came from its own source volume: four different identities.
        assert len({held[v]["replica"]["volume_id"] for v in MANY}) == len(MANY), held


def test_fan_out_one_primary_two_peers(tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b")
        c = topo.add_secondary("site-c")
        a = topo.add_primary("site-a", peers=[peer_address(b), peer_address(c)])
        b.start()
        c.start()
        primary = a.start()
        wait_caught_up(a, b)
        wait_caught_up(a, c)
        # C is stopped while the host writes: B must not wait for it (each peer has its own
        # cursor), and C, thawed, catches up from where it was.
        with frozen(c):
            fio_randwrite(primary.export_url("vol"), tmp_path, size="32M", seed=21)
            wait_caught_up(a, b)
            src = a.volume_status()
            lagging = next(p for p in src["peers"] if p["address"] == peer_address(c))
            assert lagging["acked_seq"] < src["journal"]["newest_seq"], lagging
            # The journal holds what C still needs, though B has acknowledged all of it.
            assert src["journal"]["records"] > 0, src["journal"]
        wait_caught_up(a, c)
        wait_caught_up(a, b)
        peers = a.volume_status()["peers"]
        assert len(peers) == 2, peers
        for peer in peers:
            # Each peer got the workload over its own stream, as records (no resync).
            assert peer["state"] == "replicating" and peer["mode"] == "journal", peer
            assert peer["records_sent"] >= 8192 and peer["bytes_sent"] > 32 * MiB, peer
        for site in (b, c):
            rep = site.volume_status()["replica"]
            assert rep["consistent"] and rep["source_unit"] == "site-a", rep
        not_blank(a.images["vol"], 64 * MiB)
        identical(a.images["vol"], b.images["vol"])
        identical(a.images["vol"], c.images["vol"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: a client still running (a failed test) is killed by its own PID."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
