"""The exceptions the platform raises while it runs guest code."""
from __future__ import annotations


class GuestError(Exception):
    """The guest did something the platform cannot model (not a Python bug)."""


class _Fault(Exception):
    """An exception raised while the core handles an instruction or delivers an event."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(vector)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2
