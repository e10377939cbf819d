"""Inference: BiMediX2 prompts, backends (SGLang over HTTP, transformers in-process), guarded drafts.

Public API: :func:`inference.backend.make_backend`, :class:`inference.backend.InferenceBackend`,
:func:`inference.drafting.draft_report` and the types in :mod:`inference.types`. This package never
imports FHIR, DICOM networking or the database.
"""
