"""Baseline token-reduction methods behind the same ``apply()`` interface.

One method per file (``tome.py``, ...), its config class in a torch-free companion
(``tome_config.py``, ...) so that ``pumer-plug list`` reads configs and presets without torch. The
methods are declared in :mod:`pumer_plug.catalog` and imported on first use (``METHODS.get(name)``).
"""
