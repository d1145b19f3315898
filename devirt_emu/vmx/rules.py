"""VMX exit rules: for each event, exit or not, with the exit information and
the cause.  Pure functions of (event, VMCS, memory reader).

Source: Intel SDM Vol. 3C, chapter "VMX Non-Root Operation" (sections
"Instructions That Cause VM Exits Unconditionally", "Instructions That Cause
VM Exits Conditionally", "Relative Priority of Faults and VM Exits", "Other
Causes of VM Exits", "Changes to Instruction Behavior in VMX Non-Root
Operation", "Virtualizing Memory-Mapped APIC Accesses"), chapter "VM Exits"
(exit information, see :mod:`devirt_emu.vmx.exit_info`), and the
instruction pages of Vol. 2 for the exceptions that come first.  Shape after
KVM's ``nested_vmx_l1_wants_exit``: one table, one rule per event kind, the
bitmap cases in small helpers.

Entry points
============

``decide(event, vmcs, read_mem, *, pause_loop=None) -> Decision | Fault``
    ``vmcs`` is anything with ``vmread(VmcsField) -> int`` (the
    :class:`~devirt_emu.vmx.vmcs.Vmcs` class); ``read_mem(pa, n) -> bytes``
    reads host-physical memory (the I/O bitmaps, the MSR bitmap, the
    VMREAD/VMWRITE bitmaps, the EPTP list).  The rule for ``event.kind`` is
    found in a table built at import time (:data:`RULES`).

``boundary_exit(vmcs, *, rflags, interruptibility, ...) -> Decision``
    the exits that are not tied to an event: monitor trap flag, VMX-
    preemption timer, NMI window, interrupt window, in the SDM's priority
    order (see its docstring).

``exit_decision(reason, cause, ...) -> Decision``
    a Decision for an exit found elsewhere (EPT violation and
    misconfiguration come from :mod:`devirt_emu.vmx.ept`).

Outcomes
========

:class:`Decision` with ``exit=True``: a VM exit with its reason and exit
information; ``timing`` (from the exit-reason table) says whether the
instruction must first be completed (``Timing.TRAP``: TPR below threshold
after a virtualized MOV to CR8 or TPR write) or has had no effect
(``Timing.FAULT``).  ``exit=False``: no VM exit; the platform executes the
instruction or delivers the event as VMX non-root operation modifies it.
:class:`Fault`: an exception the SDM gives priority over the VM exit (#UD,
privilege-level #GP, I/O-permission #GP, the VMX-specific #UDs of disabled
features, or the instruction's own fault when it does not exit).  Every
outcome carries ``cause``: the controls, bitmap bits, masks and shadows the
rule looked at and what it found, e.g. ``("CPU_BASED_HLT_EXITING=1",)``.

Guest state read from ``event.regs``
====================================

Always by name: the GPRs, ``rflags``, ``cr0``, ``cr4``, ``cpl``, ``mode``
(16/32/64), ``efer`` (for compatibility mode).  ``cr0``/``cr4`` are the real
control registers, not the guest's shadowed view.  A few rules need state the
events contract does not list yet; they read it from ``event.regs`` too
(:data:`EXTRA_REGS`) and raise :class:`RuleInputError` if it is missing.
Event-specific inputs come from ``event.extra`` (:data:`EXTRA_KEYS`).

Scope notes
===========

* The rules describe VMX non-root operation.  Outside VMX operation the VMX
  instructions are #UD and nothing exits; that is the platform's case.
* The VMCS is read with ``vmread`` only for fields whose controls are on
  (the secondary controls only when "activate secondary controls" is 1, the
  PLE fields only with PAUSE-loop exiting, ...), so on a VMCS that passed
  the VM-entry checks every read names a field the modelled CPU supports.

* APIC-register virtualization and virtual-interrupt delivery: the rules
  say whether an APIC access exits (which reads and writes of the
  APIC-access page are virtualized: :mod:`devirt_emu.vmx.apicv`); what a
  virtualized access then does (APIC-write emulation and the trap-like
  APIC-write and EOI-induced exits that may follow it, x2APIC MSR
  virtualization, the evaluation and delivery of virtual interrupts) is
  the vCPU's, with the same module.  An interrupt with the posted-interrupt
  notification vector does not exit (the vCPU processes it).
* SMM (RSM, SMIs), SGX enablement, MONITOR/MWAIT at CPL > 0 enabled by MSR,
  and 5-level EPT are not modelled.
* The TSS I/O-permission check is the platform's: an I/O instruction with
  CPL > IOPL (or in virtual-8086 mode) needs ``extra["io_permitted"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, NamedTuple, Optional, Union

from devirt_emu.x86 import (EFER_LMA, ERROR_CODE_VECTORS, EXCEPTION_NAMES, X86_CR0_PE, X86_CR0_TS,
                            X86_CR4_DE, X86_CR4_OSXSAVE, X86_CR4_PCE, X86_CR4_SMXE, X86_CR4_TSD,
                            X86_CR4_UMIP, X86_CR4_VMXE, X86_EFLAGS_IF, X86_EFLAGS_OF,
                            X86_EFLAGS_VM)
from devirt_emu.events import GPR_NAMES, IO_SHAPE, Event, Kind
from devirt_emu.vmx import controls as C
from devirt_emu.platform.lapic import MAXPHYADDR
from devirt_emu.vmx import apicv
from devirt_emu.vmx import capabilities as vcaps
from devirt_emu.vmx import exit_info as xi
from devirt_emu.vmx.entry import eptp_problem
from devirt_emu.vmx import exit_reasons as er
from devirt_emu.vmx.exit_reasons import Length, Timing
from devirt_emu.vmx.fields import VmcsField as F

ReadMem = Callable[[int, int], bytes]

#: Guest state some rules read from ``event.regs`` beyond the names the
#: events contract lists.
EXTRA_REGS: Mapping[str, str] = {
    "dr7": "MOV DR without MOV-DR exiting: DR7.GD decides the general-detect #DB",
    "xss": "XSAVES/XRSTORS: the IA32_XSS MSR",
    "tsc": "PAUSE with PAUSE-loop exiting at CPL 0: the current time-stamp counter",
    "activity_state": "SIPI: the current activity state (3 = wait-for-SIPI)",
}

#: ``event.extra`` keys the rules read.
EXTRA_KEYS: Mapping[str, str] = {
    "io_permitted": "IN/OUT/INS/OUTS with CPL > IOPL or in virtual-8086 mode: the TSS "
                    "I/O-permission bitmap allows every byte of the access (bool, required then)",
    "lmsw_source": "LMSW with a memory operand: the 16-bit value read (required then)",
    "monitor_armed": "MWAIT: the monitoring hardware is armed (bool, default False)",
    "dr6": "#DB exception: the DR6 value the exception would produce (default: no condition)",
    "iret_unblocked_nmi": "exception: raised by an IRET that unblocked NMIs (bool, default False)",
    "tss_selector": "TASK_SWITCH: selector of the new TSS (required)",
    "task_switch_source": "TASK_SWITCH: 'CALL', 'IRET', 'JMP' or 'IDT' (required)",
    "gpa": "APIC_ACCESS: the physical address accessed (required)",
    "access": "APIC_ACCESS: 'read', 'write' or 'fetch' (required)",
    "size": "APIC_ACCESS: access size in bytes (default 4)",
    "value": "APIC_ACCESS: the data of a write (required for a virtualized TPR write)",
    "during_delivery": "APIC_ACCESS: the access is part of event delivery (bool, default False)",
}


class RuleInputError(ValueError):
    """The event or the VMCS lacks something a rule needs, or holds a value
    VM entry would have refused."""


@dataclass(frozen=True)
class PauseLoop:
    """PAUSE-loop exiting bookkeeping of one logical processor (SDM: "PAUSE").

    ``first``: TSC of the PAUSE at CPL 0 considered first in the current
    loop; ``last``: TSC of the most recent PAUSE at CPL 0.  ``PauseLoop()``
    (both None) is the state right after VM entry: the next PAUSE at CPL 0
    is first in a loop.  The caller keeps one per core, passes it to
    :func:`decide` for PAUSE events, stores ``Decision.pause_loop`` back and
    resets it to ``PauseLoop()`` on every VM entry.
    """

    first: Optional[int] = None
    last: Optional[int] = None


class Decision(NamedTuple):
    """Exit or not; if it exits, the exit information as the SDM defines it.

    ``instruction_length`` and ``instruction_info`` are None where the SDM
    leaves the field undefined; ``interruption_info`` is 0 (invalid) where
    it does not apply.  ``timing`` is the exit reason's timing column.

    Immutable: a named tuple, because one is built on every sensitive
    instruction and a tuple costs a tenth of a frozen dataclass to make.
    """

    exit: bool
    cause: tuple
    reason: Optional[int] = None
    name: Optional[str] = None
    qualification: int = 0
    instruction_length: Optional[int] = None
    instruction_info: Optional[int] = None
    interruption_info: int = 0
    error_code: Optional[int] = None
    guest_linear_address: Optional[int] = None
    guest_physical_address: Optional[int] = None
    timing: Optional[Timing] = None
    pause_loop: Optional[PauseLoop] = None

    fault = False       # (a class attribute: Fault has True)


#: Decision from a tuple of all its field values, without the named tuple's
#: keyword-handling ``__new__`` (one is built per sensitive instruction).
_tuple_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class Fault:
    """An exception delivered to the guest instead of a VM exit (it may still
    exit through the exception bitmap when the platform raises it)."""

    vector: int
    error_code: Optional[int]
    cause: tuple

    exit: ClassVar[bool] = False
    fault: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return EXCEPTION_NAMES.get(self.vector, f"#{self.vector}")


Outcome = Union[Decision, Fault]

#: The modelled CPU's IA32_VMX_EPT_VPID_CAP (what VMFUNC's EPTP check reads, as VM entry does).
_EPT_VPID_CAP = vcaps.VMX_CAPABILITY_MSRS.get(vcaps.MSR_IA32_VMX_EPT_VPID_CAP, 0)

# Architectural register bits used below.
_DR7_GD = 1 << 13
_U32 = 0xFFFFFFFF

# Enum members used on every exit, bound once: on CPython 3.11 an attribute of an
# Enum class costs about 0.3 us (EnumType.__getattr__ puts every lookup on the
# slow path), against 0.02 us for a module global.
_ALWAYS = Length.ALWAYS

_NO_VMCS_SHADOW_CAUSE = "VMX instructions always exit in VMX non-root operation"

# VMCS fields on the hot paths, bound once: a global lookup is cheaper than an
# attribute access on the enum class.
_PROC = F.CPU_BASED_VM_EXEC_CONTROL
_PROC2 = F.SECONDARY_VM_EXEC_CONTROL
_PIN = F.PIN_BASED_VM_EXEC_CONTROL
_MSR_BITMAP = F.MSR_BITMAP
_IO_BITMAP_A = F.IO_BITMAP_A
_IO_BITMAP_B = F.IO_BITMAP_B
_EXCEPTION_BITMAP = F.EXCEPTION_BITMAP


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------
def _b(name: str, value: int) -> str:
    return f"{name}={1 if value else 0}"


def _no(*cause: str) -> Decision:
    return _tuple_new(Decision, (False, cause, None, None, 0, None, None, 0, None, None, None, None,
                                 None))


def _exit(number: int, ev: Optional[Event], cause: tuple, qualification: int = 0,
          info: Optional[int] = None, *, length: Optional[int] = -1, interruption: int = 0,
          error_code: Optional[int] = None, gla: Optional[int] = None, gpa: Optional[int] = None,
          pause_loop: Optional[PauseLoop] = None) -> Decision:
    """A Decision for exit ``number``; the instruction length is the event's
    instruction length when the table says it is always defined (pass
    ``length`` to override, None for undefined)."""
    row = er.BY_NUMBER[number]
    if length == -1:
        length = (ev.insn.length if row.length is _ALWAYS and ev is not None
                  and ev.insn is not None else None)
    return _tuple_new(Decision, (True, cause, number, row.name, qualification, length, info,
                                 interruption, error_code, gla, gpa, row.timing, pause_loop))


def exit_decision(reason: Union[int, str], cause: tuple, *, qualification: int = 0,
                  instruction_length: Optional[int] = None, instruction_info: Optional[int] = None,
                  interruption_info: int = 0, error_code: Optional[int] = None,
                  guest_linear_address: Optional[int] = None,
                  guest_physical_address: Optional[int] = None) -> Decision:
    """A Decision for a VM exit decided outside this module (EPT violation or
    misconfiguration, PML full, ...), with the reason's name and timing from
    the exit-reason table."""
    row = er.reason(reason)
    return Decision(True, tuple(cause), row.number, row.name, qualification, instruction_length,
                    instruction_info, interruption_info, error_code, guest_linear_address,
                    guest_physical_address, row.timing)


def _gp0(*cause: str) -> Fault:
    return Fault(13, 0, cause)


def _ud(*cause: str) -> Fault:
    return Fault(6, None, cause)


def _need_cpl0(ev: Event, what: str) -> Optional[Fault]:
    cpl = ev.regs["cpl"]
    if cpl:
        return _gp0(f"CPL={cpl}: {what} needs CPL 0 (#GP(0) comes before any VM exit)")
    return None


def _primary(vmcs) -> int:
    return vmcs.vmread(_PROC)


def _secondary(vmcs, primary: int) -> int:
    """Secondary controls as they act: all 0 unless "activate secondary
    controls" is 1 (SDM, primary processor-based control bit 31)."""
    if primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        return vmcs.vmread(_PROC2)
    return 0


def _sec_cause(primary: int, name: str, secondary: int, mask: int) -> str:
    if not primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        return f"CPU_BASED_ACTIVATE_SECONDARY_CONTROLS=0 (so {name} acts as 0)"
    return _b(name, secondary & mask)


def _extra_reg(ev: Event, name: str) -> int:
    try:
        return ev.regs[name]
    except KeyError:
        raise RuleInputError(
            f"{ev.kind.value}: the rule needs guest state {name!r} in event.regs "
            f"({EXTRA_REGS[name]})") from None


def _need_extra(ev: Event, key: str):
    try:
        return ev.extra[key]
    except KeyError:
        raise RuleInputError(f"{ev.kind.value}: the rule needs event.extra[{key!r}] "
                             f"({EXTRA_KEYS[key]})") from None


def _need_insn(ev: Event):
    if ev.insn is None:
        raise RuleInputError(f"{ev.kind.value}: an instruction event needs its decoded insn")
    return ev.insn


def _protected(regs) -> bool:
    return bool(regs["cr0"] & X86_CR0_PE)


def _v86(regs) -> bool:
    return bool(regs["rflags"] & X86_EFLAGS_VM)


def _gpr(regs, number: Optional[int], mode: int, what: str) -> int:
    if number is None:
        raise RuleInputError(f"{what}: the decoded instruction has no register operand")
    value = regs[GPR_NAMES[number]]
    return value if mode == 64 else value & _U32


def _bitmap_bit(read_mem: ReadMem, base: int, bit: int) -> int:
    return (read_mem(base + (bit >> 3), 1)[0] >> (bit & 7)) & 1


# --------------------------------------------------------------------------
# Unconditional exits
# --------------------------------------------------------------------------
def _cpuid(ev, vmcs, rm, pl):
    return _exit(er.CPUID, ev, ("CPUID always exits in VMX non-root operation",))


def _getsec(ev, vmcs, rm, pl):
    if not ev.regs["cr4"] & X86_CR4_SMXE:
        return _ud("CR4.SMXE=0: GETSEC is #UD")
    return _exit(er.GETSEC, ev, ("CR4.SMXE=1", "GETSEC always exits in VMX non-root operation"))


def _invd(ev, vmcs, rm, pl):
    return _need_cpl0(ev, "INVD") or _exit(
        er.INVD, ev, ("INVD always exits in VMX non-root operation",))


def _xsetbv(ev, vmcs, rm, pl):
    if not ev.regs["cr4"] & X86_CR4_OSXSAVE:
        return _ud("CR4.OSXSAVE=0: XSETBV is #UD")
    return _need_cpl0(ev, "XSETBV") or _exit(
        er.XSETBV, ev, ("XSETBV always exits in VMX non-root operation",))


def _vmcall(ev, vmcs, rm, pl):
    return _exit(er.VMCALL, ev, ("VMCALL always exits in VMX non-root operation",))


_VMX_REASON = {
    Kind.VMCLEAR: er.VMCLEAR, Kind.VMLAUNCH: er.VMLAUNCH, Kind.VMPTRLD: er.VMPTRLD,
    Kind.VMPTRST: er.VMPTRST, Kind.VMREAD: er.VMREAD, Kind.VMRESUME: er.VMRESUME,
    Kind.VMWRITE: er.VMWRITE, Kind.VMXOFF: er.VMOFF, Kind.VMXON: er.VMON,
    Kind.INVEPT: er.INVEPT, Kind.INVVPID: er.INVVPID,
}
_VMX_MEMORY_OPERAND = frozenset({Kind.VMCLEAR, Kind.VMPTRLD, Kind.VMPTRST, Kind.VMXON,
                                 Kind.INVEPT, Kind.INVVPID})


def _vmx_ud(ev: Event) -> Optional[Fault]:
    """The #UD checks a VMX instruction makes before its non-root VM exit."""
    regs = ev.regs
    if not _protected(regs):
        return _ud(f"CR0.PE=0: {ev.kind.value} is #UD in real-address mode")
    if _v86(regs):
        return _ud(f"RFLAGS.VM=1: {ev.kind.value} is #UD in virtual-8086 mode")
    if regs["efer"] & EFER_LMA and regs["mode"] != 64:
        return _ud(f"IA32_EFER.LMA=1 and CS.L=0: {ev.kind.value} is #UD in compatibility mode")
    if ev.kind in _VMX_MEMORY_OPERAND and ev.insn.mem is None:
        return _ud(f"{ev.kind.value} with a register operand is #UD")
    if ev.kind is Kind.VMXON and not regs["cr4"] & X86_CR4_VMXE:
        return _ud("CR4.VMXE=0: VMXON is #UD")
    return None


def _vmx_insn(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    fault = _vmx_ud(ev)
    if fault:
        return fault
    cause = (_NO_VMCS_SHADOW_CAUSE,)
    if ev.kind in (Kind.VMREAD, Kind.VMWRITE):
        verdict = _vmcs_shadowing(ev, vmcs, rm)
        if verdict is not None and not verdict[0]:
            return _no(*verdict[1])
        if verdict is not None:
            cause = verdict[1]
    qual = xi.displacement_qualification(insn.mem, ev.rip + insn.length) \
        if ev.kind in xi.DISPLACEMENT_KINDS else 0
    return _exit(_VMX_REASON[ev.kind], ev, cause, qual, xi.instruction_info(insn))


def _vmcs_shadowing(ev: Event, vmcs, rm: ReadMem):
    """VMREAD/VMWRITE with VMCS shadowing: (exits, cause), or None when
    shadowing is off (then the instruction always exits)."""
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    if not secondary & C.SECONDARY_EXEC_SHADOW_VMCS:
        return None
    mode = ev.regs["mode"]
    enc = _gpr(ev.regs, ev.insn.gpr, mode, ev.kind.value)
    first = "SECONDARY_EXEC_SHADOW_VMCS=1"
    if enc >> 15:
        return True, (first, f"field encoding {enc:#x} has bits above 14 set")
    field, name = ((F.VMREAD_BITMAP, "VMREAD") if ev.kind is Kind.VMREAD
                   else (F.VMWRITE_BITMAP, "VMWRITE"))
    bit = _bitmap_bit(rm, vmcs.vmread(field), enc)
    return bool(bit), (first, f"{name} bitmap bit {enc:#x}={bit}")


def _vmfunc(ev, vmcs, rm, pl):
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_ENABLE_VMFUNC", secondary,
                    C.SECONDARY_EXEC_ENABLE_VMFUNC)
    if not secondary & C.SECONDARY_EXEC_ENABLE_VMFUNC:
        return _ud(c0, "VMFUNC is #UD without enable VM functions")
    eax = ev.regs["rax"] & _U32
    if eax >= 64:
        return _exit(er.VMFUNC, ev, (c0, f"EAX={eax:#x}: no such VM function"))
    controls = vmcs.vmread(F.VM_FUNCTION_CONTROL)
    if not controls >> eax & 1:
        return _exit(er.VMFUNC, ev, (c0, f"VM_FUNCTION_CONTROL bit {eax}=0"))
    if eax != 0:
        raise RuleInputError(f"VM_FUNCTION_CONTROL enables function {eax}, which the SDM does "
                             "not define (VM entry would have failed)")
    ecx = ev.regs["rcx"] & _U32
    if ecx >= C.VMFUNC_EPTP_ENTRIES:
        return _exit(er.VMFUNC, ev, (c0, "EPTP switching", f"ECX={ecx} >= 512"))
    entry = int.from_bytes(rm(vmcs.vmread(F.EPTP_LIST_ADDRESS) + 8 * ecx, 8), "little")
    # SDM "EPTP Switching": an EPTP that VM entry would reject causes the VM exit.
    problem = eptp_problem(entry, _EPT_VPID_CAP, MAXPHYADDR)
    if problem:
        return _exit(er.VMFUNC, ev, (c0, "EPTP switching",
                                     f"EPTP list entry {ecx} = {entry:#x}: {problem}"))
    return _no(c0, "VM_FUNCTION_CONTROL bit 0=1",
               f"EPTP switching to list entry {ecx} = {entry:#x} (valid): no VM exit")


def _encls_like(ev, vmcs, control: int, control_name: str, bitmap_field, number: int):
    regs = ev.regs
    name = ev.kind.value
    if not _protected(regs) or _v86(regs):
        return _ud(f"{name} is #UD outside protected mode")
    if regs["cpl"]:
        return _ud(f"CPL={regs['cpl']}: {name} is #UD outside CPL 0")
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, control_name, secondary, control)
    if not secondary & control:
        return _no(c0)
    eax = regs["rax"] & _U32
    bit = min(eax, 63)
    hit = vmcs.vmread(bitmap_field) >> bit & 1
    c1 = f"{bitmap_field.name} bit {bit}={hit} (EAX={eax:#x})"
    return _exit(number, ev, (c0, c1)) if hit else _no(c0, c1)


def _encls(ev, vmcs, rm, pl):
    return _encls_like(ev, vmcs, C.SECONDARY_EXEC_ENCLS_EXITING, "SECONDARY_EXEC_ENCLS_EXITING",
                       F.ENCLS_EXITING_BITMAP, er.ENCLS)


def _enclv(ev, vmcs, rm, pl):
    return _encls_like(ev, vmcs, C.SECONDARY_EXEC_ENCLV_EXITING, "SECONDARY_EXEC_ENCLV_EXITING",
                       F.ENCLV_EXITING_BITMAP, er.ENCLV)


# --------------------------------------------------------------------------
# Conditional exits on a primary control
# --------------------------------------------------------------------------
def _hlt(ev, vmcs, rm, pl):
    fault = _need_cpl0(ev, "HLT")
    if fault:
        return fault
    on = _primary(vmcs) & C.CPU_BASED_HLT_EXITING
    cause = (_b("CPU_BASED_HLT_EXITING", on),)
    return _exit(er.HLT, ev, cause) if on else _no(*cause)


def _invlpg(ev, vmcs, rm, pl):
    fault = _need_cpl0(ev, "INVLPG")
    if fault:
        return fault
    on = _primary(vmcs) & C.CPU_BASED_INVLPG_EXITING
    cause = (_b("CPU_BASED_INVLPG_EXITING", on),)
    if not on:
        return _no(*cause)
    if ev.linear is None:
        raise RuleInputError("INVLPG: the event needs the operand's linear address (event.linear)")
    return _exit(er.INVLPG, ev, cause, xi.invlpg_qualification(ev.linear, ev.regs["mode"] == 64))


def _rdpmc(ev, vmcs, rm, pl):
    regs = ev.regs
    if regs["cpl"] and not regs["cr4"] & X86_CR4_PCE and _protected(regs):
        return _gp0(f"CPL={regs['cpl']} and CR4.PCE=0: RDPMC is #GP(0)")
    on = _primary(vmcs) & C.CPU_BASED_RDPMC_EXITING
    cause = (_b("CPU_BASED_RDPMC_EXITING", on),)
    return _exit(er.RDPMC, ev, cause) if on else _no(*cause)


def _tsd_fault(ev) -> Optional[Fault]:
    regs = ev.regs
    if regs["cpl"] and regs["cr4"] & X86_CR4_TSD and _protected(regs):
        return _gp0(f"CPL={regs['cpl']} and CR4.TSD=1: {ev.kind.value} is #GP(0)")
    return None


def _rdtsc(ev, vmcs, rm, pl):
    fault = _tsd_fault(ev)
    if fault:
        return fault
    on = _primary(vmcs) & C.CPU_BASED_RDTSC_EXITING
    cause = (_b("CPU_BASED_RDTSC_EXITING", on),)
    return _exit(er.RDTSC, ev, cause) if on else _no(*cause)


def _rdtscp(ev, vmcs, rm, pl):
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_ENABLE_RDTSCP", secondary,
                    C.SECONDARY_EXEC_ENABLE_RDTSCP)
    if not secondary & C.SECONDARY_EXEC_ENABLE_RDTSCP:
        return _ud(c0, "RDTSCP is #UD without enable RDTSCP")
    fault = _tsd_fault(ev)
    if fault:
        return fault
    on = primary & C.CPU_BASED_RDTSC_EXITING
    cause = (c0, _b("CPU_BASED_RDTSC_EXITING", on))
    return _exit(er.RDTSCP, ev, cause) if on else _no(*cause)


def _monitor(ev, vmcs, rm, pl):
    if ev.regs["cpl"]:
        return _ud(f"CPL={ev.regs['cpl']}: MONITOR is #UD outside CPL 0")
    on = _primary(vmcs) & C.CPU_BASED_MONITOR_EXITING
    cause = (_b("CPU_BASED_MONITOR_EXITING", on),)
    return _exit(er.MONITOR_INSTRUCTION, ev, cause) if on else _no(*cause)


def _mwait(ev, vmcs, rm, pl):
    if ev.regs["cpl"]:
        return _ud(f"CPL={ev.regs['cpl']}: MWAIT is #UD outside CPL 0")
    on = _primary(vmcs) & C.CPU_BASED_MWAIT_EXITING
    cause = (_b("CPU_BASED_MWAIT_EXITING", on),)
    if not on:
        return _no(*cause)
    armed = bool(ev.extra.get("monitor_armed", False))
    return _exit(er.MWAIT_INSTRUCTION, ev, cause, xi.mwait_qualification(armed))


def _pause(ev, vmcs, rm, pl):
    primary = _primary(vmcs)
    if primary & C.CPU_BASED_PAUSE_EXITING:
        return _exit(er.PAUSE_INSTRUCTION, ev, ("CPU_BASED_PAUSE_EXITING=1",))
    c0 = "CPU_BASED_PAUSE_EXITING=0"
    secondary = _secondary(vmcs, primary)
    c1 = _sec_cause(primary, "SECONDARY_EXEC_PAUSE_LOOP_EXITING", secondary,
                    C.SECONDARY_EXEC_PAUSE_LOOP_EXITING)
    if not secondary & C.SECONDARY_EXEC_PAUSE_LOOP_EXITING:
        return _no(c0, c1)
    cpl = ev.regs["cpl"]
    if cpl:
        return _no(c0, c1, f"CPL={cpl}: PAUSE-loop exiting applies at CPL 0 only")
    now = _extra_reg(ev, "tsc")
    state = pl if pl is not None else PauseLoop()
    gap = vmcs.vmread(F.PLE_GAP)
    window = vmcs.vmread(F.PLE_WINDOW)
    if state.last is None:
        new = PauseLoop(now, now)
        return Decision(False, (c0, c1, "first PAUSE at CPL 0 since VM entry: first in a loop"),
                        pause_loop=new)
    since_last = now - state.last
    if since_last > gap:
        new = PauseLoop(now, now)
        return Decision(False, (c0, c1, f"{since_last} TSC ticks since the last PAUSE > "
                                        f"PLE_GAP={gap}: first in a new loop"), pause_loop=new)
    new = PauseLoop(state.first, now)
    in_loop = now - state.first
    c2 = f"{since_last} TSC ticks since the last PAUSE <= PLE_GAP={gap}"
    if in_loop > window:
        return _exit(er.PAUSE_INSTRUCTION, ev,
                     (c0, c1, c2, f"{in_loop} ticks since the loop's first PAUSE > "
                                  f"PLE_WINDOW={window}"), pause_loop=new)
    return Decision(False, (c0, c1, c2, f"{in_loop} ticks since the loop's first PAUSE <= "
                                        f"PLE_WINDOW={window}"), pause_loop=new)


# --------------------------------------------------------------------------
# Conditional exits on a secondary control
# --------------------------------------------------------------------------
def _wbinvd(ev, vmcs, rm, pl):
    fault = _need_cpl0(ev, ev.kind.value)
    if fault:
        return fault
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_WBINVD_EXITING", secondary,
                    C.SECONDARY_EXEC_WBINVD_EXITING)
    return _exit(er.WBINVD, ev, (c0,)) if secondary & C.SECONDARY_EXEC_WBINVD_EXITING else _no(c0)


def _rdrand_like(ev, vmcs, control: int, name: str, number: int):
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, name, secondary, control)
    if not secondary & control:
        return _no(c0)
    insn = _need_insn(ev)
    return _exit(number, ev, (c0,), 0, xi.register_info(insn.gpr, insn.op_size))


def _rdrand(ev, vmcs, rm, pl):
    return _rdrand_like(ev, vmcs, C.SECONDARY_EXEC_RDRAND_EXITING,
                        "SECONDARY_EXEC_RDRAND_EXITING", er.RDRAND)


def _rdseed(ev, vmcs, rm, pl):
    return _rdrand_like(ev, vmcs, C.SECONDARY_EXEC_RDSEED_EXITING,
                        "SECONDARY_EXEC_RDSEED_EXITING", er.RDSEED)


def _user_wait(ev, vmcs, rm, pl):
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE", secondary,
                    C.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE)
    if not secondary & C.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE:
        return _ud(c0, f"{ev.kind.value} is #UD without enable user wait and pause")
    if ev.kind is Kind.UMONITOR:
        return _no(c0, "UMONITOR does not cause VM exits")
    on = primary & C.CPU_BASED_RDTSC_EXITING
    cause = (c0, _b("CPU_BASED_RDTSC_EXITING", on))
    if not on:
        return _no(*cause)
    insn = _need_insn(ev)
    number = er.UMWAIT if ev.kind is Kind.UMWAIT else er.TPAUSE
    return _exit(number, ev, cause, 0, xi.register_info(insn.gpr, insn.op_size))


def _invpcid(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_ENABLE_INVPCID", secondary,
                    C.SECONDARY_EXEC_ENABLE_INVPCID)
    if not secondary & C.SECONDARY_EXEC_ENABLE_INVPCID:
        return _ud(c0, "INVPCID is #UD without enable INVPCID")
    if _v86(ev.regs):
        return _ud("RFLAGS.VM=1: INVPCID is #UD in virtual-8086 mode")
    if insn.mem is None:
        return _ud("INVPCID with a register descriptor operand is #UD")
    fault = _need_cpl0(ev, "INVPCID")
    if fault:
        return fault
    on = primary & C.CPU_BASED_INVLPG_EXITING
    cause = (c0, _b("CPU_BASED_INVLPG_EXITING", on))
    if not on:
        return _no(*cause)
    return _exit(er.INVPCID, ev, cause,
                 xi.displacement_qualification(insn.mem, ev.rip + insn.length),
                 xi.instruction_info(insn))


def _xsaves(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    regs = ev.regs
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_ENABLE_XSAVES", secondary,
                    C.SECONDARY_EXEC_ENABLE_XSAVES)
    if not secondary & C.SECONDARY_EXEC_ENABLE_XSAVES:
        return _ud(c0, f"{ev.kind.value} is #UD without enable XSAVES/XRSTORS")
    if not regs["cr4"] & X86_CR4_OSXSAVE:
        return _ud(f"CR4.OSXSAVE=0: {ev.kind.value} is #UD")
    fault = _need_cpl0(ev, ev.kind.value)
    if fault:
        return fault
    mask = (regs["rdx"] & _U32) << 32 | (regs["rax"] & _U32)
    xss = _extra_reg(ev, "xss")
    bitmap = vmcs.vmread(F.XSS_EXIT_BITMAP)
    hit = mask & xss & bitmap
    c1 = (f"EDX:EAX={mask:#x} & IA32_XSS={xss:#x} & XSS_EXIT_BITMAP={bitmap:#x} = {hit:#x}")
    if not hit:
        return _no(c0, c1)
    number = er.XSAVES if ev.kind is Kind.XSAVES else er.XRSTORS
    return _exit(number, ev, (c0, c1),
                 xi.displacement_qualification(insn.mem, ev.rip + insn.length),
                 xi.instruction_info(insn))


_DESC_LOADS = frozenset({Kind.LGDT, Kind.LIDT})
_DESC_STORES = frozenset({Kind.SGDT, Kind.SIDT})
_LDT_TR_LOADS = frozenset({Kind.LLDT, Kind.LTR})


def _descriptor_table(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    regs = ev.regs
    kind = ev.kind
    name = kind.value
    cpl = regs["cpl"]
    if kind in _DESC_LOADS or kind in _DESC_STORES:
        if insn.mem is None:
            return _ud(f"{name} with a register operand is #UD")
        if kind in _DESC_LOADS and (cpl or _v86(regs)):
            return _gp0(f"CPL={cpl}: {name} needs CPL 0 (#GP(0) comes before any VM exit)")
        number = er.GDTR_IDTR
    else:
        if not _protected(regs) or _v86(regs):
            return _ud(f"{name} is #UD in real-address and virtual-8086 mode")
        if kind in _LDT_TR_LOADS and cpl:
            return _gp0(f"CPL={cpl}: {name} needs CPL 0 (#GP(0) comes before any VM exit)")
        number = er.LDTR_TR
    if kind not in _DESC_LOADS and kind not in _LDT_TR_LOADS and cpl \
            and regs["cr4"] & X86_CR4_UMIP:
        return _gp0(f"CPL={cpl} and CR4.UMIP=1: {name} is #GP(0)")
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_DESC", secondary, C.SECONDARY_EXEC_DESC)
    if not secondary & C.SECONDARY_EXEC_DESC:
        return _no(c0)
    return _exit(number, ev, (c0,),
                 xi.displacement_qualification(insn.mem, ev.rip + insn.length),
                 xi.instruction_info(insn))


# --------------------------------------------------------------------------
# Control registers
# --------------------------------------------------------------------------
def _cr_checks(ev) -> Optional[Fault]:
    regs = ev.regs
    cr = ev.insn.cr
    if cr not in (0, 2, 3, 4, 8):
        return _ud(f"CR{cr} does not exist: MOV CR is #UD")
    if cr == 8 and regs["mode"] != 64:
        return _ud("CR8 is reachable in 64-bit mode only: MOV CR8 is #UD")
    return _need_cpl0(ev, "MOV CR")


def _mov_to_cr(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    fault = _cr_checks(ev)
    if fault:
        return fault
    regs = ev.regs
    cr = insn.cr
    value = _gpr(regs, insn.gpr, regs["mode"], "MOV to CR")
    qual = xi.cr_access_qualification(cr, xi.CR_ACCESS_MOV_TO_CR, insn.gpr)
    if cr in (0, 4):
        mask_f, shadow_f = ((F.CR0_GUEST_HOST_MASK, F.CR0_READ_SHADOW) if cr == 0
                            else (F.CR4_GUEST_HOST_MASK, F.CR4_READ_SHADOW))
        mask = vmcs.vmread(mask_f)
        shadow = vmcs.vmread(shadow_f)
        diff = (value ^ shadow) & mask
        cause = (f"{mask_f.name}={mask:#x}", f"{shadow_f.name}={shadow:#x}")
        if diff:
            return _exit(er.CR_ACCESS, ev, cause + (
                f"new CR{cr} {value:#x} differs from the shadow in masked bits {diff:#x}",), qual)
        return _no(*cause, f"new CR{cr} {value:#x} matches the shadow in every masked bit")
    if cr == 2:
        return _no("MOV to CR2 never causes a VM exit")
    primary = _primary(vmcs)
    if cr == 3:
        if not primary & C.CPU_BASED_CR3_LOAD_EXITING:
            return _no("CPU_BASED_CR3_LOAD_EXITING=0")
        count = vmcs.vmread(F.CR3_TARGET_COUNT)
        if count > 4:
            raise RuleInputError(f"CR3_TARGET_COUNT={count} is above 4 (VM entry would fail)")
        for i in range(count):
            target = vmcs.vmread(_CR3_TARGETS[i])
            if target == value:
                return _no("CPU_BASED_CR3_LOAD_EXITING=1", f"CR3_TARGET_COUNT={count}",
                           f"new CR3 {value:#x} equals CR3_TARGET_VALUE{i}")
        return _exit(er.CR_ACCESS, ev, ("CPU_BASED_CR3_LOAD_EXITING=1", f"CR3_TARGET_COUNT={count}",
                                        f"new CR3 {value:#x} matches no CR3-target value"), qual)
    # CR8
    if primary & C.CPU_BASED_CR8_LOAD_EXITING:
        return _exit(er.CR_ACCESS, ev, ("CPU_BASED_CR8_LOAD_EXITING=1",), qual)
    c0 = "CPU_BASED_CR8_LOAD_EXITING=0"
    if value >> 4:
        return _gp0(c0, f"new CR8 {value:#x} sets reserved bits 63:4: #GP(0)")
    if not primary & C.CPU_BASED_TPR_SHADOW:
        return _no(c0, "CPU_BASED_TPR_SHADOW=0: MOV to CR8 writes the TPR")
    return _tpr_shadow_write(ev, vmcs, primary, value, (c0, "CPU_BASED_TPR_SHADOW=1"))


def _tpr_shadow_write(ev, vmcs, primary: int, tpr_high_nibble: int, cause: tuple) -> Decision:
    """After a virtualized write of the TPR with TPR shadowing: the TPR-below-
    threshold check (SDM "TPR Virtualization", with virtual-interrupt
    delivery 0).  ``tpr_high_nibble`` is the new VTPR bits 7:4."""
    secondary = _secondary(vmcs, primary)
    if secondary & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY:
        return _no(*cause, "SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY=1: TPR virtualization is PPR "
                           "virtualization and the evaluation of pending virtual interrupts, "
                           "no TPR-below-threshold exit")
    threshold = vmcs.vmread(F.TPR_THRESHOLD) & 0xF
    c1 = f"new VTPR[7:4]={tpr_high_nibble:#x}, TPR_THRESHOLD[3:0]={threshold:#x}"
    if threshold > tpr_high_nibble:
        return _exit(er.TPR_BELOW_THRESHOLD, ev, cause + (
            c1, "TPR shadow written (trap-like: the write completes), then below threshold"),
            length=None)
    return _no(*cause, c1, "TPR shadow written, not below the threshold")


_CR3_TARGETS = (F.CR3_TARGET_VALUE0, F.CR3_TARGET_VALUE1, F.CR3_TARGET_VALUE2,
                F.CR3_TARGET_VALUE3)


def _mov_from_cr(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    fault = _cr_checks(ev)
    if fault:
        return fault
    cr = insn.cr
    if cr in (0, 4):
        return _no(f"MOV from CR{cr} never exits (it reads the guest/host mask and read shadow)")
    if cr == 2:
        return _no("MOV from CR2 never causes a VM exit")
    primary = _primary(vmcs)
    ctl, name = ((C.CPU_BASED_CR3_STORE_EXITING, "CPU_BASED_CR3_STORE_EXITING") if cr == 3
                 else (C.CPU_BASED_CR8_STORE_EXITING, "CPU_BASED_CR8_STORE_EXITING"))
    if not primary & ctl:
        return _no(_b(name, 0))
    if insn.gpr is None:
        raise RuleInputError("MOV from CR: the decoded instruction has no register operand")
    return _exit(er.CR_ACCESS, ev, (_b(name, 1),),
                 xi.cr_access_qualification(cr, xi.CR_ACCESS_MOV_FROM_CR, insn.gpr))


def _clts(ev, vmcs, rm, pl):
    fault = _need_cpl0(ev, "CLTS")
    if fault:
        return fault
    mask = vmcs.vmread(F.CR0_GUEST_HOST_MASK)
    shadow = vmcs.vmread(F.CR0_READ_SHADOW)
    cause = (f"CR0_GUEST_HOST_MASK.TS={1 if mask & X86_CR0_TS else 0}",
             f"CR0_READ_SHADOW.TS={1 if shadow & X86_CR0_TS else 0}")
    if mask & shadow & X86_CR0_TS:
        return _exit(er.CR_ACCESS, ev, cause,
                     xi.cr_access_qualification(0, xi.CR_ACCESS_CLTS))
    return _no(*cause)


def _lmsw(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    fault = _need_cpl0(ev, "LMSW")
    if fault:
        return fault
    memory = insn.mem is not None
    if memory:
        source = _need_extra(ev, "lmsw_source") & 0xFFFF
    else:
        source = _gpr(ev.regs, insn.gpr, 64, "LMSW") & 0xFFFF
    mask = vmcs.vmread(F.CR0_GUEST_HOST_MASK)
    shadow = vmcs.vmread(F.CR0_READ_SHADOW)
    cause = (f"CR0_GUEST_HOST_MASK[3:0]={mask & 0xF:#x}", f"CR0_READ_SHADOW[3:0]={shadow & 0xF:#x}",
             f"LMSW source[3:0]={source & 0xF:#x}")
    sets_pe = mask & source & X86_CR0_PE and not shadow & X86_CR0_PE
    changed = (source ^ shadow) & mask & 0xE
    if not sets_pe and not changed:
        return _no(*cause, "no masked bit would change (LMSW never clears PE)")
    why = []
    if sets_pe:
        why.append("PE is masked, set in the source and clear in the shadow")
    if changed:
        why.append(f"masked bits {changed:#x} of MP/EM/TS differ from the shadow")
    qual = xi.cr_access_qualification(0, xi.CR_ACCESS_LMSW, lmsw_memory=memory,
                                      lmsw_source=source)
    return _exit(er.CR_ACCESS, ev, cause + tuple(why), qual, gla=ev.linear if memory else None)


# --------------------------------------------------------------------------
# Debug registers
# --------------------------------------------------------------------------
def _mov_dr(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    regs = ev.regs
    dr = insn.dr
    if dr is None or not 0 <= dr <= 7:
        return _ud(f"DR{dr} does not exist: MOV DR is #UD")
    if insn.gpr is None:
        raise RuleInputError("MOV DR: the decoded instruction has no register operand")
    from_dr = ev.kind is Kind.MOV_FROM_DR
    if _primary(vmcs) & C.CPU_BASED_MOV_DR_EXITING:
        # SDM "Instructions That Cause VM Exits Conditionally", MOV DR: these
        # exits take priority over the CPL #GP and the CR4.DE DR4/DR5 #UD
        # (and, being fault-like, over the general-detect #DB).
        return _exit(er.DR_ACCESS, ev, ("CPU_BASED_MOV_DR_EXITING=1",),
                     xi.dr_access_qualification(dr, from_dr, insn.gpr))
    c0 = "CPU_BASED_MOV_DR_EXITING=0"
    cpl = regs["cpl"]
    if cpl:
        return _gp0(c0, f"CPL={cpl}: MOV DR needs CPL 0")
    if dr in (4, 5) and regs["cr4"] & X86_CR4_DE:
        return _ud(c0, f"CR4.DE=1: DR{dr} is #UD")
    if _extra_reg(ev, "dr7") & _DR7_GD:
        return Fault(1, None, (c0, "DR7.GD=1: general-detect #DB"))
    return _no(c0)


# --------------------------------------------------------------------------
# I/O instructions
# --------------------------------------------------------------------------
#: The cause without I/O bitmaps, by "unconditional I/O exiting".
_IO_UNCOND_CAUSE = {on: ("CPU_BASED_USE_IO_BITMAPS=0", _b("CPU_BASED_UNCOND_IO_EXITING", on))
                    for on in (0, 1)}


def _io(ev, vmcs, rm, pl):
    insn = _need_insn(ev)
    regs = ev.regs
    port = ev.port if ev.port is not None else insn.port
    if port is None:
        raise RuleInputError(f"{ev.kind.value}: the event needs the resolved port (event.port)")
    size = insn.io_size
    if size not in (1, 2, 4):
        raise RuleInputError(f"{ev.kind.value}: I/O size {size!r} is not 1, 2 or 4")
    cpl = regs["cpl"] if regs["cr0"] & X86_CR0_PE else 0
    if cpl:     # (CPL 0 is never above IOPL, and virtual-8086 mode runs at CPL 3)
        rflags = regs["rflags"]
        iopl = (rflags >> 12) & 3
        if rflags & X86_EFLAGS_VM or cpl > iopl:
            permitted = _need_extra(ev, "io_permitted")
            where = "virtual-8086 mode" if rflags & X86_EFLAGS_VM else f"CPL={cpl} > IOPL={iopl}"
            if not permitted:
                return _gp0(f"{where} and the TSS I/O-permission bitmap denies port {port:#x}")
    is_in, string = IO_SHAPE[insn.kind]
    qual = xi.io_qualification(size, is_in, string, insn.rep, insn.port is not None, port)
    info = xi.instruction_info(insn) if string else None
    gla = ev.linear if string else None
    primary = vmcs.vmread(_PROC)
    if not primary & C.CPU_BASED_USE_IO_BITMAPS:
        if primary & C.CPU_BASED_UNCOND_IO_EXITING:
            return _exit(er.IO_INSTRUCTION, ev, _IO_UNCOND_CAUSE[1], qual, info, gla=gla)
        return _no(*_IO_UNCOND_CAUSE[0])
    c0 = "CPU_BASED_USE_IO_BITMAPS=1"
    seen = []
    for p in range(port, port + size):
        if p > 0xFFFF:
            return _exit(er.IO_INSTRUCTION, ev, (c0, *seen, f"access {port:#x}+{size} wraps "
                                                              "past port 0xFFFF"), qual, info,
                         gla=gla)
        which, field = ("A", _IO_BITMAP_A) if p < 0x8000 else ("B", _IO_BITMAP_B)
        bit = _bitmap_bit(rm, vmcs.vmread(field), p & 0x7FFF)
        seen.append(f"I/O bitmap {which} bit {p:#x}={bit}")
        if bit:
            return _exit(er.IO_INSTRUCTION, ev, (c0, *seen), qual, info, gla=gla)
    return _no(c0, *seen)


# --------------------------------------------------------------------------
# MSRs
# --------------------------------------------------------------------------
def _msr(ev, vmcs, rm, write: bool):
    fault = _need_cpl0(ev, ev.kind.value)
    if fault:
        return fault
    ecx = ev.regs["rcx"] & _U32
    number = er.MSR_WRITE if write else er.MSR_READ
    primary = _primary(vmcs)
    if not primary & C.CPU_BASED_USE_MSR_BITMAPS:
        return _exit(number, ev, ("CPU_BASED_USE_MSR_BITMAPS=0",))
    c0 = "CPU_BASED_USE_MSR_BITMAPS=1"
    if ecx <= 0x1FFF:
        offset, quarter = (0x800, "write-low") if write else (0x000, "read-low")
    elif 0xC0000000 <= ecx <= 0xC0001FFF:
        offset, quarter = (0xC00, "write-high") if write else (0x400, "read-high")
    else:
        return _exit(number, ev, (c0, f"MSR {ecx:#x} is outside 0-0x1FFF and "
                                      "0xC0000000-0xC0001FFF"))
    n = ecx & 0x1FFF
    bit = _bitmap_bit(rm, vmcs.vmread(_MSR_BITMAP) + offset, n)
    cause = (c0, f"MSR bitmap {quarter} bit {n:#x}={bit}")
    return _exit(number, ev, cause) if bit else _no(*cause)


def _rdmsr(ev, vmcs, rm, pl):
    return _msr(ev, vmcs, rm, False)


def _wrmsr(ev, vmcs, rm, pl):
    return _msr(ev, vmcs, rm, True)


# --------------------------------------------------------------------------
# Exceptions, NMIs, interrupts, INIT, SIPI, triple fault, task switch
# --------------------------------------------------------------------------
def _exception_exit(ev, vmcs, vector: int, itype: int, cause_prefix: tuple) -> Outcome:
    """The exception-bitmap rule (with the #PF error-code mask/match) for an
    exception of ``vector`` and interruption type ``itype``."""
    bitmap = vmcs.vmread(_EXCEPTION_BITMAP)
    in_bitmap = bitmap >> vector & 1
    c0 = f"EXCEPTION_BITMAP bit {vector}={in_bitmap}"
    regs = ev.regs
    hard = itype == C.INTR_TYPE_HARD_EXCEPTION
    error_code = None
    if hard and vector in ERROR_CODE_VECTORS and _protected(regs):
        error_code = ev.error_code
        if error_code is None:
            raise RuleInputError(f"exception {vector}: the event needs its error code")
    if vector == 14:
        if error_code is None:
            raise RuleInputError("#PF: the event needs its error code")
        pf_mask = vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MASK)
        pf_match = vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MATCH)
        matches = (error_code & pf_mask) == pf_match
        c1 = (f"PFEC {error_code:#x} & PAGE_FAULT_ERROR_CODE_MASK {pf_mask:#x} "
              f"{'==' if matches else '!='} PAGE_FAULT_ERROR_CODE_MATCH {pf_match:#x}")
        exits = matches if in_bitmap else not matches
        cause = cause_prefix + (c0, c1, "exits iff the masked error code "
                                        + ("matches" if in_bitmap else "does not match"))
    else:
        exits = bool(in_bitmap)
        cause = cause_prefix + (c0,)
    if not exits:
        return _no(*cause, "delivered through the guest IDT")
    pin = vmcs.vmread(_PIN)
    unblocked = (bool(ev.extra.get("iret_unblocked_nmi", False)) and vector != 8
                 and (not pin & C.PIN_BASED_NMI_EXITING or pin & C.PIN_BASED_VIRTUAL_NMIS))
    info = xi.interruption_info(vector, itype, error_code is not None, unblocked)
    if vector == 14:
        if ev.cr2 is None:
            raise RuleInputError("#PF: the event needs the faulting linear address (event.cr2)")
        qual = ev.cr2
    elif vector == 1 and hard:
        qual = xi.debug_exception_qualification(ev.extra.get("dr6", 0xFFFF0FF0))
    else:
        qual = 0
    # The length is defined for software exceptions (INT3, INTO, INT1) and for
    # faults during delivery of a software interrupt or exception: INT n and
    # those instructions do nothing but deliver, so any exception they raise
    # is one.  (The IDT-vectoring information of that case is the caller's.)
    length = (ev.insn.length if ev.insn is not None and
              (itype != C.INTR_TYPE_HARD_EXCEPTION or ev.insn.kind in _DELIVERY_KINDS)
              else None)
    return _exit(er.EXCEPTION_NMI, ev, cause, qual, length=length, interruption=info,
                 error_code=error_code)


_DELIVERY_KINDS = frozenset({Kind.INT, Kind.INT3, Kind.INTO, Kind.INT1})


_SOFTWARE_EXCEPTION = {Kind.INT3: (3, C.INTR_TYPE_SOFT_EXCEPTION),
                       Kind.INTO: (4, C.INTR_TYPE_SOFT_EXCEPTION),
                       Kind.INT1: (1, C.INTR_TYPE_PRIV_SW_EXCEPTION)}


def _exception(ev, vmcs, rm, pl):
    vector = ev.vector
    if vector is None or not 0 <= vector <= 31:
        raise RuleInputError(f"EXCEPTION: vector {vector!r} is not an exception vector 0..31")
    if vector == 2:
        raise RuleInputError("EXCEPTION with vector 2: an NMI is a Kind.NMI event")
    src = ev.insn.kind if ev.insn is not None else None
    if src in _SOFTWARE_EXCEPTION and _SOFTWARE_EXCEPTION[src][0] == vector:
        itype = _SOFTWARE_EXCEPTION[src][1]
    else:
        itype = C.INTR_TYPE_HARD_EXCEPTION
    return _exception_exit(ev, vmcs, vector, itype, ())


def _soft_exception(ev, vmcs, rm, pl):
    vector, itype = _SOFTWARE_EXCEPTION[ev.kind]
    if ev.kind is Kind.INTO:
        if ev.regs["mode"] == 64:
            return _ud("INTO is #UD in 64-bit mode")
        if not ev.regs["rflags"] & X86_EFLAGS_OF:
            return _no("RFLAGS.OF=0: INTO raises no exception")
    return _exception_exit(ev, vmcs, vector, itype, (f"{ev.kind.value} raises vector {vector}",))


def _nmi(ev, vmcs, rm, pl):
    pin = vmcs.vmread(_PIN)
    if pin & C.PIN_BASED_NMI_EXITING:
        return _exit(er.EXCEPTION_NMI, ev, ("PIN_BASED_NMI_EXITING=1",),
                     interruption=xi.interruption_info(2, C.INTR_TYPE_NMI_INTR))
    return _no("PIN_BASED_NMI_EXITING=0", "NMI delivered through the guest IDT")


def _interrupt(ev, vmcs, rm, pl):
    pin = vmcs.vmread(_PIN)
    if not pin & C.PIN_BASED_EXT_INTR_MASK:
        return _no("PIN_BASED_EXT_INTR_MASK=0", "interrupt delivered through the guest IDT")
    c0 = "PIN_BASED_EXT_INTR_MASK=1"
    ack = vmcs.vmread(F.VM_EXIT_CONTROLS) & C.VM_EXIT_ACK_INTR_ON_EXIT
    if not ack:
        return _exit(er.EXTERNAL_INTERRUPT, ev, (c0, "VM_EXIT_ACK_INTR_ON_EXIT=0: the interrupt "
                                                     "stays pending in the APIC"))
    vector = ev.vector
    if vector is None or not 0 <= vector <= 255:
        raise RuleInputError(f"INTERRUPT: vector {vector!r} is not 0..255")
    if pin & C.PIN_BASED_POSTED_INTR and vector == vmcs.vmread(F.POSTED_INTR_NV):
        return _no(c0, "VM_EXIT_ACK_INTR_ON_EXIT=1", "PIN_BASED_POSTED_INTR=1",
                   f"vector {vector:#x} is POSTED_INTR_NV: posted-interrupt processing, no exit")
    return _exit(er.EXTERNAL_INTERRUPT, ev, (c0, "VM_EXIT_ACK_INTR_ON_EXIT=1: acknowledged, "
                                                 f"vector {vector:#x} in the interruption "
                                                 "information"),
                 interruption=xi.interruption_info(vector, C.INTR_TYPE_EXT_INTR))


def _init(ev, vmcs, rm, pl):
    return _exit(er.INIT_SIGNAL, ev, ("INIT always exits in VMX non-root operation",))


def _sipi(ev, vmcs, rm, pl):
    state = _extra_reg(ev, "activity_state")
    if state != C.GUEST_ACTIVITY_WAIT_SIPI:
        return _no(f"activity state {state}: a SIPI is ignored outside wait-for-SIPI")
    vector = ev.vector
    if vector is None:
        raise RuleInputError("SIPI: the event needs the SIPI vector")
    return _exit(er.SIPI_SIGNAL, ev, ("activity state wait-for-SIPI",),
                 xi.sipi_qualification(vector))


def _triple_fault(ev, vmcs, rm, pl):
    return _exit(er.TRIPLE_FAULT, ev, ("a triple fault always exits in VMX non-root operation",))


def _task_switch(ev, vmcs, rm, pl):
    selector = _need_extra(ev, "tss_selector")
    source_name = _need_extra(ev, "task_switch_source")
    try:
        source = xi.TASK_SWITCH_SOURCES[source_name]
    except KeyError:
        raise RuleInputError(f"TASK_SWITCH: source {source_name!r} is not one of "
                             f"{sorted(xi.TASK_SWITCH_SOURCES)}") from None
    length = ev.insn.length if ev.insn is not None else None
    return _exit(er.TASK_SWITCH, ev, ("a task switch always exits in VMX non-root operation",
                                      f"source {source_name}"),
                 xi.task_switch_qualification(selector, source), length=length)


# --------------------------------------------------------------------------
# APIC accesses
# --------------------------------------------------------------------------
_APIC_ACCESS_TYPES = {"read": xi.APIC_ACCESS_LINEAR_READ, "write": xi.APIC_ACCESS_LINEAR_WRITE,
                      "fetch": xi.APIC_ACCESS_LINEAR_FETCH}
_APIC_TPR = 0x80


def _apic_access(ev, vmcs, rm, pl):
    primary = _primary(vmcs)
    secondary = _secondary(vmcs, primary)
    c0 = _sec_cause(primary, "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES", secondary,
                    C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES)
    if not secondary & C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES:
        return _no(c0)
    gpa = _need_extra(ev, "gpa")
    page = vmcs.vmread(F.APIC_ACCESS_ADDR) & ~0xFFF
    if gpa & ~0xFFF != page:
        return _no(c0, f"{gpa:#x} is not on the APIC-access page {page:#x}")
    access = _need_extra(ev, "access")
    try:
        atype = _APIC_ACCESS_TYPES[access]
    except KeyError:
        raise RuleInputError(f"APIC_ACCESS: access {access!r} is not 'read', 'write' or "
                             "'fetch'") from None
    offset = gpa & 0xFFF
    size = ev.extra.get("size", 4)
    c1 = f"{access} of {size} byte(s) at APIC-page offset {offset:#x}"
    apicrv = secondary & C.SECONDARY_EXEC_APIC_REGISTER_VIRT
    vid = secondary & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
    tpr_shadow = bool(primary & C.CPU_BASED_TPR_SHADOW)
    if (apicrv or vid) and not tpr_shadow:
        raise RuleInputError("APIC-register virtualization and virtual-interrupt delivery need "
                             "CPU_BASED_TPR_SHADOW=1 (VM entry would have failed)")
    if not apicrv and not vid:
        # SDM "Virtualizing Reads from the APIC-Access Page" / "Determining Whether a
        # Write Access is Virtualized", with APIC-register virtualization and
        # virtual-interrupt delivery 0: a read or write of at most 32 bits whose page
        # offset is 080H is virtualized; 081H-083H and every other offset exit.
        if atype != xi.APIC_ACCESS_LINEAR_FETCH and tpr_shadow and offset == _APIC_TPR \
                and size <= 4:
            c2 = "CPU_BASED_TPR_SHADOW=1: an access of at most 32 bits at offset 080H is virtualized"
            if atype == xi.APIC_ACCESS_LINEAR_READ:
                return _no(c0, c1, c2, "read from the virtual-APIC page")
            value = _need_extra(ev, "value")
            return _tpr_shadow_write(ev, vmcs, primary, (value & 0xFF) >> 4, (c0, c1, c2))
    elif atype != xi.APIC_ACCESS_LINEAR_FETCH and not ev.extra.get("during_delivery", False):
        c2 = (f"SECONDARY_EXEC_APIC_REGISTER_VIRT={int(bool(apicrv))}",
              f"SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY={int(bool(vid))}")
        if atype == xi.APIC_ACCESS_LINEAR_READ:
            if apicv.read_virtualized(offset, size, tpr_shadow=tpr_shadow,
                                      apic_register_virt=bool(apicrv)):
                return _no(c0, c1, *c2, "a virtualized read: from the virtual-APIC page")
        elif apicv.write_virtualized(offset, size, tpr_shadow=tpr_shadow,
                                     apic_register_virt=bool(apicrv),
                                     virtual_intr_delivery=bool(vid)):
            return _no(c0, c1, *c2, "a virtualized write: to the virtual-APIC page, then "
                                    "APIC-write emulation")
    if ev.extra.get("during_delivery", False):
        atype = xi.APIC_ACCESS_LINEAR_EVENT_DELIVERY
    qual = xi.apic_access_qualification(offset, atype)
    length = ev.insn.length if atype == xi.APIC_ACCESS_LINEAR_EVENT_DELIVERY and ev.insn else None
    return _exit(er.APIC_ACCESS, ev, (c0, c1), qual, length=length, gpa=gpa)


# --------------------------------------------------------------------------
# Events that never cause a VM exit by themselves
# --------------------------------------------------------------------------
def _never(text: str):
    def rule(ev, vmcs, rm, pl):
        return _no(text)
    return rule


def _always_ud(text: str):
    def rule(ev, vmcs, rm, pl):
        return _ud(text)
    return rule


_NOT_ON_INTEL = "an AMD instruction: #UD on the modelled Intel processor"

#: event kind -> rule(event, vmcs, read_mem, pause_loop) -> Decision | Fault
RULES: Mapping[Kind, Callable] = {
    Kind.MOV_TO_CR: _mov_to_cr,
    Kind.MOV_FROM_CR: _mov_from_cr,
    Kind.MOV_TO_DR: _mov_dr,
    Kind.MOV_FROM_DR: _mov_dr,
    Kind.CLTS: _clts,
    Kind.LMSW: _lmsw,
    Kind.SMSW: _never("SMSW never exits (it reads the CR0 guest/host mask and read shadow)"),
    Kind.RDMSR: _rdmsr,
    Kind.WRMSR: _wrmsr,
    Kind.CPUID: _cpuid,
    Kind.RDTSC: _rdtsc,
    Kind.RDTSCP: _rdtscp,
    Kind.RDPMC: _rdpmc,
    Kind.RDRAND: _rdrand,
    Kind.RDSEED: _rdseed,
    Kind.RDPRU: _always_ud(_NOT_ON_INTEL),
    Kind.HLT: _hlt,
    Kind.PAUSE: _pause,
    Kind.MONITOR: _monitor,
    Kind.MWAIT: _mwait,
    Kind.MONITORX: _always_ud(_NOT_ON_INTEL),
    Kind.MWAITX: _always_ud(_NOT_ON_INTEL),
    Kind.UMONITOR: _user_wait,
    Kind.UMWAIT: _user_wait,
    Kind.TPAUSE: _user_wait,
    Kind.INVLPG: _invlpg,
    Kind.INVLPGA: _always_ud(_NOT_ON_INTEL),
    Kind.INVLPGB: _always_ud(_NOT_ON_INTEL),
    Kind.TLBSYNC: _always_ud(_NOT_ON_INTEL),
    Kind.INVPCID: _invpcid,
    Kind.INVD: _invd,
    Kind.WBINVD: _wbinvd,
    Kind.WBNOINVD: _wbinvd,
    Kind.MCOMMIT: _always_ud(_NOT_ON_INTEL),
    Kind.XSETBV: _xsetbv,
    Kind.XSAVES: _xsaves,
    Kind.XRSTORS: _xsaves,
    Kind.LGDT: _descriptor_table,
    Kind.LIDT: _descriptor_table,
    Kind.SGDT: _descriptor_table,
    Kind.SIDT: _descriptor_table,
    Kind.LLDT: _descriptor_table,
    Kind.LTR: _descriptor_table,
    Kind.SLDT: _descriptor_table,
    Kind.STR: _descriptor_table,
    Kind.IN: _io,
    Kind.OUT: _io,
    Kind.INS: _io,
    Kind.OUTS: _io,
    Kind.INT: _never("INT n does not exit by itself (its delivery may: task gate, EPT, APIC "
                     "access)"),
    Kind.INT3: _soft_exception,
    Kind.INTO: _soft_exception,
    Kind.INT1: _soft_exception,
    Kind.IRET: _never("IRET does not cause VM exits (it changes NMI blocking); a task "
                      "return (NT=1) does (the core reports it as a TASK_SWITCH event)"),
    Kind.PUSHF: _never("PUSHF does not cause VM exits"),
    Kind.POPF: _never("POPF does not cause VM exits"),
    Kind.CLI: _never("CLI does not cause VM exits"),
    Kind.STI: _never("STI does not cause VM exits"),
    Kind.MOV_SS: _never("MOV SS does not cause VM exits"),
    Kind.POP_SS: _never("POP SS does not cause VM exits"),
    Kind.JMP_FAR: _never("a far JMP does not cause VM exits; a task switch it attempts "
                         "does (the core reports it as a TASK_SWITCH event)"),
    Kind.CALL_FAR: _never("a far CALL does not cause VM exits; a task switch it attempts "
                          "does (the core reports it as a TASK_SWITCH event)"),
    Kind.VMCALL: _vmcall,
    Kind.VMCLEAR: _vmx_insn,
    Kind.VMLAUNCH: _vmx_insn,
    Kind.VMRESUME: _vmx_insn,
    Kind.VMPTRLD: _vmx_insn,
    Kind.VMPTRST: _vmx_insn,
    Kind.VMREAD: _vmx_insn,
    Kind.VMWRITE: _vmx_insn,
    Kind.VMXON: _vmx_insn,
    Kind.VMXOFF: _vmx_insn,
    Kind.INVEPT: _vmx_insn,
    Kind.INVVPID: _vmx_insn,
    Kind.VMFUNC: _vmfunc,
    Kind.ENCLS: _encls,
    Kind.ENCLU: _never("ENCLU does not cause VM exits"),
    Kind.ENCLV: _enclv,
    Kind.VMRUN: _always_ud(_NOT_ON_INTEL),
    Kind.VMMCALL: _always_ud(_NOT_ON_INTEL),
    Kind.VMLOAD: _always_ud(_NOT_ON_INTEL),
    Kind.VMSAVE: _always_ud(_NOT_ON_INTEL),
    Kind.STGI: _always_ud(_NOT_ON_INTEL),
    Kind.CLGI: _always_ud(_NOT_ON_INTEL),
    Kind.SKINIT: _always_ud(_NOT_ON_INTEL),
    Kind.GETSEC: _getsec,
    Kind.RSM: _always_ud("RSM outside SMM is #UD (SMM is not modelled)"),
    Kind.UD2: _always_ud("UD2 is #UD"),
    Kind.MARKER_BEGIN: _never("steady-state marker: no architectural effect"),
    Kind.MARKER_END: _never("steady-state marker: no architectural effect"),
    Kind.EXCEPTION: _exception,
    Kind.INTERRUPT: _interrupt,
    Kind.NMI: _nmi,
    Kind.INIT: _init,
    Kind.SIPI: _sipi,
    Kind.TRIPLE_FAULT: _triple_fault,
    Kind.APIC_ACCESS: _apic_access,
    Kind.TASK_SWITCH: _task_switch,
}


#: Event kinds that are records of what happened (traces, counts), not events
#: a rule decides; :func:`decide` refuses them.
RECORD_KINDS = frozenset({Kind.VM_EXIT})


def decide(event: Event, vmcs, read_mem: ReadMem, *,
           pause_loop: Optional[PauseLoop] = None) -> Outcome:
    """Does ``event`` cause a VM exit under ``vmcs``?  See the module docstring.

    Raises :class:`RuleInputError` when the event lacks something its rule
    needs (a register, an ``extra`` key, the decoded instruction) or the VMCS
    holds a value VM entry would have refused.
    """
    rule = RULES.get(event.kind)
    if rule is None:
        raise RuleInputError(f"no VMX rule for event kind {event.kind!r}")
    try:
        return rule(event, vmcs, read_mem, pause_loop)
    except KeyError as e:
        raise RuleInputError(f"{event.kind.value}: lookup of {e.args[0]!r} failed (a guest "
                             "register missing from event.regs?)") from e


# --------------------------------------------------------------------------
# Exits on an instruction boundary that no event carries
# --------------------------------------------------------------------------
def boundary_exit(vmcs, *, rflags: int, interruptibility: int,
                  activity_state: int = C.GUEST_ACTIVITY_ACTIVE, mtf_pending: bool = False,
                  preemption_timer_expired: bool = False) -> Decision:
    """The highest-priority VM exit, if any, among those recognised on an
    instruction boundary without an event (SDM "Event Priority" as extended
    by VMX): monitor trap flag (after SMI/INIT, before debug traps), then
    the VMX-preemption timer, then the NMI window (before NMIs), then the
    interrupt window (after NMIs, before external interrupts).

    The caller places the events between them: a pending debug trap is
    delivered after an MTF exit but before the timer; a pending NMI goes
    between the NMI window and the interrupt window (through ``decide`` with
    a Kind.NMI event); an external interrupt after the interrupt window.

    ``mtf_pending``: an MTF VM exit is pending (the monitor trap flag was 1
    when the last instruction completed, or VM entry injected one).
    ``preemption_timer_expired``: the timer counted down to 0 (it only counts
    while PIN_BASED_VMX_PREEMPTION_TIMER is 1; the countdown is the
    caller's).  ``interruptibility`` is the guest interruptibility state
    (GUEST_INTR_STATE_* bits; bit 3 is virtual-NMI blocking when virtual NMIs
    are on).  In the wait-for-SIPI activity state none of these exits occur;
    in the shutdown state the MTF, VMX-preemption timer and NMI-window exits
    but not the interrupt window (the timer counts in shutdown and its expiry
    wakes the processor in every state but wait-for-SIPI: SDM Vol. 3C
    "VMX-Preemption Timer"; NMI-window exits wake from the states an NMI
    wakes from, shutdown among them; external interrupts are blocked in
    shutdown, SDM "Activity State"); in HLT all of them (they wake the processor).
    """
    if activity_state == C.GUEST_ACTIVITY_WAIT_SIPI:
        return _no(f"activity state {activity_state} (wait-for-SIPI): no boundary exits")
    primary = _primary(vmcs)
    if mtf_pending:
        return _exit(er.MONITOR_TRAP_FLAG, None, ("MTF VM exit pending",), length=None)
    pin = vmcs.vmread(_PIN)
    if preemption_timer_expired and pin & C.PIN_BASED_VMX_PREEMPTION_TIMER:
        return _exit(er.PREEMPTION_TIMER, None, ("PIN_BASED_VMX_PREEMPTION_TIMER=1",
                                                 "timer counted down to 0"), length=None)
    cause = ["no MTF VM exit pending",
             _b("PIN_BASED_VMX_PREEMPTION_TIMER", pin & C.PIN_BASED_VMX_PREEMPTION_TIMER)
             + (", expired" if preemption_timer_expired else ", not expired")]
    if primary & C.CPU_BASED_NMI_WINDOW_EXITING:
        blocked = interruptibility & (C.GUEST_INTR_STATE_NMI | C.GUEST_INTR_STATE_MOV_SS)
        if not blocked:
            return _exit(er.NMI_WINDOW, None, ("CPU_BASED_NMI_WINDOW_EXITING=1",
                                               "no virtual-NMI blocking, no blocking by MOV SS"),
                         length=None)
        cause.append(f"CPU_BASED_NMI_WINDOW_EXITING=1 but interruptibility {interruptibility:#x} "
                     "blocks (virtual-NMI or MOV SS)")
    else:
        cause.append("CPU_BASED_NMI_WINDOW_EXITING=0")
    if activity_state == C.GUEST_ACTIVITY_SHUTDOWN:
        cause.append("activity state 2 (shutdown) blocks external interrupts: no interrupt window")
        return _no(*cause)
    if primary & C.CPU_BASED_INTR_WINDOW_EXITING:
        c = "CPU_BASED_INTR_WINDOW_EXITING=1"
        if not rflags & X86_EFLAGS_IF:
            cause.append(c + " but RFLAGS.IF=0")
        elif interruptibility & (C.GUEST_INTR_STATE_STI | C.GUEST_INTR_STATE_MOV_SS):
            cause.append(c + " but blocking by STI or MOV SS")
        else:
            return _exit(er.INTERRUPT_WINDOW, None, (c, "RFLAGS.IF=1",
                                                     "no blocking by STI or MOV SS"),
                         length=None)
    else:
        cause.append("CPU_BASED_INTR_WINDOW_EXITING=0")
    return _no(*cause)
