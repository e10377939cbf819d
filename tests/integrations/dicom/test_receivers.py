"""The receiving processes' supervisor (integrations.dicom.receivers): real forks, real signals."""

from __future__ import annotations

import builtins
import ctypes
import errno
import itertools
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from integrations.dicom.receivers import (
    FIRST_DELAY_SECONDS,
    MAX_DELAY_SECONDS,
    STEADY_SECONDS,
    exited,
    reap,
    restart_delay,
    start_supervisor,
)
from tests.factories.listener import alive, children

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")


@linux_only
def test_a_process_that_runs_is_not_exited_a_zombie_or_a_reaped_one_is_and_reap_collects_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the listener waits on before removing a dead receiver's files: a zombie (exited, its
    reaper not yet come) runs no more code, so its files can go."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    assert not exited(pid)
    # without /proc (macOS, or not mounted) a process kill(0) finds is running, not gone
    real_isdir, real_open = os.path.isdir, builtins.open

    def no_proc_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os.path, "isdir", lambda path: not str(path).startswith("/proc") and real_isdir(path))
    monkeypatch.setattr(builtins, "open", no_proc_open)
    assert not exited(pid)
    monkeypatch.undo()
    os.close(write)  # the child reads EOF and exits; unreaped, it is a zombie
    deadline = time.monotonic() + 5
    while not exited(pid):
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert os.path.exists(f"/proc/{pid}")  # a zombie, not reaped by anyone else
    assert reap(pid)
    assert not os.path.exists(f"/proc/{pid}")
    assert exited(pid)
    assert reap(pid)  # not a child any more: nothing left to collect


_SYS_EXIT = {"x86_64": 60, "aarch64": 93}  # exit(2): the calling thread only (os._exit ends them all)


@pytest.mark.skipif(os.uname().machine not in _SYS_EXIT, reason="exit(2)'s number is known for x86_64 and aarch64")
def test_a_process_whose_first_thread_exited_reads_as_a_zombie_but_is_collected_once_all_its_threads_are() -> None:
    """A SIGKILLed receiver's threads go one by one: its first thread is a zombie (``exited``)
    a moment before the others are gone, and until then waitpid cannot collect it. The listener
    collecting a killed supervisor's orphans (PID 1) took one such try as done, and the process
    stayed a zombie; ``reap`` now says to try again."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first thread leaves; another waits on the pipe, then the process ends
        try:
            os.close(write)
            threading.Thread(target=lambda: os.read(read, 1)).start()
            ctypes.CDLL(None, use_errno=True).syscall(_SYS_EXIT[os.uname().machine], 0)
        finally:
            os._exit(1)  # never back into pytest (had the thread or the call failed)
    os.close(read)
    try:
        deadline = time.monotonic() + 5
        while not exited(pid):
            assert time.monotonic() < deadline, "the child's first thread did not exit"
            time.sleep(0.01)
        assert not reap(pid)  # its other thread runs on: not collectable yet
    finally:
        os.close(write)  # that thread reads EOF; the process ends
    deadline = time.monotonic() + 5
    while not reap(pid):
        assert time.monotonic() < deadline, "the child was never collected"
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_receiver_that_dies_young_waits_longer_each_time_one_that_ran_is_replaced_at_once() -> None:
    delays = [0.0]
    for _ in range(8):
        delays.append(restart_delay(0.2, delays[-1]))
    assert delays[1:] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_DELAY_SECONDS, MAX_DELAY_SECONDS]
    assert delays[1] == FIRST_DELAY_SECONDS
    assert restart_delay(STEADY_SECONDS, 32.0) == 0.0  # it ran: whatever killed it was not its start
    assert restart_delay(STEADY_SECONDS - 1, 0.0) == FIRST_DELAY_SECONDS


def _stop(supervisor: int) -> int:
    os.kill(supervisor, signal.SIGTERM)
    _, status = os.waitpid(supervisor, 0)
    return os.waitstatus_to_exitcode(status)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@linux_only
def test_receivers_are_forked_named_ready_and_stopped_with_the_supervisor(tmp_path: Path) -> None:
    def serve(index: int, ready: int | None) -> NoReturn:
        (tmp_path / f"{index}.{os.getpid()}").write_text(str(os.getppid()))
        assert ready is not None
        os.write(ready, b"1")
        while True:
            time.sleep(1)

    cleared: list[int] = []
    sup, readies = start_supervisor(serve, [1, 2], on_exit=lambda index, pid: cleared.append(index))
    try:
        for fd in readies:
            assert select.select([fd], [], [], 10)[0]
            assert os.read(fd, 1) == b"1"
            os.close(fd)
        assert Path(f"/proc/{sup}/comm").read_text().strip() == "taqrir-sup"
        kids = children(sup)
        assert sorted(Path(f"/proc/{k}/comm").read_text().strip() for k in kids) == ["taqrir-rcv1", "taqrir-rcv2"]
        assert {p.name for p in tmp_path.iterdir()} == {f"1.{kids[0]}", f"2.{kids[1]}"} or \
            {p.name for p in tmp_path.iterdir()} == {f"1.{kids[1]}", f"2.{kids[0]}"}
        assert all(p.read_text() == str(sup) for p in tmp_path.iterdir())
    finally:
        assert _stop(sup) == 0
    assert not any(map(alive, kids))  # SIGTERM to the supervisor stops its receivers too


@linux_only
def test_a_receiver_that_fails_before_it_is_ready_closes_its_pipe(tmp_path: Path) -> None:
    """Each receiver closes the other receivers' ready pipes: one holding another's open would
    leave the listener waiting 30 s for a receiver that had already failed."""
    def serve(index: int, ready: int | None) -> NoReturn:
        if index == 2:
            raise RuntimeError("cannot open its journal")
        assert ready is not None
        os.write(ready, b"1")
        while True:
            time.sleep(1)

    sup, readies = start_supervisor(serve, [1, 2], on_exit=lambda index, pid: None)
    try:
        answers = []
        for fd in readies:
            assert select.select([fd], [], [], 5)[0], "a failed receiver's pipe stayed open"
            answers.append(os.read(fd, 1))
            os.close(fd)
        assert sorted(answers) == [b"", b"1"]
    finally:
        _stop(sup)


@linux_only
@pytest.mark.parametrize("waiting", ["sigtimedwait", "polling"])
def test_a_killed_receiver_is_replaced_and_its_slot_cleared(tmp_path: Path, waiting: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Also where there is no ``sigtimedwait`` (macOS): the supervisor polls what is pending."""
    if waiting == "polling":
        monkeypatch.delattr(signal, "sigtimedwait")
    exits = tmp_path / "exits"

    def serve(index: int, ready: int | None) -> NoReturn:
        if ready is not None:
            os.write(ready, b"1")
        while True:
            time.sleep(1)

    def on_exit(index: int, pid: int) -> None:  # runs in the supervisor
        with exits.open("a") as f:
            f.write(f"{index} {pid}\n")

    sup, readies = start_supervisor(serve, [1], on_exit=on_exit)
    try:
        assert select.select(readies, [], [], 10)[0]
        os.close(readies[0])
        (first,) = children(sup)
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: exits.is_file() and exits.read_text() == f"1 {first}\n")
        started = time.monotonic()
        _wait_for(lambda: len(children(sup)) == 1 and children(sup)[0] != first)
        # it died young: replaced after the first delay, not at once and not much later
        assert FIRST_DELAY_SECONDS * 0.8 < time.monotonic() - started < FIRST_DELAY_SECONDS + 2
        (second,) = children(sup)
        _wait_for(lambda: Path(f"/proc/{second}/comm").read_text().strip() == "taqrir-rcv1")
    finally:
        _stop(sup)


@linux_only
def test_a_receiver_that_cannot_start_is_not_forked_in_a_loop(tmp_path: Path) -> None:
    forks = tmp_path / "forks"

    def serve(index: int, ready: int | None) -> NoReturn:
        with forks.open("a") as f:
            f.write(f"{time.monotonic()}\n")
        os._exit(3)

    sup, readies = start_supervisor(serve, [1], on_exit=lambda index, pid: None)
    try:
        time.sleep(3.6)  # forks at about 0, 1 and 3 s
        assert alive(sup)
        times = [float(t) for t in forks.read_text().split()]
    finally:
        assert _stop(sup) == 0
        os.close(readies[0])
    assert len(times) == 3, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.8 < gaps[0] < 1.6 and 1.8 < gaps[1] < 2.6, gaps


@linux_only
def test_the_supervisor_and_its_receivers_die_with_the_listener(tmp_path: Path) -> None:
    """A listener killed with SIGKILL leaves no process holding its port or a journal segment:
    the supervisor dies with it, and the receivers with the supervisor."""
    pids = tmp_path / "pids"
    r, w = os.pipe()
    listener = os.fork()
    if listener == 0:
        code = 0
        try:
            def serve(index: int, ready: int | None) -> NoReturn:
                while True:
                    time.sleep(1)

            sup, _ = start_supervisor(serve, [1, 2], on_exit=lambda index, pid: None)
            pids.write_text(str(sup))
            os.write(w, b"1")
            while True:
                time.sleep(1)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert select.select([r], [], [], 10)[0]
        sup = int(pids.read_text())
        _wait_for(lambda: len(children(sup)) == 2)
        tree = [sup, *children(sup)]
    finally:
        os.kill(listener, signal.SIGKILL)
        os.waitpid(listener, 0)
        os.close(r)
    _wait_for(lambda: not any(map(alive, tree)), timeout=1.0)


@linux_only
@pytest.mark.parametrize("trouble", ["real-time signal", "fork fails"])
def test_the_supervisor_outlives_a_receiver_s_odd_death_and_a_failed_fork(
        tmp_path: Path, trouble: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed by a real-time signal (which has no name), or replaced while fork() fails (EAGAIN at
    a service's task limit): the supervisor used to raise, exit, and take every receiver with it.
    It now goes on and forks the replacement when it can."""
    real_fork, test_process = os.fork, os.getpid()
    fail = tmp_path / "fail-the-next-fork"

    def fork() -> int:  # in the supervisor only (the test's process forks the supervisor itself)
        if os.getpid() != test_process and fail.exists():
            fail.unlink()
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)

    def serve(index: int, ready: int | None) -> NoReturn:
        if ready is not None:
            os.write(ready, b"1")
        while True:
            time.sleep(1)

    sup, readies = start_supervisor(serve, [1], on_exit=lambda index, pid: None)
    try:
        assert select.select(readies, [], [], 10)[0]
        os.close(readies[0])
        (first,) = children(sup)
        if trouble == "fork fails":
            fail.touch()
            os.kill(first, signal.SIGKILL)
        else:
            os.kill(first, signal.SIGRTMIN + 6)
        _wait_for(lambda: first not in children(sup))
        _wait_for(lambda: len(children(sup)) == 1, timeout=8.0)  # 1 s, and 2 s more after a failed fork
        assert alive(sup)
        assert not fail.exists()  # the failing fork was tried
    finally:
        assert _stop(sup) == 0
