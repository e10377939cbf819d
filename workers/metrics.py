"""Pipeline metrics in Prometheus format, read from the database at scrape time.

The database is the source of truth across hosts, so counts come from it rather than from
per-process counters: studies by state (queue depth is ``stable``+``queued``+``rendering``+``inferring``),
drafts made, time spent per stage (from the stage times each draft records), and the export outbox
per destination.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import select

from ground.db import session_scope
from integrations.dicom.index import Instance, Study, StudyState
from integrations.dicom.outbox import OutboxState, counts
from reporting.draft_record import DraftRecord

STAGES = ("queue_s", "render_s", "infer_s", "persist_s", "publish_s")


class PipelineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
        with session_scope(self.engine) as s:
            by_state = dict(s.exec(select(Study.state, func.count()).group_by(Study.state)).all())
            instances = s.exec(select(func.count()).select_from(Instance)).one()
            drafts = s.exec(select(DraftRecord.stage_times)).all()
        studies = GaugeMetricFamily("taqrir_studies", "Studies by pipeline state", labels=["state"])
        for state in StudyState:
            studies.add_metric([state.value], by_state.get(state.value, 0))
        yield studies
        yield GaugeMetricFamily("taqrir_queue_depth", "Studies stable, queued or inside drafting",
                                value=sum(by_state.get(k, 0) for k in ("stable", "queued", "rendering", "inferring")))
        yield CounterMetricFamily("taqrir_instances_received", "Instances in the index", value=instances)
        yield CounterMetricFamily("taqrir_drafts", "Drafts made", value=len(drafts))
        yield CounterMetricFamily("taqrir_studies_failed", "Study versions that ended in failed",
                                  value=by_state.get("failed", 0))
        stage = SummaryMetricFamily("taqrir_stage_seconds", "Seconds spent per pipeline stage", labels=["stage"])
        for name in STAGES:
            values = [json.loads(t).get(name) for t in drafts]
            values = [v for v in values if isinstance(v, (int, float))]
            stage.add_metric([name.removesuffix("_s")], count_value=len(values), sum_value=sum(values))
        yield stage


class ExportCollector(Collector):
    """The outbox per destination: rows by state (``dead`` needs a person; ``failed`` is
    retrying) and attempts made, so an alert can fire on a destination that stopped taking."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with session_scope(self.engine) as s:
            by = counts(s)
        objects = GaugeMetricFamily("taqrir_export_objects", "Outbox rows by destination and state",
                                    labels=["destination", "state"])
        attempts = CounterMetricFamily("taqrir_export_attempts", "C-STORE attempts made, by destination",
                                       labels=["destination"])
        for dest in sorted({d for d, _ in by}):
            for state in OutboxState:
                objects.add_metric([dest, state.value], by.get((dest, state.value), (0, 0))[0])
            attempts.add_metric([dest], sum(a for (d, _), (_n, a) in by.items() if d == dest))
        yield objects
        yield attempts


def render_metrics(engine: Engine) -> bytes:
    registry = CollectorRegistry()
    registry.register(PipelineCollector(engine))
    registry.register(ExportCollector(engine))
    return generate_latest(registry)
