"""New requests' work in slices, so that a burst of them cannot stall the streams
already flowing.

A reactor turn handles every socket that is ready: when a burst of new requests
arrives, their routing, filters and upstream requests would all run before the
next chunk of any running stream is relayed, and on one core a burst of hundreds
holds those chunks for as long (they then reach their clients late, several in
one read).  :class:`Admission` runs a new request's work at once until the
requests of one turn have used ``budget`` seconds; the rest wait, in order, for
the following turns, each of which runs one more budget of them before the reactor
polls the sockets again: a burst is spread out, and the chunks between its turns
go out on time.  Once the first waiting request has waited ``PATIENCE``, the load
is more than a burst, and a turn runs waiting requests for half as long as the
other work (relaying, mostly) took since the previous turn: under a load of both,
new requests get a third of the time and running streams the rest, so that
neither starves.  (Given as much time as the other work, new requests would feed
it with the answers they start, and the turns would grow.)  The total work is the
same; what changes is that they take turns.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

DEFAULT_BUDGET = 0.001  # seconds of new requests' work a turn (a few requests)
SHARE = 0.5  # of the other work's time, given to waiting requests
PATIENCE = 0.1  # seconds the first of them waits before they get SHARE


class Admission:
    """Runs jobs (a new request's processing) now, or in a later reactor turn once
    this turn's jobs have taken ``budget`` seconds (by ``clock``: a reactor's is the
    time of day, to the microsecond).  A pause of ``budget`` between two jobs also
    starts a new turn's budget: the reactor went on to other work, or was idle.

    The next turn is a ``callLater(0)``, due by the time of day: should that step
    back, the turn would not be due for as long, so a job arriving meanwhile
    schedules it anew."""

    def __init__(self, clock: Any, budget: float = DEFAULT_BUDGET) -> None:
        self._clock = clock
        self._budget = budget
        self._timer = clock.seconds
        self._waiting: Deque[Tuple[float, Callable[[], None]]] = deque()  # (since, job)
        self._spent = 0.0  # by this turn's jobs
        self._last_end = float("-inf")
        self._turn_ended = 0.0  # when the last turn ended (or the first job waited)
        self._next: Optional[Any] = None  # the turn scheduled (never two: a job may run() more)
        self.waited = 0  # jobs that waited for a turn, and how long they did in all
        self.waited_seconds = 0.0

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` now, or after those waiting (in order) in a later turn."""
        start = self._timer()
        if self._waiting:
            self._waiting.append((start, job))
            scheduled = self._next
            if scheduled is not None and scheduled.getTime() > start:  # the time of day stepped back
                scheduled.cancel()
                self._next = self._clock.callLater(0, self._turn)
            return
        if start - self._last_end >= self._budget:
            self._spent = 0.0
        elif self._spent >= self._budget:
            self._waiting.append((start, job))
            self._turn_ended = start
            self._next_turn()
            return
        self._timed(job, start)

    def _timed(self, job: Callable[[], None], start: float) -> None:
        try:
            job()
        finally:
            self._last_end = end = self._timer()
            self._spent += end - start

    def _next_turn(self) -> None:
        if self._next is None:
            self._next = self._clock.callLater(0, self._turn)

    def _turn(self) -> None:
        """A new turn (before the reactor polls again): run waiting jobs for
        ``budget``, or, once the first has waited PATIENCE, for SHARE of the time
        the reactor's other work took since the last turn if that is longer."""
        self._next = None
        waiting = self._waiting
        if not waiting:  # a job run in the last turn queued more, and that turn ran them too
            return
        start = self._timer()
        budget = self._budget
        if start - waiting[0][0] >= PATIENCE:
            budget = max(budget, (start - self._turn_ended) * SHARE)
        self._spent = 0.0
        try:
            while waiting and self._spent < budget:
                since, job = waiting.popleft()
                now = self._timer()
                self.waited += 1
                self.waited_seconds += max(0.0, now - since)  # (the time of day may step back)
                self._timed(job, now)
        finally:
            self._turn_ended = self._timer()
            if waiting:
                self._next_turn()

    @property
    def waiting(self) -> int:
        """How many jobs wait for a turn."""
        return len(self._waiting)
