"""ack = "remote": waits for every required peer; degrades a silent one after the timeout."""

from __future__ import annotations

import asyncio

from blockmirror.blockdev.ackmode import RemoteAck


def test_waits_for_every_peer_then_answers() -> None:
    async def main() -> None:
        ra = RemoteAck(asyncio.get_running_loop(), ["b", "c"], timeout=5.0)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ra.wait(3, fut)
        ra.acknowledge("b", 3)
        await asyncio.sleep(0)
        assert not fut.done()  # c has not got it yet
        ra.acknowledge("c", 2)
        assert not fut.done()
        ra.acknowledge("c", 4)
        assert fut.done()

    asyncio.run(main())


def test_a_silent_peer_is_degraded_after_the_timeout_and_restored_when_caught_up() -> None:
    alerts: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ra = RemoteAck(loop, ["b", "c"], timeout=0.3, on_alert=lambda k, m: alerts.append(k))
        first: asyncio.Future[None] = loop.create_future()
        ra.wait(1, first)
        ra.acknowledge("b", 1)
        await asyncio.wait_for(first, 2)  # answered once c timed out
        assert ra.degraded == {"c"} and ra.mode == "remote-degraded"
        assert "ack_timeout" in alerts
        # While degraded, writes need only b.
        second: asyncio.Future[None] = loop.create_future()
        ra.wait(2, second)
        ra.acknowledge("b", 2)
        assert second.done()
        # c catches up with everything written: required again.
        ra.acknowledge("c", 2)
        assert ra.degraded == set() and "ack_remote_restored" in alerts
        third: asyncio.Future[None] = loop.create_future()
        ra.wait(3, third)
        ra.acknowledge("b", 3)
        assert not third.done()
        ra.acknowledge("c", 3)
        assert third.done()

    asyncio.run(main())


def test_an_acknowledgement_from_a_consumer_that_is_not_a_peer_changes_nothing() -> None:
    """An archive's consumer acknowledges through the same call: it is neither waited for
    nor counted for the peer."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ra = RemoteAck(loop, ["b"], timeout=5.0)
        ra.acknowledge("archive:s3", 5)
        assert ra.required() == ["b"]
        fut: asyncio.Future[None] = loop.create_future()
        ra.wait(2, fut)
        assert not fut.done()
        ra.acknowledge("archive:s3", 9)
        assert not fut.done()
        ra.acknowledge("b", 2)
        assert fut.done()

    asyncio.run(main())
