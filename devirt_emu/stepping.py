"""What the machine's stepping API returns: why a run stopped, and where.

:meth:`Machine.step <devirt_emu.machine.Machine.step>` and
:meth:`Machine.run_until <devirt_emu.machine.Machine.run_until>` return a
:class:`Stop`; docs/architecture.md describes the API and its guarantees.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class StopKind(enum.Enum):
    """Why a run stopped."""

    #: An instruction address with a breakpoint is next (it has not executed).
    BREAKPOINT = "breakpoint"
    #: An instruction accessed a watched range (it has retired).
    WATCHPOINT = "watchpoint"
    #: A VM exit of a reason being watched: the processor has written the exit
    #: information, the hypervisor has not handled it yet.
    VM_EXIT = "vm-exit"
    #: An interrupt or exception of a watched vector is being delivered
    #: (the handler's first instruction is next).
    VECTOR = "vector"
    #: :meth:`Machine.step` retired the instructions it was asked for.
    STEP = "step"
    #: ``run_until(max_instructions=...)``: the machine retired that many.
    INSTRUCTIONS = "instructions"
    #: ``run_until(until_ns=...)``: virtual time reached the limit.
    TIME = "time"
    #: :meth:`Machine.interrupt` was called (from another thread or a signal).
    INTERRUPTED = "interrupted"
    #: The guest reached a verdict (pass, fail, shutdown, halted, timeout, error).
    VERDICT = "verdict"


@dataclass(frozen=True)
class Stop:
    """Where and why a run stopped.  ``core`` is the core the stop concerns
    (for STEP, the stepped core; for VERDICT, the core that ran last); ``rip``
    its next instruction's linear address.  The other fields are set for the
    kinds they belong to."""

    kind: StopKind
    core: int
    rip: int
    ident: Optional[int] = None         # breakpoint or watchpoint id
    address: Optional[int] = None       # the watched address accessed
    access: Optional[str] = None        # "read" or "write"
    reason: Optional[int] = None        # VM exit basic reason
    name: Optional[str] = None          # VM exit name
    vector: Optional[int] = None
    verdict: Optional[str] = None

    def describe(self) -> str:
        """One line for people."""
        k = self.kind
        where = f"core {self.core} at {self.rip:#x}"
        if k is StopKind.BREAKPOINT:
            return f"breakpoint {self.ident}: {where}"
        if k is StopKind.WATCHPOINT:
            return f"watchpoint {self.ident}: {self.access} of {self.address:#x}, {where}"
        if k is StopKind.VM_EXIT:
            return f"VM exit {self.name} ({self.reason}): {where}"
        if k is StopKind.VECTOR:
            return f"vector {self.vector:#x} delivered: {where}"
        if k is StopKind.VERDICT:
            return f"verdict {self.verdict}: {where}"
        return f"{k.value}: {where}"
