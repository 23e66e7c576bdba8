"""Baseline token-reduction methods behind the same ``apply()`` interface."""
from pumer_plug.baselines import tome  # noqa: F401
