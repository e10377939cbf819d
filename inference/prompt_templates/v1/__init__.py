"""Prompt templates, version 1."""
