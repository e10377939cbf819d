"""What the pre-forked receiving processes of one listener share (``listener.processes`` > 1): how
many connections and associations each holds, in memory that ``fork`` leaves shared.

Every process accepts on the same listening socket, and whichever wakes first takes the
connection. Left to that race, four parallel CT associations landed all in one process (bound by
the GIL to one core) in 2 runs of 6 on 2 cores, counting each process's threads, and a test
opening four one after the other found all four in one process. So a process that holds more
connections than another lets that one accept first (:meth:`Shares.yield_accept`), for
``scp.YIELD_ACCEPT_SECONDS`` at most, in case the other is busy. Four CT associations, median of
7 alternating runs: 334/s against 296/s before (bench/README.md).

``listener.max_associations`` is the listener's as a whole, not each process's: a process takes
an association only while all processes together hold fewer (:meth:`Shares.take_association`).

Each process writes its own slot only (its pid, connections, associations), each count under the
lock that guards it in that process and without touching the other, and reads the others' without
a lock: a count read a moment late makes a balancing choice a
little worse, never wrong. Taking the last association slot is optimistic (count, then check the
total): two processes taking it at the same instant may both refuse, never both accept, and a
refused sender retries (A-ASSOCIATE-RJ, rejected-transient). The parent clears the slot of a
receiving process that died (:meth:`Shares.clear`), whose connections died with it.
"""

from __future__ import annotations

import mmap
import os
import struct

_SLOT = struct.Struct("<qqq")  # pid, connections, associations
_FIELD = struct.Struct("<q")
_CONNECTIONS, _ASSOCIATIONS = 1, 2


class Shares:
    """One slot per receiving process; make it before forking, then :meth:`become` in each child."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"a listener has at least one receiving process, not {processes}")
        self.processes = processes
        # anonymous and MAP_SHARED (mmap's default): the children's writes are the parent's
        self._mem = mmap.mmap(-1, _SLOT.size * processes)
        self.index = 0
        self._write(0, (os.getpid(), 0, 0))

    def become(self, index: int) -> None:
        """This process is receiver ``index`` (0 is the parent; a forked child calls this first)."""
        if not 0 <= index < self.processes:
            raise ValueError(f"receiver {index} of {self.processes}")
        self.index = index
        self._write(index, (os.getpid(), 0, 0))

    def pid(self, index: int) -> int:
        """The process that last became receiver ``index`` (0 before one did, or once cleared)."""
        return self._read(index)[0]

    def clear(self, index: int) -> None:
        """Forget receiver ``index``'s connections (it exited; its sockets closed with it)."""
        self._write(index, (0, 0, 0))

    def _read(self, index: int) -> tuple[int, int, int]:
        pid, connections, associations = _SLOT.unpack_from(self._mem, _SLOT.size * index)
        return pid, connections, associations

    def _write(self, index: int, slot: tuple[int, int, int]) -> None:
        _SLOT.pack_into(self._mem, _SLOT.size * index, *slot)

    def _set(self, field: int, value: int) -> None:
        # this one field only: the connections and the associations of one process are counted
        # under two different locks (the server's, the slots'), so rewriting the whole slot from
        # a copy read a moment earlier could undo the other count's update
        _FIELD.pack_into(self._mem, _SLOT.size * self.index + _FIELD.size * field, value)

    # -- connections: who accepts the next one ------------------------------------------------
    def set_connections(self, count: int) -> None:
        """Publish how many connections this process holds (call under the process's own lock)."""
        self._set(_CONNECTIONS, count)

    def yield_accept(self) -> bool:
        """True when another live receiver holds fewer connections than this one: it should take
        the pending connection."""
        mine = self._read(self.index)[_CONNECTIONS]
        for i in range(self.processes):
            pid, connections, _ = self._read(i)
            if i != self.index and pid and connections < mine:
                return True
        return False

    def connections(self) -> list[int]:
        """Connections per receiver (0 for one that has not started or has exited)."""
        return [self._read(i)[_CONNECTIONS] for i in range(self.processes)]

    # -- associations: the listener's limit ---------------------------------------------------
    def take_association(self, limit: int) -> bool:
        """Count one more association in this process unless all together already hold ``limit``
        (call under the process's own lock)."""
        mine = self._read(self.index)[_ASSOCIATIONS]
        self._set(_ASSOCIATIONS, mine + 1)
        if sum(self._read(i)[_ASSOCIATIONS] for i in range(self.processes)) > limit:
            self._set(_ASSOCIATIONS, mine)
            return False
        return True

    def give_association(self) -> None:
        self._set(_ASSOCIATIONS, max(0, self._read(self.index)[_ASSOCIATIONS] - 1))

    def associations(self) -> int:
        """Associations all receivers hold together."""
        return sum(self._read(i)[_ASSOCIATIONS] for i in range(self.processes))
