"""MONITOR and MWAIT (SDM Vol. 2B, "MONITOR" and "MWAIT"; Vol. 3A, "MONITOR/MWAIT").

Present on a core whose CPU model advertises CPUID.01H:ECX.MONITOR[3]; without
it both instructions raise #UD.

* MONITOR: CPL 0 only (#UD otherwise); ECX holds extensions, none defined
  (ECX != 0: #GP(0)); DS:RAX (the segment overridable) is the linear address
  to monitor, translated like a read (a fault is the instruction's).  It arms
  the monitor on the line (CPUID leaf 5: 64 bytes) holding that address.
* MWAIT: CPL 0 only; ECX bit 0 makes interrupts break events even with
  RFLAGS.IF = 0 (CPUID.05H:ECX[1]); any other ECX bit set: #GP(0); EAX (the
  C-state hint) is accepted and ignored.  If the monitor is not armed, or was
  triggered since MONITOR, MWAIT falls through.  Otherwise the core waits, as
  after HLT, until a break event: a store to the monitored line, an NMI, an
  INIT, an external interrupt that IF (or ECX bit 0) lets through; it then
  continues after the MWAIT (an interrupt with IF = 1 is delivered first, its
  handler returning past the MWAIT).

Store detection: a waiting core compares the monitored line's bytes with
their value at MONITOR (the scheduler asks before it runs anything else), so
a store by any core that changes the line ends the wait.  A store that
leaves every byte of the line as it was is not seen: the wait then lasts
until another break event.  Under VMX the wait is not an activity state
(SDM: the activity-state field never reflects MWAIT's): a VM exit during it
saves "active" and the guest continues after the MWAIT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: The monitor line size (CPUID.05H:EAX[15:0] and EBX[15:0] of the models).
MONITOR_LINE = 64
#: MWAIT ECX bit 0: treat interrupts as break events even if masked.
MWAIT_ECX_INTERRUPT_BREAK = 1 << 0


@dataclass
class MonitorState:
    """One core's monitoring hardware and MWAIT wait."""

    #: Physical address of the armed line (None: not armed).
    line: Optional[int] = None
    #: The line's bytes when MONITOR armed it.
    snapshot: bytes = b""
    #: The core is waiting in MWAIT.
    waiting: bool = False
    #: The wait ends on an interrupt even with RFLAGS.IF = 0.
    break_on_masked: bool = False

    @property
    def armed(self) -> bool:
        return self.line is not None

    def clear(self) -> None:
        self.line, self.snapshot, self.waiting, self.break_on_masked = None, b"", False, False


def _line_bytes(core, line: int) -> bytes:
    return core.mem.read(line, MONITOR_LINE) if core.mem.contains(line, MONITOR_LINE) \
        else b"\xff" * MONITOR_LINE


def triggered(core) -> bool:
    """Has a store changed the armed line since MONITOR (which disarms it)?"""
    m = core.monitor
    if m.line is not None and _line_bytes(core, m.line) != m.snapshot:
        m.line, m.snapshot = None, b""
    return m.line is None


def do_monitor(core, linear: int) -> None:
    """MONITOR's effect once its checks passed: arm the line holding ``linear``."""
    pa = core.translate(linear)
    line = pa & ~(MONITOR_LINE - 1)
    m = core.monitor
    m.line, m.snapshot = line, _line_bytes(core, line)


def do_mwait(core, ecx: int) -> bool:
    """MWAIT's effect once its checks passed: True when the core now waits."""
    m = core.monitor
    if triggered(core):
        return False
    m.waiting, m.break_on_masked = True, bool(ecx & MWAIT_ECX_INTERRUPT_BREAK)
    return True


def wake_due(core, interrupt_pending: bool, if_set: bool) -> bool:
    """Does a break event end the MWAIT wait now (a store to the line, or a
    pending interrupt the wait lets through)?  NMI and INIT are the caller's,
    as for HLT."""
    m = core.monitor
    if not m.waiting:
        return False
    if triggered(core):
        return True
    return interrupt_pending and (if_set or m.break_on_masked)


def end_wait(core) -> None:
    core.monitor.waiting = False
