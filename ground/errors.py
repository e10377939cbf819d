"""The one exception root of Taqrir.

Each room subclasses :class:`TaqrirError` for its own concern; the edges (DIMSE handlers, Celery
tasks, FastAPI routes, the CLI) map these to protocol statuses in one place each.
"""

from __future__ import annotations


class TaqrirError(Exception):
    """Root of every error Taqrir raises on purpose. The message says what is wrong and what to do."""


class ConfigError(TaqrirError):
    """The settings are inconsistent or point at something that does not exist."""


class TransientError(TaqrirError):
    """A failure worth retrying later (a server unreachable, a database busy)."""


class PermanentError(TaqrirError):
    """A failure that retrying the same input will not fix (nothing renderable, output rejected)."""


class SchemaNotCurrent(TaqrirError):
    """The database's schema is not the one this version of Taqrir needs: run ``taqrir db upgrade``."""
