"""Store backends: durable room records and logs with compare-and-set on the room version.

* :class:`SqliteStore` — the embedded default (WAL; a commit is durable before it is
  acknowledged);
* :class:`MemoryStore` — for unit tests of one layer;
* ``RedisStore`` — several DS processes on one Redis (``delivery_service.store.redis``).

Use :func:`open_store` with a URL: ``sqlite:///path/to/ds.db``, ``memory://``,
``redis://host:port/db``.
"""

from delivery_service.store.base import Store, open_store
from delivery_service.store.memory import MemoryStore
from delivery_service.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store", "open_store"]
