"""Errors of key-image rendering."""

from __future__ import annotations

from taqrir.errors import PermanentError


class NothingRenderable(PermanentError):
    """No series of the study produced a key image; the message lists each series' reason."""


class SeriesRenderError(PermanentError):
    """One series could not be rendered (undecodable pixels, inconsistent geometry...).

    Caught by :func:`workers.render.study.render_study`, which records the reason and carries on
    with the rest of the study.
    """


class RulesError(PermanentError):
    """The series-selection rules file is unreadable or invalid."""
