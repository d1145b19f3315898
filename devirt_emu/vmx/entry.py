"""VM-entry checks (SDM Vol. 3C, chapter "VM Entries"), as pure functions.

:func:`check_vm_entry` runs, in the SDM's order, every check that a
VMLAUNCH/VMRESUME makes after its basic checks on the instruction itself,
and returns the first failure as an :class:`EntryFailure` (or None if the
VM entry may proceed to loading guest state):

1. the launch state and MOV-SS blocking (section "Basic VM-Entry Checks"):
   VMfailValid 4, 5 or 26;
2. the VM-execution, VM-exit and VM-entry control fields (section "Checks
   on VMX Controls"): VMfailValid 7 (VMXERR_ENTRY_INVALID_CONTROL_FIELD);
3. the host-state area (sections "Checks on Host Control Registers, MSRs,
   and SSP", "... Host Segment and Descriptor-Table Registers", "Checks
   Related to Address-Space Size"): VMfailValid 8;
4. the guest-state area (section "Checks on the Guest State Area": control
   registers, debug registers and MSRs; segment registers; descriptor-table
   registers; RIP and RFLAGS; non-register state; PDPTEs): a VM-entry
   failure exit with basic reason 33 (INVALID_STATE), bit 31 set and exit
   qualification 0, 2 (ENTRY_FAIL_PDPTE), 3 (ENTRY_FAIL_NMI) or 4
   (ENTRY_FAIL_VMCS_LINK_PTR);
5. the VM-entry MSR-load area (section "Loading MSRs"): a failure exit with
   basic reason 34 (MSR_LOAD_FAIL), bit 31 set and the number of the failing
   entry as qualification (1 for the first entry, as the SDM numbers them).

Each group is also a public function (``check_execution_controls``,
``check_host_state``, ``check_guest_segments``, ...) so that it can be
tested, and so that a debugger can say which check failed: every failure
carries a sentence naming the control bits or the VMCS field concerned
(``EntryFailure.check``) and the field's Linux name (``EntryFailure.field``).

Inputs:

* ``vmcs``: a :class:`~devirt_emu.vmx.vmcs.Vmcs` (read with ``Vmcs.get``,
  the processor's own accesses) or any mapping from Linux field names to
  values (a missing field reads as 0; handy in tests).
* ``caps``: an :class:`EntryCaps`, the capability inputs.
  :meth:`EntryCaps.for_model` gives a CPU model's (``devirt_emu/cpumodels``),
  :meth:`EntryCaps.modelled` the default model's; tests vary it with
  :func:`dataclasses.replace`.
* ``read_mem(pa, n) -> bytes``: host-physical memory, for the
  virtual-APIC page (VTPR), the VMCS link pointer's region, the guest PDPTEs
  (without EPT) and the MSR-load area.  Bytes that ``read_mem`` cannot read
  (it raises :class:`PhysicalAccessError`) read as all ones, as unbacked
  physical memory does on a PC.

Modelling choices (the SDM leaves them to the implementation, or the
feature is not modelled):

* VM entry never runs in SMM: "entry to SMM", "deactivate dual-monitor
  treatment" and blocking by SMI are always errors.
* Tertiary processor-based controls, secondary VM-exit controls, CET, PKRS,
  Intel PT, LBR, BNDCFGS, FRED, HLAT, SPP pointer and IPI virtualization
  state are not checked: the modelled CPU does not allow those controls,
  so their allowed-settings check fails first.  IA32_PERF_GLOBAL_CTRL
  reserved bits are not checked (its load controls are not allowed either).
* RTM and SGX are not supported: bit 16 of the pending debug exceptions and
  bit 4 of the interruptibility state must be 0.
* Canonical means canonical for ``caps.linear_address_width`` (48 bits).
* "A processor may require blocking by STI to be 0 when injecting an NMI":
  this one does (``caps.nmi_injection_checks_sti``), with qualification 3.
* The SDM lets the number of MSR-load entries beyond the recommended
  maximum (512 * (IA32_VMX_MISC[27:25] + 1)) be undefined behaviour; here
  the first entry past the limit fails with its number, as KVM does.
* The VMX-preemption timer, VTPR clearing of bytes 3:1 and the actual
  loading of state and MSRs are the caller's: these functions only check.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from devirt_emu.x86 import (EFER_LMA, EFER_LME, ERROR_CODE_VECTORS, MSR_FS_BASE, MSR_GS_BASE,
                            MSR_IA32_SMBASE, MSR_IA32_SMM_MONITOR_CTL, MSR_IA32_UCODE_REV,
                            MSR_IA32_UCODE_WRITE, X86_CR0_CD, X86_CR0_NW, X86_CR0_PE, X86_CR0_PG,
                            X86_CR0_WP, X86_CR4_CET, X86_CR4_PAE, X86_CR4_PCIDE, X86_EFLAGS_FIXED,
                            X86_EFLAGS_IF, X86_EFLAGS_TF, X86_EFLAGS_VM, X86_TRAP_CP)
from devirt_emu.platform.lapic import MAXPHYADDR
from devirt_emu.platform.memory import PhysicalAccessError
from devirt_emu.platform.paging import RSVD_PDPTE_LOW
from devirt_emu.vmx import capabilities as vcaps
from devirt_emu.vmx import controls as c
from devirt_emu.vmx import exit_reasons
from devirt_emu.vmx.vmcs import VmInstructionErrorNumber as Err

# --------------------------------------------------------------------------
# Architectural bits used by the checks (SDM Vol. 3A; Linux names)
# --------------------------------------------------------------------------
#: RFLAGS bits that must be 0 in the guest RFLAGS field: 63:22, 15, 5, 3.
RFLAGS_RESERVED = ~((1 << 22) - 1) & ((1 << 64) - 1) | (1 << 15) | (1 << 5) | (1 << 3)
DEBUGCTLMSR_BTF = 1 << 1
#: IA32_DEBUGCTL bits defined by the SDM (0, 1, 6-15); 5:2 and 63:16 are reserved.
DEBUGCTL_DEFINED = 0xFFC3
#: IA32_EFER bits of an Intel 64 processor: SCE, LME, LMA, NXE.
EFER_DEFINED_INTEL = 0xD01
#: Memory types an IA32_PAT entry may hold: UC, WC, WT, WP, WB, UC-.
PAT_VALID_TYPES = frozenset({0, 1, 4, 5, 6, 7})

# Segment access rights (VMCS format, SDM "Format of Access Rights"; Linux names).
VMX_AR_TYPE_MASK = 0x0F
VMX_AR_S_MASK = 1 << 4
VMX_AR_DPL_SHIFT = 5
VMX_AR_P_MASK = 1 << 7
VMX_AR_RESERVED_11_8 = 0xF00
VMX_AR_L_MASK = 1 << 13
VMX_AR_DB_MASK = 1 << 14
VMX_AR_G_MASK = 1 << 15
VMX_AR_UNUSABLE_MASK = 1 << 16
VMX_AR_RESERVED_31_17 = 0xFFFE0000

# Pending debug exceptions (SDM "Format of Pending-Debug-Exceptions").
PENDING_DBG_BS = 1 << 14
#: Bits 11:4, 13, 15 and 63:16 (bit 16, RTM, because RTM is not supported).
PENDING_DBG_RESERVED = (0xFF0 | (1 << 13) | (1 << 15) | (((1 << 64) - 1) & ~0xFFFF))

#: Hardware exceptions that deliver an error code: #DF #TS #NP #SS #GP #PF #AC (and #CP
#: on a processor with CET, which the modelled one is not).
EXCEPTIONS_WITH_ERROR_CODE = ERROR_CODE_VECTORS - {X86_TRAP_CP}
INTR_INFO_RESERVED_30_12 = 0x7FFFF000

# MSRs the MSR-load area may not load (SDM "Loading MSRs"; the UCODE MSRs are model-specific and
# not loadable on VM entry, as in KVM).
_MSR_LOAD_FORBIDDEN = {
    MSR_FS_BASE: "IA32_FS_BASE may not be loaded from the MSR-load area",
    MSR_GS_BASE: "IA32_GS_BASE may not be loaded from the MSR-load area",
    MSR_IA32_SMM_MONITOR_CTL: "IA32_SMM_MONITOR_CTL can be written only in SMM",
    MSR_IA32_SMBASE: "IA32_SMBASE can be accessed only in SMM",
    MSR_IA32_UCODE_WRITE: "IA32_BIOS_UPDT_TRIG cannot be loaded on VM entry",
    MSR_IA32_UCODE_REV: "IA32_BIOS_SIGN_ID cannot be loaded on VM entry",
}
MSR_LOAD_ENTRY_SIZE = 16

_SEGS = ("ES", "CS", "SS", "DS", "FS", "GS")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ALL_ONES64 = (1 << 64) - 1


# --------------------------------------------------------------------------
# Inputs and result
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class EntryCaps:
    """What VM entry checks against: the capability MSRs and CPU facts.

    Each control word is ``(must_be_1, may_be_1)``: bits 31:0 and 63:32 of
    its capability MSR (the TRUE MSR when IA32_VMX_BASIC bit 55 is 1, which
    is what VM entry checks then).  ``vmfunc`` is IA32_VMX_VMFUNC (the
    may-be-1 bits of the VM-function controls).
    """

    pinbased: tuple[int, int]
    procbased: tuple[int, int]
    procbased2: tuple[int, int]
    exit: tuple[int, int]
    entry: tuple[int, int]
    vmfunc: int
    basic: int
    misc: int
    cr0_fixed0: int
    cr0_fixed1: int
    cr4_fixed0: int
    cr4_fixed1: int
    ept_vpid_cap: int
    maxphyaddr: int = MAXPHYADDR
    linear_address_width: int = 48
    efer_defined: int = EFER_DEFINED_INTEL
    debugctl_defined: int = DEBUGCTL_DEFINED
    nmi_injection_checks_sti: bool = True

    def __post_init__(self):
        if not 36 <= self.maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR must be 36..52, not {self.maxphyaddr}")
        if self.linear_address_width not in (48, 57):
            raise ValueError(f"linear-address width is 48 or 57, not {self.linear_address_width}")

    @classmethod
    def modelled(cls, **changes) -> "EntryCaps":
        """The default CPU model's (see :meth:`for_model`)."""
        return cls.for_model(None, **changes)

    @classmethod
    def for_model(cls, model=None, **changes) -> "EntryCaps":
        """A CPU model's capability MSRs, MAXPHYADDR and linear-address width
        (``model``: a CpuModel, a spec string or None for the default model);
        keyword arguments override fields."""
        m = vcaps.model_of(model)
        msrs = m.vmx_msrs
        if vcaps.MSR_IA32_VMX_BASIC not in msrs:
            raise ValueError(f"CPU model {m.name} has no VMX capability MSRs")
        values = dict(
            pinbased=vcaps.allowed_settings("PINBASED", model=m),
            procbased=vcaps.allowed_settings("PROCBASED", model=m),
            procbased2=vcaps.allowed_settings("PROCBASED2", model=m),
            exit=vcaps.allowed_settings("EXIT", model=m),
            entry=vcaps.allowed_settings("ENTRY", model=m),
            vmfunc=vcaps.allowed_settings("VMFUNC", model=m)[1],
            basic=msrs[vcaps.MSR_IA32_VMX_BASIC],
            misc=msrs[vcaps.MSR_IA32_VMX_MISC],
            cr0_fixed0=msrs[vcaps.MSR_IA32_VMX_CR0_FIXED0],
            cr0_fixed1=msrs[vcaps.MSR_IA32_VMX_CR0_FIXED1],
            cr4_fixed0=msrs[vcaps.MSR_IA32_VMX_CR4_FIXED0],
            cr4_fixed1=msrs[vcaps.MSR_IA32_VMX_CR4_FIXED1],
            ept_vpid_cap=msrs.get(vcaps.MSR_IA32_VMX_EPT_VPID_CAP, 0),
            maxphyaddr=m.maxphyaddr,
            linear_address_width=m.linear_bits,
        )
        values.update(changes)
        return cls(**values)

    @property
    def vmcs_revision_id(self) -> int:
        return c.vmx_basic_revision_id(self.basic)


class FailureKind(str, enum.Enum):
    VMFAIL_VALID = "VMfailValid"
    ENTRY_FAILURE_EXIT = "VM-entry failure"


@dataclass(frozen=True)
class EntryFailure:
    """The outcome of a failed VM entry.

    For :attr:`FailureKind.VMFAIL_VALID` ``error`` is the VM-instruction
    error number (the instruction falls through with VMfailValid).  For
    :attr:`FailureKind.ENTRY_FAILURE_EXIT` ``exit_reason`` is the full
    exit-reason field (bit 31 set, basic reason 33 or 34) and
    ``qualification`` the exit qualification.  ``check`` says in words
    which check failed; ``field`` is the VMCS field it concerns (Linux name).
    """

    kind: FailureKind
    check: str
    field: Optional[str] = None
    error: Optional[int] = None
    exit_reason: Optional[int] = None
    qualification: int = 0

    @property
    def basic_reason(self) -> Optional[int]:
        return None if self.exit_reason is None else self.exit_reason & exit_reasons.BASIC_REASON_MASK

    @property
    def name(self) -> str:
        """VMXERR_* for a VMfailValid, the exit-reason name for a failure exit."""
        if self.kind is FailureKind.VMFAIL_VALID:
            return Err(self.error).name
        return exit_reasons.name_of(self.exit_reason)

    def __str__(self) -> str:
        if self.kind is FailureKind.VMFAIL_VALID:
            return f"VMfailValid({self.error}, {self.name}): {self.check}"
        return (f"VM-entry failure exit {self.name} (reason {self.exit_reason:#x}, "
                f"qualification {self.qualification}): {self.check}")


def _vmfail(error: int, check: str, fld: Optional[str] = None) -> EntryFailure:
    return EntryFailure(FailureKind.VMFAIL_VALID, check, fld, error=int(error))


def _ctl(check: str, fld: Optional[str] = None) -> EntryFailure:
    return _vmfail(Err.VMXERR_ENTRY_INVALID_CONTROL_FIELD, check, fld)


def _host(check: str, fld: Optional[str] = None) -> EntryFailure:
    return _vmfail(Err.VMXERR_ENTRY_INVALID_HOST_STATE_FIELD, check, fld)


def _guest(check: str, fld: Optional[str] = None, qual: int = c.ENTRY_FAIL_DEFAULT) -> EntryFailure:
    return EntryFailure(FailureKind.ENTRY_FAILURE_EXIT, check, fld,
                        exit_reason=exit_reasons.INVALID_STATE | exit_reasons.EXIT_REASON_FAILED_VMENTRY,
                        qualification=qual)


def _msr_load(check: str, number: int) -> EntryFailure:
    return EntryFailure(FailureKind.ENTRY_FAILURE_EXIT, check, "VM_ENTRY_MSR_LOAD_ADDR",
                        exit_reason=exit_reasons.MSR_LOAD_FAIL | exit_reasons.EXIT_REASON_FAILED_VMENTRY,
                        qualification=number)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------
class _Fields:
    """Reads VMCS fields by Linux name from a Vmcs or a mapping."""

    __slots__ = ("_get",)

    def __init__(self, vmcs):
        if isinstance(vmcs, _Fields):
            self._get = vmcs._get
        elif isinstance(vmcs, Mapping):
            self._get = lambda name: int(vmcs.get(name, 0))
        elif callable(getattr(vmcs, "get", None)):
            self._get = vmcs.get
        else:
            raise TypeError(f"vmcs must be a Vmcs or a mapping of field names, not {type(vmcs).__name__}")

    def __getitem__(self, name: str) -> int:
        return self._get(name)


def _read(read_mem, pa: int, n: int) -> bytes:
    """``n`` bytes at ``pa``; unreadable memory reads as all ones."""
    try:
        data = read_mem(pa, n)
    except PhysicalAccessError:
        return b"\xff" * n
    if len(data) != n:
        raise ValueError(f"read_mem({pa:#x}, {n}) returned {len(data)} bytes")
    return data


def is_canonical(addr: int, width: int = 48) -> bool:
    """Bits 63:width-1 of a 64-bit address are all equal."""
    top = addr >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def upper_bits_identical(addr: int, width: int = 48) -> bool:
    """Bits 63:width of a 64-bit address are all equal (the guest-RIP check of
    SDM 26.3.1.4 with N = width, the linear-address width: bit N-1 is not part
    of it, so a RIP may pass it and still not be canonical)."""
    top = addr >> width
    return top == 0 or top == (1 << (64 - width)) - 1


def _beyond_width(addr: int, caps: EntryCaps) -> bool:
    return addr >> caps.maxphyaddr != 0


def _page_address_problem(addr: int, caps: EntryCaps) -> Optional[str]:
    if addr & 0xFFF:
        return f"{addr:#x} is not 4 KiB aligned (bits 11:0 must be 0)"
    if _beyond_width(addr, caps):
        return f"{addr:#x} sets bits beyond the physical-address width ({caps.maxphyaddr})"
    return None


def _allowed_problem(value: int, allowed: tuple[int, int], table) -> Optional[str]:
    must1, may1 = allowed
    missing = must1 & ~value
    extra = value & ~may1
    parts = []
    if missing:
        parts.append(f"{', '.join(c.decode_bits(table, missing))} must be 1")
    if extra:
        parts.append(f"{', '.join(c.decode_bits(table, extra))} may not be 1")
    return "; ".join(parts) or None


def _fixed_problem(value: int, fixed0: int, fixed1: int) -> Optional[str]:
    missing = fixed0 & ~value
    extra = value & ~fixed1 & _ALL_ONES64
    parts = []
    if missing:
        parts.append(f"{_bit_list(missing)} must be 1 (FIXED0)")
    if extra:
        parts.append(f"{_bit_list(extra)} must be 0 (FIXED1)")
    return "; ".join(parts) or None


def _bit_list(mask: int) -> str:
    """"bit 3" or "bits 3,15"."""
    bits = [str(n) for n in range(mask.bit_length()) if (mask >> n) & 1]
    return ("bit " if len(bits) == 1 else "bits ") + ",".join(bits)


def _pat_problem(pat: int) -> Optional[str]:
    for i in range(8):
        t = (pat >> (8 * i)) & 0xFF
        if t not in PAT_VALID_TYPES:
            return f"PAT entry {i} holds memory type {t} (allowed 0, 1, 4, 5, 6, 7)"
    return None


def _msr_area_problem(count: int, addr: int, caps: EntryCaps) -> Optional[str]:
    if not count:
        return None
    if addr & 0xF:
        return f"address {addr:#x} is not 16-byte aligned (bits 3:0 must be 0)"
    if _beyond_width(addr, caps):
        return f"address {addr:#x} sets bits beyond the physical-address width"
    last = addr + count * MSR_LOAD_ENTRY_SIZE - 1
    if _beyond_width(last, caps):
        return f"the last byte of {count} entries at {addr:#x} ({last:#x}) is beyond the physical-address width"
    return None


def _secondary(v: _Fields) -> int:
    """The secondary controls in effect: 0 unless "activate secondary controls"."""
    if v["CPU_BASED_VM_EXEC_CONTROL"] & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        return v["SECONDARY_VM_EXEC_CONTROL"]
    return 0


def _intr_info(v: _Fields) -> tuple[bool, int, int]:
    """(valid, interruption type already shifted, vector) of the entry interruption info."""
    info = v["VM_ENTRY_INTR_INFO_FIELD"]
    return (bool(info & c.INTR_INFO_VALID_MASK), info & c.INTR_INFO_INTR_TYPE_MASK,
            info & c.INTR_INFO_VECTOR_MASK)


# --------------------------------------------------------------------------
# 1. Basic checks
# --------------------------------------------------------------------------
def check_launch_state(launch: bool, launch_state: str, *, blocked_by_mov_ss: bool = False
                       ) -> Optional[EntryFailure]:
    """MOV-SS blocking (error 26), then VMLAUNCH needs a clear VMCS (error 4)
    and VMRESUME a launched one (error 5)."""
    if launch_state not in ("clear", "launched"):
        raise ValueError(f"launch state is 'clear' or 'launched', not {launch_state!r}")
    if blocked_by_mov_ss:
        return _vmfail(Err.VMXERR_ENTRY_EVENTS_BLOCKED_BY_MOV_SS,
                       "VM entry while events are blocked by MOV SS")
    if launch and launch_state != "clear":
        return _vmfail(Err.VMXERR_VMLAUNCH_NONCLEAR_VMCS, "VMLAUNCH needs a VMCS whose launch state is clear")
    if not launch and launch_state != "launched":
        return _vmfail(Err.VMXERR_VMRESUME_NONLAUNCHED_VMCS, "VMRESUME needs a launched VMCS")
    return None


# --------------------------------------------------------------------------
# 2. VMX controls
# --------------------------------------------------------------------------
def eptp_problem(eptp: int, ept_vpid_cap: int, maxphyaddr: int) -> Optional[str]:
    """Why an EPTP value is invalid for VM entry, or None (SDM "VM-Execution
    Control Fields", the EPTP items)."""
    mt = eptp & c.VMX_EPTP_MT_MASK
    if not ((mt == c.VMX_EPTP_MT_UC and ept_vpid_cap & c.VMX_EPTP_UC_BIT)
            or (mt == c.VMX_EPTP_MT_WB and ept_vpid_cap & c.VMX_EPTP_WB_BIT)):
        ok = [name for name, bit in (("UC 0", c.VMX_EPTP_UC_BIT), ("WB 6", c.VMX_EPTP_WB_BIT))
              if ept_vpid_cap & bit]
        return f"memory type {mt} is not supported (supported: {' or '.join(ok) or 'none'})"
    pwl = eptp & c.VMX_EPTP_PWL_MASK
    if not ((pwl == c.VMX_EPTP_PWL_4 and ept_vpid_cap & c.VMX_EPT_PAGE_WALK_4_BIT)
            or (pwl == c.VMX_EPTP_PWL_5 and ept_vpid_cap & c.VMX_EPT_PAGE_WALK_5_BIT)):
        return f"page-walk length {(pwl >> 3) + 1} is not supported (bits 5:3 must be 3 for 4 levels)"
    if eptp & c.VMX_EPTP_AD_ENABLE_BIT and not ept_vpid_cap & c.VMX_EPT_AD_BIT:
        return "bit 6 enables accessed/dirty flags, which are not supported"
    if eptp & c.VMX_EPTP_SSS_ENABLE_BIT and not ept_vpid_cap & c.VMX_EPT_SUPERVISOR_SHADOW_STACK_BIT:
        return "bit 7 enables supervisor shadow-stack control, which is not supported"
    if eptp & c.VMX_EPTP_RESERVED_LOW_MASK:
        return "reserved bits 11:8 are set"
    if eptp >> maxphyaddr:
        return f"bits 63:{maxphyaddr} (beyond the physical-address width) are set"
    return None


def check_execution_controls(vmcs, caps: EntryCaps, read_mem) -> Optional[EntryFailure]:
    """SDM "VM-Execution Control Fields", in its order."""
    v = _Fields(vmcs)
    pin = v["PIN_BASED_VM_EXEC_CONTROL"]
    proc = v["CPU_BASED_VM_EXEC_CONTROL"]
    p = _allowed_problem(pin, caps.pinbased, c.PINBASED)
    if p:
        return _ctl(f"PIN_BASED_VM_EXEC_CONTROL: {p}", "PIN_BASED_VM_EXEC_CONTROL")
    p = _allowed_problem(proc, caps.procbased, c.PROCBASED)
    if p:
        return _ctl(f"CPU_BASED_VM_EXEC_CONTROL: {p}", "CPU_BASED_VM_EXEC_CONTROL")
    sec = _secondary(v)
    if proc & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        p = _allowed_problem(sec, caps.procbased2, c.PROCBASED2)
        if p:
            return _ctl(f"SECONDARY_VM_EXEC_CONTROL: {p}", "SECONDARY_VM_EXEC_CONTROL")

    count = v["CR3_TARGET_COUNT"]
    limit = c.vmx_misc_cr3_count(caps.misc)
    if count > limit:
        return _ctl(f"CR3_TARGET_COUNT {count} is greater than {limit}", "CR3_TARGET_COUNT")
    if proc & c.CPU_BASED_USE_IO_BITMAPS:
        for name in ("IO_BITMAP_A", "IO_BITMAP_B"):
            p = _page_address_problem(v[name], caps)
            if p:
                return _ctl(f"CPU_BASED_USE_IO_BITMAPS: {name} {p}", name)
    if proc & c.CPU_BASED_USE_MSR_BITMAPS:
        p = _page_address_problem(v["MSR_BITMAP"], caps)
        if p:
            return _ctl(f"CPU_BASED_USE_MSR_BITMAPS: MSR_BITMAP {p}", "MSR_BITMAP")

    tpr_shadow = proc & c.CPU_BASED_TPR_SHADOW
    vid = sec & c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
    apic_accesses = sec & c.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
    if tpr_shadow:
        vapic = v["VIRTUAL_APIC_PAGE_ADDR"]
        p = _page_address_problem(vapic, caps)
        if p:
            return _ctl(f"CPU_BASED_TPR_SHADOW: VIRTUAL_APIC_PAGE_ADDR {p}", "VIRTUAL_APIC_PAGE_ADDR")
        threshold = v["TPR_THRESHOLD"]
        if not vid and threshold & ~0xF:
            return _ctl(f"CPU_BASED_TPR_SHADOW: TPR_THRESHOLD {threshold:#x} has bits 31:4 set",
                        "TPR_THRESHOLD")
        if not vid and not apic_accesses:
            vtpr = _read(read_mem, vapic + 0x80, 1)[0]
            if (threshold & 0xF) > (vtpr >> 4):
                return _ctl(f"CPU_BASED_TPR_SHADOW: TPR_THRESHOLD[3:0] = {threshold & 0xF} is greater "
                            f"than VTPR[7:4] = {vtpr >> 4} (virtual-APIC page byte 0x80)",
                            "TPR_THRESHOLD")
    if not pin & c.PIN_BASED_NMI_EXITING and pin & c.PIN_BASED_VIRTUAL_NMIS:
        return _ctl("PIN_BASED_VIRTUAL_NMIS requires PIN_BASED_NMI_EXITING", "PIN_BASED_VM_EXEC_CONTROL")
    if not pin & c.PIN_BASED_VIRTUAL_NMIS and proc & c.CPU_BASED_NMI_WINDOW_EXITING:
        return _ctl("CPU_BASED_NMI_WINDOW_EXITING requires PIN_BASED_VIRTUAL_NMIS",
                    "CPU_BASED_VM_EXEC_CONTROL")
    if apic_accesses:
        p = _page_address_problem(v["APIC_ACCESS_ADDR"], caps)
        if p:
            return _ctl(f"SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES: APIC_ACCESS_ADDR {p}", "APIC_ACCESS_ADDR")
    if not tpr_shadow:
        needs = sec & (c.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE | c.SECONDARY_EXEC_APIC_REGISTER_VIRT
                       | c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)
        if needs:
            return _ctl(f"{', '.join(c.decode_bits(c.PROCBASED2, needs))} requires CPU_BASED_TPR_SHADOW",
                        "SECONDARY_VM_EXEC_CONTROL")
    if sec & c.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE and apic_accesses:
        return _ctl("SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE and SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES "
                    "cannot both be 1", "SECONDARY_VM_EXEC_CONTROL")
    if vid and not pin & c.PIN_BASED_EXT_INTR_MASK:
        return _ctl("SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY requires PIN_BASED_EXT_INTR_MASK",
                    "PIN_BASED_VM_EXEC_CONTROL")
    if pin & c.PIN_BASED_POSTED_INTR:
        if not vid:
            return _ctl("PIN_BASED_POSTED_INTR requires SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY",
                        "SECONDARY_VM_EXEC_CONTROL")
        if not v["VM_EXIT_CONTROLS"] & c.VM_EXIT_ACK_INTR_ON_EXIT:
            return _ctl("PIN_BASED_POSTED_INTR requires VM_EXIT_ACK_INTR_ON_EXIT", "VM_EXIT_CONTROLS")
        nv = v["POSTED_INTR_NV"]
        if nv & 0xFF00:
            return _ctl(f"PIN_BASED_POSTED_INTR: POSTED_INTR_NV {nv:#x} has bits 15:8 set", "POSTED_INTR_NV")
        desc = v["POSTED_INTR_DESC_ADDR"]
        if desc & 0x3F or _beyond_width(desc, caps):
            return _ctl(f"PIN_BASED_POSTED_INTR: POSTED_INTR_DESC_ADDR {desc:#x} must be 64-byte aligned "
                        "and within the physical-address width", "POSTED_INTR_DESC_ADDR")
    if sec & c.SECONDARY_EXEC_ENABLE_VPID and v["VIRTUAL_PROCESSOR_ID"] == 0:
        return _ctl("SECONDARY_EXEC_ENABLE_VPID requires VIRTUAL_PROCESSOR_ID != 0", "VIRTUAL_PROCESSOR_ID")
    ept = sec & c.SECONDARY_EXEC_ENABLE_EPT
    if ept:
        p = eptp_problem(v["EPT_POINTER"], caps.ept_vpid_cap, caps.maxphyaddr)
        if p:
            return _ctl(f"SECONDARY_EXEC_ENABLE_EPT requires a valid EPT_POINTER: {p}", "EPT_POINTER")
    if sec & c.SECONDARY_EXEC_ENABLE_PML:
        if not ept:
            return _ctl("SECONDARY_EXEC_ENABLE_PML requires SECONDARY_EXEC_ENABLE_EPT", "SECONDARY_VM_EXEC_CONTROL")
        p = _page_address_problem(v["PML_ADDRESS"], caps)
        if p:
            return _ctl(f"SECONDARY_EXEC_ENABLE_PML: PML_ADDRESS {p}", "PML_ADDRESS")
    for bit in (c.SECONDARY_EXEC_UNRESTRICTED_GUEST, c.SECONDARY_EXEC_MODE_BASED_EPT_EXEC,
                c.SECONDARY_EXEC_EPT_SUB_PAGE_WRITE):
        if sec & bit and not ept:
            return _ctl(f"{c.decode_bits(c.PROCBASED2, bit)[0]} requires SECONDARY_EXEC_ENABLE_EPT",
                        "SECONDARY_VM_EXEC_CONTROL")
    if sec & c.SECONDARY_EXEC_ENABLE_VMFUNC:
        vmfunc = v["VM_FUNCTION_CONTROL"]
        p = _allowed_problem(vmfunc, (0, caps.vmfunc), c.VMFUNC)
        if p:
            return _ctl(f"VM_FUNCTION_CONTROL: {p}", "VM_FUNCTION_CONTROL")
        if vmfunc & c.VMX_VMFUNC_EPTP_SWITCHING:
            if not ept:
                return _ctl("VMX_VMFUNC_EPTP_SWITCHING requires SECONDARY_EXEC_ENABLE_EPT", "VM_FUNCTION_CONTROL")
            p = _page_address_problem(v["EPTP_LIST_ADDRESS"], caps)
            if p:
                return _ctl(f"VMX_VMFUNC_EPTP_SWITCHING: EPTP_LIST_ADDRESS {p}", "EPTP_LIST_ADDRESS")
    if sec & c.SECONDARY_EXEC_SHADOW_VMCS:
        for name in ("VMREAD_BITMAP", "VMWRITE_BITMAP"):
            p = _page_address_problem(v[name], caps)
            if p:
                return _ctl(f"SECONDARY_EXEC_SHADOW_VMCS: {name} {p}", name)
    if sec & c.SECONDARY_EXEC_EPT_VIOLATION_VE:
        p = _page_address_problem(v["VE_INFORMATION_ADDRESS"], caps)
        if p:
            return _ctl(f"SECONDARY_EXEC_EPT_VIOLATION_VE: VE_INFORMATION_ADDRESS {p}", "VE_INFORMATION_ADDRESS")
    return None


def check_exit_controls(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "VM-Exit Control Fields"."""
    v = _Fields(vmcs)
    ex = v["VM_EXIT_CONTROLS"]
    p = _allowed_problem(ex, caps.exit, c.EXIT)
    if p:
        return _ctl(f"VM_EXIT_CONTROLS: {p}", "VM_EXIT_CONTROLS")
    if (ex & c.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER
            and not v["PIN_BASED_VM_EXEC_CONTROL"] & c.PIN_BASED_VMX_PREEMPTION_TIMER):
        return _ctl("VM_EXIT_SAVE_VMX_PREEMPTION_TIMER requires PIN_BASED_VMX_PREEMPTION_TIMER",
                    "VM_EXIT_CONTROLS")
    for count, addr in (("VM_EXIT_MSR_STORE_COUNT", "VM_EXIT_MSR_STORE_ADDR"),
                        ("VM_EXIT_MSR_LOAD_COUNT", "VM_EXIT_MSR_LOAD_ADDR")):
        p = _msr_area_problem(v[count], v[addr], caps)
        if p:
            return _ctl(f"{addr}: {p}", addr)
    return None


def check_event_injection(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "VM-Entry Control Fields": the VM-entry interruption-information
    field, exception error code and instruction length."""
    v = _Fields(vmcs)
    info = v["VM_ENTRY_INTR_INFO_FIELD"]
    valid, itype, vector = _intr_info(v)
    if not valid:
        return None
    fld = "VM_ENTRY_INTR_INFO_FIELD"
    tname = c.INTR_TYPES[itype]
    if itype == c.INTR_TYPE_RESERVED or (
            itype == c.INTR_TYPE_OTHER_EVENT and not caps.procbased[1] & c.CPU_BASED_MONITOR_TRAP_FLAG):
        return _ctl(f"interruption type {itype >> 8} ({tname}) is reserved", fld)
    if itype == c.INTR_TYPE_NMI_INTR and vector != 2:
        return _ctl(f"an NMI must have vector 2, not {vector}", fld)
    if itype == c.INTR_TYPE_HARD_EXCEPTION and vector > 31:
        return _ctl(f"a hardware exception must have a vector <= 31, not {vector}", fld)
    if itype == c.INTR_TYPE_OTHER_EVENT and vector != 0:
        return _ctl(f"other event (pending MTF) must have vector 0, not {vector}", fld)
    deliver = bool(info & c.INTR_INFO_DELIVER_CODE_MASK)
    pe = bool(v["GUEST_CR0"] & X86_CR0_PE)
    if itype != c.INTR_TYPE_HARD_EXCEPTION or not pe:
        if deliver:
            why = "the guest CR0.PE is 0" if itype == c.INTR_TYPE_HARD_EXCEPTION else f"type is {tname}"
            return _ctl(f"deliver-error-code must be 0: {why}", fld)
    elif not caps.basic & c.VMX_BASIC_NO_HW_ERROR_CODE_CC:
        should = vector in EXCEPTIONS_WITH_ERROR_CODE
        if deliver != should:
            return _ctl(f"deliver-error-code must be {int(should)} for hardware exception {vector}", fld)
    if info & INTR_INFO_RESERVED_30_12:
        return _ctl(f"reserved bits 30:12 are set ({info & INTR_INFO_RESERVED_30_12:#x})", fld)
    if deliver:
        code = v["VM_ENTRY_EXCEPTION_ERROR_CODE"]
        if code & 0xFFFF0000:
            return _ctl(f"VM_ENTRY_EXCEPTION_ERROR_CODE {code:#x} has bits 31:16 set",
                        "VM_ENTRY_EXCEPTION_ERROR_CODE")
    if itype in (c.INTR_TYPE_SOFT_INTR, c.INTR_TYPE_PRIV_SW_EXCEPTION, c.INTR_TYPE_SOFT_EXCEPTION):
        length = v["VM_ENTRY_INSTRUCTION_LEN"]
        zero_ok = bool(caps.misc & c.VMX_MISC_ZERO_LEN_INS)
        if length > 15 or (length == 0 and not zero_ok):
            return _ctl(f"{tname} needs VM_ENTRY_INSTRUCTION_LEN in 1..15"
                        f"{' (or 0)' if zero_ok else ''}, not {length}", "VM_ENTRY_INSTRUCTION_LEN")
    return None


def check_entry_controls(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "VM-Entry Control Fields": allowed settings, event injection,
    the MSR-load address, and the SMM controls (VM entry is never in SMM)."""
    v = _Fields(vmcs)
    en = v["VM_ENTRY_CONTROLS"]
    p = _allowed_problem(en, caps.entry, c.ENTRY)
    if p:
        return _ctl(f"VM_ENTRY_CONTROLS: {p}", "VM_ENTRY_CONTROLS")
    fail = check_event_injection(v, caps)
    if fail:
        return fail
    p = _msr_area_problem(v["VM_ENTRY_MSR_LOAD_COUNT"], v["VM_ENTRY_MSR_LOAD_ADDR"], caps)
    if p:
        return _ctl(f"VM_ENTRY_MSR_LOAD_ADDR: {p}", "VM_ENTRY_MSR_LOAD_ADDR")
    smm = en & (c.VM_ENTRY_SMM | c.VM_ENTRY_DEACT_DUAL_MONITOR)
    if smm:
        return _ctl(f"{', '.join(c.decode_bits(c.ENTRY, smm))} must be 0 outside SMM", "VM_ENTRY_CONTROLS")
    return None


def check_controls(vmcs, caps: EntryCaps, read_mem) -> Optional[EntryFailure]:
    """All checks on VMX controls: execution, exit, entry (error 7)."""
    v = _Fields(vmcs)
    return (check_execution_controls(v, caps, read_mem) or check_exit_controls(v, caps)
            or check_entry_controls(v, caps))


# --------------------------------------------------------------------------
# 3. Host-state area
# --------------------------------------------------------------------------
def check_host_state(vmcs, caps: EntryCaps, *, host_in_ia32e: bool = True) -> Optional[EntryFailure]:
    """SDM host-state checks (error 8).  ``host_in_ia32e`` is IA32_EFER.LMA of
    the processor executing VMLAUNCH/VMRESUME."""
    v = _Fields(vmcs)
    ex = v["VM_EXIT_CONTROLS"]
    host64 = bool(ex & c.VM_EXIT_HOST_ADDR_SPACE_SIZE)
    ia32e_guest = bool(v["VM_ENTRY_CONTROLS"] & c.VM_ENTRY_IA32E_MODE)
    width = caps.linear_address_width

    cr0, cr4 = v["HOST_CR0"], v["HOST_CR4"]
    p = _fixed_problem(cr0, caps.cr0_fixed0, caps.cr0_fixed1)
    if p:
        return _host(f"HOST_CR0 {cr0:#x}: {p}", "HOST_CR0")
    p = _fixed_problem(cr4, caps.cr4_fixed0, caps.cr4_fixed1)
    if p:
        return _host(f"HOST_CR4 {cr4:#x}: {p}", "HOST_CR4")
    if cr4 & X86_CR4_CET and not cr0 & X86_CR0_WP:
        return _host("HOST_CR4.CET requires HOST_CR0.WP", "HOST_CR4")
    cr3 = v["HOST_CR3"]
    if _beyond_width(cr3, caps):
        return _host(f"HOST_CR3 {cr3:#x} sets bits beyond the physical-address width", "HOST_CR3")
    for name in ("HOST_IA32_SYSENTER_ESP", "HOST_IA32_SYSENTER_EIP"):
        if not is_canonical(v[name], width):
            return _host(f"{name} {v[name]:#x} is not canonical", name)
    if ex & c.VM_EXIT_LOAD_IA32_PAT:
        p = _pat_problem(v["HOST_IA32_PAT"])
        if p:
            return _host(f"VM_EXIT_LOAD_IA32_PAT: HOST_IA32_PAT {p}", "HOST_IA32_PAT")
    if ex & c.VM_EXIT_LOAD_IA32_EFER:
        efer = v["HOST_IA32_EFER"]
        if efer & ~caps.efer_defined:
            return _host(f"VM_EXIT_LOAD_IA32_EFER: HOST_IA32_EFER {efer:#x} sets reserved bits", "HOST_IA32_EFER")
        if bool(efer & EFER_LMA) != host64 or bool(efer & EFER_LME) != host64:
            return _host(f"VM_EXIT_LOAD_IA32_EFER: HOST_IA32_EFER LMA and LME must equal "
                         f"VM_EXIT_HOST_ADDR_SPACE_SIZE ({int(host64)})", "HOST_IA32_EFER")

    for seg in _SEGS + ("TR",):
        name = f"HOST_{seg}_SELECTOR"
        sel = v[name]
        if sel & 7:
            return _host(f"{name} {sel:#x}: RPL and TI (bits 2:0) must be 0", name)
    if v["HOST_CS_SELECTOR"] == 0:
        return _host("HOST_CS_SELECTOR cannot be 0", "HOST_CS_SELECTOR")
    if v["HOST_TR_SELECTOR"] == 0:
        return _host("HOST_TR_SELECTOR cannot be 0", "HOST_TR_SELECTOR")
    if v["HOST_SS_SELECTOR"] == 0 and not host64:
        return _host("HOST_SS_SELECTOR cannot be 0 when VM_EXIT_HOST_ADDR_SPACE_SIZE is 0", "HOST_SS_SELECTOR")
    for name in ("HOST_FS_BASE", "HOST_GS_BASE", "HOST_GDTR_BASE", "HOST_IDTR_BASE", "HOST_TR_BASE"):
        if not is_canonical(v[name], width):
            return _host(f"{name} {v[name]:#x} is not canonical", name)

    if not host_in_ia32e:
        if ia32e_guest:
            return _host("VM_ENTRY_IA32E_MODE must be 0 when the processor is outside IA-32e mode",
                         "VM_ENTRY_CONTROLS")
        if host64:
            return _host("VM_EXIT_HOST_ADDR_SPACE_SIZE must be 0 when the processor is outside IA-32e mode",
                         "VM_EXIT_CONTROLS")
    elif not host64:
        return _host("VM_EXIT_HOST_ADDR_SPACE_SIZE must be 1 when the processor is in IA-32e mode",
                     "VM_EXIT_CONTROLS")
    rip = v["HOST_RIP"]
    if not host64:
        if ia32e_guest:
            return _host("VM_ENTRY_IA32E_MODE requires VM_EXIT_HOST_ADDR_SPACE_SIZE", "VM_ENTRY_CONTROLS")
        if cr4 & X86_CR4_PCIDE:
            return _host("HOST_CR4.PCIDE must be 0 without VM_EXIT_HOST_ADDR_SPACE_SIZE", "HOST_CR4")
        if rip >> 32:
            return _host(f"HOST_RIP {rip:#x}: bits 63:32 must be 0 without VM_EXIT_HOST_ADDR_SPACE_SIZE",
                         "HOST_RIP")
    else:
        if not cr4 & X86_CR4_PAE:
            return _host("VM_EXIT_HOST_ADDR_SPACE_SIZE requires HOST_CR4.PAE", "HOST_CR4")
        if not is_canonical(rip, width):
            return _host(f"HOST_RIP {rip:#x} is not canonical", "HOST_RIP")
    return None


# --------------------------------------------------------------------------
# 4. Guest-state area
# --------------------------------------------------------------------------
def check_guest_control_registers(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest Control Registers, Debug Registers, and MSRs"."""
    v = _Fields(vmcs)
    en = v["VM_ENTRY_CONTROLS"]
    ia32e = bool(en & c.VM_ENTRY_IA32E_MODE)
    ug = bool(_secondary(v) & c.SECONDARY_EXEC_UNRESTRICTED_GUEST)
    cr0, cr4 = v["GUEST_CR0"], v["GUEST_CR4"]
    # CD and NW are never checked (VM entry does not change them); PE and PG
    # are not checked with unrestricted guest.
    unchecked = X86_CR0_CD | X86_CR0_NW | ((X86_CR0_PE | X86_CR0_PG) if ug else 0)
    p = _fixed_problem(cr0, caps.cr0_fixed0 & ~unchecked, caps.cr0_fixed1 | unchecked)
    if p:
        return _guest(f"GUEST_CR0 {cr0:#x}: {p}", "GUEST_CR0")
    if cr0 & X86_CR0_PG and not cr0 & X86_CR0_PE:
        return _guest("GUEST_CR0.PG requires GUEST_CR0.PE", "GUEST_CR0")
    p = _fixed_problem(cr4, caps.cr4_fixed0, caps.cr4_fixed1)
    if p:
        return _guest(f"GUEST_CR4 {cr4:#x}: {p}", "GUEST_CR4")
    if cr4 & X86_CR4_CET and not cr0 & X86_CR0_WP:
        return _guest("GUEST_CR4.CET requires GUEST_CR0.WP", "GUEST_CR4")
    if en & c.VM_ENTRY_LOAD_DEBUG_CONTROLS:
        dbg = v["GUEST_IA32_DEBUGCTL"]
        if dbg & ~caps.debugctl_defined:
            return _guest(f"VM_ENTRY_LOAD_DEBUG_CONTROLS: GUEST_IA32_DEBUGCTL {dbg:#x} sets reserved bits",
                          "GUEST_IA32_DEBUGCTL")
    if ia32e:
        if not cr0 & X86_CR0_PG:
            return _guest("VM_ENTRY_IA32E_MODE requires GUEST_CR0.PG", "GUEST_CR0")
        if not cr4 & X86_CR4_PAE:
            return _guest("VM_ENTRY_IA32E_MODE requires GUEST_CR4.PAE", "GUEST_CR4")
    elif cr4 & X86_CR4_PCIDE:
        return _guest("GUEST_CR4.PCIDE must be 0 without VM_ENTRY_IA32E_MODE", "GUEST_CR4")
    cr3 = v["GUEST_CR3"]
    if _beyond_width(cr3, caps):
        return _guest(f"GUEST_CR3 {cr3:#x} sets bits beyond the physical-address width", "GUEST_CR3")
    if en & c.VM_ENTRY_LOAD_DEBUG_CONTROLS and v["GUEST_DR7"] >> 32:
        return _guest(f"VM_ENTRY_LOAD_DEBUG_CONTROLS: GUEST_DR7 {v['GUEST_DR7']:#x} has bits 63:32 set",
                      "GUEST_DR7")
    for name in ("GUEST_SYSENTER_ESP", "GUEST_SYSENTER_EIP"):
        if not is_canonical(v[name], caps.linear_address_width):
            return _guest(f"{name} {v[name]:#x} is not canonical", name)
    if en & c.VM_ENTRY_LOAD_IA32_PAT:
        p = _pat_problem(v["GUEST_IA32_PAT"])
        if p:
            return _guest(f"VM_ENTRY_LOAD_IA32_PAT: GUEST_IA32_PAT {p}", "GUEST_IA32_PAT")
    if en & c.VM_ENTRY_LOAD_IA32_EFER:
        efer = v["GUEST_IA32_EFER"]
        if efer & ~caps.efer_defined:
            return _guest(f"VM_ENTRY_LOAD_IA32_EFER: GUEST_IA32_EFER {efer:#x} sets reserved bits",
                          "GUEST_IA32_EFER")
        if bool(efer & EFER_LMA) != ia32e:
            return _guest(f"VM_ENTRY_LOAD_IA32_EFER: GUEST_IA32_EFER.LMA must equal VM_ENTRY_IA32E_MODE "
                          f"({int(ia32e)})", "GUEST_IA32_EFER")
        if cr0 & X86_CR0_PG and bool(efer & EFER_LME) != bool(efer & EFER_LMA):
            return _guest("VM_ENTRY_LOAD_IA32_EFER: GUEST_IA32_EFER.LME must equal LMA when GUEST_CR0.PG is 1",
                          "GUEST_IA32_EFER")
    return None


def _limit_granularity_problem(limit: int, ar: int) -> Optional[str]:
    g = bool(ar & VMX_AR_G_MASK)
    if (limit & 0xFFF) != 0xFFF and g:
        return f"limit {limit:#x} has a 0 in bits 11:0, so G must be 0"
    if limit & 0xFFF00000 and not g:
        return f"limit {limit:#x} has a 1 in bits 31:20, so G must be 1"
    return None


def check_guest_segments(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest Segment Registers": selectors, bases, limits,
    access rights, in that order."""
    v = _Fields(vmcs)
    rflags = v["GUEST_RFLAGS"]
    v86 = bool(rflags & X86_EFLAGS_VM)
    ia32e = bool(v["VM_ENTRY_CONTROLS"] & c.VM_ENTRY_IA32E_MODE)
    ug = bool(_secondary(v) & c.SECONDARY_EXEC_UNRESTRICTED_GUEST)
    width = caps.linear_address_width
    sel = {s: v[f"GUEST_{s}_SELECTOR"] for s in _SEGS + ("TR", "LDTR")}
    ar = {s: v[f"GUEST_{s}_AR_BYTES"] for s in _SEGS + ("TR", "LDTR")}
    usable = {s: not ar[s] & VMX_AR_UNUSABLE_MASK for s in ar}

    # Selectors.
    if sel["TR"] & 4:
        return _guest("GUEST_TR_SELECTOR: TI (bit 2) must be 0", "GUEST_TR_SELECTOR")
    if usable["LDTR"] and sel["LDTR"] & 4:
        return _guest("GUEST_LDTR_SELECTOR: TI (bit 2) must be 0 when LDTR is usable", "GUEST_LDTR_SELECTOR")
    if not v86 and not ug and (sel["SS"] & 3) != (sel["CS"] & 3):
        return _guest("GUEST_SS_SELECTOR RPL must equal GUEST_CS_SELECTOR RPL", "GUEST_SS_SELECTOR")

    # Bases.
    base = {s: v[f"GUEST_{s}_BASE"] for s in _SEGS + ("TR", "LDTR")}
    if v86:
        for s in _SEGS:
            if base[s] != sel[s] << 4:
                return _guest(f"virtual-8086 guest: GUEST_{s}_BASE must be the selector times 16 "
                              f"({sel[s] << 4:#x}), not {base[s]:#x}", f"GUEST_{s}_BASE")
    for s in ("TR", "FS", "GS") + (("LDTR",) if usable["LDTR"] else ()):
        if not is_canonical(base[s], width):
            return _guest(f"GUEST_{s}_BASE {base[s]:#x} is not canonical", f"GUEST_{s}_BASE")
    if base["CS"] >> 32:
        return _guest(f"GUEST_CS_BASE {base['CS']:#x}: bits 63:32 must be 0", "GUEST_CS_BASE")
    for s in ("SS", "DS", "ES"):
        if usable[s] and base[s] >> 32:
            return _guest(f"GUEST_{s}_BASE {base[s]:#x}: bits 63:32 must be 0", f"GUEST_{s}_BASE")

    # Limits.
    limit = {s: v[f"GUEST_{s}_LIMIT"] for s in _SEGS + ("TR", "LDTR")}
    if v86:
        for s in _SEGS:
            if limit[s] != 0xFFFF:
                return _guest(f"virtual-8086 guest: GUEST_{s}_LIMIT must be 0xffff", f"GUEST_{s}_LIMIT")

    # Access rights: CS, SS, DS, ES, FS, GS.
    if v86:
        for s in _SEGS:
            if ar[s] != 0xF3:
                return _guest(f"virtual-8086 guest: GUEST_{s}_AR_BYTES must be 0xf3, not {ar[s]:#x}",
                              f"GUEST_{s}_AR_BYTES")
    else:
        p = _segment_ar_problem(sel, ar, limit, usable, ia32e=ia32e, ug=ug,
                                pe=bool(v["GUEST_CR0"] & X86_CR0_PE))
        if p:
            return _guest(p[1], f"GUEST_{p[0]}_AR_BYTES")

    # TR.
    t, a = "TR", ar["TR"]
    ttype = a & VMX_AR_TYPE_MASK
    if ia32e and ttype != 11:
        return _guest(f"GUEST_TR_AR_BYTES: type must be 11 (busy 64-bit TSS) for an IA-32e guest, not {ttype}",
                      "GUEST_TR_AR_BYTES")
    if not ia32e and ttype not in (3, 11):
        return _guest(f"GUEST_TR_AR_BYTES: type must be 3 or 11 (busy TSS), not {ttype}", "GUEST_TR_AR_BYTES")
    p = _system_segment_problem(a, limit[t])
    if p:
        return _guest(f"GUEST_TR_AR_BYTES: {p}", "GUEST_TR_AR_BYTES")
    if a & VMX_AR_UNUSABLE_MASK:
        return _guest("GUEST_TR_AR_BYTES: TR must be usable (bit 16 must be 0)", "GUEST_TR_AR_BYTES")

    # LDTR.
    if usable["LDTR"]:
        a = ar["LDTR"]
        if a & VMX_AR_TYPE_MASK != 2:
            return _guest(f"GUEST_LDTR_AR_BYTES: type must be 2 (LDT), not {a & VMX_AR_TYPE_MASK}",
                          "GUEST_LDTR_AR_BYTES")
        p = _system_segment_problem(a, limit["LDTR"])
        if p:
            return _guest(f"GUEST_LDTR_AR_BYTES: {p}", "GUEST_LDTR_AR_BYTES")
    return None


def _system_segment_problem(a: int, limit: int) -> Optional[str]:
    """Checks shared by TR and LDTR: S = 0, P = 1, reserved bits, G vs limit."""
    if a & VMX_AR_S_MASK:
        return "S (bit 4) must be 0"
    if not a & VMX_AR_P_MASK:
        return "P (bit 7) must be 1"
    if a & VMX_AR_RESERVED_11_8:
        return "reserved bits 11:8 must be 0"
    p = _limit_granularity_problem(limit, a)
    if p:
        return p
    if a & VMX_AR_RESERVED_31_17:
        return "reserved bits 31:17 must be 0"
    return None


def _segment_ar_problem(sel, ar, limit, usable, *, ia32e: bool, ug: bool, pe: bool
                        ) -> Optional[tuple[str, str]]:
    """Access-rights checks for CS, SS, DS, ES, FS, GS of a guest that is not
    virtual-8086, sub-field by sub-field as the SDM lists them."""
    cs_type = ar["CS"] & VMX_AR_TYPE_MASK
    allowed_cs = (3, 9, 11, 13, 15) if ug else (9, 11, 13, 15)
    # Type.
    if cs_type not in allowed_cs:
        return "CS", f"GUEST_CS_AR_BYTES: type {cs_type} is not one of {allowed_cs}"
    if usable["SS"] and ar["SS"] & VMX_AR_TYPE_MASK not in (3, 7):
        return "SS", f"GUEST_SS_AR_BYTES: type {ar['SS'] & VMX_AR_TYPE_MASK} is not 3 or 7"
    for s in ("DS", "ES", "FS", "GS"):
        if usable[s]:
            t = ar[s] & VMX_AR_TYPE_MASK
            if not t & 1:
                return s, f"GUEST_{s}_AR_BYTES: type {t} is not accessed (bit 0)"
            if t & 8 and not t & 2:
                return s, f"GUEST_{s}_AR_BYTES: type {t} is an unreadable code segment"
    checked = [s for s in _SEGS if s == "CS" or usable[s]]
    # S.
    for s in checked:
        if not ar[s] & VMX_AR_S_MASK:
            return s, f"GUEST_{s}_AR_BYTES: S (bit 4) must be 1"
    # DPL.
    dpl = {s: (ar[s] >> VMX_AR_DPL_SHIFT) & 3 for s in _SEGS}
    if cs_type == 3 and dpl["CS"] != 0:
        return "CS", "GUEST_CS_AR_BYTES: DPL must be 0 for type 3 (unrestricted guest)"
    if cs_type in (9, 11) and dpl["CS"] != dpl["SS"]:
        return "CS", f"GUEST_CS_AR_BYTES: non-conforming code DPL {dpl['CS']} must equal SS DPL {dpl['SS']}"
    if cs_type in (13, 15) and dpl["CS"] > dpl["SS"]:
        return "CS", f"GUEST_CS_AR_BYTES: conforming code DPL {dpl['CS']} cannot exceed SS DPL {dpl['SS']}"
    if not ug and dpl["SS"] != sel["SS"] & 3:
        return "SS", f"GUEST_SS_AR_BYTES: DPL {dpl['SS']} must equal the SS selector RPL {sel['SS'] & 3}"
    if dpl["SS"] != 0 and (cs_type == 3 or not pe):
        return "SS", "GUEST_SS_AR_BYTES: DPL must be 0 when CS type is 3 or GUEST_CR0.PE is 0"
    if not ug:
        for s in ("DS", "ES", "FS", "GS"):
            if usable[s] and (ar[s] & VMX_AR_TYPE_MASK) <= 11 and dpl[s] < sel[s] & 3:
                return s, f"GUEST_{s}_AR_BYTES: DPL {dpl[s]} is less than the selector RPL {sel[s] & 3}"
    # P.
    for s in checked:
        if not ar[s] & VMX_AR_P_MASK:
            return s, f"GUEST_{s}_AR_BYTES: P (bit 7) must be 1"
    # Reserved bits 11:8.
    for s in checked:
        if ar[s] & VMX_AR_RESERVED_11_8:
            return s, f"GUEST_{s}_AR_BYTES: reserved bits 11:8 must be 0"
    # D/B of CS.
    if ia32e and ar["CS"] & VMX_AR_L_MASK and ar["CS"] & VMX_AR_DB_MASK:
        return "CS", "GUEST_CS_AR_BYTES: D/B must be 0 when L is 1 in an IA-32e guest"
    # G.
    for s in checked:
        p = _limit_granularity_problem(limit[s], ar[s])
        if p:
            return s, f"GUEST_{s}_AR_BYTES: {p}"
    # Reserved bits 31:17.
    for s in checked:
        if ar[s] & VMX_AR_RESERVED_31_17:
            return s, f"GUEST_{s}_AR_BYTES: reserved bits 31:17 must be 0"
    return None


def check_guest_descriptor_tables(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest Descriptor-Table Registers"."""
    v = _Fields(vmcs)
    for t in ("GDTR", "IDTR"):
        b = v[f"GUEST_{t}_BASE"]
        if not is_canonical(b, caps.linear_address_width):
            return _guest(f"GUEST_{t}_BASE {b:#x} is not canonical", f"GUEST_{t}_BASE")
    for t in ("GDTR", "IDTR"):
        lim = v[f"GUEST_{t}_LIMIT"]
        if lim & 0xFFFF0000:
            return _guest(f"GUEST_{t}_LIMIT {lim:#x}: bits 31:16 must be 0", f"GUEST_{t}_LIMIT")
    return None


def check_guest_rip(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest RIP, RFLAGS, and SSP": the RIP checks."""
    v = _Fields(vmcs)
    rip = v["GUEST_RIP"]
    if v["VM_ENTRY_CONTROLS"] & c.VM_ENTRY_IA32E_MODE and v["GUEST_CS_AR_BYTES"] & VMX_AR_L_MASK:
        # "bits 63:N must be identical", N the linear-address width; a RIP that passes
        # but is not canonical enters, and its first fetch raises #GP(0).
        width = caps.linear_address_width
        if not upper_bits_identical(rip, width):
            return _guest(f"GUEST_RIP {rip:#x}: bits 63:{width} are not identical (64-bit guest)",
                          "GUEST_RIP")
    elif rip >> 32:
        return _guest(f"GUEST_RIP {rip:#x}: bits 63:32 must be 0 unless the guest is in 64-bit mode", "GUEST_RIP")
    return None


def check_guest_rflags(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest RIP, RFLAGS, and SSP": the RFLAGS checks."""
    v = _Fields(vmcs)
    ia32e = bool(v["VM_ENTRY_CONTROLS"] & c.VM_ENTRY_IA32E_MODE)
    rflags = v["GUEST_RFLAGS"]
    if rflags & RFLAGS_RESERVED:
        return _guest(f"GUEST_RFLAGS {rflags:#x}: reserved {_bit_list(rflags & RFLAGS_RESERVED)} must be 0",
                      "GUEST_RFLAGS")
    if not rflags & X86_EFLAGS_FIXED:
        return _guest(f"GUEST_RFLAGS {rflags:#x}: bit 1 must be 1", "GUEST_RFLAGS")
    if rflags & X86_EFLAGS_VM and (ia32e or not v["GUEST_CR0"] & X86_CR0_PE):
        return _guest("GUEST_RFLAGS.VM must be 0 for an IA-32e guest or when GUEST_CR0.PE is 0", "GUEST_RFLAGS")
    valid, itype, _ = _intr_info(v)
    if valid and itype == c.INTR_TYPE_EXT_INTR and not rflags & X86_EFLAGS_IF:
        return _guest("GUEST_RFLAGS.IF must be 1 to inject an external interrupt", "GUEST_RFLAGS")
    return None


def check_guest_rip_rflags(vmcs, caps: EntryCaps) -> Optional[EntryFailure]:
    """SDM "Checks on Guest RIP, RFLAGS, and SSP" (SSP not modelled)."""
    v = _Fields(vmcs)
    return check_guest_rip(v, caps) or check_guest_rflags(v, caps)


def _injection_allowed_in(activity: int, itype: int, vector: int) -> bool:
    """May an event of this type and vector be injected into this activity state?"""
    if activity == c.GUEST_ACTIVITY_ACTIVE:
        return True
    if activity == c.GUEST_ACTIVITY_HLT:
        return (itype in (c.INTR_TYPE_EXT_INTR, c.INTR_TYPE_NMI_INTR)
                or (itype == c.INTR_TYPE_HARD_EXCEPTION and vector in (1, 18))
                or (itype == c.INTR_TYPE_OTHER_EVENT and vector == 0))
    if activity == c.GUEST_ACTIVITY_SHUTDOWN:
        return itype == c.INTR_TYPE_NMI_INTR or (itype == c.INTR_TYPE_HARD_EXCEPTION and vector == 18)
    return False            # wait-for-SIPI: nothing


def check_guest_non_register_state(vmcs, caps: EntryCaps, read_mem, *,
                                   current_vmcs_pa: Optional[int] = None) -> Optional[EntryFailure]:
    """SDM "Checks on Guest Non-Register State": activity state,
    interruptibility state, pending debug exceptions, VMCS link pointer."""
    v = _Fields(vmcs)
    valid, itype, vector = _intr_info(v)
    act = v["GUEST_ACTIVITY_STATE"]
    supported = {c.GUEST_ACTIVITY_ACTIVE: True,
                 c.GUEST_ACTIVITY_HLT: bool(caps.misc & c.VMX_MISC_ACTIVITY_HLT),
                 c.GUEST_ACTIVITY_SHUTDOWN: bool(caps.misc & c.VMX_MISC_ACTIVITY_SHUTDOWN),
                 c.GUEST_ACTIVITY_WAIT_SIPI: bool(caps.misc & c.VMX_MISC_ACTIVITY_WAIT_SIPI)}
    if not supported.get(act, False):
        return _guest(f"GUEST_ACTIVITY_STATE {act} is not a supported activity state", "GUEST_ACTIVITY_STATE")
    ss_dpl = (v["GUEST_SS_AR_BYTES"] >> VMX_AR_DPL_SHIFT) & 3
    if act == c.GUEST_ACTIVITY_HLT and ss_dpl != 0:
        return _guest(f"GUEST_ACTIVITY_STATE HLT requires SS DPL 0, not {ss_dpl}", "GUEST_ACTIVITY_STATE")
    intr = v["GUEST_INTERRUPTIBILITY_INFO"]
    sti, movss = intr & c.GUEST_INTR_STATE_STI, intr & c.GUEST_INTR_STATE_MOV_SS
    if (sti or movss) and act != c.GUEST_ACTIVITY_ACTIVE:
        return _guest("GUEST_ACTIVITY_STATE must be active with blocking by STI or MOV SS",
                      "GUEST_ACTIVITY_STATE")
    if valid and not _injection_allowed_in(act, itype, vector):
        return _guest(f"{c.INTR_TYPES[itype]} vector {vector} cannot be injected in activity state "
                      f"{c.GUEST_ACTIVITY_STATES[act]}", "GUEST_ACTIVITY_STATE")

    fld = "GUEST_INTERRUPTIBILITY_INFO"
    reserved = c.GUEST_INTR_STATE_RESERVED_MASK | c.GUEST_INTR_STATE_ENCLAVE_INTR
    if intr & reserved:
        return _guest(f"{fld} {intr:#x}: reserved bits set (bit 4 too: SGX is not supported)", fld)
    if sti and movss:
        return _guest(f"{fld}: blocking by STI and by MOV SS cannot both be set", fld)
    if sti and not v["GUEST_RFLAGS"] & X86_EFLAGS_IF:
        return _guest(f"{fld}: blocking by STI requires GUEST_RFLAGS.IF", fld)
    if valid and itype == c.INTR_TYPE_EXT_INTR and (sti or movss):
        return _guest(f"{fld}: no blocking by STI or MOV SS may be set when injecting an external interrupt", fld)
    if valid and itype == c.INTR_TYPE_NMI_INTR and movss:
        return _guest(f"{fld}: blocking by MOV SS may not be set when injecting an NMI", fld)
    if intr & c.GUEST_INTR_STATE_SMI:
        return _guest(f"{fld}: blocking by SMI must be 0 outside SMM", fld)
    if valid and itype == c.INTR_TYPE_NMI_INTR and sti and caps.nmi_injection_checks_sti:
        return _guest(f"{fld}: blocking by STI may not be set when injecting an NMI", fld, c.ENTRY_FAIL_NMI)
    if (valid and itype == c.INTR_TYPE_NMI_INTR and intr & c.GUEST_INTR_STATE_NMI
            and v["PIN_BASED_VM_EXEC_CONTROL"] & c.PIN_BASED_VIRTUAL_NMIS):
        return _guest(f"{fld}: blocking by NMI may not be set when injecting an NMI with virtual NMIs", fld)

    fld = "GUEST_PENDING_DBG_EXCEPTIONS"
    pde = v[fld]
    if pde & PENDING_DBG_RESERVED:
        return _guest(f"{fld} {pde:#x}: reserved {_bit_list(pde & PENDING_DBG_RESERVED)} must be 0", fld)
    if sti or movss or act == c.GUEST_ACTIVITY_HLT:
        tf = bool(v["GUEST_RFLAGS"] & X86_EFLAGS_TF)
        btf = bool(v["GUEST_IA32_DEBUGCTL"] & DEBUGCTLMSR_BTF)
        bs = bool(pde & PENDING_DBG_BS)
        if tf and not btf and not bs:
            return _guest(f"{fld}: BS (bit 14) must be 1 when RFLAGS.TF = 1 and DEBUGCTL.BTF = 0", fld)
        if (not tf or btf) and bs:
            return _guest(f"{fld}: BS (bit 14) must be 0 when RFLAGS.TF = 0 or DEBUGCTL.BTF = 1", fld)

    fld = "VMCS_LINK_POINTER"
    link = v[fld]
    if link != _ALL_ONES64:
        p = _page_address_problem(link, caps)
        if p:
            return _guest(f"{fld} {p}", fld, c.ENTRY_FAIL_VMCS_LINK_PTR)
        header = _U32.unpack(_read(read_mem, link, 4))[0]
        shadowing = bool(_secondary(v) & c.SECONDARY_EXEC_SHADOW_VMCS)
        if header & 0x7FFFFFFF != caps.vmcs_revision_id:
            return _guest(f"{fld} {link:#x}: the referenced region has revision {header & 0x7FFFFFFF:#x}, "
                          f"not {caps.vmcs_revision_id:#x}", fld, c.ENTRY_FAIL_VMCS_LINK_PTR)
        if bool(header >> 31) != shadowing:
            return _guest(f"{fld} {link:#x}: shadow-VMCS indicator {header >> 31} must equal "
                          f"SECONDARY_EXEC_SHADOW_VMCS ({int(shadowing)})", fld, c.ENTRY_FAIL_VMCS_LINK_PTR)
        if current_vmcs_pa is not None and link == current_vmcs_pa:
            return _guest(f"{fld} may not point to the current VMCS", fld, c.ENTRY_FAIL_VMCS_LINK_PTR)
    return None


#: PAE PDPTE bits reserved below MAXPHYADDR: 2:1 and 8:5 (the platform's paging table).
PAE_PDPTE_RESERVED_LOW = RSVD_PDPTE_LOW


def check_guest_pdptes(vmcs, caps: EntryCaps, read_mem) -> Optional[EntryFailure]:
    """SDM "Checks on Guest Page-Directory-Pointer-Table Entries": a guest
    with PAE paging (CR0.PG, CR4.PAE, not IA-32e) needs valid PDPTEs: the
    GUEST_PDPTRn fields with EPT, else the four entries at GUEST_CR3[31:5]
    (this model always checks them).  Failure: qualification 2."""
    v = _Fields(vmcs)
    cr0, cr4 = v["GUEST_CR0"], v["GUEST_CR4"]
    if not (cr0 & X86_CR0_PG and cr4 & X86_CR4_PAE
            and not v["VM_ENTRY_CONTROLS"] & c.VM_ENTRY_IA32E_MODE):
        return None
    if _secondary(v) & c.SECONDARY_EXEC_ENABLE_EPT:
        names = [f"GUEST_PDPTR{i}" for i in range(4)]
        entries = [v[n] for n in names]
    else:
        table = v["GUEST_CR3"] & 0xFFFFFFE0
        names = [f"PDPTE{i} at {table + 8 * i:#x}" for i in range(4)]
        raw = _read(read_mem, table, 32)
        entries = [_U64.unpack_from(raw, 8 * i)[0] for i in range(4)]
    reserved = PAE_PDPTE_RESERVED_LOW | (_ALL_ONES64 & ~((1 << caps.maxphyaddr) - 1))
    for name, e in zip(names, entries):
        if e & 1 and e & reserved:
            return _guest(f"{name} {e:#x} is present with reserved {_bit_list(e & reserved)} set",
                          "GUEST_PDPTR0" if name.startswith("GUEST") else "GUEST_CR3", c.ENTRY_FAIL_PDPTE)
    return None


def check_guest_state(vmcs, caps: EntryCaps, read_mem, *,
                      current_vmcs_pa: Optional[int] = None) -> Optional[EntryFailure]:
    """Every guest-state check, in the SDM's order (exit reason 33)."""
    v = _Fields(vmcs)
    return (check_guest_control_registers(v, caps) or check_guest_segments(v, caps)
            or check_guest_descriptor_tables(v, caps) or check_guest_rip_rflags(v, caps)
            or check_guest_non_register_state(v, caps, read_mem, current_vmcs_pa=current_vmcs_pa)
            or check_guest_pdptes(v, caps, read_mem))


# --------------------------------------------------------------------------
# 5. MSR-load area
# --------------------------------------------------------------------------
def msr_load_entry_problem(index: int, reserved: int, data: int,
                           msr_write_faults: Optional[Callable[[int, int], bool]] = None) -> Optional[str]:
    """Why one MSR-load entry cannot be loaded on VM entry, or None."""
    if index in _MSR_LOAD_FORBIDDEN:
        return f"MSR {index:#x}: {_MSR_LOAD_FORBIDDEN[index]}"
    if index >> 8 == 0x8:
        return f"MSR {index:#x} is an x2APIC register (0x800-0x8ff), not loadable on VM entry"
    if reserved:
        return f"MSR {index:#x}: bits 63:32 of the entry ({reserved:#x}) must be 0"
    if msr_write_faults is not None and msr_write_faults(index, data):
        return f"MSR {index:#x}: WRMSR of {data:#x} would raise #GP"
    return None


def check_msr_load(vmcs, caps: EntryCaps, read_mem,
                   msr_write_faults: Optional[Callable[[int, int], bool]] = None) -> Optional[EntryFailure]:
    """SDM "Loading MSRs": every entry of the VM-entry MSR-load area, in order.
    ``msr_write_faults(index, value)`` says whether WRMSR at CPL 0 would #GP
    (None: only the SDM's fixed list is checked).  Failure: exit reason 34,
    qualification = the entry's number counting from 1."""
    v = _Fields(vmcs)
    count, addr = v["VM_ENTRY_MSR_LOAD_COUNT"], v["VM_ENTRY_MSR_LOAD_ADDR"]
    limit = c.vmx_misc_msr_list_limit(caps.misc)
    for i in range(count):
        if i >= limit:
            return _msr_load(f"entry {i + 1}: more than the {limit} MSR-load entries IA32_VMX_MISC allows", i + 1)
        raw = _read(read_mem, addr + MSR_LOAD_ENTRY_SIZE * i, MSR_LOAD_ENTRY_SIZE)
        index, reserved, data = struct.unpack("<IIQ", raw)
        p = msr_load_entry_problem(index, reserved, data, msr_write_faults)
        if p:
            return _msr_load(f"entry {i + 1}: {p}", i + 1)
    return None


# --------------------------------------------------------------------------
# Everything, in order
# --------------------------------------------------------------------------
def check_vm_entry(vmcs, caps: EntryCaps, read_mem, *, launch: bool,
                   launch_state: Optional[str] = None, blocked_by_mov_ss: bool = False,
                   host_in_ia32e: bool = True, current_vmcs_pa: Optional[int] = None,
                   msr_write_faults: Optional[Callable[[int, int], bool]] = None
                   ) -> Optional[EntryFailure]:
    """Run every VM-entry check in the SDM's order; the first failure, or None.

    ``launch`` is True for VMLAUNCH, False for VMRESUME.  ``launch_state``
    and ``current_vmcs_pa`` default to those of a :class:`Vmcs`
    (``vmcs.launch_state``, ``vmcs.pa``); with a mapping, ``launch_state``
    must be given.  See the module docstring for the other inputs.
    """
    if launch_state is None:
        launch_state = getattr(vmcs, "launch_state", None)
        if launch_state is None:
            raise ValueError("launch_state is needed when vmcs is not a Vmcs")
    if current_vmcs_pa is None:
        current_vmcs_pa = getattr(vmcs, "pa", None)
    v = _Fields(vmcs)
    return (check_launch_state(launch, launch_state, blocked_by_mov_ss=blocked_by_mov_ss)
            or check_controls(v, caps, read_mem)
            or check_host_state(v, caps, host_in_ia32e=host_in_ia32e)
            or check_guest_state(v, caps, read_mem, current_vmcs_pa=current_vmcs_pa)
            or check_msr_load(v, caps, read_mem, msr_write_faults))
