"""The error a user can cause and fix (bad option, config value, name, file, model structure).

``pumer-plug`` prints a :class:`UserError` as one line and exits with status 2; any other exception
is a bug and shows its traceback. It subclasses ``ValueError`` so that code catching bad values
keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for; the message names it and, where possible, the fix."""
