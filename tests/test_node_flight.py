"""lazyfs.node.flight: one piece of work for many askers, its result or its error to all."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from lazyfs.node.flight import Flights


def _flights():
    lock = threading.RLock()

    @contextmanager
    def unlocked():
        lock.release()
        try:
            yield
        finally:
            lock.acquire()
    return lock, Flights(unlocked)


def _ask_together(outcome, askers=8):
    lock, flights = _flights()
    calls, go, started = [], threading.Event(), threading.Event()

    def work():
        calls.append(1)
        started.set()
        go.wait(10)
        return outcome()

    def ask():
        with lock:
            return flights.do("key", work)
    with ThreadPoolExecutor(askers) as pool:
        futures = [pool.submit(ask) for _ in range(askers)]
        assert started.wait(10)
        threading.Event().wait(0.2)  # the others are waiting on the first by now
        go.set()
        results = []
        for f in futures:
            try:
                results.append(f.result(10))
            except Exception as exc:  # noqa: BLE001 (what each asker got)
                results.append(exc)
    assert len(flights) == 0
    return calls, results


def test_askers_at_once_share_one_call_and_its_result():
    calls, results = _ask_together(lambda: object())
    assert len(calls) == 1
    assert all(r is results[0] for r in results)


def test_askers_at_once_share_its_error_and_the_next_asker_tries_again():
    def fail():
        raise LookupError("no such tag")
    calls, results = _ask_together(fail)
    assert len(calls) == 1
    assert all(isinstance(r, LookupError) for r in results)
    lock, flights = _flights()
    with lock:
        assert flights.do("key", lambda: 5) == 5
        with pytest.raises(ZeroDivisionError):
            flights.do("key", lambda: 1 / 0)
        assert flights.do("key", lambda: 6) == 6  # nothing stays once a flight ended
