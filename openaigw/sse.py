"""Server-sent events, incrementally: an event may span reads; a read may hold several."""

from __future__ import annotations

import re
from typing import List, Optional

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LF_BOUNDARY = re.compile(rb"\n\n")  # the same where there is no CR: a literal, found fast
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Cuts a byte stream into whole events, each with its terminating blank line."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> List[bytes]:
        """The events completed by ``data``; an unfinished one waits for more."""
        buffer = self._pending + data if self._pending else data
        events = []
        start = 0
        search = _BOUNDARY.search if b"\r" in buffer else _LF_BOUNDARY.search
        while True:
            match = search(buffer, start)
            if match is None:
                break
            events.append(buffer[start : match.end()])
            start = match.end()
        self._pending = buffer[start:]
        return events

    def rest(self) -> bytes:
        """What arrived after the last complete event."""
        return self._pending


def event_data(event: bytes) -> Optional[bytes]:
    """The ``data:`` lines of one event, joined by newlines (None without any)."""
    lines = [line[5:] for line in _LINE.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
