"""Group commit: concurrent callers share one transaction, each answered once it has committed.

Concurrent associations each used to commit their own index transaction: one writer-lock wait,
one directory fsync and one WAL flush per instance, one after another. Here a caller hands its
item to :meth:`GroupCommit.submit` and waits; the first caller to find nobody committing becomes
the *leader*: it takes every item queued so far (its own first), runs them as one batch, hands
each caller its own outcome (a result or an exception) and, when more items queued meanwhile,
makes the first of their callers the next leader. With one caller at a time nothing waits on
anything: the leader runs its own item at once, in its own thread (no hand-off to a committing
thread, whose wake-ups would cost every instance on a single association).

A caller announces its item early (:meth:`GroupCommit.expect`, when it starts the work that
precedes submitting: hashing, the header parse, the file's fsync); a leader waits up to
``max_wait`` seconds for announced items to be submitted before it runs the batch, so that the
associations in flight share the commit instead of forming a queue of batches of one.

Each caller gets exactly its own outcome; how a batch's failure is split among its items is the
batch function's business (:class:`~integrations.dicom.ingest.Ingestor`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Waiter(Generic[T, R]):
    item: T
    done: bool = False
    lead: bool = False
    result: R | None = None
    error: BaseException | None = None
    event: threading.Event = field(default_factory=threading.Event)


class GroupCommit(Generic[T, R]):
    """Batches concurrent :meth:`submit` calls through ``run``, one batch at a time.

    ``run`` gets the items of a batch in submission order and returns one outcome per item, in
    the same order: a result, or the exception that item's caller must raise. If ``run`` itself
    raises, every caller of the batch raises that exception.
    """

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R | BaseException]], *, max_wait: float = 0.002,
                 max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_wait = max_wait
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a leader waits here for announced items
        self._queue: list[_Waiter[T, R]] = []
        self._leading = False
        self._expected = 0
        #: batches run and items committed (the tests check that commits are shared)
        self.batches = 0
        self.items = 0

    def expect(self) -> None:
        """Announce an item that will be submitted (``submit(..., expected=True)``) or given up
        (:meth:`unexpect`)."""
        with self._lock:
            self._expected += 1

    def unexpect(self) -> None:
        """The announced item will not come (its preparation failed)."""
        with self._lock:
            self._expected -= 1
            self._arrived.notify_all()

    def submit(self, item: T, *, expected: bool = False) -> R:
        """Commit ``item`` with whatever else is queued; returns its result or raises its error."""
        me: _Waiter[T, R] = _Waiter(item)
        with self._lock:
            if expected:
                self._expected -= 1
            self._queue.append(me)
            self._arrived.notify_all()
            lead = not self._leading
            self._leading = True
        if not lead:
            me.event.wait()
            if me.done:
                return self._outcome(me)
            # promoted: the previous leader finished and we are first in the queue
        self._lead(me)
        return self._outcome(me)

    def _lead(self, me: _Waiter[T, R]) -> None:
        with self._lock:
            deadline = time.monotonic() + self.max_wait
            while self._expected > 0 and len(self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        assert batch and batch[0] is me, "the leader's own item heads its batch"
        try:
            outcomes = list(self._run([w.item for w in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as err:  # every caller hears of it, then the leader's thread too
            outcomes = [err] * len(batch)
        with self._lock:
            self.batches += 1
            self.items += len(batch)
            for w, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    w.error = outcome
                else:
                    w.result = outcome
                w.done = True
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._leading = False
            else:
                nxt.lead = True
        for w in batch[1:]:
            w.event.set()
        if nxt is not None:
            nxt.event.set()

    @staticmethod
    def _outcome(w: _Waiter[T, R]) -> R:
        if w.error is not None:
            raise w.error
        return w.result  # type: ignore[return-value]
