"""A minimal typed event emitter, in the style of the LiveKit SDK (``.on(name, callback)``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[..., Any]


class EventEmitter:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Callback]] = {}

    def on(self, event: str, callback: Callback | None = None) -> Any:
        """Registers ``callback`` for ``event``; usable as a decorator without callback."""
        if callback is None:

            def decorator(fn: Callback) -> Callback:
                self._handlers.setdefault(event, []).append(fn)
                return fn

            return decorator
        self._handlers.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: Callback) -> None:
        handlers = self._handlers.get(event, [])
        if callback in handlers:
            handlers.remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self._handlers.get(event, ())):
            try:
                callback(*args)
            except Exception:  # an app callback must not break key rotation
                log.exception("handler for %r raised", event)
