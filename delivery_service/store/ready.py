"""Ready acks kept in process memory (single-process stores)."""

from __future__ import annotations


class ReadyAcks:
    """Per room, the identities ready for the newest (generation, epoch) seen.

    Acks are soft state: after a restart they are gone and the open transition executes
    at its deadline instead. Only the newest epoch of a room is kept.
    """

    def __init__(self) -> None:
        self._acks: dict[str, tuple[int, int, set[str]]] = {}

    def mark(self, room: str, generation: int, epoch: int, identity: str) -> set[str]:
        current = self._acks.get(room)
        if current is None or (current[0], current[1]) < (generation, epoch):
            current = (generation, epoch, set())
            self._acks[room] = current
        elif (current[0], current[1]) != (generation, epoch):
            return set()  # an ack for an older epoch than the newest seen
        current[2].add(identity)
        return set(current[2])

    def acks(self, room: str, generation: int, epoch: int) -> set[str]:
        current = self._acks.get(room)
        if current is None or (current[0], current[1]) != (generation, epoch):
            return set()
        return set(current[2])
