"""Research audits of the drafts: the analysis-ready export (Parquet and JSON Lines, one row per
draft version, de-identified) and the report (one self-contained HTML page of plots)."""
