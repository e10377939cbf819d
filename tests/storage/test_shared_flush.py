"""storage.files.SharedFlush: concurrent writers share flushes, and none returns before a flush
that started after its change."""

from __future__ import annotations

import threading
import time

from storage.files import SharedFlush


def test_concurrent_changes_share_flushes_and_each_is_covered() -> None:
    changes = 0
    flushes: list[int] = []  # the changes made before each flush started
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            flushes.append(changes)
        time.sleep(0.02)  # a slow disk: others change and wait meanwhile

    shared = SharedFlush(flush)
    covered: list[bool] = []

    def writer() -> None:
        nonlocal changes
        with lock:
            changes += 1
            mine = changes
        ticket = shared.changed()
        shared.wait(ticket)
        with lock:
            covered.append(any(seen >= mine for seen in flushes))

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert covered == [True] * 16
    assert len(flushes) < 16
    assert shared.idle
    shared.wait(shared.changed())  # alone: flushes itself
    assert len(flushes) >= 2 and shared.idle


def test_a_failed_flush_fails_every_change_it_was_to_cover_and_a_later_one_flushes_again() -> None:
    """Linux reports a writeback error to one fsync and may drop the pages: a second waiter that
    ran its own flush after the first one's failed was told its change was durable."""
    calls: list[str] = []
    fail = [True]
    started, release = threading.Event(), threading.Event()

    def flush() -> None:
        calls.append("flush")
        if fail[0]:
            started.set()
            release.wait(5)
            fail[0] = False
            raise OSError(5, "Input/output error")

    shared = SharedFlush(flush)
    first, second = shared.changed(), shared.changed()  # both before the flush starts
    errors: list[BaseException] = []

    def wait(ticket: int) -> None:
        try:
            shared.wait(ticket)
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=wait, args=(first,))]
    threads[0].start()
    assert started.wait(5)
    threads.append(threading.Thread(target=wait, args=(second,)))
    threads[1].start()
    release.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 2 and calls == ["flush"]  # the second did not flush again and succeed
    later = shared.changed()
    shared.wait(later)  # a change made after the failure: flushed anew
    assert calls == ["flush", "flush"]


def test_a_change_the_failed_flush_covered_fails_even_after_a_later_flush_succeeded() -> None:
    """A waiter preempted between noting its change and waiting: a failed flush covered its change,
    then a later change's flush succeeded (Linux reported the error once). Its wait took the
    already-flushed fast path and returned as if its change were durable."""
    calls: list[int] = []

    def flush() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    shared = SharedFlush(flush)
    first, second = shared.changed(), shared.changed()
    try:
        shared.wait(first)
    except OSError:
        pass
    else:
        raise AssertionError("the failed flush was not reported")
    later = shared.changed()
    shared.wait(later)  # after the failure: flushed anew, durable
    try:
        shared.wait(second)
    except OSError as err:
        assert err.errno == 5
    else:
        raise AssertionError("a change the failed flush covered was reported durable")
