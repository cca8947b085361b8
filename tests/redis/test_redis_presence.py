"""Presence with several DS processes on one Redis: a member's stream may be on another
process. Streams on any live process count; a stream whose process died stops counting
once that process's heartbeat is stale, and its member is removed by a survivor.
"""

from __future__ import annotations

import asyncio

import pytest
from redis_testlib import (
    MakeRedis,
    Member,
    StartCluster,
    ds_errors,
    join_all,
    make_member,
    wait_converged,
)

pytestmark = pytest.mark.redis

PRESENCE_TIMEOUT = 3.0  # the DS default


async def test_streams_on_any_process_count_and_a_dead_processs_member_is_removed(
    make_redis: MakeRedis, start_cluster: StartCluster, members: list[Member]
) -> None:
    """Four members on two processes stay in the group for longer than the presence
    timeout (each process sees the other's streams through Redis). Then process B dies
    together with one of its members: B's other member fails over to A and stays, the dead
    one is removed by A once B's last report of its stream is older than the timeout."""
    redis = await make_redis(appendonly=True)
    procs = await start_cluster(2, redis.url)
    targets = [p.target for p in procs]
    group = [make_member(f"m{i}", "presence", targets, home=i % 2) for i in range(4)]
    members.extend(group)
    await join_all(group)
    epoch = await wait_converged(group, procs=procs)
    await asyncio.sleep(PRESENCE_TIMEOUT + 1.5)
    assert await wait_converged(group, procs=procs) == epoch, "a member with a stream left"

    victim = group[1]  # its stream is on procs[1]
    assert victim.client.target == procs[1].target
    await victim.session.stop(leave=False)
    await victim.client.close()
    procs[1].kill()
    survivors = [m for m in group if m is not victim]
    await wait_converged(survivors, at_least=epoch + 1, procs=procs, timeout=30)
    assert {m.client.target for m in survivors} == {procs[0].target}
    messages = [str(r.get("msg", "")) for r in procs[0].log_lines()]
    assert any(m.startswith("vanished room=presence identity=m1") for m in messages)
    assert not any("identity=m3" in m and m.startswith("vanished") for m in messages)
    assert ds_errors(procs[:1]) == []
