"""The debugger: a Python debugging API (:class:`Session`), a REPL
(``devirt-emu debug``) and a GDB remote-serial-protocol stub (``--gdb``).
See docs/debugging.md.  (Imports are lazy: the CLI registers the subcommand
without loading the emulator.)"""
from __future__ import annotations

__all__ = ["Session", "DebugError", "Position"]


def __getattr__(name: str):
    if name in __all__:
        from . import session
        return getattr(session, name)
    raise AttributeError(name)
