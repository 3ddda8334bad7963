"""Single flight in memory: one upstream answer, many clients, each at its own pace."""

from __future__ import annotations

from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from openaigw.cache.flight import Flight, Head

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]


class Client:
    """The parts of a Twisted request a subscriber uses."""

    def __init__(self) -> None:
        self.channel: Any = object()
        self.writes: List[bytes] = []
        self.finished = False
        self.aborted = False
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True
        self.channel = None

    def body(self) -> bytes:
        return b"".join(self.writes)


class Upstream:
    """The relay's push producer, as the flight sees it."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def head(code: int = 200) -> Head:
    return Head(code, b"OK", Headers({b"content-type": [b"text/event-stream"]}))


def started(streamed: bool = True, code: int = 200, max_size: int = 1 << 20, ended: Any = None):
    flight = Flight(max_size, on_end=(lambda f, complete: ended.append(complete)) if ended is not None else None)
    upstream = Upstream()
    flight.fetching = Deferred()
    flight.registerProducer(upstream, True)
    flight.start(head(code), streamed)
    return flight, upstream


def subscribed(flight: Flight, leader: bool = False) -> Client:
    client = Client()
    ready: List[bool] = []
    flight.join(leader).addCallback(ready.append)
    assert ready == [True]
    flight.subscribe(client)
    return client


def test_followers_get_the_same_stream_and_a_late_one_the_events_so_far():
    """Every subscriber gets every event, one write each; one joining late first gets
    what came before it, then the rest live; all finish."""
    ended: List[bool] = []
    flight, _ = started(ended=ended)
    leader, follower = subscribed(flight, leader=True), subscribed(flight)
    for event in EVENTS[:3]:
        flight.write(event)
    late = subscribed(flight)
    assert late.writes == EVENTS[:3]
    for event in EVENTS[3:]:
        flight.write(event)
    flight.finish()
    for client in (leader, follower, late):
        assert client.writes == EVENTS and client.finished and not client.aborted
        assert client.producer is None
    assert ended == [True]


def test_upstream_paused_only_while_every_subscriber_is():
    """One slow client does not hold the others back; when all are paused, so is the upstream."""
    flight, upstream = started()
    fast, slow = subscribed(flight, leader=True), subscribed(flight)
    slow.producer.pauseProducing()
    assert not upstream.paused
    flight.write(EVENTS[0])
    assert fast.writes == [EVENTS[0]] and slow.writes == []
    fast.producer.pauseProducing()
    assert upstream.paused
    slow.producer.resumeProducing()
    assert not upstream.paused and slow.writes == [EVENTS[0]]


def test_a_follower_too_far_behind_is_cut_alone():
    """A subscriber that falls more than lag_limit behind is cut; the others go on."""
    flight, upstream = started(max_size=100)
    flight.lag_limit = 100
    fast, slow = subscribed(flight, leader=True), subscribed(flight)
    slow.producer.pauseProducing()
    for _ in range(6):
        flight.write(b"x" * 20)
    assert slow.aborted and not fast.aborted
    assert flight.chunks == []  # once past max_size, what everyone took is dropped
    flight.write(b"y")
    flight.finish()
    assert fast.finished and fast.body() == b"x" * 120 + b"y"
    assert not upstream.stopped


def test_past_max_size_nobody_joins():
    """An answer over max_size cannot be shared whole: new clients go upstream themselves."""
    flight, _ = started(max_size=10)
    subscribed(flight, leader=True)
    flight.write(b"0123456789ab")
    assert not flight.joinable()
    ready: List[bool] = []
    flight.join().addCallback(ready.append)
    assert ready == [False]


def test_leader_leaving_keeps_the_upstream_for_followers_last_one_cancels():
    """The leader's client leaving does not stop the upstream; the last client leaving does."""
    flight, upstream = started()
    leader, follower = subscribed(flight, leader=True), subscribed(flight)
    flight.write(EVENTS[0])
    flight._subscribers[0].leave()
    assert not upstream.stopped and not flight.fetching.called
    flight.write(EVENTS[1])
    assert follower.writes == EVENTS[:2] and leader.writes == EVENTS[:1]
    flight._subscribers[0].leave()
    cancelled: List[Any] = []
    flight.fetching.addErrback(cancelled.append)
    assert cancelled and flight.ended == "cut"


def test_client_gone_before_answer_then_no_one_left_cancels_the_request():
    """Waiting clients keep the request going; when the last one stops waiting it is cancelled."""
    flight = Flight(1 << 20)
    flight.fetching = Deferred()
    errors: List[Any] = []
    flight.fetching.addErrback(errors.append)
    first, second = flight.join(leader=True), flight.join()
    flight.leave_waiting(first)
    assert not errors
    flight.leave_waiting(second)
    assert errors and flight.ended == "failed"


def test_non_streamed_answer_followers_wait_for_all_of_it():
    """A follower of a JSON answer gets it once complete; a cut one sends it upstream."""
    for complete in (True, False):
        flight, _ = started(streamed=False)
        leader = subscribed(flight, leader=True)
        ready: List[bool] = []
        flight.join().addCallback(ready.append)
        flight.write(b'{"a": ')
        assert ready == []
        flight.write(b"1}")
        if complete:
            flight.finish()
            assert ready == [True]
            follower = Client()
            flight.subscribe(follower)
            assert follower.body() == b'{"a": 1}' and follower.finished
        else:
            flight.abort()
            assert ready == [False] and leader.aborted


def test_who_gets_what_by_status():
    """200 and 4xx answers are shared; a 5xx only goes to the leader, followers go upstream."""
    for code, shared in ((200, True), (404, True), (429, True), (500, False), (503, False), (201, False)):
        flight = Flight(1 << 20)
        leader: List[bool] = []
        follower: List[bool] = []
        flight.join(leader=True).addCallback(leader.append)
        flight.join().addCallback(follower.append)
        flight.start(head(code), streamed=True)
        assert leader == [True] and follower == [shared], code


def test_failure_before_an_answer():
    """No answer: the leader learns the error; followers go upstream themselves."""
    flight = Flight(1 << 20)
    leader: List[bool] = []
    follower: List[bool] = []
    flight.join(leader=True).addCallback(leader.append)
    flight.join().addCallback(follower.append)
    error = RuntimeError("502")
    flight.fail(error)
    assert leader == [False] and follower == [False] and flight.error is error
    assert not flight.joinable()


def test_cut_stream_cuts_every_subscriber():
    """A stream cut upstream is cut for every client (none may take it as complete)."""
    ended: List[bool] = []
    flight, _ = started(ended=ended)
    clients = [subscribed(flight, leader=True), subscribed(flight)]
    flight.write(EVENTS[0])
    flight.abort()
    assert all(c.aborted and not c.finished for c in clients)
    assert ended == [False]


def test_replay_writes_event_by_event_at_the_clients_pace():
    """A stored answer is written one event a write, pausing with the client."""
    flight = Flight.replay(head(), True, EVENTS)
    client = Client()
    client.write = lambda data: (client.writes.append(data), client.producer.pauseProducing())  # type: ignore
    flight.subscribe(client)
    assert client.writes == EVENTS[:1]
    while client.producer is not None:
        client.producer.resumeProducing()
    assert client.writes == EVENTS and client.finished


def test_client_connection_gone_is_left():
    """A subscriber whose client connection is gone leaves instead of writing."""
    flight, _ = started()
    client = subscribed(flight, leader=True)
    other = subscribed(flight)
    client.channel = None
    flight.write(EVENTS[0])
    assert client.writes == [] and other.writes == [EVENTS[0]]
    assert len(flight._subscribers) == 1
