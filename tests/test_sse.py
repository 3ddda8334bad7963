"""Cutting event streams into events, as they arrive in reads of any size."""

from __future__ import annotations

import pytest

from openaigw.sse import EventSplitter, event_data, split_events

STREAMS = {
    "LF": [b"data: {\"a\": 1}\n\n", b": comment\nevent: x\ndata: 2\n\n", b"data: [DONE]\n\n"],
    "CRLF": [b"data: 1\r\n\r\n", b"data: 2\r\nid: 7\r\n\r\n"],
    "CR": [b"data: 1\r\r", b"data: 2\r\r"],
    "mixed": [b"data: 1\n\n", b"data: 2\r\n\r\n", b"data: 3\n\n"],
    "LF runs": [b"data: 1\n\n", b"\ndata: 2\n\n", b"\n\n", b"data: 3\n\n"],
}


@pytest.mark.parametrize("name", STREAMS)
def test_events_whatever_the_reads(name):
    """Each event comes out whole, with its blank line, however the bytes are split;
    what follows the last event waits."""
    events = STREAMS[name]
    stream = b"".join(events) + b"data: unfinished"
    for size in range(1, len(stream) + 1):
        splitter = EventSplitter()
        got = []
        for start in range(0, len(stream), size):
            got += splitter.feed(stream[start:start + size])
        assert got == events, size
        assert splitter.rest() == b"data: unfinished"


@pytest.mark.parametrize("name", STREAMS)
def test_take_gives_whole_events_and_their_count(name):
    """take: the completed events as one run of bytes, and how many; the same cut as feed."""
    events = STREAMS[name]
    stream = b"".join(events) + b"data: unfinished"
    for size in range(1, len(stream) + 1):
        splitter = EventSplitter()
        taken, count = b"", 0
        for start in range(0, len(stream), size):
            run, n = splitter.take(stream[start:start + size])
            assert len(split_events(run)) == n
            taken, count = taken + run, count + n
        assert (taken, count) == (b"".join(events), len(events)), size
        assert split_events(taken) == events and splitter.rest() == b"data: unfinished"


def test_event_data():
    """data lines joined by newlines, one leading space dropped; None without data."""
    assert event_data(b"event: x\ndata: a\ndata:b\n\n") == b"a\nb"
    assert event_data(b": comment\n\n") is None
