"""New requests take turns with the rest of the reactor's work (openaigw.admission)."""

from __future__ import annotations

from typing import Any, Callable, List

import pytest
from twisted.internet.task import Clock

from openaigw.admission import PATIENCE, Admission
from tests.memory import Gateway, post, response

BUDGET = 0.002


def job(clock: Clock, done: List[str], name: str, seconds: float = 0.0) -> Callable[[], None]:
    """A job that takes ``seconds`` of the clock's time."""
    def run() -> None:
        clock.rightNow += seconds
        done.append(name)
    return run


def next_turn(clock: Clock) -> None:
    """Run the calls due, as a reactor's turn does: not those they schedule (which
    Clock.advance would run at once too)."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = True
        call.func(*call.args, **call.kw)


def test_jobs_run_at_once_within_the_budget():
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []
    for name in "abc":
        admission.run(job(clock, done, name, BUDGET / 4))
    assert done == ["a", "b", "c"]
    assert admission.waiting == 0 and not clock.getDelayedCalls()


def test_past_the_budget_jobs_wait_for_later_turns_in_order():
    """Once a turn's jobs took the budget, the next wait (arrivals queue behind them),
    and each turn runs another budget's worth."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []
    admission.run(job(clock, done, "a", BUDGET * 0.6))
    admission.run(job(clock, done, "b", BUDGET * 0.6))  # the budget is used up now
    for name in "cdef":
        admission.run(job(clock, done, name, BUDGET * 0.6))
    assert done == ["a", "b"]
    assert admission.waiting == 4
    next_turn(clock)  # c and d use its budget
    assert done == ["a", "b", "c", "d"]
    admission.run(job(clock, done, "g"))  # behind those still waiting, not before them
    next_turn(clock)
    assert done == list("abcdef")
    next_turn(clock)
    assert done == list("abcdefg")
    assert admission.waiting == 0 and not clock.getDelayedCalls()


def test_a_burst_waits_in_turns_of_one_budget():
    """While the first waiting request has waited less than PATIENCE, each turn runs
    one budget's worth, however long the reactor's other work took: a short burst
    is spread out, and the streams' chunks between the turns go out on time."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []
    for name in "abcd":
        admission.run(job(clock, done, name, BUDGET))
    clock.rightNow += PATIENCE / 2  # the rest of the reactor's turn: relaying
    next_turn(clock)
    assert done == ["a", "b"]


def test_requests_waiting_long_get_half_the_other_works_time():
    """Once the first has waited PATIENCE, a turn runs waiting requests for half the
    time the other work took since the last turn (at least one budget): relaying
    cannot starve new requests."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []
    for name in "abcdefghijk":
        admission.run(job(clock, done, name, 0.01))
    clock.rightNow += PATIENCE  # relaying
    next_turn(clock)
    assert done == list("abcdef")  # half of PATIENCE: five jobs of 10 ms
    next_turn(clock)  # no other work since: one budget (one job)
    assert done == list("abcdefg")


def test_a_pause_starts_a_new_budget():
    """Jobs a budget's time apart are not one burst: none waits."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []
    for name in "abcd":
        admission.run(job(clock, done, name, BUDGET))
        clock.rightNow += BUDGET
    assert done == list("abcd")
    assert not clock.getDelayedCalls()


def test_jobs_started_by_a_waiting_job_keep_one_turn_scheduled():
    """A job run in a turn may run() others (a pipelined request answered at once):
    they run or wait as any, and one turn stays scheduled, never two."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []

    def starts_two() -> None:
        admission.run(job(clock, done, "c", BUDGET))  # at once: the turn's budget is not spent
        admission.run(job(clock, done, "d"))  # it is now: d waits

    admission.run(job(clock, done, "a", BUDGET))
    admission.run(starts_two)
    next_turn(clock)
    assert done == ["a", "c"] and admission.waiting == 1
    assert len(clock.getDelayedCalls()) == 1
    next_turn(clock)
    assert done == ["a", "c", "d"]
    assert admission.waiting == 0 and not clock.getDelayedCalls()



def test_a_job_queued_and_run_in_the_same_turn_leaves_no_turn_behind():
    """Past PATIENCE a turn's budget is larger than the budget its jobs check: a job
    one of them queues may then run in that same turn, and the turn scheduled for it
    finds nothing to do (and does nothing, no IndexError)."""
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []

    def starts_d() -> None:
        done.append("c")
        admission.run(job(clock, done, "d"))  # past the budget: queued, a turn scheduled

    admission.run(job(clock, done, "a", BUDGET))
    admission.run(job(clock, done, "b", BUDGET))
    admission.run(starts_d)
    clock.rightNow += PATIENCE  # the reactor's other work: this turn may run PATIENCE / 2
    next_turn(clock)
    assert done == list("abcd") and admission.waiting == 0
    next_turn(clock)  # the turn scheduled for d
    assert not clock.getDelayedCalls()
    admission.run(job(clock, done, "e"))  # (the turn's budget is spent: in the next)
    next_turn(clock)
    assert done == list("abcde") and not clock.getDelayedCalls()


def test_the_time_of_day_stepping_back_does_not_hold_new_requests():
    """The next turn is due by the time of day: after a step back it would not be due
    for as long, so a request arriving meanwhile schedules it anew."""
    gw = Gateway()
    admission = gw.site.admission
    admission.run(lambda: setattr(gw.reactor, "rightNow", gw.reactor.rightNow + 1.0))  # the budget, spent
    gw.client(post(b"/v1/chat/completions", b"{}"))
    assert admission.waiting == 1
    gw.reactor.rightNow -= 30.0  # (an NTP step, a VM resumed)
    gw.client(post(b"/v1/models", b"{}"))
    gw.reactor.advance(0)
    assert gw.requests_sent() == 2 and admission.waiting == 0

class _Ticking:
    """The gateway's clock, read as if each reading came 1.5 ms after the last."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def seconds(self) -> float:
        self._reactor.rightNow += 0.0015
        return self._reactor.rightNow

    def callLater(self, *args: Any) -> Any:
        return self._reactor.callLater(*args)


def test_pipelined_requests_answered_in_a_turn_are_all_answered():
    """Requests pipelined on one connection, each answered at once (a 404) in its
    turn, so that the next is read and run() from inside the turn."""
    gw = Gateway()
    admission = gw.site.admission = Admission(_Ticking(gw.reactor), BUDGET)
    admission.run(lambda: None)
    admission.run(lambda: None)  # the budget, spent
    _, transport = gw.client(b"GET /nope HTTP/1.1\r\nHost: gw\r\n\r\n" * 4)
    for _ in range(4):
        turns = [call for call in gw.reactor.getDelayedCalls() if call.func == admission._turn]
        assert len(turns) <= 1
        next_turn(gw.reactor)
    assert transport.value().count(b"HTTP/1.1 404 ") == 4
    assert admission.waiting == 0


def test_a_failing_job_does_not_stop_those_behind_it():
    clock = Clock()
    admission = Admission(clock, BUDGET)
    done: List[str] = []

    def fails() -> None:
        raise RuntimeError("a bug")

    admission.run(job(clock, done, "a", BUDGET))
    admission.run(fails)
    admission.run(job(clock, done, "b"))
    with pytest.raises(RuntimeError):
        next_turn(clock)
    next_turn(clock)
    assert done == ["a", "b"]
    assert admission.waiting == 0


def test_requests_past_the_budget_are_answered_in_the_next_turn():
    """The gateway's new requests use its admission: one arriving once the turn's
    budget is spent goes upstream in the next turn; one whose client leaves while it
    waits never goes upstream, and is logged as 499."""
    gw = Gateway()
    admission = gw.site.admission
    admission.run(lambda: setattr(gw.reactor, "rightNow", gw.reactor.rightNow + 1.0))  # the budget, spent
    _, waiting_client = gw.client(post(b"/v1/chat/completions", b"{}"))
    leaving, _ = gw.client(post(b"/v1/models", b"{}"))
    assert admission.waiting == 2 and gw.requests_sent() == 0
    leaving.connectionLost(None)
    gw.reactor.advance(0)
    assert gw.requests_sent() == 1
    gw.upstream(0).send(response())
    assert waiting_client.value().startswith(b"HTTP/1.1 200 OK")
    assert sorted((r.path, r.status) for r in gw.records) == [("/v1/chat/completions", 200), ("/v1/models", 499)]


def test_metrics_show_requests_waiting_and_how_long_they_waited():
    gw = Gateway(metrics=True)
    gw.metrics.admission.source = lambda: gw.site.admission  # (as the service wires it)
    registry = gw.metrics.registry
    assert registry.get_sample_value("openaigw_requests_waiting") == 0
    gw.site.admission.run(lambda: setattr(gw.reactor, "rightNow", gw.reactor.rightNow + 1.0))
    gw.client(post(b"/v1/models", b"{}"))
    gw.client(post(b"/v1/models", b"{}"))
    assert registry.get_sample_value("openaigw_requests_waiting") == 2
    gw.reactor.rightNow += 0.25
    gw.reactor.advance(0)
    assert registry.get_sample_value("openaigw_requests_waiting") == 0
    assert registry.get_sample_value("openaigw_requests_waited_total") == 2
    assert registry.get_sample_value("openaigw_requests_waited_seconds_total") == 0.5
