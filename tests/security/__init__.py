"""Regression tests for the promises in SECURITY.md."""
