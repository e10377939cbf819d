"""FHIR R4 API of Taqrir (research drafts): storage, REST server, CLI commands.

Public entry points: :func:`integrations.fhir.store.publish_draft` (the pipeline's call),
:func:`integrations.fhir.app.create_app` (its CLI commands and ASGI factory are the roof's:
``taqrir/cli_api.py``, ``taqrir/asgi.py``).
See README.md in this folder.
"""
