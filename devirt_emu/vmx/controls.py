"""VMX control bits and VMCS bit-field constants, by Linux's names.

Names follow Linux's ``arch/x86/include/asm/vmx.h`` (which follows the Intel
SDM, Vol. 3C chapter "Virtual Machine Control Structures" and Vol. 3D
Appendix A "VMX Capability Reporting Facility").  Where Linux has no name for
an SDM bit, the name is derived from the SDM's wording in the same style and
the comment says so ("SDM name").

Every control word has one table, a read-only ``name -> mask`` mapping, that
lists each architecturally defined bit once:

========================  ==========================================  =====================
table                     VMCS field                                  capability MSR(s)
========================  ==========================================  =====================
``PINBASED``              PIN_BASED_VM_EXEC_CONTROL (32 bits)         0x481 / TRUE 0x48D
``PROCBASED``             CPU_BASED_VM_EXEC_CONTROL (32 bits)         0x482 / TRUE 0x48E
``PROCBASED2``            SECONDARY_VM_EXEC_CONTROL (32 bits)         0x48B
``PROCBASED3``            TERTIARY_VM_EXEC_CONTROL (64 bits)          0x492
``EXIT``                  VM_EXIT_CONTROLS (32 bits)                  0x483 / TRUE 0x48F
``EXIT2``                 SECONDARY_VM_EXIT_CONTROLS (64 bits)        0x493
``ENTRY``                 VM_ENTRY_CONTROLS (32 bits)                 0x484 / TRUE 0x490
``VMFUNC``                VM_FUNCTION_CONTROL (64 bits)               0x491
========================  ==========================================  =====================

``decode_bits(table, value)`` turns a control word into the names of its set
bits (unknown bits come out as ``"bit N"``), for the REPL and JSON dumps.
Other tables (``EPT_VPID_CAP``, ``VMX_BASIC``, ``VMX_MISC``, the interruption
information and interruptibility bits) decode the same way.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping


def _bit(n: int) -> int:
    return 1 << n


def _table(*names: str) -> Mapping[str, int]:
    """Build a read-only name -> mask table from constants of this module.

    Each constant must be a single bit and no two may share a bit: a table
    is the list of distinct architectural bits of one control word.
    """
    g = globals()
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name in names:
        mask = g[name]
        if mask <= 0 or mask & (mask - 1):
            raise AssertionError(f"{name} = {mask:#x} is not a single bit")
        if mask in seen:
            raise AssertionError(f"{name} and {seen[mask]} share bit {mask.bit_length() - 1}")
        seen[mask] = name
        out[name] = mask
    return MappingProxyType(out)


def decode_bits(table: Mapping[str, int], value: int) -> list[str]:
    """Names of the bits of ``value`` that ``table`` defines, lowest bit first.

    Set bits the table does not define are reported as ``"bit N"`` so that a
    dump never hides a bit.
    """
    if value < 0:
        raise ValueError(f"a control word is non-negative, not {value}")
    by_mask = {mask: name for name, mask in table.items()}
    out = []
    n = 0
    while value >> n:
        if (value >> n) & 1:
            out.append(by_mask.get(1 << n, f"bit {n}"))
        n += 1
    return out


def encode_bits(table: Mapping[str, int], names) -> int:
    """The control word with exactly the named bits of ``table`` set."""
    value = 0
    for name in names:
        try:
            value |= table[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a bit of this control table") from None
    return value


# --------------------------------------------------------------------------
# Pin-based VM-execution controls (SDM Vol. 3C, Table 25-5)
# --------------------------------------------------------------------------
PIN_BASED_EXT_INTR_MASK = _bit(0)          # external-interrupt exiting
PIN_BASED_NMI_EXITING = _bit(3)
PIN_BASED_VIRTUAL_NMIS = _bit(5)
PIN_BASED_VMX_PREEMPTION_TIMER = _bit(6)
PIN_BASED_POSTED_INTR = _bit(7)            # process posted interrupts

PINBASED = _table(
    "PIN_BASED_EXT_INTR_MASK", "PIN_BASED_NMI_EXITING", "PIN_BASED_VIRTUAL_NMIS",
    "PIN_BASED_VMX_PREEMPTION_TIMER", "PIN_BASED_POSTED_INTR",
)

# --------------------------------------------------------------------------
# Primary processor-based VM-execution controls (SDM Vol. 3C, Table 25-6)
# --------------------------------------------------------------------------
CPU_BASED_INTR_WINDOW_EXITING = _bit(2)
CPU_BASED_USE_TSC_OFFSETTING = _bit(3)
CPU_BASED_HLT_EXITING = _bit(7)
CPU_BASED_INVLPG_EXITING = _bit(9)
CPU_BASED_MWAIT_EXITING = _bit(10)
CPU_BASED_RDPMC_EXITING = _bit(11)
CPU_BASED_RDTSC_EXITING = _bit(12)
CPU_BASED_CR3_LOAD_EXITING = _bit(15)
CPU_BASED_CR3_STORE_EXITING = _bit(16)
CPU_BASED_ACTIVATE_TERTIARY_CONTROLS = _bit(17)
CPU_BASED_CR8_LOAD_EXITING = _bit(19)
CPU_BASED_CR8_STORE_EXITING = _bit(20)
CPU_BASED_TPR_SHADOW = _bit(21)
CPU_BASED_NMI_WINDOW_EXITING = _bit(22)
CPU_BASED_MOV_DR_EXITING = _bit(23)
CPU_BASED_UNCOND_IO_EXITING = _bit(24)
CPU_BASED_USE_IO_BITMAPS = _bit(25)
CPU_BASED_MONITOR_TRAP_FLAG = _bit(27)
CPU_BASED_USE_MSR_BITMAPS = _bit(28)
CPU_BASED_MONITOR_EXITING = _bit(29)
CPU_BASED_PAUSE_EXITING = _bit(30)
CPU_BASED_ACTIVATE_SECONDARY_CONTROLS = _bit(31)

PROCBASED = _table(
    "CPU_BASED_INTR_WINDOW_EXITING", "CPU_BASED_USE_TSC_OFFSETTING", "CPU_BASED_HLT_EXITING",
    "CPU_BASED_INVLPG_EXITING", "CPU_BASED_MWAIT_EXITING", "CPU_BASED_RDPMC_EXITING",
    "CPU_BASED_RDTSC_EXITING", "CPU_BASED_CR3_LOAD_EXITING", "CPU_BASED_CR3_STORE_EXITING",
    "CPU_BASED_ACTIVATE_TERTIARY_CONTROLS", "CPU_BASED_CR8_LOAD_EXITING",
    "CPU_BASED_CR8_STORE_EXITING", "CPU_BASED_TPR_SHADOW", "CPU_BASED_NMI_WINDOW_EXITING",
    "CPU_BASED_MOV_DR_EXITING", "CPU_BASED_UNCOND_IO_EXITING", "CPU_BASED_USE_IO_BITMAPS",
    "CPU_BASED_MONITOR_TRAP_FLAG", "CPU_BASED_USE_MSR_BITMAPS", "CPU_BASED_MONITOR_EXITING",
    "CPU_BASED_PAUSE_EXITING", "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS",
)

# --------------------------------------------------------------------------
# Secondary processor-based VM-execution controls (SDM Vol. 3C, Table 25-7)
# --------------------------------------------------------------------------
SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES = _bit(0)
SECONDARY_EXEC_ENABLE_EPT = _bit(1)
SECONDARY_EXEC_DESC = _bit(2)                      # descriptor-table exiting
SECONDARY_EXEC_ENABLE_RDTSCP = _bit(3)
SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE = _bit(4)
SECONDARY_EXEC_ENABLE_VPID = _bit(5)
SECONDARY_EXEC_WBINVD_EXITING = _bit(6)
SECONDARY_EXEC_UNRESTRICTED_GUEST = _bit(7)
SECONDARY_EXEC_APIC_REGISTER_VIRT = _bit(8)
SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY = _bit(9)
SECONDARY_EXEC_PAUSE_LOOP_EXITING = _bit(10)
SECONDARY_EXEC_RDRAND_EXITING = _bit(11)
SECONDARY_EXEC_ENABLE_INVPCID = _bit(12)
SECONDARY_EXEC_ENABLE_VMFUNC = _bit(13)
SECONDARY_EXEC_SHADOW_VMCS = _bit(14)
SECONDARY_EXEC_ENCLS_EXITING = _bit(15)
SECONDARY_EXEC_RDSEED_EXITING = _bit(16)
SECONDARY_EXEC_ENABLE_PML = _bit(17)
SECONDARY_EXEC_EPT_VIOLATION_VE = _bit(18)
SECONDARY_EXEC_PT_CONCEAL_VMX = _bit(19)
SECONDARY_EXEC_ENABLE_XSAVES = _bit(20)
SECONDARY_EXEC_PASID_TRANSLATION = _bit(21)        # SDM name
SECONDARY_EXEC_MODE_BASED_EPT_EXEC = _bit(22)
SECONDARY_EXEC_EPT_SUB_PAGE_WRITE = _bit(23)       # SDM name (sub-page write permissions)
SECONDARY_EXEC_PT_USE_GPA = _bit(24)
SECONDARY_EXEC_TSC_SCALING = _bit(25)
SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE = _bit(26)
SECONDARY_EXEC_ENABLE_PCONFIG = _bit(27)           # SDM name
SECONDARY_EXEC_ENCLV_EXITING = _bit(28)            # SDM name
SECONDARY_EXEC_BUS_LOCK_DETECTION = _bit(30)
SECONDARY_EXEC_NOTIFY_VM_EXITING = _bit(31)        # SDM: instruction timeout

PROCBASED2 = _table(
    "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES", "SECONDARY_EXEC_ENABLE_EPT", "SECONDARY_EXEC_DESC",
    "SECONDARY_EXEC_ENABLE_RDTSCP", "SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE",
    "SECONDARY_EXEC_ENABLE_VPID", "SECONDARY_EXEC_WBINVD_EXITING",
    "SECONDARY_EXEC_UNRESTRICTED_GUEST", "SECONDARY_EXEC_APIC_REGISTER_VIRT",
    "SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY", "SECONDARY_EXEC_PAUSE_LOOP_EXITING",
    "SECONDARY_EXEC_RDRAND_EXITING", "SECONDARY_EXEC_ENABLE_INVPCID",
    "SECONDARY_EXEC_ENABLE_VMFUNC", "SECONDARY_EXEC_SHADOW_VMCS", "SECONDARY_EXEC_ENCLS_EXITING",
    "SECONDARY_EXEC_RDSEED_EXITING", "SECONDARY_EXEC_ENABLE_PML",
    "SECONDARY_EXEC_EPT_VIOLATION_VE", "SECONDARY_EXEC_PT_CONCEAL_VMX",
    "SECONDARY_EXEC_ENABLE_XSAVES", "SECONDARY_EXEC_PASID_TRANSLATION",
    "SECONDARY_EXEC_MODE_BASED_EPT_EXEC", "SECONDARY_EXEC_EPT_SUB_PAGE_WRITE",
    "SECONDARY_EXEC_PT_USE_GPA", "SECONDARY_EXEC_TSC_SCALING",
    "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE", "SECONDARY_EXEC_ENABLE_PCONFIG",
    "SECONDARY_EXEC_ENCLV_EXITING", "SECONDARY_EXEC_BUS_LOCK_DETECTION",
    "SECONDARY_EXEC_NOTIFY_VM_EXITING",
)

# --------------------------------------------------------------------------
# Tertiary processor-based VM-execution controls (SDM Vol. 3C, Table 25-8)
# --------------------------------------------------------------------------
TERTIARY_EXEC_LOADIWKEY_EXITING = _bit(0)          # SDM name
TERTIARY_EXEC_ENABLE_HLAT = _bit(1)                # SDM name
TERTIARY_EXEC_EPT_PAGING_WRITE = _bit(2)           # SDM name
TERTIARY_EXEC_GUEST_PAGING_VERIFY = _bit(3)        # SDM name
TERTIARY_EXEC_IPI_VIRT = _bit(4)
TERTIARY_EXEC_VIRT_SPEC_CTRL = _bit(7)             # SDM name: virtualize IA32_SPEC_CTRL

PROCBASED3 = _table(
    "TERTIARY_EXEC_LOADIWKEY_EXITING", "TERTIARY_EXEC_ENABLE_HLAT",
    "TERTIARY_EXEC_EPT_PAGING_WRITE", "TERTIARY_EXEC_GUEST_PAGING_VERIFY",
    "TERTIARY_EXEC_IPI_VIRT", "TERTIARY_EXEC_VIRT_SPEC_CTRL",
)

# --------------------------------------------------------------------------
# Primary VM-exit controls (SDM Vol. 3C, Table 25-13)
# --------------------------------------------------------------------------
VM_EXIT_SAVE_DEBUG_CONTROLS = _bit(2)
VM_EXIT_HOST_ADDR_SPACE_SIZE = _bit(9)
VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL = _bit(12)
VM_EXIT_ACK_INTR_ON_EXIT = _bit(15)
VM_EXIT_SAVE_IA32_PAT = _bit(18)
VM_EXIT_LOAD_IA32_PAT = _bit(19)
VM_EXIT_SAVE_IA32_EFER = _bit(20)
VM_EXIT_LOAD_IA32_EFER = _bit(21)
VM_EXIT_SAVE_VMX_PREEMPTION_TIMER = _bit(22)
VM_EXIT_CLEAR_BNDCFGS = _bit(23)
VM_EXIT_PT_CONCEAL_PIP = _bit(24)
VM_EXIT_CLEAR_IA32_RTIT_CTL = _bit(25)
VM_EXIT_CLEAR_IA32_LBR_CTL = _bit(26)
VM_EXIT_CLEAR_UINV = _bit(27)                      # SDM name
VM_EXIT_LOAD_CET_STATE = _bit(28)
VM_EXIT_LOAD_IA32_PKRS = _bit(29)
VM_EXIT_SAVE_IA32_PERF_GLOBAL_CTRL = _bit(30)
VM_EXIT_ACTIVATE_SECONDARY_CONTROLS = _bit(31)

EXIT = _table(
    "VM_EXIT_SAVE_DEBUG_CONTROLS", "VM_EXIT_HOST_ADDR_SPACE_SIZE",
    "VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL", "VM_EXIT_ACK_INTR_ON_EXIT", "VM_EXIT_SAVE_IA32_PAT",
    "VM_EXIT_LOAD_IA32_PAT", "VM_EXIT_SAVE_IA32_EFER", "VM_EXIT_LOAD_IA32_EFER",
    "VM_EXIT_SAVE_VMX_PREEMPTION_TIMER", "VM_EXIT_CLEAR_BNDCFGS", "VM_EXIT_PT_CONCEAL_PIP",
    "VM_EXIT_CLEAR_IA32_RTIT_CTL", "VM_EXIT_CLEAR_IA32_LBR_CTL", "VM_EXIT_CLEAR_UINV",
    "VM_EXIT_LOAD_CET_STATE", "VM_EXIT_LOAD_IA32_PKRS", "VM_EXIT_SAVE_IA32_PERF_GLOBAL_CTRL",
    "VM_EXIT_ACTIVATE_SECONDARY_CONTROLS",
)

# --------------------------------------------------------------------------
# Secondary VM-exit controls (SDM Vol. 3C, Table 25-14; FRED specification)
# --------------------------------------------------------------------------
SECONDARY_VM_EXIT_SAVE_IA32_FRED = _bit(0)
SECONDARY_VM_EXIT_LOAD_IA32_FRED = _bit(1)

EXIT2 = _table("SECONDARY_VM_EXIT_SAVE_IA32_FRED", "SECONDARY_VM_EXIT_LOAD_IA32_FRED")

# --------------------------------------------------------------------------
# VM-entry controls (SDM Vol. 3C, Table 25-15)
# --------------------------------------------------------------------------
VM_ENTRY_LOAD_DEBUG_CONTROLS = _bit(2)
VM_ENTRY_IA32E_MODE = _bit(9)
VM_ENTRY_SMM = _bit(10)
VM_ENTRY_DEACT_DUAL_MONITOR = _bit(11)
VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL = _bit(13)
VM_ENTRY_LOAD_IA32_PAT = _bit(14)
VM_ENTRY_LOAD_IA32_EFER = _bit(15)
VM_ENTRY_LOAD_BNDCFGS = _bit(16)
VM_ENTRY_PT_CONCEAL_PIP = _bit(17)
VM_ENTRY_LOAD_IA32_RTIT_CTL = _bit(18)
VM_ENTRY_LOAD_UINV = _bit(19)                      # SDM name
VM_ENTRY_LOAD_CET_STATE = _bit(20)
VM_ENTRY_LOAD_IA32_LBR_CTL = _bit(21)
VM_ENTRY_LOAD_IA32_PKRS = _bit(22)
VM_ENTRY_LOAD_IA32_FRED = _bit(23)

ENTRY = _table(
    "VM_ENTRY_LOAD_DEBUG_CONTROLS", "VM_ENTRY_IA32E_MODE", "VM_ENTRY_SMM",
    "VM_ENTRY_DEACT_DUAL_MONITOR", "VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL",
    "VM_ENTRY_LOAD_IA32_PAT", "VM_ENTRY_LOAD_IA32_EFER", "VM_ENTRY_LOAD_BNDCFGS",
    "VM_ENTRY_PT_CONCEAL_PIP", "VM_ENTRY_LOAD_IA32_RTIT_CTL", "VM_ENTRY_LOAD_UINV",
    "VM_ENTRY_LOAD_CET_STATE", "VM_ENTRY_LOAD_IA32_LBR_CTL", "VM_ENTRY_LOAD_IA32_PKRS",
    "VM_ENTRY_LOAD_IA32_FRED",
)

# --------------------------------------------------------------------------
# VM-function controls (SDM Vol. 3C, Table 25-10)
# --------------------------------------------------------------------------
VMX_VMFUNC_EPTP_SWITCHING = _bit(0)
VMFUNC_EPTP_ENTRIES = 512

VMFUNC = _table("VMX_VMFUNC_EPTP_SWITCHING")

# --------------------------------------------------------------------------
# Default1 classes (SDM Vol. 3D, Appendix A.2-A.5): bits that are reserved
# and must be 1 in the plain capability MSRs.  The TRUE_ MSRs may report
# some of them as allowed-0; no other bit is default1.
# --------------------------------------------------------------------------
PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x00000016       # bits 1, 2, 4
CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x0401E172       # bits 1, 4-6, 8, 13-16, 26
VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR = 0x00036DFF         # bits 0-8, 10, 11, 13, 14, 16, 17
VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR = 0x000011FF        # bits 0-8, 12

# --------------------------------------------------------------------------
# Interruption-information format: VM-entry interruption information,
# VM-exit interruption information, IDT-vectoring information
# (SDM Vol. 3C, Tables 25-17, 25-19, 25-20)
# --------------------------------------------------------------------------
INTR_INFO_VECTOR_MASK = 0xFF            # 7:0
INTR_INFO_INTR_TYPE_MASK = 0x700        # 10:8
INTR_INFO_INTR_TYPE_SHIFT = 8
INTR_INFO_DELIVER_CODE_MASK = 0x800     # 11
INTR_INFO_UNBLOCK_NMI = 0x1000          # 12 (exit and IDT-vectoring information only)
INTR_INFO_VALID_MASK = 0x80000000       # 31
INTR_INFO_RESVD_BITS_MASK = 0x7FFFF000

VECTORING_INFO_VECTOR_MASK = INTR_INFO_VECTOR_MASK
VECTORING_INFO_TYPE_MASK = INTR_INFO_INTR_TYPE_MASK
VECTORING_INFO_DELIVER_CODE_MASK = INTR_INFO_DELIVER_CODE_MASK
VECTORING_INFO_VALID_MASK = INTR_INFO_VALID_MASK

INTR_TYPE_EXT_INTR = 0 << 8             # external interrupt
INTR_TYPE_RESERVED = 1 << 8
INTR_TYPE_NMI_INTR = 2 << 8             # NMI
INTR_TYPE_HARD_EXCEPTION = 3 << 8       # hardware exception
INTR_TYPE_SOFT_INTR = 4 << 8            # software interrupt (INT n)
INTR_TYPE_PRIV_SW_EXCEPTION = 5 << 8    # privileged software exception (INT1)
INTR_TYPE_SOFT_EXCEPTION = 6 << 8       # software exception (INT3, INTO)
INTR_TYPE_OTHER_EVENT = 7 << 8          # other event (MTF pending on entry)

#: Interruption type (bits 10:8, already shifted) -> name.
INTR_TYPES: Mapping[int, str] = MappingProxyType({
    INTR_TYPE_EXT_INTR: "INTR_TYPE_EXT_INTR",
    INTR_TYPE_RESERVED: "INTR_TYPE_RESERVED",
    INTR_TYPE_NMI_INTR: "INTR_TYPE_NMI_INTR",
    INTR_TYPE_HARD_EXCEPTION: "INTR_TYPE_HARD_EXCEPTION",
    INTR_TYPE_SOFT_INTR: "INTR_TYPE_SOFT_INTR",
    INTR_TYPE_PRIV_SW_EXCEPTION: "INTR_TYPE_PRIV_SW_EXCEPTION",
    INTR_TYPE_SOFT_EXCEPTION: "INTR_TYPE_SOFT_EXCEPTION",
    INTR_TYPE_OTHER_EVENT: "INTR_TYPE_OTHER_EVENT",
})

# --------------------------------------------------------------------------
# Guest interruptibility state (SDM Vol. 3C, Table 25-3)
# --------------------------------------------------------------------------
GUEST_INTR_STATE_STI = _bit(0)
GUEST_INTR_STATE_MOV_SS = _bit(1)
GUEST_INTR_STATE_SMI = _bit(2)
GUEST_INTR_STATE_NMI = _bit(3)
GUEST_INTR_STATE_ENCLAVE_INTR = _bit(4)

GUEST_INTR_STATE = _table(
    "GUEST_INTR_STATE_STI", "GUEST_INTR_STATE_MOV_SS", "GUEST_INTR_STATE_SMI",
    "GUEST_INTR_STATE_NMI", "GUEST_INTR_STATE_ENCLAVE_INTR",
)
#: Bits 31:5 of the interruptibility state are reserved.
GUEST_INTR_STATE_RESERVED_MASK = 0xFFFFFFE0

# --------------------------------------------------------------------------
# Guest activity state (SDM Vol. 3C, Section 25.4.2)
# --------------------------------------------------------------------------
GUEST_ACTIVITY_ACTIVE = 0
GUEST_ACTIVITY_HLT = 1
GUEST_ACTIVITY_SHUTDOWN = 2
GUEST_ACTIVITY_WAIT_SIPI = 3

GUEST_ACTIVITY_STATES: Mapping[int, str] = MappingProxyType({
    GUEST_ACTIVITY_ACTIVE: "GUEST_ACTIVITY_ACTIVE",
    GUEST_ACTIVITY_HLT: "GUEST_ACTIVITY_HLT",
    GUEST_ACTIVITY_SHUTDOWN: "GUEST_ACTIVITY_SHUTDOWN",
    GUEST_ACTIVITY_WAIT_SIPI: "GUEST_ACTIVITY_WAIT_SIPI",
})

# --------------------------------------------------------------------------
# Exit reason field (SDM Vol. 3C, Table 25-18): flag bits above the basic
# reason in bits 15:0.
# --------------------------------------------------------------------------
VMX_EXIT_REASON_BASIC_MASK = 0xFFFF
VMX_EXIT_REASONS_BUS_LOCK_DETECTED = _bit(26)
VMX_EXIT_REASONS_ENCLAVE_MODE = _bit(27)           # SDM name
VMX_EXIT_REASONS_PENDING_MTF = _bit(28)            # SDM name
VMX_EXIT_REASONS_FROM_VMX_ROOT = _bit(29)          # SDM name
VMX_EXIT_REASONS_FAILED_VMENTRY = _bit(31)

# --------------------------------------------------------------------------
# IA32_VMX_BASIC (SDM Vol. 3D, Appendix A.1)
# --------------------------------------------------------------------------
VMX_BASIC_REVISION_MASK = 0x7FFFFFFF               # 30:0 (bit 31 is always 0)
VMX_BASIC_VMCS_SIZE_SHIFT = 32                     # 44:32
VMX_BASIC_VMCS_SIZE_MASK = 0x1FFF << 32
VMX_BASIC_32BIT_PHYS_ADDR_ONLY = _bit(48)
VMX_BASIC_DUAL_MONITOR_TREATMENT = _bit(49)
VMX_BASIC_MEM_TYPE_SHIFT = 50                      # 53:50
VMX_BASIC_MEM_TYPE_MASK = 0xF << 50
VMX_BASIC_INOUT = _bit(54)                         # INS/OUTS instruction information
VMX_BASIC_TRUE_CTLS = _bit(55)
VMX_BASIC_NO_HW_ERROR_CODE_CC = _bit(56)           # entry may deliver exceptions without
                                                   # the error-code consistency check

VMX_BASIC = _table(
    "VMX_BASIC_32BIT_PHYS_ADDR_ONLY", "VMX_BASIC_DUAL_MONITOR_TREATMENT", "VMX_BASIC_INOUT",
    "VMX_BASIC_TRUE_CTLS", "VMX_BASIC_NO_HW_ERROR_CODE_CC",
)

#: Memory types (SDM Vol. 3A, Table 12-8), as used in IA32_VMX_BASIC and the EPTP.
MEMTYPE_UC = 0
MEMTYPE_WB = 6


def vmx_basic_revision_id(vmx_basic: int) -> int:
    return vmx_basic & VMX_BASIC_REVISION_MASK


def vmx_basic_vmcs_size(vmx_basic: int) -> int:
    return (vmx_basic & VMX_BASIC_VMCS_SIZE_MASK) >> VMX_BASIC_VMCS_SIZE_SHIFT


def vmx_basic_encode(revision: int, size: int, memtype: int, flags: int = 0) -> int:
    """IA32_VMX_BASIC from its fields; ``flags`` are VMX_BASIC_* single bits."""
    if not 0 <= revision <= VMX_BASIC_REVISION_MASK:
        raise ValueError(f"VMCS revision identifier {revision:#x} does not fit bits 30:0")
    if not 0 < size <= 0x1000:
        raise ValueError(f"VMCS region size {size} is not in 1..4096")
    if not 0 <= memtype <= 0xF:
        raise ValueError(f"memory type {memtype} does not fit bits 53:50")
    return revision | (size << VMX_BASIC_VMCS_SIZE_SHIFT) | (memtype << VMX_BASIC_MEM_TYPE_SHIFT) | flags


# --------------------------------------------------------------------------
# IA32_VMX_MISC (SDM Vol. 3D, Appendix A.6)
# --------------------------------------------------------------------------
VMX_MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F         # 4:0: timer ticks every 2^N TSC ticks
VMX_MISC_SAVE_EFER_LMA = _bit(5)
VMX_MISC_ACTIVITY_HLT = _bit(6)
VMX_MISC_ACTIVITY_SHUTDOWN = _bit(7)
VMX_MISC_ACTIVITY_WAIT_SIPI = _bit(8)
VMX_MISC_INTEL_PT = _bit(14)
VMX_MISC_RDMSR_IN_SMM = _bit(15)
VMX_MISC_CR3_COUNT_SHIFT = 16                      # 24:16
VMX_MISC_CR3_COUNT_MASK = 0x1FF << 16
VMX_MISC_MAX_MSR_SHIFT = 25                        # 27:25: 512 * (N + 1) MSRs per list
VMX_MISC_MAX_MSR_MASK = 0x7 << 25
VMX_MISC_VMXOFF_BLOCK_SMI = _bit(28)
VMX_MISC_VMWRITE_SHADOW_RO_FIELDS = _bit(29)       # VMWRITE may write exit-information fields
VMX_MISC_ZERO_LEN_INS = _bit(30)
VMX_MISC_MSEG_REVID_SHIFT = 32                     # 63:32
VMX_MISC_MSR_LIST_MULTIPLIER = 512

VMX_MISC = _table(
    "VMX_MISC_SAVE_EFER_LMA", "VMX_MISC_ACTIVITY_HLT", "VMX_MISC_ACTIVITY_SHUTDOWN",
    "VMX_MISC_ACTIVITY_WAIT_SIPI", "VMX_MISC_INTEL_PT", "VMX_MISC_RDMSR_IN_SMM",
    "VMX_MISC_VMXOFF_BLOCK_SMI", "VMX_MISC_VMWRITE_SHADOW_RO_FIELDS", "VMX_MISC_ZERO_LEN_INS",
)


def vmx_misc_preemption_timer_rate(vmx_misc: int) -> int:
    return vmx_misc & VMX_MISC_PREEMPTION_TIMER_RATE_MASK


def vmx_misc_cr3_count(vmx_misc: int) -> int:
    return (vmx_misc & VMX_MISC_CR3_COUNT_MASK) >> VMX_MISC_CR3_COUNT_SHIFT


def vmx_misc_max_msr(vmx_misc: int) -> int:
    """The raw bits 27:25; the list limit is 512 * (value + 1) entries."""
    return (vmx_misc & VMX_MISC_MAX_MSR_MASK) >> VMX_MISC_MAX_MSR_SHIFT


def vmx_misc_msr_list_limit(vmx_misc: int) -> int:
    """Recommended maximum number of MSRs in each MSR-load/store list."""
    return VMX_MISC_MSR_LIST_MULTIPLIER * (vmx_misc_max_msr(vmx_misc) + 1)


# --------------------------------------------------------------------------
# IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D, Appendix A.10).  As in Linux, the
# VMX_VPID_* constants count from bit 32 of the MSR (they describe its high
# dword); the EPT_VPID_CAP table holds positions in the whole 64-bit MSR.
# --------------------------------------------------------------------------
VMX_EPT_EXECUTE_ONLY_BIT = _bit(0)
VMX_EPT_PAGE_WALK_4_BIT = _bit(6)
VMX_EPT_PAGE_WALK_5_BIT = _bit(7)
VMX_EPTP_UC_BIT = _bit(8)
VMX_EPTP_WB_BIT = _bit(14)
VMX_EPT_2MB_PAGE_BIT = _bit(16)
VMX_EPT_1GB_PAGE_BIT = _bit(17)
VMX_EPT_INVEPT_BIT = _bit(20)
VMX_EPT_AD_BIT = _bit(21)
VMX_EPT_ADVANCED_EXIT_INFO_BIT = _bit(22)          # SDM name
VMX_EPT_SUPERVISOR_SHADOW_STACK_BIT = _bit(23)     # SDM name
VMX_EPT_EXTENT_CONTEXT_BIT = _bit(25)
VMX_EPT_EXTENT_GLOBAL_BIT = _bit(26)

VMX_VPID_INVVPID_BIT = _bit(0)                     # MSR bit 32
VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT = _bit(8)      # MSR bit 40
VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT = _bit(9)       # MSR bit 41
VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT = _bit(10)      # MSR bit 42
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT = _bit(11)   # MSR bit 43
VMX_EPT_VPID_CAP_VPID_SHIFT = 32
VMX_EPT_VPID_CAP_HLAT_PREFIX_SHIFT = 48            # 53:48: maximum HLAT prefix size
VMX_EPT_VPID_CAP_HLAT_PREFIX_MASK = 0x3F << 48

EPT_VPID_CAP: Mapping[str, int] = MappingProxyType({
    "VMX_EPT_EXECUTE_ONLY_BIT": VMX_EPT_EXECUTE_ONLY_BIT,
    "VMX_EPT_PAGE_WALK_4_BIT": VMX_EPT_PAGE_WALK_4_BIT,
    "VMX_EPT_PAGE_WALK_5_BIT": VMX_EPT_PAGE_WALK_5_BIT,
    "VMX_EPTP_UC_BIT": VMX_EPTP_UC_BIT,
    "VMX_EPTP_WB_BIT": VMX_EPTP_WB_BIT,
    "VMX_EPT_2MB_PAGE_BIT": VMX_EPT_2MB_PAGE_BIT,
    "VMX_EPT_1GB_PAGE_BIT": VMX_EPT_1GB_PAGE_BIT,
    "VMX_EPT_INVEPT_BIT": VMX_EPT_INVEPT_BIT,
    "VMX_EPT_AD_BIT": VMX_EPT_AD_BIT,
    "VMX_EPT_ADVANCED_EXIT_INFO_BIT": VMX_EPT_ADVANCED_EXIT_INFO_BIT,
    "VMX_EPT_SUPERVISOR_SHADOW_STACK_BIT": VMX_EPT_SUPERVISOR_SHADOW_STACK_BIT,
    "VMX_EPT_EXTENT_CONTEXT_BIT": VMX_EPT_EXTENT_CONTEXT_BIT,
    "VMX_EPT_EXTENT_GLOBAL_BIT": VMX_EPT_EXTENT_GLOBAL_BIT,
    "VMX_VPID_INVVPID_BIT": VMX_VPID_INVVPID_BIT << 32,
    "VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT": VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT << 32,
    "VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT": VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT << 32,
    "VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT": VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT << 32,
    "VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT": VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT << 32,
})

#: INVEPT types (SDM Vol. 3C, INVEPT) and INVVPID types (INVVPID).
VMX_EPT_EXTENT_CONTEXT = 1
VMX_EPT_EXTENT_GLOBAL = 2
VMX_VPID_EXTENT_INDIVIDUAL_ADDR = 0
VMX_VPID_EXTENT_SINGLE_CONTEXT = 1
VMX_VPID_EXTENT_ALL_CONTEXT = 2
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL = 3

# --------------------------------------------------------------------------
# EPT pointer (SDM Vol. 3C, Table 25-9) and EPT paging-structure entries
# (SDM Vol. 3C, Tables 30-1 .. 30-6)
# --------------------------------------------------------------------------
VMX_EPTP_MT_MASK = 0x7                  # 2:0 paging-structure memory type
VMX_EPTP_MT_UC = MEMTYPE_UC
VMX_EPTP_MT_WB = MEMTYPE_WB
VMX_EPTP_PWL_MASK = 0x38                # 5:3 page-walk length minus 1
VMX_EPTP_PWL_4 = 0x18
VMX_EPTP_PWL_5 = 0x20
VMX_EPTP_AD_ENABLE_BIT = _bit(6)
VMX_EPTP_SSS_ENABLE_BIT = _bit(7)       # SDM name: supervisor shadow-stack pages
VMX_EPTP_RESERVED_LOW_MASK = 0xF00      # 11:8 reserved

VMX_EPT_READABLE_MASK = _bit(0)
VMX_EPT_WRITABLE_MASK = _bit(1)
VMX_EPT_EXECUTABLE_MASK = _bit(2)
VMX_EPT_RWX_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_MT_EPTE_SHIFT = 3               # 5:3 memory type of a leaf entry
VMX_EPT_MT_MASK = 0x7 << VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_IPAT_BIT = _bit(6)              # ignore PAT (leaf)
VMX_EPT_LARGE_PAGE_BIT = _bit(7)        # SDM name: maps a 1 GiB / 2 MiB page
VMX_EPT_ACCESS_BIT = _bit(8)
VMX_EPT_DIRTY_BIT = _bit(9)
VMX_EPT_USER_EXECUTABLE_MASK = _bit(10)  # SDM name: execute for user-mode addresses (MBEC)
VMX_EPT_SUPPRESS_VE_BIT = _bit(63)

# --------------------------------------------------------------------------
# VM-entry failure exit qualifications (SDM Vol. 3C, Section 27.8)
# --------------------------------------------------------------------------
ENTRY_FAIL_DEFAULT = 0
ENTRY_FAIL_PDPTE = 2
ENTRY_FAIL_NMI = 3
ENTRY_FAIL_VMCS_LINK_PTR = 4
