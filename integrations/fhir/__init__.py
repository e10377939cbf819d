"""FHIR R4 API of Taqrir (research drafts): storage, REST server, CLI commands.

Public entry points: :func:`integrations.fhir.store.publish_draft` (the pipeline's call),
:func:`integrations.fhir.app.create_app` and :func:`integrations.fhir.cli.register`.
See README.md in this folder.
"""
