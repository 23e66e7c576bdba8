"""Baseline token-reduction methods behind the same ``apply()`` interface."""
from pumer_plug.baselines import tome  # noqa: F401
from pumer_plug.baselines import dynamicvit  # noqa: F401
from pumer_plug.baselines import smres  # noqa: F401
from pumer_plug.baselines import fastv  # noqa: F401
from pumer_plug.baselines import random_prune  # noqa: F401
from pumer_plug.baselines import pool  # noqa: F401
