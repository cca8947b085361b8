"""Reading the delivery service's log: when it accepted a commit, when it learned of a removal.

The exposure window of a removal starts when the DS accepted the removing commit, and a
kill's detection time ends when the DS learned that the participant was gone; neither is
visible to members, so :class:`DsLog` takes both from the DS's JSON log (``ds.log`` in its
work dir), matching these messages of ``delivery_service``:

* ``commit accepted room=R by=I epoch=N ...`` (``api.py``): epoch N's commit accepted;
* ``leave room=R identity=I`` (``api.py``): a member said goodbye;
* ``vanished room=R identity=I ...`` (``rooms.py``): its event stream was gone past the
  presence timeout;
* ``disconnect reported room=R identity=I ...`` (``api.py``): a member reported another gone;
* ``webhook K room=R identity=I removed=True`` (``http.py``): LiveKit said it left.

If the DS words these differently, exposure and detection times become null in reports:
``tests/harness/test_ds_log.py`` runs a real DS and fails when that happens.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["DsLog"]


class DsLog:
    """Follows the DS's JSON log for one room: when commits were accepted (``accepted``:
    epoch -> time), when removals arrived (``removals``: (time, identity)); monotonic times."""

    _COMMIT = re.compile(r"^commit accepted room=(\S+) by=\S+ epoch=(\d+)")
    _REMOVAL = re.compile(
        r"^(?:webhook \S+ room=(\S+) identity=(\S+) removed=True"
        r"|disconnect reported room=(\S+) identity=(\S+)"
        r"|leave room=(\S+) identity=(\S+)"
        r"|vanished room=(\S+) identity=(\S+))"
    )

    def __init__(self, path: Path, room: str) -> None:
        self.path = path
        self.room = room
        self.offset = 0
        self.accepted: dict[int, float] = {}
        self.removals: list[tuple[float, str]] = []
        # the DS logs wall-clock time; everything else here is monotonic
        self.wall_offset = time.time() - time.monotonic()

    def poll(self) -> None:
        """Reads the lines the DS wrote since the last poll."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a partly written last line waits for the next poll
        self.offset += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                message, ts = str(record["msg"]), str(record["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if "accepted" not in message and "room=" not in message:
                continue
            wall = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            t = wall.timestamp() - self.wall_offset
            if m := self._COMMIT.match(message):
                if m.group(1) == self.room:
                    self.accepted.setdefault(int(m.group(2)), t)
            elif m := self._REMOVAL.match(message):
                groups = [g for g in m.groups() if g is not None]
                if groups[0] == self.room:
                    self.removals.append((t, groups[1]))

    def removal_seen(self, identity: str, after: float) -> float | None:
        """When the DS first learned that ``identity`` left, at ``after`` or later."""
        # the log has millisecond resolution: allow for rounding down
        return min(
            (t for t, who in self.removals if who == identity and t >= after - 0.002), default=None
        )
