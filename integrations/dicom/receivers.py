"""The pre-forked receiving processes of ``taqrir listen`` (``listener.processes`` > 1), kept at
their number by a supervisor process.

A receiving process can die while the listener goes on: the kernel's OOM killer picks the
largest process, a C extension crashes, an operator kills the wrong pid. Before, the listener
then ran with one process fewer until it was restarted, and nothing but a log line said so.

Forking a replacement from the running listener is unsafe: its threads (associations, the
indexer, the spare-file pool, the database pool) may hold locks at the moment of the fork, and
the child would inherit them held for ever. So the listener forks one *supervisor* before it
starts any thread or opens any database connection, and the supervisor forks the receivers: it
stays single-threaded and never touches the database, so every fork from it, the first ones and
each replacement, starts from the state the first fork had. When a receiver exits, the
supervisor clears its slot in :mod:`.shares` (its connections died with it) and forks another in
its place; the listener's sweep files again what the dead one's intake journal segment holds
(:mod:`.intake`). The supervisor also removes the dead one's partial transfers and spare files
(the listener's ``on_exit``): what it had not answered is sent again, and what it had answered is
in its journal segment or in place.

A receiver that dies young (within :data:`STEADY_SECONDS` of its start) is replaced after a delay
that doubles each time (:func:`restart_delay`, from 1 s up to 60 s), so one that cannot start
(its journal folder unwritable, say) is not forked in a loop, and one that ran for a while is
replaced at once. The chain of lifetimes is the kernel's: the supervisor dies with the listener
and each receiver with the supervisor (``PR_SET_PDEATHSIG``), so a killed listener leaves no
process holding its port or a journal segment. The supervisor and each receiver name themselves
(``taqrir-sup``, ``taqrir-rcv1``...; what ``top`` and ``ps -o comm`` show) so that an operator
can tell them apart.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

log = logging.getLogger(__name__)

#: A receiver that ran at least this long is replaced at once when it exits.
STEADY_SECONDS = 60.0
#: The first and the longest delay before a young receiver's replacement.
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 60.0

_PR_SET_NAME = 15  # <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
_SUPERVISED = {signal.SIGCHLD, signal.SIGTERM}


def _prctl(option: int, value: int | bytes) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this (forked) process the moment its parent dies. A process
    outliving a killed listener kept the listening port and its intake journal segment locked, so
    a restart could neither bind nor replay that segment at once; elsewhere each process's
    parent watch (polling every second) ends it."""
    if sys.platform.startswith("linux") and not _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)):
        log.warning("could not ask to be stopped with the parent process; polling instead")


def name_process(name: str) -> None:
    """The process's name as ``top`` and ``ps -o comm`` show it (Linux; 15 bytes at most)."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def restart_delay(lifetime: float, previous: float) -> float:
    """Seconds to wait before replacing a receiver that exited after ``lifetime`` seconds, when
    the one before it in that slot was replaced after ``previous`` seconds (0 for the first)."""
    if lifetime >= STEADY_SECONDS:
        return 0.0
    return min(MAX_DELAY_SECONDS, max(FIRST_DELAY_SECONDS, 2 * previous))


#: Runs receiver ``index`` in a freshly forked process (named, tied to the supervisor's life, other
#: signals as the listener had them), writing a byte to ``ready`` (a pipe's write end, or None for
#: a replacement) once it serves; never returns.
Serve = Callable[[int, int | None], NoReturn]


@dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    delay: float = 0.0
    due: float | None = None  # when its replacement is forked (monotonic)


class Supervisor:
    """The supervisor's side: fork receivers, replace those that exit, stop them all on SIGTERM.
    Built and run in the forked supervisor process (:func:`start_supervisor`)."""

    def __init__(self, serve: Serve, indexes: list[int], *, on_exit: Callable[[int, int], None],
                 parent: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.serve = serve
        self.on_exit = on_exit
        self.parent = parent
        self.clock = clock
        self.slots = {index: _Slot() for index in indexes}
        self._mask: set[int | signal.Signals] = set()
        #: ready pipes (write ends) of the first receivers not forked yet: a receiver closes the
        #: others' (holding one open, it would hide that receiver's failure from the listener)
        self._readies: dict[int, int] = {}

    def fork(self, index: int) -> int:
        """Fork receiver ``index``, handing it its ready pipe if it is one of the first. A fork
        that fails (EAGAIN at the service's task limit, ENOMEM) is tried again later, as a
        receiver that died young would be, and returns 0; the supervisor goes on."""
        supervisor = os.getpid()
        ready = self._readies.pop(index, None)
        try:
            pid = os.fork()
        except OSError as err:
            if ready is not None:
                os.close(ready)  # the listener stops waiting for this one
            slot = self.slots[index]
            slot.delay = restart_delay(0.0, slot.delay)
            slot.due = self.clock() + slot.delay
            log.error("could not fork receiving process %d (%s); trying again in %.0f s", index, err, slot.delay)
            return 0
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until serve sets its own
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
                name_process(f"taqrir-rcv{index}")
                die_with_parent()
                if os.getppid() != supervisor:  # it died before we asked
                    os._exit(0)
                for other in self._readies.values():
                    os.close(other)
                threading.Thread(target=_exit_with_parent, args=(supervisor,), name="parent-watch",
                                 daemon=True).start()
                self.serve(index, ready)
            except BaseException:
                log.exception("receiving process %d failed", os.getpid())
                code = 1
            finally:
                os._exit(code)
        if ready is not None:
            os.close(ready)
        slot = self.slots[index]
        slot.pid, slot.started, slot.due = pid, self.clock(), None
        log.info("receiving process %d started", pid)
        return pid

    def reap(self) -> None:
        """Collect receivers that exited; schedule each one's replacement."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            for index, slot in self.slots.items():
                if slot.pid == pid:
                    now = self.clock()
                    slot.pid = 0
                    slot.delay = restart_delay(now - slot.started, slot.delay)
                    slot.due = now + slot.delay
                    self.on_exit(index, pid)
                    log.warning("receiving process %d exited (%s); replacing it in %.0f s", pid,
                                _describe(status), slot.delay)

    def replace_due(self) -> None:
        now = self.clock()
        for index, slot in self.slots.items():
            if slot.due is not None and slot.due <= now:
                self.fork(index)

    def next_wait(self) -> float:
        """Seconds until the next replacement is due, at most 1 (the parent check's period)."""
        now = self.clock()
        dues = [slot.due - now for slot in self.slots.values() if slot.due is not None]
        return max(0.0, min([1.0, *dues]))

    def stop(self) -> None:
        for slot in self.slots.values():
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for slot in self.slots.values():
            if slot.pid:
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass
                slot.pid = 0

    def run(self, readies: dict[int, int]) -> NoReturn:
        """Fork the receivers (each told to say it is ready on its pipe in ``readies``), then keep
        them at their number until SIGTERM or until the listener is gone."""
        code = 0
        try:
            name_process("taqrir-sup")
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the listener, which stops us
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
            die_with_parent()
            self._readies = dict(readies)
            for index in self.slots:
                self.fork(index)
            while os.getppid() == self.parent:
                if _wait_signal(self.next_wait()) == signal.SIGTERM:
                    break
                try:
                    self.reap()
                    self.replace_due()
                except Exception:  # its receivers die with it: keep supervising them
                    log.exception("the receiving processes' supervisor hit an error; going on")
                    time.sleep(1.0)
            self.stop()
        except BaseException:
            log.exception("the receiving processes' supervisor failed")
            code = 1
        finally:
            os._exit(code)


def _wait_signal(timeout: float) -> int | None:
    """Take one of the (blocked) supervised signals, waiting ``timeout`` seconds at most."""
    if hasattr(signal, "sigtimedwait"):
        received = signal.sigtimedwait(_SUPERVISED, timeout)
        return None if received is None else received.si_signo
    time.sleep(timeout)  # macOS has no sigtimedwait: look at what is pending once a second
    pending = signal.sigpending() & _SUPERVISED
    if not pending:
        return None
    return signal.sigwait({signal.SIGTERM} if signal.SIGTERM in pending else pending)


def _exit_with_parent(parent: int) -> None:
    """The fallback of :func:`die_with_parent` (a thread of a receiver): end once orphaned."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def exited(pid: int) -> bool:
    """Process ``pid`` is gone, or is a zombie waiting for its reaper (it runs no more code). A
    pid taken since by a process of another user also reads as gone; one taken by a process of
    ours reads as running (the safe side: whatever waits for it waits on). Without /proc (macOS,
    or not mounted), a process that ``kill(pid, 0)`` finds reads as running, zombie or not."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return True
    if not os.path.isdir("/proc/self"):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):  # it went between the two looks
        return True


def reap(pid: int) -> bool:
    """Collect the exit status of ``pid`` if it is a child of ours that has exited: orphans are
    given to PID 1, so a listener running as PID 1 (a container without an init) inherits its
    killed supervisor's receivers, which stayed zombies. True once nothing of ``pid`` is left to
    collect here (collected now, or not a child of ours); False while a child of ours is still
    exiting: a multi-threaded process's first thread reads as a zombie (:func:`exited`) before
    its other threads are gone, and cannot be collected until they are, so ask again."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {number}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def start_supervisor(serve: Serve, indexes: list[int], *,
                     on_exit: Callable[[int, int], None]) -> tuple[int, list[int]]:
    """Fork the supervisor of receivers ``indexes`` (call with no other thread running and no
    database connection open). ``on_exit(index, pid)`` runs in the supervisor when receiver
    ``index`` (process ``pid``) has exited, before its replacement is forked. Returns its pid
    and one pipe read end per receiver that becomes readable (a byte, or closed if it failed)
    once that receiver serves."""
    parent = os.getpid()
    pipes = {index: os.pipe() for index in indexes}
    pid = os.fork()
    if pid == 0:
        for r, _ in pipes.values():
            os.close(r)
        Supervisor(serve, indexes, on_exit=on_exit, parent=parent).run({i: w for i, (_, w) in pipes.items()})
    for _, w in pipes.values():
        os.close(w)
    return pid, [r for r, _ in pipes.values()]
