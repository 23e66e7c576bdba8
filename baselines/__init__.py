"""Baseline token-reduction methods behind the same ``apply()`` interface."""
