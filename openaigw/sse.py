"""Server-sent events, incrementally: an event may span reads; a read may hold several."""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LF_BOUNDARY = re.compile(rb"\n\n")  # the same where there is no CR: a literal, found fast
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Cuts a byte stream into whole events, each with its terminating blank line.

    (It looks for bytes with ``find``, not ``in``: in CPython 3.11, ``sub in data``
    first tries ``sub`` as an integer, and makes and drops an exception.)
    """

    def __init__(self) -> None:
        self.pending = b""  # what arrived after the last complete event

    def feed(self, data: bytes) -> List[bytes]:
        """The events completed by ``data``; an unfinished one waits for more."""
        return split_events(self.take(data)[0])

    def take(self, data: bytes) -> Tuple[bytes, int]:
        """The events completed by ``data``, as one run of bytes, and how many they
        are; an unfinished one waits for more."""
        buffer = self.pending + data if self.pending else data
        lf_only = buffer.find(b"\r") < 0
        if lf_only:  # the usual case: found from the end, counted in C
            last = buffer.rfind(b"\n\n")
            if last < 0:
                self.pending = buffer
                return b"", 0
            if last == 0 or buffer[last - 1] != 0x0A:  # (within a run of LFs, pairs count)
                end = last + 2
                self.pending = buffer[end:]
                return buffer[:end], buffer.count(b"\n\n", 0, end)
        search = _LF_BOUNDARY.search if lf_only else _BOUNDARY.search
        end = count = 0
        while True:
            match = search(buffer, end)
            if match is None:
                break
            end = match.end()
            count += 1
        self.pending = buffer[end:]
        return buffer[:end], count

    def rest(self) -> bytes:
        """What arrived after the last complete event."""
        return self.pending


def split_events(events: bytes) -> List[bytes]:
    """Whole events (as :meth:`EventSplitter.take` gives them) one by one."""
    search = _LF_BOUNDARY.search if events.find(b"\r") < 0 else _BOUNDARY.search
    out = []
    start = 0
    while start < len(events):
        match = search(events, start)
        end = match.end() if match is not None else len(events)  # (not whole: the rest as one)
        out.append(events[start:end])
        start = end
    return out


def event_data(event: bytes) -> Optional[bytes]:
    """The ``data:`` lines of one event, joined by newlines (None without any)."""
    lines = [line[5:] for line in _LINE.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
