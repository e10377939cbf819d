"""The listener's settings that are decided, not just read: how many receiving processes."""

from __future__ import annotations

import pytest

from integrations.dicom.config import AUTO_PROCESSES_MAX, ListenerSettings, receiving_processes


@pytest.mark.parametrize(("configured", "cores", "expected"), [
    (None, 1, 1),
    (None, 2, 2),
    (None, 64, AUTO_PROCESSES_MAX),  # more processes than this contend for the one index lock
    (1, 16, 1),  # set is set, whatever the cores
    (8, 2, 8),
])
def test_receiving_processes(configured: int | None, cores: int, expected: int) -> None:
    assert receiving_processes(configured, cores) == expected


def test_unset_processes_read_the_cores_this_process_may_use() -> None:
    assert ListenerSettings().processes is None
    assert 1 <= receiving_processes(None) <= AUTO_PROCESSES_MAX


def test_processes_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ListenerSettings(processes=0)
