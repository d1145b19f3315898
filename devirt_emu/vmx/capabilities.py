"""The VMX capability MSRs of the one CPU devirt-emu models.

SDM Vol. 3D, Appendix A ("VMX Capability Reporting Facility").  MSR names and
numbers are Linux's (``arch/x86/include/asm/msr-index.h``).

What the modelled CPU advertises is decided here, feature by feature, in
:data:`_ALLOWED_1`; everything else (the MSR values, which optional MSRs
exist, which VMCS fields exist, IA32_VMX_VMCS_ENUM) is derived from it.  Only
features that the emulator gives semantics are advertised:

* pin-based: external-interrupt exiting, NMI exiting, virtual NMIs,
  VMX-preemption timer.  Not posted interrupts.
* primary: every control except "activate tertiary controls".
* secondary: virtualize APIC accesses, EPT, descriptor-table exiting,
  RDTSCP, VPID, WBINVD exiting, unrestricted guest, PAUSE-loop exiting,
  RDRAND/RDSEED exiting, INVPCID, XSAVES/XRSTORS, user wait and pause.
  Not: virtualize x2APIC mode, APIC-register virtualization,
  virtual-interrupt delivery, VM functions, VMCS shadowing, ENCLS/ENCLV
  exiting, PML, EPT-violation #VE, Intel PT controls, mode-based execute
  control, sub-page permissions, TSC scaling, PCONFIG, PASID translation,
  bus-lock detection, instruction timeout.
* VM-exit: save debug controls, host address-space size, acknowledge
  interrupt on exit, save/load IA32_PAT, save/load IA32_EFER, save
  VMX-preemption timer value.
* VM-entry: load debug controls, IA-32e mode guest, load IA32_PAT, load
  IA32_EFER.
* MISC: preemption-timer rate 5, stores EFER.LMA into "IA-32e mode guest" on
  exit, activity states HLT/shutdown/wait-for-SIPI, 4 CR3-target values,
  512-entry MSR lists.  Bit 29 (VMWRITE to VM-exit information fields) is
  NOT advertised: VMWRITE to a read-only field fails with error 13.
* EPT: 4-level walk, UC and WB paging-structure memory types, 2 MiB and
  1 GiB pages, accessed/dirty flags, INVEPT single- and all-context.
  VPID: INVVPID with all four types.

Which optional MSRs exist follows the SDM: TRUE_*_CTLS because
IA32_VMX_BASIC bit 55 is 1; PROCBASED_CTLS2 because "activate secondary
controls" may be 1; EPT_VPID_CAP because EPT and VPID may be 1.
IA32_VMX_VMFUNC, IA32_VMX_PROCBASED_CTLS3 and IA32_VMX_EXIT_CTLS2 do NOT
exist (their enabling controls are fixed to 0): they are absent from
:data:`VMX_CAPABILITY_MSRS` and a RDMSR of them must #GP.  Their control words
still have allowed settings (must be 1: none, may be 1: none).

The TRUE MSRs report, as hardware does, that "CR3-load exiting",
"CR3-store exiting" (primary) and "save/load debug controls" (exit/entry)
may be 0; every other default1 bit stays must-be-1.  Since bit 55 is 1,
VM entry checks controls against the TRUE MSRs (SDM 26.2.1.1), and so do
:func:`allowed_settings`, :func:`is_allowed` and :func:`make_legal`.

CR0/CR4 FIXED MSRs report what hardware reports; the relaxation of CR0.PE
and CR0.PG for unrestricted guests is a VM-entry check (SDM 26.3.1.1), not
an MSR value.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Union

from devirt_emu.vmx import controls as c
from devirt_emu.vmx import fields as f

# --------------------------------------------------------------------------
# MSR numbers (msr-index.h)
# --------------------------------------------------------------------------
MSR_IA32_VMX_BASIC = 0x480
MSR_IA32_VMX_PINBASED_CTLS = 0x481
MSR_IA32_VMX_PROCBASED_CTLS = 0x482
MSR_IA32_VMX_EXIT_CTLS = 0x483
MSR_IA32_VMX_ENTRY_CTLS = 0x484
MSR_IA32_VMX_MISC = 0x485
MSR_IA32_VMX_CR0_FIXED0 = 0x486
MSR_IA32_VMX_CR0_FIXED1 = 0x487
MSR_IA32_VMX_CR4_FIXED0 = 0x488
MSR_IA32_VMX_CR4_FIXED1 = 0x489
MSR_IA32_VMX_VMCS_ENUM = 0x48A
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_IA32_VMX_EPT_VPID_CAP = 0x48C
MSR_IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
MSR_IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
MSR_IA32_VMX_TRUE_EXIT_CTLS = 0x48F
MSR_IA32_VMX_TRUE_ENTRY_CTLS = 0x490
MSR_IA32_VMX_VMFUNC = 0x491
MSR_IA32_VMX_PROCBASED_CTLS3 = 0x492
MSR_IA32_VMX_EXIT_CTLS2 = 0x493

#: Every VMX capability MSR number the SDM defines, by name (present or not).
VMX_MSR_NAMES: Mapping[int, str] = MappingProxyType({
    v: k for k, v in dict(globals()).items() if k.startswith("MSR_IA32_VMX_")
})

# --------------------------------------------------------------------------
# The modelled CPU
# --------------------------------------------------------------------------
#: VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC), our choice.
VMCS_REVISION_ID = 0x0DE71001
VMCS_SIZE = 4096

#: The features advertised: allowed-1 bits per control word, beyond default1.
_ALLOWED_1: Mapping[str, int] = MappingProxyType({
    "PINBASED": (c.PIN_BASED_EXT_INTR_MASK | c.PIN_BASED_NMI_EXITING | c.PIN_BASED_VIRTUAL_NMIS
                 | c.PIN_BASED_VMX_PREEMPTION_TIMER),
    "PROCBASED": (c.CPU_BASED_INTR_WINDOW_EXITING | c.CPU_BASED_USE_TSC_OFFSETTING
                  | c.CPU_BASED_HLT_EXITING | c.CPU_BASED_INVLPG_EXITING | c.CPU_BASED_MWAIT_EXITING
                  | c.CPU_BASED_RDPMC_EXITING | c.CPU_BASED_RDTSC_EXITING
                  | c.CPU_BASED_CR3_LOAD_EXITING | c.CPU_BASED_CR3_STORE_EXITING
                  | c.CPU_BASED_CR8_LOAD_EXITING | c.CPU_BASED_CR8_STORE_EXITING
                  | c.CPU_BASED_TPR_SHADOW | c.CPU_BASED_NMI_WINDOW_EXITING
                  | c.CPU_BASED_MOV_DR_EXITING | c.CPU_BASED_UNCOND_IO_EXITING
                  | c.CPU_BASED_USE_IO_BITMAPS | c.CPU_BASED_MONITOR_TRAP_FLAG
                  | c.CPU_BASED_USE_MSR_BITMAPS | c.CPU_BASED_MONITOR_EXITING
                  | c.CPU_BASED_PAUSE_EXITING | c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    "PROCBASED2": (c.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | c.SECONDARY_EXEC_ENABLE_EPT
                   | c.SECONDARY_EXEC_DESC | c.SECONDARY_EXEC_ENABLE_RDTSCP
                   | c.SECONDARY_EXEC_ENABLE_VPID | c.SECONDARY_EXEC_WBINVD_EXITING
                   | c.SECONDARY_EXEC_UNRESTRICTED_GUEST | c.SECONDARY_EXEC_PAUSE_LOOP_EXITING
                   | c.SECONDARY_EXEC_RDRAND_EXITING | c.SECONDARY_EXEC_ENABLE_INVPCID
                   | c.SECONDARY_EXEC_RDSEED_EXITING | c.SECONDARY_EXEC_ENABLE_XSAVES
                   | c.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE),
    "PROCBASED3": 0,
    "EXIT": (c.VM_EXIT_SAVE_DEBUG_CONTROLS | c.VM_EXIT_HOST_ADDR_SPACE_SIZE
             | c.VM_EXIT_ACK_INTR_ON_EXIT | c.VM_EXIT_SAVE_IA32_PAT | c.VM_EXIT_LOAD_IA32_PAT
             | c.VM_EXIT_SAVE_IA32_EFER | c.VM_EXIT_LOAD_IA32_EFER
             | c.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER),
    "EXIT2": 0,
    "ENTRY": (c.VM_ENTRY_LOAD_DEBUG_CONTROLS | c.VM_ENTRY_IA32E_MODE | c.VM_ENTRY_LOAD_IA32_PAT
              | c.VM_ENTRY_LOAD_IA32_EFER),
    "VMFUNC": 0,
})

#: Default1 bits the TRUE MSRs report as allowed-0 (may be cleared).
_TRUE_CLEARABLE: Mapping[str, int] = MappingProxyType({
    "PINBASED": 0,
    "PROCBASED": c.CPU_BASED_CR3_LOAD_EXITING | c.CPU_BASED_CR3_STORE_EXITING,
    "EXIT": c.VM_EXIT_SAVE_DEBUG_CONTROLS,
    "ENTRY": c.VM_ENTRY_LOAD_DEBUG_CONTROLS,
})

#: The default1 class of each control word that has one (SDM Appendix A.2-A.5).
DEFAULT1: Mapping[str, int] = MappingProxyType({
    "PINBASED": c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "PROCBASED": c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "EXIT": c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR,
    "ENTRY": c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR,
})

#: Control word name -> its VMCS field and its bit table.
CONTROL_FIELDS: Mapping[str, int] = MappingProxyType({
    "PINBASED": f.VmcsField.PIN_BASED_VM_EXEC_CONTROL,
    "PROCBASED": f.VmcsField.CPU_BASED_VM_EXEC_CONTROL,
    "PROCBASED2": f.VmcsField.SECONDARY_VM_EXEC_CONTROL,
    "PROCBASED3": f.VmcsField.TERTIARY_VM_EXEC_CONTROL,
    "EXIT": f.VmcsField.VM_EXIT_CONTROLS,
    "EXIT2": f.VmcsField.SECONDARY_VM_EXIT_CONTROLS,
    "ENTRY": f.VmcsField.VM_ENTRY_CONTROLS,
    "VMFUNC": f.VmcsField.VM_FUNCTION_CONTROL,
})
CONTROL_TABLES: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "PINBASED": c.PINBASED, "PROCBASED": c.PROCBASED, "PROCBASED2": c.PROCBASED2,
    "PROCBASED3": c.PROCBASED3, "EXIT": c.EXIT, "EXIT2": c.EXIT2, "ENTRY": c.ENTRY,
    "VMFUNC": c.VMFUNC,
})

#: CR0 bits fixed to 1 in VMX operation: PE, NE, PG (SDM A.7).
CR0_FIXED0 = 0x80000021
#: CR0 bits allowed to be 1: bits 31:0 (bits 63:32 are reserved).
CR0_FIXED1 = 0xFFFFFFFF
#: CR4 bits fixed to 1: VMXE (SDM A.8).
CR4_FIXED0 = 1 << 13
#: CR4 bits allowed to be 1: the CR4 features of the modelled CPU: VME, PVI,
#: TSD, DE, PSE, PAE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT, UMIP, VMXE,
#: FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP.
CR4_FIXED1 = (0x7FF | (1 << 11) | (1 << 13) | (1 << 16) | (1 << 17) | (1 << 18)
              | (1 << 20) | (1 << 21))

_MISC = (5                                   # preemption timer: TSC >> 5
         | c.VMX_MISC_SAVE_EFER_LMA
         | c.VMX_MISC_ACTIVITY_HLT | c.VMX_MISC_ACTIVITY_SHUTDOWN | c.VMX_MISC_ACTIVITY_WAIT_SIPI
         | (4 << c.VMX_MISC_CR3_COUNT_SHIFT)   # CR3-target count
         | (0 << c.VMX_MISC_MAX_MSR_SHIFT))    # 512 MSRs per list

_EPT_VPID_CAP = (c.VMX_EPT_PAGE_WALK_4_BIT | c.VMX_EPTP_UC_BIT | c.VMX_EPTP_WB_BIT
                 | c.VMX_EPT_2MB_PAGE_BIT | c.VMX_EPT_1GB_PAGE_BIT | c.VMX_EPT_INVEPT_BIT
                 | c.VMX_EPT_AD_BIT | c.VMX_EPT_EXTENT_CONTEXT_BIT | c.VMX_EPT_EXTENT_GLOBAL_BIT
                 | ((c.VMX_VPID_INVVPID_BIT | c.VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT
                     | c.VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT | c.VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT
                     | c.VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT) << c.VMX_EPT_VPID_CAP_VPID_SHIFT))

IA32_VMX_BASIC = c.vmx_basic_encode(VMCS_REVISION_ID, VMCS_SIZE, c.MEMTYPE_WB,
                                    c.VMX_BASIC_INOUT | c.VMX_BASIC_TRUE_CTLS)


def _ctls(allowed0: int, allowed1: int) -> int:
    return allowed0 | (allowed1 << 32)


def _may_be_1(table: str) -> int:
    return DEFAULT1.get(table, 0) | _ALLOWED_1[table]


# --------------------------------------------------------------------------
# Derived: which fields exist, VMCS_ENUM, the MSR values
# --------------------------------------------------------------------------
_MAY_BE_1: Mapping[str, int] = MappingProxyType({t: _may_be_1(t) for t in _ALLOWED_1})

#: Encodings (full and high) of every VMCS field the modelled CPU supports.
SUPPORTED_FIELDS: frozenset[int] = frozenset(
    info.encoding for info in f.ALL_FIELDS if f.field_supported(info, _MAY_BE_1))

#: Highest index (bits 9:1 of an encoding) of any supported field.
HIGHEST_FIELD_INDEX = max(f.field_index(e) for e in SUPPORTED_FIELDS)


def _build_msrs() -> dict[int, int]:
    msrs = {
        MSR_IA32_VMX_BASIC: IA32_VMX_BASIC,
        MSR_IA32_VMX_MISC: _MISC,
        MSR_IA32_VMX_CR0_FIXED0: CR0_FIXED0,
        MSR_IA32_VMX_CR0_FIXED1: CR0_FIXED1,
        MSR_IA32_VMX_CR4_FIXED0: CR4_FIXED0,
        MSR_IA32_VMX_CR4_FIXED1: CR4_FIXED1,
        MSR_IA32_VMX_VMCS_ENUM: HIGHEST_FIELD_INDEX << 1,
    }
    for table, plain, true in (
            ("PINBASED", MSR_IA32_VMX_PINBASED_CTLS, MSR_IA32_VMX_TRUE_PINBASED_CTLS),
            ("PROCBASED", MSR_IA32_VMX_PROCBASED_CTLS, MSR_IA32_VMX_TRUE_PROCBASED_CTLS),
            ("EXIT", MSR_IA32_VMX_EXIT_CTLS, MSR_IA32_VMX_TRUE_EXIT_CTLS),
            ("ENTRY", MSR_IA32_VMX_ENTRY_CTLS, MSR_IA32_VMX_TRUE_ENTRY_CTLS)):
        d1 = DEFAULT1[table]
        msrs[plain] = _ctls(d1, _MAY_BE_1[table])
        if IA32_VMX_BASIC & c.VMX_BASIC_TRUE_CTLS:
            msrs[true] = _ctls(d1 & ~_TRUE_CLEARABLE[table], _MAY_BE_1[table])
    proc1 = _MAY_BE_1["PROCBASED"]
    if proc1 & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        msrs[MSR_IA32_VMX_PROCBASED_CTLS2] = _ctls(0, _MAY_BE_1["PROCBASED2"])
        if _MAY_BE_1["PROCBASED2"] & (c.SECONDARY_EXEC_ENABLE_EPT | c.SECONDARY_EXEC_ENABLE_VPID):
            msrs[MSR_IA32_VMX_EPT_VPID_CAP] = _EPT_VPID_CAP
        if _MAY_BE_1["PROCBASED2"] & c.SECONDARY_EXEC_ENABLE_VMFUNC:
            msrs[MSR_IA32_VMX_VMFUNC] = _MAY_BE_1["VMFUNC"]
    if proc1 & c.CPU_BASED_ACTIVATE_TERTIARY_CONTROLS:
        msrs[MSR_IA32_VMX_PROCBASED_CTLS3] = _MAY_BE_1["PROCBASED3"]
    if _MAY_BE_1["EXIT"] & c.VM_EXIT_ACTIVATE_SECONDARY_CONTROLS:
        msrs[MSR_IA32_VMX_EXIT_CTLS2] = _MAY_BE_1["EXIT2"]
    return msrs


#: The capability MSRs the modelled CPU has, by MSR number (read-only).  An
#: MSR number of :data:`VMX_MSR_NAMES` missing here does not exist (#GP).
VMX_CAPABILITY_MSRS: Mapping[int, int] = MappingProxyType(_build_msrs())

# The checks below are facts the rest of the model relies on; a change to the
# tables above that breaks one fails at import, not at some later VM entry.
assert all(v < 1 << 64 for v in VMX_CAPABILITY_MSRS.values())
assert VMX_CAPABILITY_MSRS[MSR_IA32_VMX_BASIC] & c.VMX_BASIC_TRUE_CTLS


# --------------------------------------------------------------------------
# Allowed settings
# --------------------------------------------------------------------------
_PLAIN_MSR = {"PINBASED": MSR_IA32_VMX_PINBASED_CTLS, "PROCBASED": MSR_IA32_VMX_PROCBASED_CTLS,
              "EXIT": MSR_IA32_VMX_EXIT_CTLS, "ENTRY": MSR_IA32_VMX_ENTRY_CTLS}
_TRUE_MSR = {"PINBASED": MSR_IA32_VMX_TRUE_PINBASED_CTLS,
             "PROCBASED": MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
             "EXIT": MSR_IA32_VMX_TRUE_EXIT_CTLS, "ENTRY": MSR_IA32_VMX_TRUE_ENTRY_CTLS}
_ALLOWED1_ONLY_MSR = {"PROCBASED3": MSR_IA32_VMX_PROCBASED_CTLS3,
                      "EXIT2": MSR_IA32_VMX_EXIT_CTLS2, "VMFUNC": MSR_IA32_VMX_VMFUNC}
_BY_FIELD = {int(enc): name for name, enc in CONTROL_FIELDS.items()}


def control_name(ctl: Union[str, int]) -> str:
    """Normalise a control word given by table name or by its VMCS field encoding."""
    if isinstance(ctl, str):
        if ctl in CONTROL_FIELDS:
            return ctl
        raise KeyError(f"unknown control word {ctl!r}; one of {', '.join(CONTROL_FIELDS)}")
    try:
        return _BY_FIELD[int(ctl)]
    except KeyError:
        raise KeyError(f"VMCS field {int(ctl):#x} is not a VMX control word") from None


def allowed_settings(ctl: Union[str, int], use_true: bool = True) -> tuple[int, int]:
    """(must_be_1, may_be_1) for a control word, as VM entry checks it.

    ``ctl`` is a table name ("PINBASED", "PROCBASED", "PROCBASED2",
    "PROCBASED3", "EXIT", "EXIT2", "ENTRY", "VMFUNC") or the control's VMCS
    field encoding.  With ``use_true`` (the default, and what VM entry does
    on this CPU because IA32_VMX_BASIC bit 55 is 1) the TRUE MSRs are used
    for the four controls that have them; ``use_true=False`` reads the plain
    MSRs.  A control word whose capability MSR does not exist has no allowed
    1-settings: (0, 0).
    """
    name = control_name(ctl)
    msrs = VMX_CAPABILITY_MSRS
    if name in _PLAIN_MSR:
        v = msrs[(_TRUE_MSR if use_true else _PLAIN_MSR)[name]]
        return v & 0xFFFFFFFF, v >> 32
    if name == "PROCBASED2":
        v = msrs.get(MSR_IA32_VMX_PROCBASED_CTLS2, 0)
        return v & 0xFFFFFFFF, v >> 32
    return 0, msrs.get(_ALLOWED1_ONLY_MSR[name], 0)


def is_allowed(ctl: Union[str, int], value: int, use_true: bool = True) -> list[int]:
    """Bit numbers of ``value`` that violate the control word's allowed settings.

    A bit offends if it must be 1 and is 0, or is 1 and may not be 1.  An
    empty list means the value passes the SDM's allowed-settings check
    (26.2.1.1) for this word.
    """
    if value < 0:
        raise ValueError(f"a control word is non-negative, not {value}")
    must1, may1 = allowed_settings(ctl, use_true)
    bad = (must1 & ~value) | (value & ~may1)
    return [n for n in range(bad.bit_length()) if (bad >> n) & 1]


def make_legal(ctl: Union[str, int], requested: int, use_true: bool = True) -> int:
    """``requested`` with must-be-1 bits set and not-allowed-1 bits cleared."""
    if requested < 0:
        raise ValueError(f"a control word is non-negative, not {requested}")
    must1, may1 = allowed_settings(ctl, use_true)
    return (requested | must1) & may1


def may_be_1() -> Mapping[str, int]:
    """Allowed-1 settings of every control word (what :func:`fields.field_supported` takes)."""
    return _MAY_BE_1


def is_field_supported(field: Union[int, str]) -> bool:
    """Does the modelled CPU have this VMCS field (by encoding, VmcsField or name)?"""
    if isinstance(field, str):
        return field in f.VmcsField.__members__ and f.VmcsField[field] in SUPPORTED_FIELDS
    return int(field) in SUPPORTED_FIELDS
