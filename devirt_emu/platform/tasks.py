"""Task-switch attempts outside IA-32e mode: which far transfers switch tasks,
and the checks made on the gate and the new TSS before the switch.

Sources: Intel SDM Vol. 2, the "Operation" of JMP, CALL and IRET (the
TASK-GATE, TASK-STATE-SEGMENT and TASK-RETURN parts) and of INT n (TASK-GATE);
Vol. 3A "Task Management" and "Interrupt 10 -- Invalid TSS Exception" (the
#TS conditions, the TSS's minimum limit); Vol. 3C "Treatment of Task
Switches": in VMX non-root operation the checks on the gate (P bit,
privilege), on the new TSS selector (within the GDT), the read of the new TSS
descriptor and the checks on it (type, P bit, S bit, limit) come first and
may fault; only if they pass does the task switch cause a VM exit.

These are pure functions of descriptor values.  The caller reads the
descriptors (``read_gdt(selector) -> int | None``: the 8-byte GDT entry, None
beyond the GDT limit) and turns a :class:`TaskFault` into the exception.  In
IA-32e mode there is no task switching: a far JMP/CALL to a TSS or task gate
and an IRET with NT=1 are #GP there, which the caller leaves to the processor.
"""
from __future__ import annotations

from typing import Callable, Optional

#: System-descriptor types (SDM "System-Segment and Gate-Descriptor Types", outside IA-32e mode).
TSS16_AVAILABLE, TSS16_BUSY, TASK_GATE, TSS32_AVAILABLE, TSS32_BUSY = 1, 3, 5, 9, 11
TASK_TYPES = frozenset({TSS16_AVAILABLE, TSS16_BUSY, TASK_GATE, TSS32_AVAILABLE, TSS32_BUSY})
_AVAILABLE_TSS = frozenset({TSS16_AVAILABLE, TSS32_AVAILABLE})
_BUSY_TSS = frozenset({TSS16_BUSY, TSS32_BUSY})

#: The smallest valid limit of a TSS: its last byte (the 32-bit TSS is 104 bytes, the
#: 16-bit one 44); a smaller limit is #TS(TSS selector) (Bochs reads the SDM's
#: "less than 2CH" for a 16-bit TSS the same way: limit 2BH is valid).
MIN_TSS_LIMIT = {TSS16_AVAILABLE: 0x2B, TSS16_BUSY: 0x2B, TSS32_AVAILABLE: 0x67, TSS32_BUSY: 0x67}

GP, NP, TS = 13, 11, 10

ReadGdt = Callable[[int], Optional[int]]


class TaskFault(Exception):
    """The exception a check raises, with its error code."""

    def __init__(self, vector: int, error_code: int):
        super().__init__(f"vector {vector}, error code {error_code:#x}")
        self.vector = vector
        self.error_code = error_code


def _type(desc: int) -> int:
    return (desc >> 40) & 0xF


def _system(desc: int) -> bool:
    return not (desc >> 44) & 1


def _dpl(desc: int) -> int:
    return (desc >> 45) & 3


def _present(desc: int) -> bool:
    return bool((desc >> 47) & 1)


def _limit(desc: int) -> int:
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    return (limit << 12) | 0xFFF if (desc >> 55) & 1 else limit


def selector_error_code(selector: int, ext: int = 0) -> int:
    """The error code of a fault that names a selector: index and TI, IDT = 0, EXT."""
    return (selector & 0xFFFC) | ext


def is_task_descriptor(desc: int) -> bool:
    """A TSS descriptor or a task gate: a far JMP/CALL to it attempts a task switch."""
    return _system(desc) and _type(desc) in TASK_TYPES


def _new_tss(tss_selector: int, read_gdt: ReadGdt, ext: int, *, busy: bool) -> int:
    """The TSS descriptor a task gate or a task return names, checked for its
    place (GDT, within the limit) and type; returns the descriptor."""
    ec = selector_error_code(tss_selector, ext)
    vector = TS if busy else GP          # a task return's bad back link is #TS, a gate's #GP
    if tss_selector & 4:
        raise TaskFault(vector, ec)
    desc = read_gdt(tss_selector)
    if desc is None or not _system(desc) or \
            _type(desc) not in (_BUSY_TSS if busy else _AVAILABLE_TSS):
        raise TaskFault(vector, ec)
    return desc


def _present_and_limit(tss_selector: int, desc: int, ext: int) -> None:
    ec = selector_error_code(tss_selector, ext)
    if not _present(desc):
        raise TaskFault(NP, ec)
    if _limit(desc) < MIN_TSS_LIMIT[_type(desc)]:
        raise TaskFault(TS, ec)


def far_transfer_tss(selector: int, desc: int, cpl: int, read_gdt: ReadGdt) -> int:
    """CALL or JMP far to ``selector``, whose descriptor ``desc`` is a TSS or a
    task gate (:func:`is_task_descriptor`), outside IA-32e mode: the selector
    of the new task's TSS once the checks pass.

    A task gate (in the GDT or the LDT): DPL < CPL or < the selector's RPL is
    #GP(gate), not present #NP(gate); its TSS selector must name an available
    TSS in the GDT, else #GP(TSS).  A TSS descriptor named directly: in the LDT,
    DPL < CPL or < RPL, or busy is #GP(TSS).  Then the TSS: not present is
    #NP(TSS), a limit below :data:`MIN_TSS_LIMIT` #TS(TSS).
    """
    rpl = selector & 3
    dpl = _dpl(desc)
    if _type(desc) == TASK_GATE:
        if dpl < cpl or dpl < rpl:
            raise TaskFault(GP, selector_error_code(selector))
        if not _present(desc):
            raise TaskFault(NP, selector_error_code(selector))
        tss_selector = (desc >> 16) & 0xFFFF
        tss = _new_tss(tss_selector, read_gdt, 0, busy=False)
    else:
        if selector & 4 or dpl < cpl or dpl < rpl or _type(desc) not in _AVAILABLE_TSS:
            raise TaskFault(GP, selector_error_code(selector))
        tss_selector, tss = selector, desc
    _present_and_limit(tss_selector, tss, 0)
    return tss_selector


def task_return_tss(link: int, read_gdt: ReadGdt) -> int:
    """IRET with RFLAGS.NT = 1 outside IA-32e mode: ``link`` is the previous-task
    link of the current TSS.  No privilege checks; the link must name a busy TSS
    in the GDT (else #TS(link), a null link included), present (#NP(link)) with
    a valid limit (#TS(link)).  Returns ``link``."""
    tss = _new_tss(link, read_gdt, 0, busy=True)
    _present_and_limit(link, tss, 0)
    return link


def idt_task_gate_tss(vector: int, gate: int, cpl: int, read_gdt: ReadGdt, *,
                      soft: bool) -> int:
    """An event delivered through the IDT task gate ``gate`` (an 8-byte
    descriptor of type 5) outside IA-32e mode: the new TSS's selector once the
    checks pass.  ``soft``: INT n, INT3 or INTO, whose gate DPL must be >= CPL
    (else #GP(vector * 8 + 2)); other events (NMI, external interrupts,
    exceptions, INT1) get no privilege check and set EXT in error codes.  A
    gate not present is #NP(vector * 8 + 2 + EXT); then the gate's TSS
    selector is checked as for a far JMP through a task gate, with EXT."""
    ext = 0 if soft else 1
    idt_ec = vector * 8 + 2 + ext
    if soft and _dpl(gate) < cpl:
        raise TaskFault(GP, vector * 8 + 2)
    if not _present(gate):
        raise TaskFault(NP, idt_ec)
    tss_selector = (gate >> 16) & 0xFFFF
    tss = _new_tss(tss_selector, read_gdt, ext, busy=False)
    _present_and_limit(tss_selector, tss, ext)
    return tss_selector
