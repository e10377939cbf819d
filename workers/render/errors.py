"""Errors of key-image rendering."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ground.errors import PermanentError

if TYPE_CHECKING:
    from .model import RenderedStudy


class NothingRenderable(PermanentError):
    """No series of the study produced a key image; the message lists each series' reason, and
    ``rendered`` (when given) holds the decisions, failures and skipped instances to record."""

    def __init__(self, message: str, *, rendered: RenderedStudy | None = None) -> None:
        super().__init__(message)
        self.rendered = rendered


class SeriesRenderError(PermanentError):
    """One series could not be rendered (undecodable pixels, inconsistent geometry...).

    Caught by :func:`workers.render.study.render_study`, which records the reason and carries on
    with the rest of the study.
    """


class RulesError(PermanentError):
    """The series-selection rules file is unreadable or invalid."""
