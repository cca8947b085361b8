"""DataSendGate: key installs never overlap a data send that the SDK is still encrypting."""

from __future__ import annotations

import asyncio

import pytest

from mls_provider.livekit_adapter import DataSendGate

pytestmark = pytest.mark.timeout(10)


async def test_quiesce_waits_for_sends_in_flight() -> None:
    gate = DataSendGate()
    order: list[str] = []
    send_may_finish = asyncio.Event()

    async def send() -> None:
        async with gate.sending():
            order.append("send started")
            await send_may_finish.wait()  # the SDK encrypting and sending
            order.append("send done")

    async def update() -> None:
        await gate.quiesce()
        order.append("keys installed")

    sender = asyncio.create_task(send())
    await asyncio.sleep(0)
    updater = asyncio.create_task(update())
    await asyncio.sleep(0.05)
    assert order == ["send started"], "the update must wait for the send in flight"
    send_may_finish.set()
    await asyncio.gather(sender, updater)
    assert order == ["send started", "send done", "keys installed"]


async def test_waiting_update_holds_new_sends_back() -> None:
    """A chatty sender cannot starve a rotation: sends that arrive while an update waits
    run after it."""
    gate = DataSendGate()
    order: list[str] = []
    first_may_finish = asyncio.Event()

    async def send(name: str, until: asyncio.Event | None = None) -> None:
        async with gate.sending():
            order.append(f"{name} started")
            if until is not None:
                await until.wait()

    async def update() -> None:
        await gate.quiesce()
        order.append("keys installed")  # synchronously after quiesce, as the session does

    first = asyncio.create_task(send("first", first_may_finish))
    await asyncio.sleep(0)
    updater = asyncio.create_task(update())
    await asyncio.sleep(0)
    second = asyncio.create_task(send("second"))
    await asyncio.sleep(0.05)
    assert order == ["first started"]
    first_may_finish.set()
    await asyncio.gather(first, updater, second)
    assert order == ["first started", "keys installed", "second started"]


async def test_quiesce_with_nothing_in_flight_does_not_yield() -> None:
    """The session installs keys right after quiesce returns: a sender scheduled meanwhile
    must not get in between."""
    gate = DataSendGate()
    entered: list[str] = []

    async def send() -> None:
        async with gate.sending():
            entered.append("send")

    sender = asyncio.create_task(send())  # scheduled, not yet run
    await gate.quiesce()
    assert entered == [], "quiesce yielded to the loop"
    await sender
    assert entered == ["send"]


async def test_send_that_fails_releases_the_gate() -> None:
    gate = DataSendGate()
    with pytest.raises(RuntimeError):
        async with gate.sending():
            raise RuntimeError("PublishDataError")
    await asyncio.wait_for(gate.quiesce(), 1.0)
