"""SVM intercept rules: for each event, #VMEXIT or not, with EXITINFO1,
EXITINFO2, the next RIP and the cause.  Pure functions of (event, VMCB,
memory reader).

Source: AMD64 APM Vol. 2, chapter 15 "Secure Virtual Machine": "Intercept
Operation" (state saved on exit, nRIP), "Instruction Intercepts" (the
priority of exceptions: "instruction intercepts are checked after simple
exceptions (such as #GP when CPL is incorrect, or #UD) have been checked,
but before exceptions related to memory accesses ... and exceptions based on
specific operand values"), "IOIO Intercepts" (the IOPM, EXITINFO1 of IN/OUT,
EXITINFO2 the next RIP), "MSR Intercepts" (the MSRPM; EXITINFO1 0 RDMSR, 1
WRMSR), "Exception Intercepts" (EXITINFO1 the error code, EXITINFO2 the #PF
address), "Interrupt Intercepts" (INTR, NMI, SMI, INIT, VINTR),
"Miscellaneous Intercepts" (task switch, shutdown, pause intercept
filtering), "CR and DR intercepts" with the selective CR0 write intercept
and the CR/EFER write traps, and "Decode Assists" (EXITINFO1 of MOV CR/DR,
INTn and INVLPG).  Exit codes: Appendix C.  Shape after KVM's
``nested_svm_intercept``: one table, one rule per event kind, the bitmap
cases in small helpers.

Entry points
============

``decide(event, vmcb, read_mem, *, pause=None) -> Decision | Fault``
    ``vmcb`` is anything with ``get(name) -> int`` (a
    :class:`~devirt_emu.svm.vmcb.Vmcb`); ``read_mem(pa, n) -> bytes`` reads
    physical memory (the MSRPM and the IOPM).  ``pause`` is the PAUSE filter
    state (:class:`PauseFilter`) for PAUSE events.
``virtual_interrupt_exit(vmcb, *, rflags, ...) -> Decision``
    the VINTR intercept on an instruction boundary.
``exit_decision(code, cause, ...) -> Decision``
    a Decision for an exit found elsewhere (NPF, VMEXIT_INVALID).

A :class:`Decision` with ``trap=True`` (the CR and EFER write traps) is
taken after the instruction completed; the others before it had any effect.
A :class:`Fault` is an exception the APM gives priority over the intercept.
Every outcome carries ``cause``: the intercept bits and map bits the rule
looked at, e.g. ``("INTERCEPT_HLT=1",)``.

Inputs read from ``event.regs``: the GPRs, ``rflags``, ``cr0``, ``cr4``,
``efer``, ``cpl``, ``mode``; ``tsc`` for PAUSE with a filter threshold.
``event.extra``: :data:`EXTRA_KEYS`.

Not modelled: FERR_FREEZE (no external FERR), SMI (no source of SMIs),
MWAIT_COND's monitor hardware beyond ``extra["monitor_armed"]``, SKINIT,
the #DB of DR7.GD against the DR intercepts, and the instruction bytes of
the #PF/NPF decode assist unless the caller passes ``extra["insn_bytes"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, NamedTuple, Optional, Union

from devirt_emu.events import GPR_NAMES, IO_SHAPE, Event, Kind

from . import exit_codes as X
from . import intercepts as I
from .vmcb import INTERCEPT_WORDS, V_IGN_TPR_MASK, V_INTR_PRIO_SHIFT, V_IRQ_MASK, V_TPR_MASK

ReadMem = Callable[[int, int], bytes]

EXTRA_KEYS: Mapping[str, str] = {
    "io_permitted": "IN/OUT/INS/OUTS with CPL > IOPL or in virtual-8086 mode: the TSS "
                    "I/O-permission bitmap allows the access (bool, required then)",
    "lmsw_source": "LMSW with a memory operand: the 16-bit value read (required then)",
    "monitor_armed": "MWAIT: the monitoring hardware is armed (bool, default False)",
    "insn_bytes": "#PF: the instruction bytes fetched (decode assists; default none)",
    "tss_selector": "TASK_SWITCH: the selector of the new TSS (required)",
    "task_switch_source": "TASK_SWITCH: 'CALL', 'IRET', 'JMP' or 'IDT' (required)",
    "task_switch_error_code": "TASK_SWITCH through a task gate of an exception with an "
                              "error code: that error code (default none)",
}


class RuleInputError(ValueError):
    """The event lacks something a rule needs."""


@dataclass(frozen=True)
class PauseFilter:
    """PAUSE intercept filtering state of one vCPU (APM "Pause Intercept
    Filtering"): ``count`` is the internal counter VMRUN loads from
    ``pause_filter_count``, ``last`` the TSC of the most recent PAUSE
    (None: none since VMRUN).  The caller keeps one per vCPU, passes it for
    PAUSE events, stores :attr:`Decision.pause` back, and makes a new one at
    every VMRUN (:meth:`at_vmrun`)."""

    count: int
    last: Optional[int] = None

    @classmethod
    def at_vmrun(cls, vmcb) -> "PauseFilter":
        return cls(vmcb.get("pause_filter_count"))


class Decision(NamedTuple):
    """#VMEXIT or not; if it exits, what the processor writes into the VMCB.

    ``next_rip`` is the nRIP the exit saves (0 where the APM resets it);
    ``insn_bytes`` the decode-assist bytes (#PF); ``trap`` marks the write
    traps (taken after the instruction); ``pause`` the new PAUSE filter state.
    """

    exit: bool
    cause: tuple
    code: Optional[int] = None
    name: Optional[str] = None
    exit_info_1: int = 0
    exit_info_2: int = 0
    next_rip: int = 0
    insn_bytes: bytes = b""
    trap: bool = False
    pause: Optional[PauseFilter] = None

    fault = False


@dataclass(frozen=True, slots=True)
class Fault:
    """An exception the guest gets instead of an intercept check."""

    vector: int
    error_code: Optional[int]
    cause: tuple

    exit: ClassVar[bool] = False
    fault: ClassVar[bool] = True


Outcome = Union[Decision, Fault]

_CR0_PE, _CR0_MP, _CR0_TS = 1, 1 << 1, 1 << 3
_CR4_TSD, _CR4_DE, _CR4_PCE, _CR4_UMIP, _CR4_OSXSAVE = 1 << 2, 1 << 3, 1 << 8, 1 << 11, 1 << 18
_RFLAGS_IF, _RFLAGS_VM = 1 << 9, 1 << 17
_EFER_SVME = 1 << 12
_U32 = 0xFFFFFFFF
#: EXITINFO1 bit 63 of a CR intercept: the access was a MOV CR (decode assists).
CR_VALID = 1 << 63
#: IOIO EXITINFO1 (APM "IOIO Intercepts", Figure "EXITINFO1 for IOIO Intercept").
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_SIZE_SHIFT = 4          # SZ8 bit 4, SZ16 bit 5, SZ32 bit 6
IOIO_ADDR_SHIFT = 7          # A16 bit 7, A32 bit 8, A64 bit 9
IOIO_SEG_SHIFT = 10          # bits 12:10: the segment of the string source (decode assists)
IOIO_PORT_SHIFT = 16
#: TASK_SWITCH EXITINFO2 (Linux SVM_EXITINFOSHIFT_TS_*).
TS_REASON_IRET = 1 << 36
TS_REASON_JMP = 1 << 38
TS_HAS_ERROR_CODE = 1 << 44
#: Exceptions that push an error code (their EXITINFO1).
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
MSRPM_SIZE = 8 << 10
IOPM_SIZE = 12 << 10


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def intercepted(vmcb, bit: int) -> bool:
    """Is intercept ``bit`` (see :mod:`devirt_emu.svm.intercepts`) set in the VMCB?"""
    return bool(vmcb.get(INTERCEPT_WORDS[bit >> 5]) >> (bit & 31) & 1)


def _b(bit: int, on) -> str:
    return f"{I.BY_BIT[bit]}={1 if on else 0}"


def _no(*cause: str) -> Decision:
    return Decision(False, cause)


def _exit(code: int, cause: tuple, info1: int = 0, info2: int = 0, *, ev: Optional[Event] = None,
          trap: bool = False, insn_bytes: bytes = b"", pause=None) -> Decision:
    """An exit with ``code``; ``ev`` given: an instruction intercept, nRIP saved."""
    nrip = ev.rip + ev.insn.length if ev is not None and ev.insn is not None else 0
    return Decision(True, cause, code, X.BY_CODE[code], info1, info2, nrip, insn_bytes, trap,
                    pause)


def exit_decision(code: int, cause: tuple, *, exit_info_1: int = 0, exit_info_2: int = 0,
                  next_rip: int = 0) -> Decision:
    """A Decision for an exit decided elsewhere (NPF, VMEXIT_INVALID)."""
    return Decision(True, tuple(cause), code, X.name_of(code), exit_info_1, exit_info_2, next_rip)


def _simple(bit: int, code: int) -> Callable:
    """An instruction whose intercept is one bit and that has no EXITINFO."""
    def rule(ev, vmcb, rm, pause):
        on = intercepted(vmcb, bit)
        return _exit(code, (_b(bit, 1),), ev=ev) if on else _no(_b(bit, 0))
    return rule


def _gp0(*cause) -> Fault:
    return Fault(13, 0, cause)


def _ud(*cause) -> Fault:
    return Fault(6, None, cause)


def _cpl(ev: Event) -> int:
    regs = ev.regs
    return regs["cpl"] if regs["cr0"] & _CR0_PE else 0


def _need_cpl0(ev: Event) -> Optional[Fault]:
    cpl = _cpl(ev)
    if cpl:
        return _gp0(f"CPL={cpl}: {ev.kind.value} needs CPL 0 (#GP(0) comes before the intercept)")
    return None


def _cpl0_then(bit: int, code: int) -> Callable:
    simple = _simple(bit, code)

    def rule(ev, vmcb, rm, pause):
        return _need_cpl0(ev) or simple(ev, vmcb, rm, pause)
    return rule


def _gpr(ev: Event, number: Optional[int]) -> int:
    if number is None:
        raise RuleInputError(f"{ev.kind.value}: the decoded instruction has no register operand")
    value = ev.regs[GPR_NAMES[number]]
    return value if ev.regs["mode"] == 64 else value & _U32


def _need_extra(ev: Event, key: str):
    try:
        return ev.extra[key]
    except KeyError:
        raise RuleInputError(f"{ev.kind.value}: the rule needs event.extra[{key!r}] "
                             f"({EXTRA_KEYS[key]})") from None


# --------------------------------------------------------------------------
# the permission maps (pure: a reader and a base address)
# --------------------------------------------------------------------------
def msrpm_bit(msr: int, write: bool) -> Optional[int]:
    """The bit of the MSRPM that controls RDMSR (``write`` False) or WRMSR of
    ``msr``, or None when the MSR is outside the three ranges the map covers
    (APM "MSR Intercepts", Table "MSR Ranges Covered by MSRPM": 0-1FFFh at
    byte 0, C000_0000h-C000_1FFFh at byte 800h, C001_0000h-C001_1FFFh at byte
    1000h; two bits per MSR, the lower for reads, the higher for writes)."""
    if msr <= 0x1FFF:
        base = 0
    elif 0xC0000000 <= msr <= 0xC0001FFF:
        base, msr = 0x800 * 8, msr - 0xC0000000
    elif 0xC0010000 <= msr <= 0xC0011FFF:
        base, msr = 0x1000 * 8, msr - 0xC0010000
    else:
        return None
    return base + 2 * msr + (1 if write else 0)


def msrpm_intercepts(read_mem: ReadMem, msrpm_pa: int, msr: int, write: bool) -> tuple[bool, str]:
    """(intercepted, cause) for an RDMSR/WRMSR of ``msr`` with MSR_PROT set."""
    b = msrpm_bit(msr, write)
    if b is None:
        return True, f"MSR {msr:#x} is outside the MSRPM's ranges (always intercepted)"
    on = read_mem((msrpm_pa & ~0xFFF) + (b >> 3), 1)[0] >> (b & 7) & 1
    return bool(on), f"MSRPM bit {b:#x} ({'write' if write else 'read'} of {msr:#x})={on}"


def iopm_intercepts(read_mem: ReadMem, iopm_pa: int, port: int, size: int) -> tuple[bool, str]:
    """(intercepted, cause) for an access of ``size`` bytes at ``port`` (APM
    "I/O Permissions Map": one bit per port; a multi-byte access checks the
    bits of every port it touches, and an access past port FFFFh reads the
    bits that follow in the map's third page, without wrapping to port 0)."""
    base = iopm_pa & ~0xFFF
    for p in range(port, port + size):
        on = read_mem(base + (p >> 3), 1)[0] >> (p & 7) & 1
        if on:
            return True, f"IOPM bit {p:#x}=1"
    return False, f"IOPM bits {port:#x}-{port + size - 1:#x}=0"


# --------------------------------------------------------------------------
# CR and DR accesses
# --------------------------------------------------------------------------
def _mov_from_cr(ev, vmcb, rm, pause):
    insn = ev.insn
    fault = _need_cpl0(ev)
    if fault:
        return fault
    bit = I.INTERCEPT_CR0_READ + insn.cr
    if intercepted(vmcb, bit):
        return _exit(X.READ_CR0 + insn.cr, (_b(bit, 1),), CR_VALID | insn.gpr, ev=ev)
    return _no(_b(bit, 0))


def _selective_cr0(old: int, new: int) -> bool:
    """APM "CR0 selective write": a write that changes a bit other than CR0.TS
    or CR0.MP."""
    return bool((old ^ new) & ~(_CR0_TS | _CR0_MP))


def _cr_write(ev, vmcb, cr: int, new: int, info1: int, selective: bool) -> Decision:
    """The write intercept of CRn, then (CR0) the selective write intercept,
    then the CRn write trap: the plain write intercept has priority over the
    selective one (APM "CR0 selective write")."""
    bit = I.INTERCEPT_CR0_WRITE + cr
    if intercepted(vmcb, bit):
        return _exit(X.WRITE_CR0 + cr, (_b(bit, 1),), info1, ev=ev)
    cause = [_b(bit, 0)]
    if cr == 0 and selective:
        sel = I.INTERCEPT_SELECTIVE_CR0
        on = intercepted(vmcb, sel)
        changes = _selective_cr0(ev.regs["cr0"], new)
        if on and changes:
            return _exit(X.CR0_SEL_WRITE, (*cause, _b(sel, 1), "a bit other than TS/MP changes"),
                         info1, ev=ev)
        cause.append(_b(sel, on) if changes or not on else f"{_b(sel, 1)} (only TS/MP change)")
    trap = I.TABLE[f"TRAP_CR{cr}_WRITE"]
    if intercepted(vmcb, trap):
        return _exit(X.TABLE[f"CR{cr}_WRITE_TRAP"], (*cause, _b(trap, 1)), new, ev=ev, trap=True)
    return _no(*cause)


def _mov_to_cr(ev, vmcb, rm, pause):
    insn = ev.insn
    fault = _need_cpl0(ev)
    if fault:
        return fault
    return _cr_write(ev, vmcb, insn.cr, _gpr(ev, insn.gpr), CR_VALID | insn.gpr, True)


def _clts(ev, vmcb, rm, pause):
    fault = _need_cpl0(ev)
    if fault:
        return fault
    # CLTS changes only TS: never a selective CR0 write
    return _cr_write(ev, vmcb, 0, ev.regs["cr0"] & ~_CR0_TS, 0, False)


def _lmsw(ev, vmcb, rm, pause):
    insn = ev.insn
    fault = _need_cpl0(ev)
    if fault:
        return fault
    src = _gpr(ev, insn.gpr) if insn.mem is None else _need_extra(ev, "lmsw_source")
    old = ev.regs["cr0"]
    # LMSW loads CR0[3:0] and cannot clear PE
    new = (old & ~0xE) | (src & 0xF) | (old & _CR0_PE)
    return _cr_write(ev, vmcb, 0, new, 0, True)


def _smsw(ev, vmcb, rm, pause):
    if ev.regs["cr4"] & _CR4_UMIP and _cpl(ev):
        return _gp0("CR4.UMIP=1 and CPL>0: SMSW is #GP(0)")
    bit = I.INTERCEPT_CR0_READ
    if intercepted(vmcb, bit):
        return _exit(X.READ_CR0, (_b(bit, 1),), 0, ev=ev)
    return _no(_b(bit, 0))


def _mov_dr(ev, vmcb, rm, pause):
    insn = ev.insn
    fault = _need_cpl0(ev)
    if fault:
        return fault
    if insn.dr in (4, 5) and ev.regs["cr4"] & _CR4_DE:
        return _ud(f"CR4.DE=1: MOV DR{insn.dr} is #UD")
    write = ev.kind is Kind.MOV_TO_DR
    bit = (I.INTERCEPT_DR0_WRITE if write else I.INTERCEPT_DR0_READ) + insn.dr
    code = (X.WRITE_DR0 if write else X.READ_DR0) + insn.dr
    if intercepted(vmcb, bit):
        return _exit(code, (_b(bit, 1),), insn.gpr, ev=ev)
    return _no(_b(bit, 0))


# --------------------------------------------------------------------------
# MSRs, I/O
# --------------------------------------------------------------------------
def _msr(ev, vmcb, rm, pause):
    fault = _need_cpl0(ev)
    if fault:
        return fault
    write = ev.kind is Kind.WRMSR
    ecx = ev.regs["rcx"] & _U32
    bit = I.INTERCEPT_MSR_PROT
    if intercepted(vmcb, bit):
        on, why = msrpm_intercepts(rm, vmcb.get("msrpm_base_pa"), ecx, write)
        if on:
            return _exit(X.MSR, (_b(bit, 1), why), 1 if write else 0, ev=ev)
        cause = (_b(bit, 1), why)
    else:
        cause = (_b(bit, 0),)
    if write and ecx == 0xC0000080:
        trap = I.TRAP_EFER_WRITE
        if intercepted(vmcb, trap):
            new = (ev.regs["rdx"] & _U32) << 32 | ev.regs["rax"] & _U32
            return _exit(X.EFER_WRITE_TRAP, (*cause, _b(trap, 1)), new, ev=ev, trap=True)
    return _no(*cause)


def ioio_exit_info_1(port: int, size: int, is_in: bool, string: bool, rep: bool,
                     addr_size: int, seg: int) -> int:
    """EXITINFO1 of an IOIO intercept (APM "IOIO Intercepts"): bit 0 TYPE (1 =
    IN), bit 2 STR, bit 3 REP, bits 6:4 SZ8/SZ16/SZ32, bits 9:7 A16/A32/A64,
    bits 12:10 the segment (string instructions; decode assists), 31:16 the port."""
    info = port << IOIO_PORT_SHIFT
    info |= {1: 1, 2: 2, 4: 4}[size] << IOIO_SIZE_SHIFT
    info |= {2: 1, 4: 2, 8: 4}[addr_size] << IOIO_ADDR_SHIFT
    if is_in:
        info |= IOIO_TYPE_IN
    if string:
        info |= IOIO_STR | (seg & 7) << IOIO_SEG_SHIFT
    if rep:
        info |= IOIO_REP
    return info


def _io(ev, vmcb, rm, pause):
    insn = ev.insn
    regs = ev.regs
    port = ev.port if ev.port is not None else insn.port
    if port is None:
        raise RuleInputError(f"{ev.kind.value}: the event needs the resolved port (event.port)")
    size = insn.io_size
    if size not in (1, 2, 4):
        raise RuleInputError(f"{ev.kind.value}: I/O size {size!r} is not 1, 2 or 4")
    cpl = _cpl(ev)
    if cpl:
        rflags = regs["rflags"]
        iopl = rflags >> 12 & 3
        if rflags & _RFLAGS_VM or cpl > iopl:
            if not _need_extra(ev, "io_permitted"):
                return _gp0(f"CPL={cpl} > IOPL={iopl} and the TSS I/O-permission bitmap "
                            f"denies port {port:#x}")
    bit = I.INTERCEPT_IOIO_PROT
    if not intercepted(vmcb, bit):
        return _no(_b(bit, 0))
    on, why = iopm_intercepts(rm, vmcb.get("iopm_base_pa"), port, size)
    if not on:
        return _no(_b(bit, 1), why)
    is_in, string = IO_SHAPE[insn.kind]
    seg = insn.mem.seg if string and insn.mem is not None else (0 if is_in else 3)
    info1 = ioio_exit_info_1(port, size, is_in, string, insn.rep, insn.addr_size, seg)
    d = _exit(X.IOIO, (_b(bit, 1), why), info1, ev=ev)
    return d._replace(exit_info_2=d.next_rip)     # EXITINFO2: the next RIP


# --------------------------------------------------------------------------
# instructions
# --------------------------------------------------------------------------
def _rdtsc(ev, vmcb, rm, pause):
    if ev.regs["cr4"] & _CR4_TSD and _cpl(ev):
        return _gp0("CR4.TSD=1 and CPL>0: #GP(0) comes before the intercept")
    bit, code = ((I.INTERCEPT_RDTSC, X.RDTSC) if ev.kind is Kind.RDTSC
                 else (I.INTERCEPT_RDTSCP, X.RDTSCP))
    return _simple(bit, code)(ev, vmcb, rm, pause)


def _rdpmc(ev, vmcb, rm, pause):
    if not ev.regs["cr4"] & _CR4_PCE and _cpl(ev):
        return _gp0("CR4.PCE=0 and CPL>0: #GP(0) comes before the intercept")
    return _simple(I.INTERCEPT_RDPMC, X.RDPMC)(ev, vmcb, rm, pause)


def _flags_insn(bit, code):
    simple = _simple(bit, code)

    def rule(ev, vmcb, rm, pause):
        rflags = ev.regs["rflags"]
        if rflags & _RFLAGS_VM and rflags >> 12 & 3 < 3 and not ev.regs["cr4"] & 1:
            return _gp0("virtual-8086 mode with IOPL<3 and CR4.VME=0: #GP(0) first")
        return simple(ev, vmcb, rm, pause)
    return rule


def _intn(ev, vmcb, rm, pause):
    rflags = ev.regs["rflags"]
    if rflags & _RFLAGS_VM and rflags >> 12 & 3 < 3 and not ev.regs["cr4"] & 1:
        return _gp0("virtual-8086 mode with IOPL<3: INT n is #GP(0) first")
    bit = I.INTERCEPT_INTn
    if intercepted(vmcb, bit):
        return _exit(X.SWINT, (_b(bit, 1),), ev.insn.vector, ev=ev)   # decode assist: the vector
    return _no(_b(bit, 0))


def _invlpg(ev, vmcb, rm, pause):
    fault = _need_cpl0(ev)
    if fault:
        return fault
    bit = I.INTERCEPT_INVLPG
    if intercepted(vmcb, bit):
        return _exit(X.INVLPG, (_b(bit, 1),), ev.linear or 0, ev=ev)  # decode assist: the address
    return _no(_b(bit, 0))


def _svm_insn(bit, code, *, needs_cpl0: bool = True, ud_unintercepted: bool = False):
    """VMRUN, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA: #UD with EFER.SVME
    clear, #GP(0) at CPL > 0, then the intercept (APM, the instruction pages)."""
    def rule(ev, vmcb, rm, pause):
        if not ev.regs["efer"] & _EFER_SVME:
            return _ud(f"EFER.SVME=0: {ev.kind.value} is #UD")
        if needs_cpl0:
            fault = _need_cpl0(ev)
            if fault:
                return fault
        if intercepted(vmcb, bit):
            return _exit(code, (_b(bit, 1),), ev=ev)
        if ud_unintercepted:
            return _ud(f"{_b(bit, 0)}: {ev.kind.value} is #UD")
        return _no(_b(bit, 0))
    return rule


def _vmmcall(ev, vmcb, rm, pause):
    """VMMCALL: the intercept, else #UD (APM, VMMCALL: "#UD if not intercepted")."""
    bit = I.INTERCEPT_VMMCALL
    if intercepted(vmcb, bit):
        return _exit(X.VMMCALL, (_b(bit, 1),), ev=ev)
    return _ud(f"{_b(bit, 0)}: VMMCALL is #UD")


def _pause(ev, vmcb, rm, pause: Optional[PauseFilter]):
    """APM "Pause Intercept Filtering": with a nonzero pause_filter_count, the
    counter VMRUN loaded is decremented by every PAUSE and the PAUSE that
    brings it to zero is intercepted; with a nonzero pause_filter_thresh, a
    PAUSE more than that many TSC cycles after the previous one first reloads
    the counter from pause_filter_count."""
    bit = I.INTERCEPT_PAUSE
    if not intercepted(vmcb, bit):
        return _no(_b(bit, 0))
    field_count = vmcb.get("pause_filter_count")
    if field_count == 0:
        return _exit(X.PAUSE, (_b(bit, 1), "pause_filter_count=0 (no filter)"), ev=ev)
    if pause is None:
        pause = PauseFilter(field_count)
    count, cause = pause.count, [_b(bit, 1)]
    threshold = vmcb.get("pause_filter_thresh")
    tsc = None
    if threshold:
        try:
            tsc = ev.regs["tsc"]
        except KeyError:
            raise RuleInputError("PAUSE with pause_filter_thresh: the rule needs regs['tsc']") \
                from None
        if pause.last is not None and tsc - pause.last > threshold:
            count = field_count
            cause.append(f"{tsc - pause.last} cycles since the last PAUSE > "
                         f"pause_filter_thresh={threshold}: counter reloaded")
    count -= 1
    new = PauseFilter(max(count, 0), tsc)
    if count <= 0:
        return _exit(X.PAUSE, (*cause, "the PAUSE filter counter reached 0"), ev=ev, pause=new)
    return Decision(False, (*cause, f"PAUSE filter counter {count} left"), pause=new)


def _mwait(ev, vmcb, rm, pause):
    if intercepted(vmcb, I.INTERCEPT_MWAIT):
        return _exit(X.MWAIT, (_b(I.INTERCEPT_MWAIT, 1),), ev=ev)
    cause = (_b(I.INTERCEPT_MWAIT, 0),)
    if intercepted(vmcb, I.INTERCEPT_MWAIT_COND) and ev.extra.get("monitor_armed", False):
        return _exit(X.MWAIT_COND, (*cause, _b(I.INTERCEPT_MWAIT_COND, 1), "monitor armed"),
                     ev=ev)
    return _no(*cause)


def _xsetbv(ev, vmcb, rm, pause):
    if not ev.regs["cr4"] & _CR4_OSXSAVE:
        return _ud("CR4.OSXSAVE=0: XSETBV is #UD")
    return _need_cpl0(ev) or _simple(I.INTERCEPT_XSETBV, X.XSETBV)(ev, vmcb, rm, pause)


def _store_dt(bit, code):
    simple = _simple(bit, code)

    def rule(ev, vmcb, rm, pause):
        if ev.regs["cr4"] & _CR4_UMIP and _cpl(ev):
            return _gp0(f"CR4.UMIP=1 and CPL>0: {ev.kind.value} is #GP(0)")
        return simple(ev, vmcb, rm, pause)
    return rule


def _rsm(ev, vmcb, rm, pause):
    # the model has no SMM: RSM outside SMM is #UD, a simple exception checked first
    return _ud("RSM outside SMM is #UD (SMM is not modelled)")


def _task_switch(ev, vmcb, rm, pause):
    """EXITINFO1: the new TSS selector; EXITINFO2: bit 36 IRET, bit 38 JMP,
    bit 44 with the error code in 31:0 (APM "Task Switch Intercept")."""
    bit = I.INTERCEPT_TASK_SWITCH
    if not intercepted(vmcb, bit):
        return _no(_b(bit, 0))
    sel = _need_extra(ev, "tss_selector")
    src = _need_extra(ev, "task_switch_source")
    info2 = {"IRET": TS_REASON_IRET, "JMP": TS_REASON_JMP}.get(src, 0)
    ec = ev.extra.get("task_switch_error_code")
    if ec is not None:
        info2 |= TS_HAS_ERROR_CODE | ec & _U32
    return _exit(X.TASK_SWITCH, (_b(bit, 1), f"task switch by {src}"), sel & 0xFFFF, info2)


def _shutdown(ev, vmcb, rm, pause):
    bit = I.INTERCEPT_SHUTDOWN
    if intercepted(vmcb, bit):
        return _exit(X.SHUTDOWN, (_b(bit, 1),))
    return _no(_b(bit, 0))


def _exception(ev, vmcb, rm, pause):
    """APM "Exception Intercepts": EXITINFO1 the error code (exceptions that push
    one), EXITINFO2 the faulting address of a #PF (CR2 is not written);
    decode assists give a #PF's instruction bytes."""
    v = ev.vector
    bit = I.INTERCEPT_EXCEPTION_OFFSET + v
    if not intercepted(vmcb, bit):
        return _no(_b(bit, 0))
    info1 = ev.error_code or 0 if v in _ERROR_CODE_VECTORS else 0
    info2 = ev.cr2 or 0 if v == 14 else 0
    insn_bytes = ev.extra.get("insn_bytes", b"") if v == 14 else b""
    # nRIP: saved for the exceptions of INT3, INTO and BOUND (APM "State Saved on Exit")
    by_insn = ev.insn if ev.insn is not None and ev.insn.kind in (Kind.INT3, Kind.INTO) else None
    d = _exit(X.EXCP_BASE + v, (_b(bit, 1),), info1, info2, insn_bytes=insn_bytes)
    if by_insn is not None:
        d = d._replace(next_rip=ev.rip + by_insn.length)
    return d


def _event(bit, code):
    def rule(ev, vmcb, rm, pause):
        if intercepted(vmcb, bit):
            return _exit(code, (_b(bit, 1),))
        return _no(_b(bit, 0))
    return rule


def _never(why: str):
    def rule(ev, vmcb, rm, pause):
        return _no(why)
    return rule


def _ud_rule(why: str):
    def rule(ev, vmcb, rm, pause):
        return _ud(why)
    return rule


_VMX_KINDS = (Kind.VMCALL, Kind.VMCLEAR, Kind.VMLAUNCH, Kind.VMRESUME, Kind.VMPTRLD,
              Kind.VMPTRST, Kind.VMREAD, Kind.VMWRITE, Kind.VMXON, Kind.VMXOFF, Kind.INVEPT,
              Kind.INVVPID, Kind.VMFUNC)

#: event kind -> rule(ev, vmcb, read_mem, pause) -> Outcome.
RULES: Mapping[Kind, Callable] = {
    Kind.MOV_FROM_CR: _mov_from_cr, Kind.MOV_TO_CR: _mov_to_cr, Kind.CLTS: _clts,
    Kind.LMSW: _lmsw, Kind.SMSW: _smsw, Kind.MOV_FROM_DR: _mov_dr, Kind.MOV_TO_DR: _mov_dr,
    Kind.RDMSR: _msr, Kind.WRMSR: _msr,
    Kind.IN: _io, Kind.OUT: _io, Kind.INS: _io, Kind.OUTS: _io,
    Kind.CPUID: _simple(I.INTERCEPT_CPUID, X.CPUID),
    Kind.RDTSC: _rdtsc, Kind.RDTSCP: _rdtsc, Kind.RDPMC: _rdpmc,
    Kind.RDPRU: _simple(I.INTERCEPT_RDPRU, X.RDPRU),
    Kind.HLT: _cpl0_then(I.INTERCEPT_HLT, X.HLT),
    Kind.PAUSE: _pause,
    Kind.MONITOR: _simple(I.INTERCEPT_MONITOR, X.MONITOR),
    Kind.MONITORX: _never("MONITORX has no intercept"),
    Kind.MWAIT: _mwait, Kind.MWAITX: _never("MWAITX has no intercept"),
    Kind.INVLPG: _invlpg,
    Kind.INVLPGA: _svm_insn(I.INTERCEPT_INVLPGA, X.INVLPGA),
    Kind.INVLPGB: _cpl0_then(I.INTERCEPT_INVLPGB, X.INVLPGB),
    Kind.TLBSYNC: _cpl0_then(I.INTERCEPT_TLBSYNC, X.TLBSYNC),
    Kind.INVPCID: _cpl0_then(I.INTERCEPT_INVPCID, X.INVPCID),
    Kind.INVD: _cpl0_then(I.INTERCEPT_INVD, X.INVD),
    Kind.WBINVD: _cpl0_then(I.INTERCEPT_WBINVD, X.WBINVD),
    Kind.WBNOINVD: _cpl0_then(I.INTERCEPT_WBINVD, X.WBINVD),
    Kind.MCOMMIT: _simple(I.INTERCEPT_MCOMMIT, X.MCOMMIT),
    Kind.XSETBV: _xsetbv,
    Kind.SIDT: _store_dt(I.INTERCEPT_STORE_IDTR, X.IDTR_READ),
    Kind.SGDT: _store_dt(I.INTERCEPT_STORE_GDTR, X.GDTR_READ),
    Kind.SLDT: _store_dt(I.INTERCEPT_STORE_LDTR, X.LDTR_READ),
    Kind.STR: _store_dt(I.INTERCEPT_STORE_TR, X.TR_READ),
    Kind.LIDT: _cpl0_then(I.INTERCEPT_LOAD_IDTR, X.IDTR_WRITE),
    Kind.LGDT: _cpl0_then(I.INTERCEPT_LOAD_GDTR, X.GDTR_WRITE),
    Kind.LLDT: _cpl0_then(I.INTERCEPT_LOAD_LDTR, X.LDTR_WRITE),
    Kind.LTR: _cpl0_then(I.INTERCEPT_LOAD_TR, X.TR_WRITE),
    Kind.PUSHF: _flags_insn(I.INTERCEPT_PUSHF, X.PUSHF),
    Kind.POPF: _flags_insn(I.INTERCEPT_POPF, X.POPF),
    Kind.IRET: _simple(I.INTERCEPT_IRET, X.IRET),
    Kind.INT: _intn,
    Kind.INT1: _simple(I.INTERCEPT_ICEBP, X.ICEBP),
    Kind.INT3: _never("INT3 raises #BP (exception intercept 3)"),
    Kind.INTO: _never("INTO raises #OF (exception intercept 4)"),
    Kind.RSM: _rsm,
    Kind.VMRUN: _svm_insn(I.INTERCEPT_VMRUN, X.VMRUN),
    Kind.VMLOAD: _svm_insn(I.INTERCEPT_VMLOAD, X.VMLOAD),
    Kind.VMSAVE: _svm_insn(I.INTERCEPT_VMSAVE, X.VMSAVE),
    Kind.STGI: _svm_insn(I.INTERCEPT_STGI, X.STGI),
    Kind.CLGI: _svm_insn(I.INTERCEPT_CLGI, X.CLGI),
    Kind.SKINIT: _svm_insn(I.INTERCEPT_SKINIT, X.SKINIT),
    Kind.VMMCALL: _vmmcall,
    Kind.TASK_SWITCH: _task_switch,
    Kind.TRIPLE_FAULT: _shutdown,
    Kind.EXCEPTION: _exception,
    Kind.INTERRUPT: _event(I.INTERCEPT_INTR, X.INTR),
    Kind.NMI: _event(I.INTERCEPT_NMI, X.NMI),
    Kind.INIT: _event(I.INTERCEPT_INIT, X.INIT),
    Kind.SIPI: _never("SVM has no SIPI intercept"),
    **{k: _ud_rule(f"{k.value} is a VMX instruction: #UD on an AMD processor")
       for k in _VMX_KINDS},
}


def decide(ev: Event, vmcb, read_mem: ReadMem, *, pause: Optional[PauseFilter] = None) -> Outcome:
    """Does ``ev`` cause a #VMEXIT under ``vmcb``?  A kind with no SVM intercept
    (RDRAND, CLI, the markers, ...) never exits."""
    rule = RULES.get(ev.kind)
    if rule is None:
        return _no(f"{ev.kind.value} has no SVM intercept")
    if ev.insn is None and ev.kind not in _NON_INSN_OK:
        raise RuleInputError(f"{ev.kind.value}: an instruction event needs its decoded insn")
    return rule(ev, vmcb, read_mem, pause)


_NON_INSN_OK = frozenset({Kind.TASK_SWITCH, Kind.TRIPLE_FAULT, Kind.EXCEPTION, Kind.INTERRUPT,
                          Kind.NMI, Kind.INIT, Kind.SIPI})


def virtual_interrupt_ready(int_ctl: int, *, rflags: int, interrupt_shadow: bool,
                            gif: bool) -> bool:
    """Would the guest take its pending virtual interrupt now (APM "Injecting
    Virtual (INTR) Interrupts")?  V_IRQ set, GIF set, RFLAGS.IF set, no
    interrupt shadow, and unless V_IGN_TPR, V_INTR_PRIO above V_TPR."""
    if not int_ctl & V_IRQ_MASK or not gif or not rflags & _RFLAGS_IF or interrupt_shadow:
        return False
    return bool(int_ctl & V_IGN_TPR_MASK) or \
        (int_ctl >> V_INTR_PRIO_SHIFT & 0xF) > int_ctl & V_TPR_MASK


def virtual_interrupt_exit(vmcb, *, rflags: int, interrupt_shadow: bool, gif: bool) -> Decision:
    """The VINTR intercept (APM "Interrupt Intercepts"): a pending virtual
    interrupt the guest would take now (:func:`virtual_interrupt_ready`)
    exits with VINTR instead of being delivered when INTERCEPT_VINTR is set."""
    bit = I.INTERCEPT_VINTR
    int_ctl = vmcb.get("int_ctl")
    if not int_ctl & V_IRQ_MASK:
        return _no("V_IRQ=0")
    if not virtual_interrupt_ready(int_ctl, rflags=rflags, interrupt_shadow=interrupt_shadow,
                                   gif=gif):
        return _no("V_IRQ=1 but the guest cannot take it now (GIF, IF, shadow or V_TPR)")
    if intercepted(vmcb, bit):
        return _exit(X.VINTR, ("V_IRQ=1 and deliverable", _b(bit, 1)))
    return _no("V_IRQ=1 and deliverable", _b(bit, 0))
