"""QEMU's isa-debug-exit device: the guest ends the run by writing a port.

At I/O port ``port`` (default 0xF4), ``iosize`` 1 or 4 bytes wide, as QEMU's
``-device isa-debug-exit,iobase=0xf4,iosize=0x04``.  A write of value ``v``
ends the run; the process exit status is ``(v << 1) | 1``, as QEMU's
(:attr:`DebugExit.exit_status`; the operating system keeps its low 8 bits).
Reads return 0.  Only the first write counts (later ones in the same run,
e.g. from another core before the machine stops, are ignored).

The verdict rule is devirt-emu's own, not QEMU's: ``v == 0`` means pass,
any other value fail (:attr:`DebugExit.verdict`).  With QEMU itself a pass
therefore shows as exit status 1.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["DebugExit", "DEBUG_EXIT_PORT"]

DEBUG_EXIT_PORT = 0xF4


class DebugExit:
    """The exit device; ``exit_value`` is None until the guest writes it."""

    def __init__(self, port: int = DEBUG_EXIT_PORT, iosize: int = 1):
        if iosize not in (1, 4):
            raise ValueError(f"isa-debug-exit iosize must be 1 or 4, got {iosize!r}")
        if not 0 <= port <= 0x10000 - iosize:
            raise ValueError(f"isa-debug-exit port {port!r} out of the I/O space")
        self.port = port
        self.iosize = iosize
        self.exit_value: Optional[int] = None

    def contains(self, port: int) -> bool:
        return self.port <= port < self.port + self.iosize

    @property
    def exited(self) -> bool:
        return self.exit_value is not None

    @property
    def exit_status(self) -> Optional[int]:
        """QEMU's process exit status for the written value: (v << 1) | 1."""
        return None if self.exit_value is None else (self.exit_value << 1) | 1

    @property
    def verdict(self) -> Optional[str]:
        """"pass" for 0, "fail" otherwise, None before any write."""
        if self.exit_value is None:
            return None
        return "pass" if self.exit_value == 0 else "fail"

    def io_read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """A write of ``size`` bytes at ``offset`` (0 .. iosize-1) ends the run."""
        self._check(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        if self.exit_value is None:
            self.exit_value = value

    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"I/O access size must be 1, 2 or 4, got {size!r}")
        if not 0 <= offset < self.iosize:
            raise ValueError(f"offset {offset!r} outside the device's {self.iosize} port(s)")
