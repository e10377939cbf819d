"""Tamper-evident audit trail: :func:`audit.chain.record` is the one entry point."""
