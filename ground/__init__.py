"""The ground: what every room may use and what imports no room.

``ground.db`` (engines, sessions, the writer lock), ``ground.migrations`` (Alembic revisions),
``ground.errors`` (the exception root) and ``ground.clock`` (aware UTC time). The roof (``taqrir``)
composes the rooms on top; nothing here imports a room or the roof (import-linter enforces it).
"""
