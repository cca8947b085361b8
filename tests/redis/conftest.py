"""Registers the Redis test fixtures (defined in redis_testlib.py, see there)."""

from redis_testlib import (
    make_redis,
    make_store,
    members,
    redis_server,
    start_cluster,
)

__all__ = ["make_redis", "make_store", "members", "redis_server", "start_cluster"]
