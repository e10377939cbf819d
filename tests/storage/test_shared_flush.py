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
