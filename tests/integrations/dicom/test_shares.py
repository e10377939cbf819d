"""What pre-forked receiving processes share (integrations.dicom.shares), across a real fork."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from integrations.dicom.shares import Shares


def _in_child(shares: Shares, index: int, *steps: str) -> int:
    """Fork receiver ``index``, do ``steps`` there, exit; returns what the last step answered
    (1 for True) as the child's exit status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            shares.become(index)
            for step in steps:
                if step == "take":
                    code = int(shares.take_association(limit=3))
                elif step.startswith("connections="):
                    shares.set_connections(int(step.split("=")[1]))
                elif step == "yield":
                    code = int(shares.yield_accept())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="receiving processes are forked")
def test_a_child_s_counts_are_the_parent_s_to_read() -> None:
    shares = Shares(3)
    _in_child(shares, 1, "connections=2")
    _in_child(shares, 2, "connections=1")
    assert shares.connections() == [0, 2, 1]
    # the parent holds none: it takes the next connection, the others leave it to it
    assert not shares.yield_accept()
    assert _in_child(shares, 1, "connections=2", "yield") == 1
    shares.set_connections(1)
    assert _in_child(shares, 2, "connections=1", "yield") == 0  # nobody holds fewer than one


@pytest.mark.skipif(not hasattr(os, "fork"), reason="receiving processes are forked")
def test_max_associations_counts_every_process() -> None:
    shares = Shares(3)
    assert shares.take_association(limit=3) and shares.take_association(limit=3)
    assert _in_child(shares, 1, "take") == 1  # the third of three
    assert shares.associations() == 3
    assert _in_child(shares, 2, "take") == 0  # a fourth, in any process, is refused
    assert not shares.take_association(limit=3)
    assert shares.associations() == 3
    shares.give_association()
    assert shares.take_association(limit=3)


def test_an_exited_receiver_no_longer_counts() -> None:
    shares = Shares(2)
    _in_child(shares, 1, "take", "connections=5")
    assert shares.associations() == 1 and shares.connections() == [0, 5]
    shares.set_connections(3)
    shares.clear(1)  # the parent saw it exit
    assert shares.associations() == 0 and shares.connections() == [3, 0]
    assert not shares.yield_accept()  # a slot nobody holds is not a process to leave connections to


def test_at_least_one_process() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Shares(0)
    with pytest.raises(ValueError, match="receiver 2 of 2"):
        Shares(2).become(2)


def test_connections_and_associations_counted_at_once_in_one_process_lose_neither() -> None:
    """In one process, the accepting thread publishes connections under the server's lock while an
    association's thread counts associations under the slots' lock: neither may undo the other.
    Before, each rewrote the whole slot from a copy read a moment earlier, so a connection count
    published in between was put back, or an association given back was counted again (a slot
    leaked for ever: the listener then refused associations it had room for)."""
    shares = Shares(2)
    rounds = 100_000
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the interpreter lock over between almost any two bytecodes
    try:
        def connections() -> None:
            for i in range(rounds):
                shares.set_connections(i % 7)
            shares.set_connections(5)

        def associations() -> None:
            for _ in range(rounds):
                assert shares.take_association(limit=10)
                shares.give_association()
            assert shares.take_association(limit=10)

        threads = [threading.Thread(target=connections), threading.Thread(target=associations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert shares.connections() == [5, 0]
    assert shares.associations() == 1
