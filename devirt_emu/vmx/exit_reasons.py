"""The VMX basic exit reasons: one table, the single source of truth.

Source: Intel SDM Vol. 3D, Appendix C "VMX Basic Exit Reasons" (Table C-1);
the instruction-length list of SDM Vol. 3C, Section "Information for VM Exits
Due to Instruction Execution" ("VM-exit instruction length"); the
instruction-information formats of the same section (the tables "Format of
the VM-Exit Instruction-Information Field as Used for ...").

Names are Linux's ``EXIT_REASON_*`` (``arch/x86/include/uapi/asm/vmx.h``)
without the prefix.  Linux has no name for a few reasons; those rows say
"SDM name" and use the SDM's wording in the same style (IO_SMI, OTHER_SMI,
PCONFIG, SPP, LOADIWKEY, ENCLV, SGX_CONFLICT, ENQCMD_PASID_FAIL,
ENQCMDS_PASID_FAIL, RDMSRLIST, WRMSRLIST, URDMSR, UWRMSR).

Columns of :data:`TABLE` (one :class:`ExitReason` per basic reason):

``number``
    bits 15:0 of the exit-reason field.
``name``
    as above.
``timing``
    :attr:`Timing.FAULT`: the exit happens before the instruction (or event
    delivery, or memory access) has any effect; guest RIP is that of the
    instruction.  :attr:`Timing.TRAP`: the exit happens after the instruction
    completed; guest RIP is that of the next instruction (MTF, TPR below
    threshold, EOI-induced, APIC write, bus lock).  :attr:`Timing.EVENT`: an
    event recognised on an instruction boundary (external interrupt, NMI,
    INIT, SIPI, the window exits, the preemption timer, an exception
    (fault or trap, as the exception itself is), triple fault).
    :attr:`Timing.ENTRY`: a VM-entry failure (reasons 33, 34, 41; bit 31 of
    the exit reason is set).
``length``
    whether the VM-exit instruction-length field is defined:
    :attr:`Length.ALWAYS` (the listed instructions), :attr:`Length.UNDEFINED`
    or :attr:`Length.SOFTWARE_EVENT` (defined only in the SDM's special
    cases: software exceptions from INT3/INTO/INT1, exits during delivery
    of a software interrupt or software exception, task switches caused by
    CALL/IRET/JMP or by a task gate reached from a software interrupt or
    exception).
``info``
    the VM-exit instruction-information format (:class:`InfoFormat`),
    ``NONE`` when the field is undefined for that reason.  For
    IO_INSTRUCTION the INS/OUTS format applies to the string forms only
    (and only when IA32_VMX_BASIC bit 54 is 1).
``description``
    one line, after the SDM.

The rules (``devirt_emu.vmx.rules``), the REPL's dumps and the JSON output
read names and columns from here; :data:`BY_NUMBER` and :data:`BY_NAME`
index the table.  Numbers 35, 38 and 42 are not used by the SDM.  Rows 71
to 85 (SGX conflict, ENQCMD, bus lock, notify, TDX, MSR lists, user MSRs,
immediate-form MSR instructions) are listed so that names decode; no rule
in this package produces them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


class Timing(str, enum.Enum):
    """When, relative to the instruction or event, the VM exit happens."""

    FAULT = "fault"
    TRAP = "trap"
    EVENT = "event"
    ENTRY = "entry"


class Length(str, enum.Enum):
    """Whether the VM-exit instruction-length field is defined."""

    ALWAYS = "always"
    SOFTWARE_EVENT = "software-event"
    UNDEFINED = "undefined"


class InfoFormat(str, enum.Enum):
    """The VM-exit instruction-information formats of the SDM."""

    NONE = "none"
    INS_OUTS = "ins-outs"                     # INS, OUTS
    INVALIDATE = "invept-invpcid-invvpid"     # INVEPT, INVPCID, INVVPID
    GDTR_IDTR = "lidt-lgdt-sidt-sgdt"         # LIDT, LGDT, SIDT, SGDT
    LDTR_TR = "lldt-ltr-sldt-str"             # LLDT, LTR, SLDT, STR
    REGISTER = "rdrand-rdseed-tpause-umwait"  # RDRAND, RDSEED, TPAUSE, UMWAIT
    VMX_MEMORY = "vmclear-vmptrld-vmptrst-vmxon-xrstors-xsaves"
    VMREAD_VMWRITE = "vmread-vmwrite"         # VMREAD, VMWRITE
    LOADIWKEY = "loadiwkey"                   # LOADIWKEY (two XMM registers)


@dataclass(frozen=True)
class ExitReason:
    """One row of :data:`TABLE`."""

    number: int
    name: str
    timing: Timing
    length: Length
    info: InfoFormat
    description: str


_F, _T, _E, _N = Timing.FAULT, Timing.TRAP, Timing.EVENT, Timing.ENTRY
_A, _S, _U = Length.ALWAYS, Length.SOFTWARE_EVENT, Length.UNDEFINED
_I = InfoFormat

#: Every basic exit reason, by number.
TABLE: tuple[ExitReason, ...] = tuple(ExitReason(*row) for row in (
    (0, "EXCEPTION_NMI", _E, _S, _I.NONE,
     "Exception (exception bitmap, #PF error-code mask/match) or NMI (NMI exiting)"),
    (1, "EXTERNAL_INTERRUPT", _E, _U, _I.NONE,
     "External interrupt with external-interrupt exiting"),
    (2, "TRIPLE_FAULT", _E, _U, _I.NONE, "Triple fault"),
    (3, "INIT_SIGNAL", _E, _U, _I.NONE, "INIT signal"),
    (4, "SIPI_SIGNAL", _E, _U, _I.NONE, "Start-up IPI in the wait-for-SIPI state"),
    (5, "IO_SMI", _E, _U, _I.NONE,
     "SDM name: SMI right after an I/O instruction (dual-monitor treatment)"),
    (6, "OTHER_SMI", _E, _U, _I.NONE, "SDM name: other SMI (dual-monitor treatment)"),
    (7, "INTERRUPT_WINDOW", _E, _U, _I.NONE,
     "Interrupt-window exiting and the guest can take an interrupt"),
    (8, "NMI_WINDOW", _E, _U, _I.NONE, "NMI-window exiting and no virtual-NMI blocking"),
    (9, "TASK_SWITCH", _F, _S, _I.NONE, "Task switch (always exits)"),
    (10, "CPUID", _F, _A, _I.NONE, "CPUID (always exits)"),
    (11, "GETSEC", _F, _A, _I.NONE, "GETSEC (always exits)"),
    (12, "HLT", _F, _A, _I.NONE, "HLT with HLT exiting"),
    (13, "INVD", _F, _A, _I.NONE, "INVD (always exits)"),
    (14, "INVLPG", _F, _A, _I.NONE, "INVLPG with INVLPG exiting"),
    (15, "RDPMC", _F, _A, _I.NONE, "RDPMC with RDPMC exiting"),
    (16, "RDTSC", _F, _A, _I.NONE, "RDTSC with RDTSC exiting"),
    (17, "RSM", _F, _A, _I.NONE, "RSM in SMM (dual-monitor treatment)"),
    (18, "VMCALL", _F, _A, _I.NONE, "VMCALL (always exits)"),
    (19, "VMCLEAR", _F, _A, _I.VMX_MEMORY, "VMCLEAR (always exits)"),
    (20, "VMLAUNCH", _F, _A, _I.NONE, "VMLAUNCH (always exits)"),
    (21, "VMPTRLD", _F, _A, _I.VMX_MEMORY, "VMPTRLD (always exits)"),
    (22, "VMPTRST", _F, _A, _I.VMX_MEMORY, "VMPTRST (always exits)"),
    (23, "VMREAD", _F, _A, _I.VMREAD_VMWRITE, "VMREAD (exits unless the VMREAD bitmap allows it)"),
    (24, "VMRESUME", _F, _A, _I.NONE, "VMRESUME (always exits)"),
    (25, "VMWRITE", _F, _A, _I.VMREAD_VMWRITE,
     "VMWRITE (exits unless the VMWRITE bitmap allows it)"),
    (26, "VMOFF", _F, _A, _I.NONE, "VMXOFF (always exits)"),
    (27, "VMON", _F, _A, _I.VMX_MEMORY, "VMXON (always exits)"),
    (28, "CR_ACCESS", _F, _A, _I.NONE, "MOV CR, CLTS, LMSW per masks, shadows and controls"),
    (29, "DR_ACCESS", _F, _A, _I.NONE, "MOV DR with MOV-DR exiting"),
    (30, "IO_INSTRUCTION", _F, _A, _I.INS_OUTS,
     "IN/OUT/INS/OUTS: unconditional I/O exiting or the I/O bitmaps"),
    (31, "MSR_READ", _F, _A, _I.NONE, "RDMSR: MSR bitmaps off, MSR out of range, or bitmap bit"),
    (32, "MSR_WRITE", _F, _A, _I.NONE, "WRMSR: MSR bitmaps off, MSR out of range, or bitmap bit"),
    (33, "INVALID_STATE", _N, _U, _I.NONE, "VM-entry failure due to invalid guest state"),
    (34, "MSR_LOAD_FAIL", _N, _U, _I.NONE, "VM-entry failure due to MSR loading"),
    (36, "MWAIT_INSTRUCTION", _F, _A, _I.NONE, "MWAIT with MWAIT exiting"),
    (37, "MONITOR_TRAP_FLAG", _T, _U, _I.NONE, "Monitor trap flag"),
    (39, "MONITOR_INSTRUCTION", _F, _A, _I.NONE, "MONITOR with MONITOR exiting"),
    (40, "PAUSE_INSTRUCTION", _F, _A, _I.NONE, "PAUSE with PAUSE exiting or PAUSE-loop exiting"),
    (41, "MCE_DURING_VMENTRY", _N, _U, _I.NONE, "VM-entry failure due to a machine-check event"),
    (43, "TPR_BELOW_THRESHOLD", _T, _U, _I.NONE,
     "TPR shadow dropped below the TPR threshold (use TPR shadow, no virtual-interrupt delivery)"),
    (44, "APIC_ACCESS", _F, _S, _I.NONE, "Access to the APIC-access page"),
    (45, "EOI_INDUCED", _T, _U, _I.NONE, "Virtualized EOI with the vector's EOI-exit bitmap bit"),
    (46, "GDTR_IDTR", _F, _A, _I.GDTR_IDTR, "LGDT/LIDT/SGDT/SIDT with descriptor-table exiting"),
    (47, "LDTR_TR", _F, _A, _I.LDTR_TR, "LLDT/LTR/SLDT/STR with descriptor-table exiting"),
    (48, "EPT_VIOLATION", _F, _S, _I.NONE, "EPT violation"),
    (49, "EPT_MISCONFIG", _F, _S, _I.NONE, "EPT misconfiguration"),
    (50, "INVEPT", _F, _A, _I.INVALIDATE, "INVEPT (always exits)"),
    (51, "RDTSCP", _F, _A, _I.NONE, "RDTSCP with RDTSC exiting and enable RDTSCP"),
    (52, "PREEMPTION_TIMER", _E, _U, _I.NONE, "VMX-preemption timer counted down to zero"),
    (53, "INVVPID", _F, _A, _I.INVALIDATE, "INVVPID (always exits)"),
    (54, "WBINVD", _F, _A, _I.NONE, "WBINVD or WBNOINVD with WBINVD exiting"),
    (55, "XSETBV", _F, _A, _I.NONE, "XSETBV (always exits)"),
    (56, "APIC_WRITE", _T, _U, _I.NONE, "APIC-register virtualization: write needing emulation"),
    (57, "RDRAND", _F, _A, _I.REGISTER, "RDRAND with RDRAND exiting"),
    (58, "INVPCID", _F, _A, _I.INVALIDATE, "INVPCID with enable INVPCID and INVLPG exiting"),
    (59, "VMFUNC", _F, _A, _I.NONE, "VMFUNC of a disabled function or invalid EPTP index/entry"),
    (60, "ENCLS", _F, _A, _I.NONE, "ENCLS with ENCLS exiting and the ENCLS-exiting bitmap bit"),
    (61, "RDSEED", _F, _A, _I.REGISTER, "RDSEED with RDSEED exiting"),
    (62, "PML_FULL", _F, _S, _I.NONE, "Page-modification log full"),
    (63, "XSAVES", _F, _A, _I.VMX_MEMORY, "XSAVES with EDX:EAX & IA32_XSS & XSS-exiting bitmap"),
    (64, "XRSTORS", _F, _A, _I.VMX_MEMORY, "XRSTORS with EDX:EAX & IA32_XSS & XSS-exiting bitmap"),
    (65, "PCONFIG", _F, _A, _I.NONE, "SDM name: PCONFIG with PCONFIG exiting"),
    (66, "SPP", _F, _S, _I.NONE, "SDM name: sub-page-permission related event"),
    (67, "UMWAIT", _F, _A, _I.REGISTER, "UMWAIT with enable user wait and pause and RDTSC exiting"),
    (68, "TPAUSE", _F, _A, _I.REGISTER, "TPAUSE with enable user wait and pause and RDTSC exiting"),
    (69, "LOADIWKEY", _F, _A, _I.LOADIWKEY, "SDM name: LOADIWKEY with LOADIWKEY exiting"),
    (70, "ENCLV", _F, _A, _I.NONE, "SDM name: ENCLV with ENCLV exiting and the ENCLV bitmap bit"),
    (71, "SGX_CONFLICT", _F, _U, _I.NONE, "SDM name: SGX conflict"),
    (72, "ENQCMD_PASID_FAIL", _F, _A, _I.NONE, "SDM name: ENQCMD PASID translation failure"),
    (73, "ENQCMDS_PASID_FAIL", _F, _A, _I.NONE, "SDM name: ENQCMDS PASID translation failure"),
    (74, "BUS_LOCK", _T, _U, _I.NONE, "Bus lock detected"),
    (75, "NOTIFY", _E, _U, _I.NONE, "Instruction timeout (notify window elapsed)"),
    (76, "SEAMCALL", _F, _A, _I.NONE, "SEAMCALL"),
    (77, "TDCALL", _F, _A, _I.NONE, "TDCALL"),
    (78, "RDMSRLIST", _F, _A, _I.NONE, "SDM name: RDMSRLIST"),
    (79, "WRMSRLIST", _F, _A, _I.NONE, "SDM name: WRMSRLIST"),
    (80, "URDMSR", _F, _A, _I.NONE, "SDM name: URDMSR"),
    (81, "UWRMSR", _F, _A, _I.NONE, "SDM name: UWRMSR"),
    (84, "MSR_READ_IMM", _F, _A, _I.NONE, "RDMSR with an immediate MSR index"),
    (85, "MSR_WRITE_IMM", _F, _A, _I.NONE, "WRMSRNS with an immediate MSR index"),
))

#: number -> row
BY_NUMBER: Mapping[int, ExitReason] = MappingProxyType({r.number: r for r in TABLE})
#: name -> row
BY_NAME: Mapping[str, ExitReason] = MappingProxyType({r.name: r for r in TABLE})

if len(BY_NUMBER) != len(TABLE) or len(BY_NAME) != len(TABLE):  # a typo in the table
    raise AssertionError("exit-reason table has a duplicate number or name")

# Module-level constants, one per row: exit_reasons.HLT == 12, ...
globals().update({r.name: r.number for r in TABLE})

#: Bit 31 of the exit-reason field: VM-entry failure.
EXIT_REASON_FAILED_VMENTRY = 1 << 31
#: Bits 15:0 of the exit-reason field: the basic exit reason.
BASIC_REASON_MASK = 0xFFFF


def reason(number_or_name) -> ExitReason:
    """The row for a basic exit reason given by number or name.

    A full exit-reason field (with flag bits such as bit 31) is accepted: only
    bits 15:0 are looked up.  An unknown reason raises :class:`KeyError`
    naming it.
    """
    if isinstance(number_or_name, str):
        try:
            return BY_NAME[number_or_name]
        except KeyError:
            raise KeyError(f"no VMX exit reason is named {number_or_name!r}") from None
    basic = int(number_or_name) & BASIC_REASON_MASK
    try:
        return BY_NUMBER[basic]
    except KeyError:
        raise KeyError(f"{basic} is not a VMX basic exit reason") from None


def name_of(number: int) -> str:
    """The name of a basic exit reason (``"REASON_<n>"`` for a number not in the SDM)."""
    row = BY_NUMBER.get(int(number) & BASIC_REASON_MASK)
    return row.name if row is not None else f"REASON_{int(number) & BASIC_REASON_MASK}"
