"""Settings of the DICOM listener and of study stability (composed into the roof's settings as
``listener`` and ``study``: ``TAQRIR_LISTENER__PORT``, ``TAQRIR_STUDY__STABLE_AFTER``, ...)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

#: the most receiving processes ``taqrir listen`` starts by itself (:func:`receiving_processes`)
AUTO_PROCESSES_MAX = 4


class ListenerSettings(BaseModel):
    """The DICOM Storage SCP (``taqrir listen``)."""

    ae_title: str = Field("TAQRIR", max_length=16, description="Our AE title, as PACS admins configure it.")
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(11112, ge=0, le=65535, description="TCP port (0 picks a free one, tests only).")
    allowed_calling_aes: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty allows any.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Peer IP addresses or CIDR networks allowed to connect; empty allows any.",
    )
    max_associations: int = Field(
        16, ge=1,
        description="Concurrent associations before refusing, all receiving processes together.",
    )
    max_pdu: int = Field(
        131072,
        ge=0,
        description="Maximum PDU length we advertise; 128 KiB measured +22% over 16 KiB.",
    )
    network_timeout: float = Field(30.0, gt=0, description="Seconds of silence before dropping a peer.")
    acse_timeout: float = Field(15.0, gt=0, description="Seconds to finish association negotiation.")
    dimse_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a DIMSE message.")
    stop_timeout: float = Field(
        30.0,
        ge=0,
        description=(
            "Seconds a stopping listener (SIGTERM, Ctrl-C) lets running associations finish while "
            "it refuses new connections; those still running then are cut (their unanswered "
            "instances are the sender's to send again). A service manager's stop timeout "
            "(systemd's TimeoutStopSec, 90 s by default) must be longer."
        ),
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: set with tls_key to require TLS.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    tls_ca: Path | None = Field(None, description="CA bundle: when set, peers must present a certificate.")
    min_free_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description="Below this free space in storage, C-STORE answers 0xA700 and new associations are refused.",
    )
    max_sequence_depth: int = Field(
        64, ge=1, description="Datasets nesting sequences deeper are refused as unparseable."
    )
    group_commit_wait: float = Field(
        0.002,
        ge=0,
        le=0.1,
        description=(
            "Seconds a group commit waits for instances other associations are preparing, so that "
            "they share one index transaction and disk flush (never waited for with one association)."
        ),
    )
    spool_max_bytes: int = Field(
        256 * 1024,
        ge=0,
        le=1 << 20,
        description=(
            "Instances up to this size are written into the index's commit (its one flush makes them "
            "durable) and their files made durable after the acknowledgement, instead of three flushes "
            "before it (integrations.dicom.spool); 0 turns the spool off. At most 1 MiB: only instances "
            "kept in memory can be spooled."
        ),
    )
    intake_journal: bool = Field(
        True,
        description=(
            "Answer an instance once it is durable in the intake journal (up to spool_max_bytes: its "
            "bytes, one append and flush; larger: its file in place, then a record of its key) and index "
            "it right after the answer, in batches; the association's release waits for its instances "
            "to be indexed (integrations.dicom.intake). Off: instances are answered after their index "
            "commit (small ones through the spool)."
        ),
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Receiving processes of `taqrir listen` sharing the listening socket (pre-forked, "
            "Linux/Unix only). One process is bound by the GIL to about one core; more let parallel "
            "associations use more cores. Unset: one per CPU core the listener may use, at most "
            f"{AUTO_PROCESSES_MAX} (receiving_processes). A listener embedded in another program (the "
            "demo) receives in that program's process. Parallel associations are spread evenly over the "
            "processes, and max_associations counts all of them together."
        ),
    )


def receiving_processes(configured: int | None, cores: int | None = None) -> int:
    """How many receiving processes ``taqrir listen`` runs: ``listener.processes`` when set, else
    one per CPU core this process may run on (``cores``; read from the scheduler's affinity when
    None), at most :data:`AUTO_PROCESSES_MAX`: every process's index transaction takes the one
    index lock, so processes past the cores only add contention (measured on 2 cores, bench/README.md)."""
    if configured is not None:
        return configured
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(cores, AUTO_PROCESSES_MAX))


class StudySettings(BaseModel):
    """Study lifecycle."""

    stable_after: float = Field(
        30.0, gt=0, description="Seconds without a new instance after which a study is stable."
    )
    sweep_interval: float = Field(5.0, gt=0, description="Seconds between stability sweeps.")
