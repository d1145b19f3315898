"""The debugger: a Python debugging API (:class:`Session`), a REPL and a GDB stub."""
from .session import DebugError, Position, Session

__all__ = ["Session", "DebugError", "Position"]
