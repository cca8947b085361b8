"""A long-running DS sees an endless stream of room names: only rooms in use may hold
memory (cached record, lock, publish cursor), and dropping an idle room from memory must
lose nothing of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery_service.model import Phase
from delivery_service.rooms import RoomManager

from .conftest import MakeMember, StartDs, joined_room, manager_of, wait_until
from .members import GrpcMember, check_all, converged

ROOMS = 12


def room_memory(manager: RoomManager) -> dict[str, set[str]]:
    return {
        "cached": set(manager._rooms),
        "locks": set(manager._locks),
        "published": set(manager._published),
        "loading": set(manager._loads),
        "timers": set(manager._timers),
    }


async def leave_one_by_one(last: GrpcMember, first: GrpcMember) -> None:
    await first.leave()
    await wait_until(lambda: last.roster() == [last.identity], what=f"{first.identity} out")
    await last.leave()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_rooms_everyone_left_hold_no_memory_and_keep_their_record(
    backend: str, start_ds: StartDs, make_member: MakeMember, tmp_path: Path
) -> None:
    store = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'ds.db'}"
    ds = await start_ds(store=store)
    manager = manager_of(ds)
    rooms = [f"brief-{i}" for i in range(ROOMS)]
    for room in rooms:
        alice, bob = await joined_room(ds, make_member, room, "alice", "bob")
        assert room in manager._rooms, "a room in use is cached"
        await leave_one_by_one(alice, bob)
    empty: dict[str, set[str]] = {key: set() for key in room_memory(manager)}
    await wait_until(
        lambda: room_memory(manager) == empty,
        what="no memory held for rooms nobody is in",
    )

    # The record survived: the next joiner starts the room's next generation, not its first.
    retired = await manager.store.load(rooms[0])
    assert retired is not None and retired.phase is Phase.EMPTY
    carol, dave = await joined_room(ds, make_member, rooms[0], "carol", "dave")
    state = await manager.room_state(rooms[0])
    assert state.generation == retired.generation
    assert state.generation > 0 and state.phase is Phase.ACTIVE
    assert state.head > retired.head, "the log continues where it stopped"
    assert rooms[0] in manager._rooms
    await wait_until(
        lambda: converged([carol, dave]), what="carol and dave", check=check_all([carol, dave])
    )
