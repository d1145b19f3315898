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

Also the layouts of the 32-bit and 16-bit TSS and the checks of the new
task's LDT and segments that a task switch makes after its commit point (SDM
Vol. 3A "Task Switching", Table 7-1), for the switches the platform performs.

These are pure functions of descriptor values.  The caller reads the
descriptors (``read_gdt(selector) -> int | None``: the 8-byte GDT entry, None
beyond the GDT limit) and turns a :class:`TaskFault` into the exception.  In
IA-32e mode there is no task switching: a far JMP/CALL to a TSS or task gate
and an IRET with NT=1 are #GP there, which the caller leaves to the processor.
"""
from __future__ import annotations

from typing import Callable, Optional

from .descriptors import (LDT, TASK_GATE, TSS16_AVAILABLE, TSS16_BUSY, TSS32_AVAILABLE,
                          TSS32_BUSY, desc_dpl, desc_limit, desc_type, is_code,
                          is_conforming_code, is_present, is_readable, is_system,
                          is_writable_data, selector_error_code)

TASK_TYPES = frozenset({TSS16_AVAILABLE, TSS16_BUSY, TASK_GATE, TSS32_AVAILABLE, TSS32_BUSY})
_AVAILABLE_TSS = frozenset({TSS16_AVAILABLE, TSS32_AVAILABLE})
_BUSY_TSS = frozenset({TSS16_BUSY, TSS32_BUSY})

#: The smallest valid limit of a TSS: its last byte (the 32-bit TSS is 104 bytes, the
#: 16-bit one 44); a smaller limit is #TS(TSS selector) (Bochs reads the SDM's
#: "less than 2CH" for a 16-bit TSS the same way: limit 2BH is valid).
MIN_TSS_LIMIT = {TSS16_AVAILABLE: 0x2B, TSS16_BUSY: 0x2B, TSS32_AVAILABLE: 0x67, TSS32_BUSY: 0x67}

GP, NP, SS, TS = 13, 11, 12, 10

ReadGdt = Callable[[int], Optional[int]]


class TaskFault(Exception):
    """The exception a check raises, with its error code."""

    def __init__(self, vector: int, error_code: int):
        super().__init__(f"vector {vector}, error code {error_code:#x}")
        self.vector = vector
        self.error_code = error_code


def is_task_descriptor(desc: int) -> bool:
    """A TSS descriptor or a task gate: a far JMP/CALL to it attempts a task switch."""
    return is_system(desc) and desc_type(desc) in TASK_TYPES


def _new_tss(tss_selector: int, read_gdt: ReadGdt, ext: int, *, busy: bool) -> int:
    """The TSS descriptor a task gate or a task return names, checked for its
    place (GDT, within the limit) and type; returns the descriptor."""
    ec = selector_error_code(tss_selector, ext)
    vector = TS if busy else GP          # a task return's bad back link is #TS, a gate's #GP
    if tss_selector & 4:
        raise TaskFault(vector, ec)
    desc = read_gdt(tss_selector)
    if desc is None or not is_system(desc) or \
            desc_type(desc) not in (_BUSY_TSS if busy else _AVAILABLE_TSS):
        raise TaskFault(vector, ec)
    return desc


def _present_and_limit(tss_selector: int, desc: int, ext: int) -> None:
    ec = selector_error_code(tss_selector, ext)
    if not is_present(desc):
        raise TaskFault(NP, ec)
    if desc_limit(desc) < MIN_TSS_LIMIT[desc_type(desc)]:
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
    dpl = desc_dpl(desc)
    if desc_type(desc) == TASK_GATE:
        if dpl < cpl or dpl < rpl:
            raise TaskFault(GP, selector_error_code(selector))
        if not is_present(desc):
            raise TaskFault(NP, selector_error_code(selector))
        tss_selector = (desc >> 16) & 0xFFFF
        tss = _new_tss(tss_selector, read_gdt, 0, busy=False)
    else:
        if selector & 4 or dpl < cpl or dpl < rpl or desc_type(desc) not in _AVAILABLE_TSS:
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
    if soft and desc_dpl(gate) < cpl:
        raise TaskFault(GP, vector * 8 + 2)
    if not is_present(gate):
        raise TaskFault(NP, idt_ec)
    tss_selector = (gate >> 16) & 0xFFFF
    tss = _new_tss(tss_selector, read_gdt, ext, busy=False)
    _present_and_limit(tss_selector, tss, ext)
    return tss_selector


# --------------------------------------------------------------------------
# The task switch itself (SDM Vol. 3A "Task Switching", "Task-State Segment")
# --------------------------------------------------------------------------
class TssLayout:
    """Where a TSS of one size keeps the state a task switch saves and loads:
    the previous-task link, EIP, EFLAGS, the eight general registers (EAX, ECX,
    EDX, EBX, ESP, EBP, ESI, EDI), the segment selectors (ES, CS, SS, DS and, in
    a 32-bit TSS, FS and GS), the LDT selector, CR3 and the T flag (32-bit
    only).  ``width`` is the size of EIP, EFLAGS and each register (4 or 2);
    selectors are 16 bits wide, ``seg_stride`` apart."""

    def __init__(self, *, width: int, eip: int, eflags: int, gprs: int, segs: int,
                 seg_stride: int, n_segs: int, ldt: int, cr3: Optional[int],
                 trap: Optional[int], size: int):
        self.width, self.eip, self.eflags, self.gprs = width, eip, eflags, gprs
        self.segs, self.seg_stride, self.n_segs = segs, seg_stride, n_segs
        self.ldt, self.cr3, self.trap, self.size = ldt, cr3, trap, size
        self.link = 0

    def stack(self, cpl: int) -> tuple[int, int]:
        """(offset of ESPn or SPn, offset of SSn) for privilege level ``cpl`` (0-2)."""
        return (4 + 8 * cpl, 8 + 8 * cpl) if self.width == 4 else (2 + 4 * cpl, 4 + 4 * cpl)


#: SDM "32-Bit Task-State Segment (TSS)" (104 bytes) and "16-Bit Task-State Segment (TSS)" (44).
TSS32 = TssLayout(width=4, eip=0x20, eflags=0x24, gprs=0x28, segs=0x48, seg_stride=4, n_segs=6,
                  ldt=0x60, cr3=0x1C, trap=0x64, size=0x68)
TSS16 = TssLayout(width=2, eip=0x0E, eflags=0x10, gprs=0x12, segs=0x22, seg_stride=2, n_segs=4,
                  ldt=0x2A, cr3=None, trap=None, size=0x2C)


def tss_layout(tss_type: int) -> TssLayout:
    """The layout of a TSS of descriptor type ``tss_type`` (1, 3: 16-bit; 9, 11: 32-bit)."""
    return TSS32 if tss_type & 8 else TSS16


# Loading the new task's segments: the checks of SDM Table 7-1 ("Exception
# Conditions Checked During a Task Switch"), after the commit point.  A
# selector is "valid" when it lies within its descriptor table and names the
# right kind of descriptor; ``desc`` is None beyond the table's limit.  The
# table's order is model specific (its note); here: the LDT, CS, SS, then ES,
# DS, FS and GS.  Error codes name the selector, with EXT.

def check_new_ldt(selector: int, desc: Optional[int], ext: int) -> bool:
    """The new task's LDT selector: null (no LDT: returns False) or an LDT
    descriptor in the GDT that is present, else #TS(selector)."""
    if selector & ~3 == 0:
        return False
    if selector & 4 or desc is None or not is_system(desc) or desc_type(desc) != LDT \
            or not is_present(desc):
        raise TaskFault(TS, selector_error_code(selector, ext))
    return True


def check_new_cs(selector: int, desc: Optional[int], ext: int) -> None:
    """CS of the new task (its RPL becomes the CPL): a code segment, DPL = RPL
    (nonconforming) or DPL <= RPL (conforming), else #TS(CS); present, else #NP(CS)."""
    ec = selector_error_code(selector, ext)
    if selector & ~3 == 0 or desc is None or not is_code(desc):
        raise TaskFault(TS, ec)
    dpl, rpl = desc_dpl(desc), selector & 3
    if (dpl > rpl) if is_conforming_code(desc) else (dpl != rpl):
        raise TaskFault(TS, ec)
    if not is_present(desc):
        raise TaskFault(NP, ec)


def check_new_ss(selector: int, desc: Optional[int], cpl: int, ext: int) -> None:
    """SS of the new task: a writable data segment with RPL = DPL = CPL, else
    #TS(SS); present, else #SS(SS)."""
    ec = selector_error_code(selector, ext)
    if selector & ~3 == 0 or desc is None or not is_writable_data(desc) \
            or selector & 3 != cpl or desc_dpl(desc) != cpl:
        raise TaskFault(TS, ec)
    if not is_present(desc):
        raise TaskFault(SS, ec)


def check_new_data_segment(selector: int, desc: Optional[int], cpl: int, ext: int) -> bool:
    """ES, DS, FS or GS of the new task: null (loaded unusable: returns False),
    or a data or readable code segment whose DPL >= CPL and >= RPL unless it is
    conforming code, else #TS(selector); present, else #NP(selector)."""
    if selector & ~3 == 0:
        return False
    ec = selector_error_code(selector, ext)
    if desc is None or not is_readable(desc):
        raise TaskFault(TS, ec)
    if not is_conforming_code(desc) and (desc_dpl(desc) < cpl or desc_dpl(desc) < selector & 3):
        raise TaskFault(TS, ec)
    if not is_present(desc):
        raise TaskFault(NP, ec)
    return True
