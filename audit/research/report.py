"""``taqrir research report``: one self-contained HTML page of plots from a research export.

Reads the export's Parquet file with pandas and draws each panel with matplotlib (Agg backend, no
display needed) as an inline base64 PNG, so the page opens anywhere without a server or network:
review outcomes and "signed without change" by modality and language, percent edited, latency
distributions, the consistency-flag rate, and volume over time. A panel without data says so (an
empty export gives a page of such panels, never an error).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")  # before pyplot: no display, same output everywhere

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from audit.chain import record
from ground.db import session_scope

from .export import MANIFEST, PARQUET, ResearchError

log = logging.getLogger(__name__)
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache and category chatter

REPORT = "report.html"
OUTCOMES = ("accepted", "edited", "rejected", "none")
OUTCOME_COLOURS = {"accepted": "#2e7d32", "edited": "#f9a825", "rejected": "#c62828", "none": "#b0bec5"}
LANG_COLOURS = {"en": "#1565c0", "ar": "#6a1b9a"}
STAGES = (("queue_s", "queue"), ("render_s", "render"), ("infer_s", "inference"), ("persist_s", "store"),
          ("publish_s", "publish"))


@dataclass(frozen=True)
class Panel:
    title: str
    caption: str
    png: bytes | None = None  # None: no data
    empty: str = ""


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fig(width: float = 7.5, height: float = 3.0) -> tuple[Figure, Any]:
    fig, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def _modalities(df: pd.DataFrame) -> list[str]:
    return sorted(df["modality"].fillna("?").unique().tolist())


def outcomes_panel(df: pd.DataFrame) -> Panel:
    title = "Review outcome by modality"
    caption = ("Share of draft versions per clinician review outcome (accepted, edited, rejected; none = not "
               "reviewed yet). n above each bar.")
    if df.empty:
        return Panel(title, caption, empty="No drafts in this export.")
    d = df.assign(modality=df["modality"].fillna("?"))
    table = pd.crosstab(d["modality"], d["review_outcome"]).reindex(columns=list(OUTCOMES), fill_value=0)
    shares = table.div(table.sum(axis=1), axis=0) * 100
    fig, ax = _fig()
    bottom = pd.Series(0.0, index=shares.index)
    for outcome in OUTCOMES:
        ax.bar(shares.index, shares[outcome], bottom=bottom, label=outcome, color=OUTCOME_COLOURS[outcome])
        bottom += shares[outcome]
    for i, (mod, n) in enumerate(table.sum(axis=1).items()):
        ax.text(i, 101, f"n={n}", ha="center", va="bottom", fontsize=8)
        del mod
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of drafts")
    ax.legend(ncols=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    return Panel(title, caption, _png(fig))


def _signed_long(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (draft, language) with a signed report in that language."""
    parts = []
    for lang in ("en", "ar"):
        col = f"{lang}_percent_edited"
        part = df.loc[df[col].notna(), ["modality", col]].rename(columns={col: "percent_edited"})
        parts.append(part.assign(language=lang))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if not out.empty:
        out["modality"] = out["modality"].fillna("?")
    return out


def unchanged_panel(df: pd.DataFrame) -> Panel:
    title = "Signed without change, by modality and language"
    caption = ("Of the drafts with a signed report in that language: the share whose signed text equals the draft "
               "(percent edited = 0, after normalising whitespace, diacritics and digits).")
    long = _signed_long(df)
    if long.empty:
        return Panel(title, caption, empty="No signed reports yet: acceptance needs the signed text back "
                                           "(FHIR, HL7 ORU or a verified SR).")
    g = long.assign(unchanged=long["percent_edited"] <= 0).groupby(["modality", "language"])
    rate = (g["unchanged"].mean() * 100).unstack("language").reindex(columns=["en", "ar"])
    count = g.size().unstack("language").reindex(columns=["en", "ar"])
    fig, ax = _fig()
    width = 0.38
    xs = range(len(rate.index))
    for k, lang in enumerate(("en", "ar")):
        vals = rate[lang].fillna(0).tolist()
        pos = [x + (k - 0.5) * width for x in xs]
        ax.bar(pos, vals, width, label={"en": "English", "ar": "Arabic"}[lang], color=LANG_COLOURS[lang])
        for p, v, n in zip(pos, vals, count[lang].tolist(), strict=True):
            if pd.notna(n):
                ax.text(p, v + 1, f"{v:.0f}%\nn={int(n)}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), rate.index.tolist())
    ax.set_ylim(0, 118)
    ax.set_ylabel("% signed unchanged")
    ax.legend(fontsize=8, frameon=False)
    return Panel(title, caption, _png(fig))


def edited_panel(df: pd.DataFrame) -> Panel:
    title = "Percent edited, by modality and language"
    caption = ("Share of words the clinician inserted, deleted or replaced between the draft and the signed "
               "report (word-level edit distance, 0-100). Boxes: quartiles; whiskers: 1.5 IQR.")
    long = _signed_long(df)
    if long.empty:
        return Panel(title, caption, empty="No signed reports yet, so nothing to compare the drafts with.")
    fig, ax = _fig(9.5, 3.0)
    data, colours, positions, centres, names = [], [], [], [], []
    for i, mod in enumerate(sorted(long["modality"].unique())):
        for k, lang in enumerate(("en", "ar")):
            vals = long.loc[(long["modality"] == mod) & (long["language"] == lang), "percent_edited"]
            if len(vals):
                data.append(vals.tolist())
                colours.append(LANG_COLOURS[lang])
                positions.append(3 * i + k)
        centres.append(3 * i + 0.5)
        names.append(f"{mod}\n(n={int(long.loc[long['modality'] == mod].groupby('language').size().max())})")
    box = ax.boxplot(data, positions=positions, patch_artist=True, widths=0.8,
                     medianprops={"color": "black"}, flierprops={"markersize": 3})
    for patch, c in zip(box["boxes"], colours, strict=True):
        patch.set_facecolor(c)
        patch.set_alpha(0.6)
    ax.set_xticks(centres, names, fontsize=8)
    ax.set_ylabel("% of words edited")
    ax.set_ylim(bottom=0)
    ax.legend(handles=[matplotlib.patches.Patch(color=LANG_COLOURS[lang], alpha=0.6, label=label)
                       for lang, label in (("en", "English"), ("ar", "Arabic"))], fontsize=8, frameon=False)
    return Panel(title, caption, _png(fig))


def latency_panel(df: pd.DataFrame) -> Panel:
    title = "Latency distribution"
    caption = ("Left: seconds in the model per draft (both languages, retries included). Right: seconds per "
               "pipeline stage and from the study's first instance to the draft (log scale).")
    if df.empty or df["model_latency_s"].dropna().empty:
        return Panel(title, caption, empty="No drafts, so no latencies.")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.0), gridspec_kw={"width_ratios": [1, 1.4]})
    for ax in (a1, a2):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    lat = df["model_latency_s"].dropna()
    a1.hist(lat, bins=min(30, max(5, len(lat) // 3)), color="#00897b")
    med, p95 = lat.median(), lat.quantile(0.95)
    a1.axvline(med, color="black", lw=1)
    a1.axvline(p95, color="black", lw=1, ls="--")
    a1.set_title(f"model: median {med:.2f} s, p95 {p95:.2f} s", fontsize=9)
    a1.set_xlabel("seconds")
    a1.set_ylabel("drafts")
    series, names = [], []
    for column, name in (*STAGES, ("arrival_to_draft_s", "arrival\u2192draft")):
        vals = df[column].dropna()
        vals = vals[vals > 0]
        if len(vals):
            series.append(vals.tolist())
            names.append(f"{name}\n(n={len(vals)})")
    if series:
        a2.boxplot(series, widths=0.6)
        a2.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        a2.set_yscale("log")
        a2.set_ylabel("seconds (log)")
    return Panel(title, caption, _png(fig))


def consistency_panel(df: pd.DataFrame) -> Panel:
    title = "Bilingual consistency flags"
    caption = ("Left: share of drafts whose English and Arabic disagree (numbers/units, laterality, negation or a "
               "lexicon term), by modality. Right: drafts flagged per kind of mismatch.")
    if df.empty:
        return Panel(title, caption, empty="No drafts in this export.")
    d = df.assign(modality=df["modality"].fillna("?"), flagged=~df["consistent"].astype(bool))
    g = d.groupby("modality")["flagged"]
    rate, n = g.mean() * 100, g.size()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.0))
    for ax in (a1, a2):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    a1.bar(rate.index, rate.values, color="#ef6c00")
    for i, (v, k) in enumerate(zip(rate.values, n.values, strict=True)):
        a1.text(i, v + 1, f"{v:.0f}%\nn={k}", ha="center", va="bottom", fontsize=7)
    a1.set_ylim(0, 118)
    a1.set_ylabel("% of drafts flagged")
    kinds = ["number", "laterality", "negation", "term"]
    counts = [int(d["consistency_kinds"].map(lambda ks, k=k: k in list(ks)).sum()) for k in kinds]
    a2.bar(kinds, counts, color="#8d6e63")
    a2.set_ylabel("drafts")
    return Panel(title, caption, _png(fig))


def volume_panel(df: pd.DataFrame, dates: str) -> Panel:
    title = "Volume over time"
    caption = "Draft versions per period of drafting (dates as the export's date policy keeps them)."
    if df.empty:
        return Panel(title, caption, empty="No drafts in this export.")
    stamps = df["drafted_at"].dropna()
    if stamps.empty:
        return Panel(title, caption, empty=f"Dates withheld by this export's date policy (research.dates = {dates}).")
    if dates == "year":
        counts = stamps.value_counts().sort_index()
        xlabel = "year"
    else:
        when = pd.to_datetime(stamps, utc=True, format="ISO8601")
        span_days = (when.max() - when.min()).days
        freq, xlabel = ("D", "day") if span_days <= 62 else ("W", "week") if span_days <= 400 else ("M", "month")
        counts = when.dt.tz_localize(None).dt.to_period(freq).value_counts().sort_index()
        # a week is named by its first day ("2026-06-01"), not pandas' "2026-06-01/2026-06-07"
        counts.index = [p.start_time.strftime("%Y-%m" if freq == "M" else "%Y-%m-%d") for p in counts.index]
    fig, ax = _fig(9.5, 3.0)
    ax.bar([str(i) for i in counts.index], counts.values, color="#3949ab")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("draft versions")
    if len(counts) > 12:
        step = max(1, len(counts) // 12)
        ax.set_xticks(range(0, len(counts), step), [str(i) for i in counts.index[::step]], rotation=45, ha="right", fontsize=7)
    return Panel(title, caption, _png(fig))


def _summary(df: pd.DataFrame, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    reviewed = int((df["review_outcome"] != "none").sum()) if not df.empty else 0
    signed = int(df["signed_status"].notna().sum()) if not df.empty else 0
    flagged = int((~df["consistent"].astype(bool)).sum()) if not df.empty else 0
    return [
        ("draft versions", f"{len(df)}"),
        ("studies / patients", (f"{df['study_pseudonym'].nunique() if not df.empty else 0} / "
                               f"{df['patient_pseudonym'].nunique() if not df.empty else 0}")),
        ("modalities", ", ".join(_modalities(df)) or "-"),
        ("reviewed", f"{reviewed}"),
        ("with a signed report", f"{signed}"),
        ("EN/AR consistency flagged", f"{flagged}" + (f" ({100 * flagged / len(df):.0f}%)" if len(df) else "")),
        ("models", ", ".join(sorted(df["model_name"].dropna().unique().tolist())) or "-" if not df.empty else "-"),
        ("filters", json.dumps(manifest.get("filters", {}))),
        ("date policy", str(manifest.get("dates", "?"))),
        ("export", f"{manifest.get('export_id', '?')} made {manifest.get('made_at', '?')}"),
    ]


_CSS = """
body{font-family:'Noto Sans',system-ui,sans-serif;margin:0;background:#f5f6f8;color:#222}
header{background:#263238;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:6px 0 0;font-size:13px;color:#cfd8dc}
main{max-width:1100px;margin:0 auto;padding:18px}
section{background:#fff;border-radius:6px;box-shadow:0 1px 3px rgba(0,0,0,.12);margin:0 0 16px;padding:14px 18px}
h2{font-size:16px;margin:0 0 4px}p.cap{font-size:12px;color:#555;margin:0 0 8px}
img{max-width:100%;height:auto;display:block}
.nodata{border:2px dashed #b0bec5;color:#546e7a;padding:28px;text-align:center;font-size:14px;border-radius:6px}
table{border-collapse:collapse;font-size:13px}td{padding:3px 14px 3px 0;vertical-align:top}td:first-child{color:#555}
footer{font-size:11px;color:#777;text-align:center;padding:10px}
"""


def render_html(panels: list[Panel], summary: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary)
    body = [f"<section><h2>This export</h2><table>{rows}</table></section>"]
    for p in panels:
        inner = (f'<img alt="{html.escape(p.title)}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
                 if p.png is not None else f'<div class="nodata"><b>No data.</b> {html.escape(p.empty)}</div>')
        body.append(f"<section><h2>{html.escape(p.title)}</h2><p class=\"cap\">{html.escape(p.caption)}</p>{inner}</section>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Taqrir research report</title>"
            f"<style>{_CSS}</style></head><body><header><h1>Taqrir research report</h1>"
            "<p>Machine-drafted bilingual reports: research drafts, never signed clinical reports. "
            "De-identified export; no identifiers on this page.</p></header><main>"
            + "".join(body)
            + "</main><footer>Made by <code>taqrir research report</code> from a <code>taqrir research export</code>."
              "</footer></body></html>")


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    rows: int
    sha256: str
    export_id: str


def load_export(out_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The export's rows (pandas, from Parquet) and its manifest."""
    parquet = out_dir / PARQUET
    if not parquet.exists():
        raise ResearchError(f"{out_dir} holds no research export ({PARQUET}); run `taqrir research export {out_dir}` first")
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text("utf-8")) if manifest_path.exists() else {}
    return pd.read_parquet(parquet), manifest


def make_report(out_dir: Path) -> tuple[str, ReportSummary]:
    """The HTML page of the export in ``out_dir`` (written as ``report.html``)."""
    df, manifest = load_export(out_dir)
    panels = [outcomes_panel(df), unchanged_panel(df), edited_panel(df), latency_panel(df),
              consistency_panel(df), volume_panel(df, str(manifest.get("dates", "year")))]
    page = render_html(panels, _summary(df, manifest))
    path = out_dir / REPORT
    path.write_text(page, "utf-8")
    digest = hashlib.sha256(page.encode("utf-8")).hexdigest()
    log.info("research report of %d rows written (%d panels with data)", len(df),
             sum(p.png is not None for p in panels))
    return page, ReportSummary(path, len(df), digest, str(manifest.get("export_id", "")))


def write_report(engine: Any, out_dir: Path, *, actor: str | None = None) -> ReportSummary:
    """Write ``report.html`` for the export in ``out_dir`` and record it in the audit trail."""
    _, summary = make_report(out_dir)
    with session_scope(engine) as s:
        record(s, action="research.report", actor=actor or f"cli:{getpass.getuser()}", entity_type="ResearchReport",
               entity_id=summary.sha256[:32], details={"export_id": summary.export_id, "rows": summary.rows,
                                                       "sha256": summary.sha256})
    return summary
