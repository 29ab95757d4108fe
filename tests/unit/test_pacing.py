"""The pacer's rules (core/pacing.py), answer by answer: slow start, additive increase,
one halving per window, patience before a level that failed, the ceiling; and the gate
that holds calls to its limit across threads (service/pacing.py)."""

from __future__ import annotations

import threading

import pytest

from reconciler.core.pacing import Change, Pacer
from reconciler.service.pacing import Gate

FAST = 0.05


def answer(p: Pacer, n: int, latency: float = FAST) -> list[Change]:
    """`n` answers, each sent under the limit of its moment."""
    changes = []
    for _ in range(n):
        change = p.answered(p.ticket(), latency)
        if change is not None:
            changes.append(change)
    return changes


def test_it_starts_at_one_and_doubles_per_window_up_to_the_ceiling() -> None:
    p = Pacer(8)
    assert p.limit == 1
    limits = []
    for _ in range(7):  # windows of 1, 2 and 4 answers
        answer(p, 1)
        limits.append(p.limit)
    assert limits == [2, 2, 4, 4, 4, 4, 8]
    answer(p, 100)
    assert p.limit == 8  # never above the ceiling


def test_a_ceiling_of_one_is_a_hard_cap() -> None:
    p = Pacer(1)
    answer(p, 50)
    assert p.limit == 1


def test_a_start_above_the_ceiling_is_the_ceiling() -> None:
    assert Pacer(3, start=8).limit == 3
    with pytest.raises(ValueError, match="at least 1"):
        Pacer(0)


def test_no_answer_halves_once_per_window_then_growth_is_additive() -> None:
    p = Pacer(8, start=8)
    tickets = [p.ticket() for _ in range(8)]  # eight calls in flight under limit 8
    changes = [p.congested(t, "timed out") for t in tickets]
    assert changes[0] == Change(8, 4, "timed out")
    assert changes[1:] == [None] * 7  # the same congestion, seen by its other calls
    assert p.limit == 4
    answer(p, 3)
    assert p.limit == 4
    answer(p, 1)
    assert p.limit == 5  # +1 per window of 4, not doubling: slow start is over


def test_a_call_sent_after_the_halving_halves_again() -> None:
    p = Pacer(8, start=8)
    p.congested(p.ticket(), "503")
    p.congested(p.ticket(), "503")
    assert p.limit == 2
    p.congested(p.ticket(), "503")
    p.congested(p.ticket(), "503")
    assert p.limit == 1  # the floor


def test_a_slow_answer_halves_and_noise_does_not() -> None:
    p = Pacer(8, start=4)
    answer(p, 1, latency=0.10)  # the baseline
    assert p.limit == 4
    answer(p, 1, latency=0.40)  # 2 x 0.10 + 0.25 = 0.45: noise
    assert p.limit == 4
    change = p.answered(p.ticket(), 0.50)
    assert change is not None
    assert (change.old, change.new) == (4, 2)
    assert "slow answer" in change.why


def test_an_answer_queued_behind_our_own_calls_holds_the_limit() -> None:
    """A server that answers one call at a time answers the 4th of 4 sent together after
    4 service times: that is queueing (hold), not congestion (halve)."""
    p = Pacer(8, start=4)
    answer(p, 1, latency=0.10)  # the baseline, alone
    for _ in range(12):  # 2 x 0.10 x 4 + 0.25 = 1.05 explains 0.80 with 4 in flight
        assert p.answered(p.ticket(), 0.80, in_flight=4) is None
    assert p.limit == 4  # held: neither halved nor grown (12 fast answers would double it)
    assert p.answered(p.ticket(), 0.80, in_flight=1) == Change(
        4, 2, "slow answer (0.80 s with 1 in flight, usually 0.10 s alone)")
    change = p.answered(p.ticket(), 1.10, in_flight=4)
    assert change is not None
    assert (change.old, change.new) == (2, 1)


def test_a_level_that_failed_is_probed_with_growing_patience() -> None:
    """SQLite: 2 in flight always time out. The probes of 2 get rarer: 1, 2, 4, ...
    windows of fast answers at 1 between them, up to max_patience."""
    p = Pacer(8, max_patience=8)
    gaps = []
    for _ in range(6):
        n = 0
        while p.limit == 1:
            answer(p, 1)
            n += 1
        gaps.append(n)
        assert p.limit == 2
        p.congested(p.ticket(), "timed out")  # the probe fails
        assert p.limit == 1
    assert gaps == [1, 2, 4, 8, 8, 8]


def test_a_level_that_works_again_is_no_longer_probed_with_patience() -> None:
    p = Pacer(8, start=4)
    p.congested(p.ticket(), "503")  # 4 -> 2, 4 failed
    answer(p, 2)
    assert p.limit == 3
    answer(p, 5)
    assert p.limit == 3  # growing onto 4 takes 2 windows of 3
    answer(p, 1)
    assert p.limit == 4
    answer(p, 4)  # a whole window at 4 went well: on to 5, without patience
    assert (p.limit, p.failed_at, p.patience) == (5, None, 1)
    answer(p, 5)
    assert p.limit == 6


# --- the gate (service/pacing.py): the limit, held across threads -----------------------


def test_the_gate_holds_a_call_until_a_slot_is_free() -> None:
    gate = Gate(Pacer(4, start=1))
    first = gate.slot()
    through = threading.Event()

    def second() -> None:
        gate.slot().release()
        through.set()

    waiting = threading.Thread(target=second)
    waiting.start()
    assert not through.wait(0.2)  # the limit is 1 and the first call is in flight
    first.answered(0.01)  # a prompt answer: the slot frees (and the limit grows to 2)
    waiting.join(5)
    assert through.is_set()
    assert (gate.limit, gate.in_flight, gate.peak) == (2, 0, 1)


def test_a_slot_ends_once_and_a_release_teaches_nothing() -> None:
    changes: list[Change] = []
    gate = Gate(Pacer(4, start=4), changes.append)
    slot = gate.slot()
    slot.congested("timed out")
    slot.release()
    slot.congested("timed out")
    assert changes == [Change(4, 2, "timed out")]
    assert gate.in_flight == 0
    gate.slot().release()  # not sent: no answer, no change
    assert (gate.limit, gate.pacer.baseline, len(changes)) == (2, None, 1)


def test_the_gate_tells_the_pacer_how_many_were_in_flight_when_each_call_went() -> None:
    changes: list[Change] = []
    gate = Gate(Pacer(4, start=4), changes.append)
    gate.slot().answered(0.10)  # the baseline, alone
    slots = [gate.slot() for _ in range(4)]  # sent together: 1, 2, 3 and 4 in flight
    slots[3].answered(0.80)  # the last of four waited for the three before it: queued
    assert changes == []
    assert gate.limit == 4
    slots[0].answered(0.80)  # the first waited for nothing of ours: Airflow is slow
    assert [(c.old, c.new) for c in changes] == [(4, 2)]
    for s in slots[1:3]:
        s.release()
    assert gate.in_flight == 0
