"""Database helpers shared by the tests and the benchmarks."""

from __future__ import annotations

from sqlalchemy import text

from ground.db import make_engine


def reset_postgres_schema(url: str) -> None:
    """Empty a PostgreSQL database (drop and recreate its public schema)."""
    eng = make_engine(url, pool_size=1)
    with eng.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    eng.dispose()
