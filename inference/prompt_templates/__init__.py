"""Versioned prompt templates (data files; a package so that wheels ship them)."""
