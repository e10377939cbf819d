"""Errors of the inference room, under the project's one exception root."""

from __future__ import annotations

from ground.errors import PermanentError, TransientError


class BackendUnavailable(TransientError):
    """The model server (or local checkpoint) cannot answer now; retrying later may succeed."""


class OutputRejected(PermanentError):
    """The model's answer failed the output guard twice; no draft is returned.

    ``reason`` says which check failed; ``raw_outputs`` keeps every rejected answer for the audit
    trail (it is report text: store it, never log it).
    """

    def __init__(self, reason: str, raw_outputs: list[str]) -> None:
        super().__init__(f"model output rejected: {reason}")
        self.reason = reason
        self.raw_outputs = list(raw_outputs)
