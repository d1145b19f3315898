"""Every VMCS field of the SDM's field-encoding appendix, in one table.

Source: Intel SDM Vol. 3D, Appendix B "Field Encoding in VMCS" (plus the
FRED specification for the FRED fields).  Names are Linux's ``enum
vmcs_field`` (``arch/x86/include/asm/vmx.h``) where Linux has one; the few
fields Linux does not name get an SDM-derived name in the same style (the
table's comment column says "SDM name").

A field encoding is 32 bits (SDM Vol. 3C, Section 25.11.2, Table 25-21):

====  ======================================================================
bits  meaning
====  ======================================================================
0     access type: 0 = full, 1 = high (only 64-bit fields have a high access)
9:1   index
11:10 type: 0 control, 1 VM-exit information (read-only data), 2 guest
      state, 3 host state
12    reserved (0)
14:13 width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural-width
31:15 reserved (0)
====  ======================================================================

Only :data:`TABLE` is written by hand; :class:`VmcsField` (with a ``_HIGH``
member for each 64-bit field), :class:`FieldInfo` records and the lookups are
derived from it and from the encoding bits.

Which fields exist on a given processor: the SDM says a field exists only if
the processor supports the feature that uses it (the footnotes of Appendix
B: "This field exists only on processors that support the 1-setting of
..."). Each row carries that condition as ``requires``: a tuple of
``(control table, mask)`` alternatives, any one of which must be allowed-1
(empty = the field always exists).  :func:`field_supported` is the one place
that applies it; ``capabilities.SUPPORTED_FIELDS`` is the result for the
modelled CPU.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Union

from devirt_emu.vmx import controls as c


class FieldWidth(enum.IntEnum):
    """Bits 14:13 of an encoding."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3


class FieldType(enum.IntEnum):
    """Bits 11:10 of an encoding."""

    CONTROL = 0
    EXIT_INFO = 1       # "VM-exit information" / read-only data fields
    GUEST = 2
    HOST = 3


#: Size in bytes of a full field of each width (natural width is 64 bits here:
#: the model is a 64-bit processor).
WIDTH_BYTES = MappingProxyType({
    FieldWidth.BITS16: 2, FieldWidth.BITS64: 8, FieldWidth.BITS32: 4, FieldWidth.NATURAL: 8,
})

#: Bits of an encoding that must be 0 (31:15 and 12).
ENCODING_RESERVED_MASK = 0xFFFF8000 | (1 << 12)

#: The key of a requirement that this model never satisfies: the field belongs
#: to a feature whose existence condition is not modelled (see its row).
NOT_MODELLED = "NOT_MODELLED"

Requirement = tuple  # tuple[tuple[str, int], ...]: (control table name, mask) alternatives

_ALWAYS: Requirement = ()


def _r(*alts: tuple[str, int]) -> Requirement:
    return tuple(alts)


# Requirement shorthands (SDM Appendix B footnotes).
_PIN = "PINBASED"
_PROC = "PROCBASED"
_PROC2 = "PROCBASED2"
_PROC3 = "PROCBASED3"
_EXIT = "EXIT"
_EXIT2 = "EXIT2"
_ENTRY = "ENTRY"
_VMFUNC = "VMFUNC"

_FRED_GUEST = _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_FRED), (_EXIT2, c.SECONDARY_VM_EXIT_SAVE_IA32_FRED))
_FRED_HOST = _r((_EXIT2, c.SECONDARY_VM_EXIT_LOAD_IA32_FRED))

#: The one hand-written table: (name, encoding of the full field, SDM field name, requires).
#: Rows are in the SDM's order (by width, then type, then index).  64-bit fields
#: list only their full encoding; the high encoding (full | 1) is derived.
TABLE: tuple[tuple[str, int, str, Requirement], ...] = (
    # ---- 16-bit control fields (Table B-1) ----
    ("VIRTUAL_PROCESSOR_ID", 0x0000, "Virtual-processor identifier (VPID)",
     _r((_PROC2, c.SECONDARY_EXEC_ENABLE_VPID))),
    ("POSTED_INTR_NV", 0x0002, "Posted-interrupt notification vector",
     _r((_PIN, c.PIN_BASED_POSTED_INTR))),
    ("EPTP_INDEX", 0x0004, "EPTP index (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_EPT_VIOLATION_VE))),
    ("HLAT_PREFIX_SIZE", 0x0006, "HLAT prefix size (SDM name)",
     _r((_PROC3, c.TERTIARY_EXEC_ENABLE_HLAT))),
    ("LAST_PID_POINTER_INDEX", 0x0008, "Last PID-pointer index",
     _r((_PROC3, c.TERTIARY_EXEC_IPI_VIRT))),
    # ---- 16-bit guest-state fields (Table B-2) ----
    ("GUEST_ES_SELECTOR", 0x0800, "Guest ES selector", _ALWAYS),
    ("GUEST_CS_SELECTOR", 0x0802, "Guest CS selector", _ALWAYS),
    ("GUEST_SS_SELECTOR", 0x0804, "Guest SS selector", _ALWAYS),
    ("GUEST_DS_SELECTOR", 0x0806, "Guest DS selector", _ALWAYS),
    ("GUEST_FS_SELECTOR", 0x0808, "Guest FS selector", _ALWAYS),
    ("GUEST_GS_SELECTOR", 0x080A, "Guest GS selector", _ALWAYS),
    ("GUEST_LDTR_SELECTOR", 0x080C, "Guest LDTR selector", _ALWAYS),
    ("GUEST_TR_SELECTOR", 0x080E, "Guest TR selector", _ALWAYS),
    ("GUEST_INTR_STATUS", 0x0810, "Guest interrupt status",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY))),
    ("GUEST_PML_INDEX", 0x0812, "PML index", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_PML))),
    ("GUEST_UINV", 0x0814, "Guest UINV (SDM name)",
     _r((_ENTRY, c.VM_ENTRY_LOAD_UINV), (_EXIT, c.VM_EXIT_CLEAR_UINV))),
    # ---- 16-bit host-state fields (Table B-3) ----
    ("HOST_ES_SELECTOR", 0x0C00, "Host ES selector", _ALWAYS),
    ("HOST_CS_SELECTOR", 0x0C02, "Host CS selector", _ALWAYS),
    ("HOST_SS_SELECTOR", 0x0C04, "Host SS selector", _ALWAYS),
    ("HOST_DS_SELECTOR", 0x0C06, "Host DS selector", _ALWAYS),
    ("HOST_FS_SELECTOR", 0x0C08, "Host FS selector", _ALWAYS),
    ("HOST_GS_SELECTOR", 0x0C0A, "Host GS selector", _ALWAYS),
    ("HOST_TR_SELECTOR", 0x0C0C, "Host TR selector", _ALWAYS),
    # ---- 64-bit control fields (Table B-4) ----
    ("IO_BITMAP_A", 0x2000, "Address of I/O bitmap A", _ALWAYS),
    ("IO_BITMAP_B", 0x2002, "Address of I/O bitmap B", _ALWAYS),
    ("MSR_BITMAP", 0x2004, "Address of MSR bitmaps", _r((_PROC, c.CPU_BASED_USE_MSR_BITMAPS))),
    ("VM_EXIT_MSR_STORE_ADDR", 0x2006, "VM-exit MSR-store address", _ALWAYS),
    ("VM_EXIT_MSR_LOAD_ADDR", 0x2008, "VM-exit MSR-load address", _ALWAYS),
    ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A, "VM-entry MSR-load address", _ALWAYS),
    ("EXECUTIVE_VMCS_POINTER", 0x200C, "Executive-VMCS pointer (SDM name)", _ALWAYS),
    ("PML_ADDRESS", 0x200E, "PML address", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_PML))),
    ("TSC_OFFSET", 0x2010, "TSC offset", _ALWAYS),
    ("VIRTUAL_APIC_PAGE_ADDR", 0x2012, "Virtual-APIC address", _r((_PROC, c.CPU_BASED_TPR_SHADOW))),
    ("APIC_ACCESS_ADDR", 0x2014, "APIC-access address",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES))),
    ("POSTED_INTR_DESC_ADDR", 0x2016, "Posted-interrupt descriptor address",
     _r((_PIN, c.PIN_BASED_POSTED_INTR))),
    ("VM_FUNCTION_CONTROL", 0x2018, "VM-function controls",
     _r((_PROC2, c.SECONDARY_EXEC_ENABLE_VMFUNC))),
    ("EPT_POINTER", 0x201A, "EPT pointer (EPTP)", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("EOI_EXIT_BITMAP0", 0x201C, "EOI-exit bitmap 0",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY))),
    ("EOI_EXIT_BITMAP1", 0x201E, "EOI-exit bitmap 1",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY))),
    ("EOI_EXIT_BITMAP2", 0x2020, "EOI-exit bitmap 2",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY))),
    ("EOI_EXIT_BITMAP3", 0x2022, "EOI-exit bitmap 3",
     _r((_PROC2, c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY))),
    ("EPTP_LIST_ADDRESS", 0x2024, "EPTP-list address", _r((_VMFUNC, c.VMX_VMFUNC_EPTP_SWITCHING))),
    ("VMREAD_BITMAP", 0x2026, "VMREAD-bitmap address", _r((_PROC2, c.SECONDARY_EXEC_SHADOW_VMCS))),
    ("VMWRITE_BITMAP", 0x2028, "VMWRITE-bitmap address", _r((_PROC2, c.SECONDARY_EXEC_SHADOW_VMCS))),
    ("VE_INFORMATION_ADDRESS", 0x202A, "Virtualization-exception information address",
     _r((_PROC2, c.SECONDARY_EXEC_EPT_VIOLATION_VE))),
    ("XSS_EXIT_BITMAP", 0x202C, "XSS-exiting bitmap", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_XSAVES))),
    ("ENCLS_EXITING_BITMAP", 0x202E, "ENCLS-exiting bitmap",
     _r((_PROC2, c.SECONDARY_EXEC_ENCLS_EXITING))),
    ("SPPT_POINTER", 0x2030, "Sub-page-permission-table pointer (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_EPT_SUB_PAGE_WRITE))),
    ("TSC_MULTIPLIER", 0x2032, "TSC multiplier", _r((_PROC2, c.SECONDARY_EXEC_TSC_SCALING))),
    ("TERTIARY_VM_EXEC_CONTROL", 0x2034, "Tertiary processor-based VM-execution controls",
     _r((_PROC, c.CPU_BASED_ACTIVATE_TERTIARY_CONTROLS))),
    ("ENCLV_EXITING_BITMAP", 0x2036, "ENCLV-exiting bitmap (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_ENCLV_EXITING))),
    ("LOW_PASID_DIRECTORY_ADDRESS", 0x2038, "Low PASID directory address (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_PASID_TRANSLATION))),
    ("HIGH_PASID_DIRECTORY_ADDRESS", 0x203A, "High PASID directory address (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_PASID_TRANSLATION))),
    # Shared EPTP belongs to TDX (SEAM) operation, which this model does not have.
    ("SHARED_EPT_POINTER", 0x203C, "Shared EPTP", _r((NOT_MODELLED, 1))),
    ("PCONFIG_EXITING_BITMAP", 0x203E, "PCONFIG-exiting bitmap (SDM name)",
     _r((_PROC2, c.SECONDARY_EXEC_ENABLE_PCONFIG))),
    ("HLATP", 0x2040, "Hypervisor-managed linear-address translation pointer (SDM name)",
     _r((_PROC3, c.TERTIARY_EXEC_ENABLE_HLAT))),
    ("PID_POINTER_TABLE", 0x2042, "PID-pointer table address", _r((_PROC3, c.TERTIARY_EXEC_IPI_VIRT))),
    ("SECONDARY_VM_EXIT_CONTROLS", 0x2044, "Secondary VM-exit controls",
     _r((_EXIT, c.VM_EXIT_ACTIVATE_SECONDARY_CONTROLS))),
    ("IA32_SPEC_CTRL_MASK", 0x204A, "IA32_SPEC_CTRL mask",
     _r((_PROC3, c.TERTIARY_EXEC_VIRT_SPEC_CTRL))),
    ("IA32_SPEC_CTRL_SHADOW", 0x204C, "IA32_SPEC_CTRL shadow",
     _r((_PROC3, c.TERTIARY_EXEC_VIRT_SPEC_CTRL))),
    ("INJECTED_EVENT_DATA", 0x2052, "Injected-event data (FRED)", _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_FRED))),
    # ---- 64-bit read-only data fields (Table B-5) ----
    ("GUEST_PHYSICAL_ADDRESS", 0x2400, "Guest-physical address",
     _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("ORIGINAL_EVENT_DATA", 0x2404, "Original-event data (FRED)", _FRED_GUEST),
    # ---- 64-bit guest-state fields (Table B-6) ----
    ("VMCS_LINK_POINTER", 0x2800, "VMCS link pointer", _ALWAYS),
    ("GUEST_IA32_DEBUGCTL", 0x2802, "Guest IA32_DEBUGCTL", _ALWAYS),
    ("GUEST_IA32_PAT", 0x2804, "Guest IA32_PAT",
     _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_PAT), (_EXIT, c.VM_EXIT_SAVE_IA32_PAT))),
    ("GUEST_IA32_EFER", 0x2806, "Guest IA32_EFER",
     _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_EFER), (_EXIT, c.VM_EXIT_SAVE_IA32_EFER))),
    ("GUEST_IA32_PERF_GLOBAL_CTRL", 0x2808, "Guest IA32_PERF_GLOBAL_CTRL",
     _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL),
        (_EXIT, c.VM_EXIT_SAVE_IA32_PERF_GLOBAL_CTRL))),
    ("GUEST_PDPTR0", 0x280A, "Guest PDPTE0", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("GUEST_PDPTR1", 0x280C, "Guest PDPTE1", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("GUEST_PDPTR2", 0x280E, "Guest PDPTE2", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("GUEST_PDPTR3", 0x2810, "Guest PDPTE3", _r((_PROC2, c.SECONDARY_EXEC_ENABLE_EPT))),
    ("GUEST_BNDCFGS", 0x2812, "Guest IA32_BNDCFGS",
     _r((_ENTRY, c.VM_ENTRY_LOAD_BNDCFGS), (_EXIT, c.VM_EXIT_CLEAR_BNDCFGS))),
    ("GUEST_IA32_RTIT_CTL", 0x2814, "Guest IA32_RTIT_CTL",
     _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_RTIT_CTL), (_EXIT, c.VM_EXIT_CLEAR_IA32_RTIT_CTL))),
    ("GUEST_IA32_LBR_CTL", 0x2816, "Guest IA32_LBR_CTL",
     _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_LBR_CTL), (_EXIT, c.VM_EXIT_CLEAR_IA32_LBR_CTL))),
    ("GUEST_IA32_PKRS", 0x2818, "Guest IA32_PKRS", _r((_ENTRY, c.VM_ENTRY_LOAD_IA32_PKRS))),
    ("GUEST_IA32_FRED_CONFIG", 0x281A, "Guest IA32_FRED_CONFIG", _FRED_GUEST),
    ("GUEST_IA32_FRED_RSP1", 0x281C, "Guest IA32_FRED_RSP1", _FRED_GUEST),
    ("GUEST_IA32_FRED_RSP2", 0x281E, "Guest IA32_FRED_RSP2", _FRED_GUEST),
    ("GUEST_IA32_FRED_RSP3", 0x2820, "Guest IA32_FRED_RSP3", _FRED_GUEST),
    ("GUEST_IA32_FRED_STKLVLS", 0x2822, "Guest IA32_FRED_STKLVLS", _FRED_GUEST),
    ("GUEST_IA32_FRED_SSP1", 0x2824, "Guest IA32_FRED_SSP1", _FRED_GUEST),
    ("GUEST_IA32_FRED_SSP2", 0x2826, "Guest IA32_FRED_SSP2", _FRED_GUEST),
    ("GUEST_IA32_FRED_SSP3", 0x2828, "Guest IA32_FRED_SSP3", _FRED_GUEST),
    # ---- 64-bit host-state fields (Table B-7) ----
    ("HOST_IA32_PAT", 0x2C00, "Host IA32_PAT", _r((_EXIT, c.VM_EXIT_LOAD_IA32_PAT))),
    ("HOST_IA32_EFER", 0x2C02, "Host IA32_EFER", _r((_EXIT, c.VM_EXIT_LOAD_IA32_EFER))),
    ("HOST_IA32_PERF_GLOBAL_CTRL", 0x2C04, "Host IA32_PERF_GLOBAL_CTRL",
     _r((_EXIT, c.VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL))),
    ("HOST_IA32_PKRS", 0x2C06, "Host IA32_PKRS", _r((_EXIT, c.VM_EXIT_LOAD_IA32_PKRS))),
    ("HOST_IA32_FRED_CONFIG", 0x2C08, "Host IA32_FRED_CONFIG", _FRED_HOST),
    ("HOST_IA32_FRED_RSP1", 0x2C0A, "Host IA32_FRED_RSP1", _FRED_HOST),
    ("HOST_IA32_FRED_RSP2", 0x2C0C, "Host IA32_FRED_RSP2", _FRED_HOST),
    ("HOST_IA32_FRED_RSP3", 0x2C0E, "Host IA32_FRED_RSP3", _FRED_HOST),
    ("HOST_IA32_FRED_STKLVLS", 0x2C10, "Host IA32_FRED_STKLVLS", _FRED_HOST),
    ("HOST_IA32_FRED_SSP1", 0x2C12, "Host IA32_FRED_SSP1", _FRED_HOST),
    ("HOST_IA32_FRED_SSP2", 0x2C14, "Host IA32_FRED_SSP2", _FRED_HOST),
    ("HOST_IA32_FRED_SSP3", 0x2C16, "Host IA32_FRED_SSP3", _FRED_HOST),
    # ---- 32-bit control fields (Table B-8) ----
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000, "Pin-based VM-execution controls", _ALWAYS),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002, "Primary processor-based VM-execution controls", _ALWAYS),
    ("EXCEPTION_BITMAP", 0x4004, "Exception bitmap", _ALWAYS),
    ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006, "Page-fault error-code mask", _ALWAYS),
    ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008, "Page-fault error-code match", _ALWAYS),
    ("CR3_TARGET_COUNT", 0x400A, "CR3-target count", _ALWAYS),
    ("VM_EXIT_CONTROLS", 0x400C, "Primary VM-exit controls", _ALWAYS),
    ("VM_EXIT_MSR_STORE_COUNT", 0x400E, "VM-exit MSR-store count", _ALWAYS),
    ("VM_EXIT_MSR_LOAD_COUNT", 0x4010, "VM-exit MSR-load count", _ALWAYS),
    ("VM_ENTRY_CONTROLS", 0x4012, "VM-entry controls", _ALWAYS),
    ("VM_ENTRY_MSR_LOAD_COUNT", 0x4014, "VM-entry MSR-load count", _ALWAYS),
    ("VM_ENTRY_INTR_INFO_FIELD", 0x4016, "VM-entry interruption-information field", _ALWAYS),
    ("VM_ENTRY_EXCEPTION_ERROR_CODE", 0x4018, "VM-entry exception error code", _ALWAYS),
    ("VM_ENTRY_INSTRUCTION_LEN", 0x401A, "VM-entry instruction length", _ALWAYS),
    ("TPR_THRESHOLD", 0x401C, "TPR threshold", _r((_PROC, c.CPU_BASED_TPR_SHADOW))),
    ("SECONDARY_VM_EXEC_CONTROL", 0x401E, "Secondary processor-based VM-execution controls",
     _r((_PROC, c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS))),
    ("PLE_GAP", 0x4020, "PLE_Gap", _r((_PROC2, c.SECONDARY_EXEC_PAUSE_LOOP_EXITING))),
    ("PLE_WINDOW", 0x4022, "PLE_Window", _r((_PROC2, c.SECONDARY_EXEC_PAUSE_LOOP_EXITING))),
    ("NOTIFY_WINDOW", 0x4024, "Instruction-timeout control",
     _r((_PROC2, c.SECONDARY_EXEC_NOTIFY_VM_EXITING))),
    # ---- 32-bit read-only data fields (Table B-9) ----
    ("VM_INSTRUCTION_ERROR", 0x4400, "VM-instruction error", _ALWAYS),
    ("VM_EXIT_REASON", 0x4402, "Exit reason", _ALWAYS),
    ("VM_EXIT_INTR_INFO", 0x4404, "VM-exit interruption information", _ALWAYS),
    ("VM_EXIT_INTR_ERROR_CODE", 0x4406, "VM-exit interruption error code", _ALWAYS),
    ("IDT_VECTORING_INFO_FIELD", 0x4408, "IDT-vectoring information field", _ALWAYS),
    ("IDT_VECTORING_ERROR_CODE", 0x440A, "IDT-vectoring error code", _ALWAYS),
    ("VM_EXIT_INSTRUCTION_LEN", 0x440C, "VM-exit instruction length", _ALWAYS),
    ("VMX_INSTRUCTION_INFO", 0x440E, "VM-exit instruction information", _ALWAYS),
    # ---- 32-bit guest-state fields (Table B-10) ----
    ("GUEST_ES_LIMIT", 0x4800, "Guest ES limit", _ALWAYS),
    ("GUEST_CS_LIMIT", 0x4802, "Guest CS limit", _ALWAYS),
    ("GUEST_SS_LIMIT", 0x4804, "Guest SS limit", _ALWAYS),
    ("GUEST_DS_LIMIT", 0x4806, "Guest DS limit", _ALWAYS),
    ("GUEST_FS_LIMIT", 0x4808, "Guest FS limit", _ALWAYS),
    ("GUEST_GS_LIMIT", 0x480A, "Guest GS limit", _ALWAYS),
    ("GUEST_LDTR_LIMIT", 0x480C, "Guest LDTR limit", _ALWAYS),
    ("GUEST_TR_LIMIT", 0x480E, "Guest TR limit", _ALWAYS),
    ("GUEST_GDTR_LIMIT", 0x4810, "Guest GDTR limit", _ALWAYS),
    ("GUEST_IDTR_LIMIT", 0x4812, "Guest IDTR limit", _ALWAYS),
    ("GUEST_ES_AR_BYTES", 0x4814, "Guest ES access rights", _ALWAYS),
    ("GUEST_CS_AR_BYTES", 0x4816, "Guest CS access rights", _ALWAYS),
    ("GUEST_SS_AR_BYTES", 0x4818, "Guest SS access rights", _ALWAYS),
    ("GUEST_DS_AR_BYTES", 0x481A, "Guest DS access rights", _ALWAYS),
    ("GUEST_FS_AR_BYTES", 0x481C, "Guest FS access rights", _ALWAYS),
    ("GUEST_GS_AR_BYTES", 0x481E, "Guest GS access rights", _ALWAYS),
    ("GUEST_LDTR_AR_BYTES", 0x4820, "Guest LDTR access rights", _ALWAYS),
    ("GUEST_TR_AR_BYTES", 0x4822, "Guest TR access rights", _ALWAYS),
    ("GUEST_INTERRUPTIBILITY_INFO", 0x4824, "Guest interruptibility state", _ALWAYS),
    ("GUEST_ACTIVITY_STATE", 0x4826, "Guest activity state", _ALWAYS),
    ("GUEST_SMBASE", 0x4828, "Guest SMBASE (SDM name)", _ALWAYS),
    ("GUEST_SYSENTER_CS", 0x482A, "Guest IA32_SYSENTER_CS", _ALWAYS),
    ("VMX_PREEMPTION_TIMER_VALUE", 0x482E, "VMX-preemption timer value",
     _r((_PIN, c.PIN_BASED_VMX_PREEMPTION_TIMER))),
    # ---- 32-bit host-state field (Table B-11) ----
    ("HOST_IA32_SYSENTER_CS", 0x4C00, "Host IA32_SYSENTER_CS", _ALWAYS),
    # ---- natural-width control fields (Table B-12) ----
    ("CR0_GUEST_HOST_MASK", 0x6000, "CR0 guest/host mask", _ALWAYS),
    ("CR4_GUEST_HOST_MASK", 0x6002, "CR4 guest/host mask", _ALWAYS),
    ("CR0_READ_SHADOW", 0x6004, "CR0 read shadow", _ALWAYS),
    ("CR4_READ_SHADOW", 0x6006, "CR4 read shadow", _ALWAYS),
    ("CR3_TARGET_VALUE0", 0x6008, "CR3-target value 0", _ALWAYS),
    ("CR3_TARGET_VALUE1", 0x600A, "CR3-target value 1", _ALWAYS),
    ("CR3_TARGET_VALUE2", 0x600C, "CR3-target value 2", _ALWAYS),
    ("CR3_TARGET_VALUE3", 0x600E, "CR3-target value 3", _ALWAYS),
    # ---- natural-width read-only data fields (Table B-13) ----
    ("EXIT_QUALIFICATION", 0x6400, "Exit qualification", _ALWAYS),
    ("IO_RCX", 0x6402, "I/O RCX (SDM name)", _ALWAYS),
    ("IO_RSI", 0x6404, "I/O RSI (SDM name)", _ALWAYS),
    ("IO_RDI", 0x6406, "I/O RDI (SDM name)", _ALWAYS),
    ("IO_RIP", 0x6408, "I/O RIP (SDM name)", _ALWAYS),
    ("GUEST_LINEAR_ADDRESS", 0x640A, "Guest-linear address", _ALWAYS),
    # ---- natural-width guest-state fields (Table B-14) ----
    ("GUEST_CR0", 0x6800, "Guest CR0", _ALWAYS),
    ("GUEST_CR3", 0x6802, "Guest CR3", _ALWAYS),
    ("GUEST_CR4", 0x6804, "Guest CR4", _ALWAYS),
    ("GUEST_ES_BASE", 0x6806, "Guest ES base", _ALWAYS),
    ("GUEST_CS_BASE", 0x6808, "Guest CS base", _ALWAYS),
    ("GUEST_SS_BASE", 0x680A, "Guest SS base", _ALWAYS),
    ("GUEST_DS_BASE", 0x680C, "Guest DS base", _ALWAYS),
    ("GUEST_FS_BASE", 0x680E, "Guest FS base", _ALWAYS),
    ("GUEST_GS_BASE", 0x6810, "Guest GS base", _ALWAYS),
    ("GUEST_LDTR_BASE", 0x6812, "Guest LDTR base", _ALWAYS),
    ("GUEST_TR_BASE", 0x6814, "Guest TR base", _ALWAYS),
    ("GUEST_GDTR_BASE", 0x6816, "Guest GDTR base", _ALWAYS),
    ("GUEST_IDTR_BASE", 0x6818, "Guest IDTR base", _ALWAYS),
    ("GUEST_DR7", 0x681A, "Guest DR7", _ALWAYS),
    ("GUEST_RSP", 0x681C, "Guest RSP", _ALWAYS),
    ("GUEST_RIP", 0x681E, "Guest RIP", _ALWAYS),
    ("GUEST_RFLAGS", 0x6820, "Guest RFLAGS", _ALWAYS),
    ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822, "Guest pending debug exceptions", _ALWAYS),
    ("GUEST_SYSENTER_ESP", 0x6824, "Guest IA32_SYSENTER_ESP", _ALWAYS),
    ("GUEST_SYSENTER_EIP", 0x6826, "Guest IA32_SYSENTER_EIP", _ALWAYS),
    ("GUEST_S_CET", 0x6828, "Guest IA32_S_CET", _r((_ENTRY, c.VM_ENTRY_LOAD_CET_STATE))),
    ("GUEST_SSP", 0x682A, "Guest SSP", _r((_ENTRY, c.VM_ENTRY_LOAD_CET_STATE))),
    ("GUEST_INTR_SSP_TABLE", 0x682C, "Guest IA32_INTERRUPT_SSP_TABLE_ADDR",
     _r((_ENTRY, c.VM_ENTRY_LOAD_CET_STATE))),
    # ---- natural-width host-state fields (Table B-15) ----
    ("HOST_CR0", 0x6C00, "Host CR0", _ALWAYS),
    ("HOST_CR3", 0x6C02, "Host CR3", _ALWAYS),
    ("HOST_CR4", 0x6C04, "Host CR4", _ALWAYS),
    ("HOST_FS_BASE", 0x6C06, "Host FS base", _ALWAYS),
    ("HOST_GS_BASE", 0x6C08, "Host GS base", _ALWAYS),
    ("HOST_TR_BASE", 0x6C0A, "Host TR base", _ALWAYS),
    ("HOST_GDTR_BASE", 0x6C0C, "Host GDTR base", _ALWAYS),
    ("HOST_IDTR_BASE", 0x6C0E, "Host IDTR base", _ALWAYS),
    ("HOST_IA32_SYSENTER_ESP", 0x6C10, "Host IA32_SYSENTER_ESP", _ALWAYS),
    ("HOST_IA32_SYSENTER_EIP", 0x6C12, "Host IA32_SYSENTER_EIP", _ALWAYS),
    ("HOST_RSP", 0x6C14, "Host RSP", _ALWAYS),
    ("HOST_RIP", 0x6C16, "Host RIP", _ALWAYS),
    ("HOST_S_CET", 0x6C18, "Host IA32_S_CET", _r((_EXIT, c.VM_EXIT_LOAD_CET_STATE))),
    ("HOST_SSP", 0x6C1A, "Host SSP", _r((_EXIT, c.VM_EXIT_LOAD_CET_STATE))),
    ("HOST_INTR_SSP_TABLE", 0x6C1C, "Host IA32_INTERRUPT_SSP_TABLE_ADDR",
     _r((_EXIT, c.VM_EXIT_LOAD_CET_STATE))),
)


# --------------------------------------------------------------------------
# Encoding arithmetic (pure functions of the encoding bits)
# --------------------------------------------------------------------------
def _check_encoding(enc: int) -> int:
    if not isinstance(enc, int) or isinstance(enc, bool):
        raise TypeError(f"a VMCS field encoding is an int, not {type(enc).__name__}")
    if not 0 <= enc <= 0xFFFFFFFF:
        raise ValueError(f"VMCS field encoding {enc:#x} is not a 32-bit value")
    return enc


def field_width(enc: int) -> FieldWidth:
    """Width of the field an encoding names (bits 14:13)."""
    return FieldWidth((_check_encoding(enc) >> 13) & 3)


def field_type(enc: int) -> FieldType:
    """Type of the field an encoding names (bits 11:10)."""
    return FieldType((_check_encoding(enc) >> 10) & 3)


def field_index(enc: int) -> int:
    """Index of the field within its width and type (bits 9:1)."""
    return (_check_encoding(enc) >> 1) & 0x1FF


def is_high(enc: int) -> bool:
    """True for a high access (bit 0 = 1): bits 63:32 of a 64-bit field."""
    return bool(_check_encoding(enc) & 1)


def is_read_only(enc: int) -> bool:
    """True for a VM-exit information (read-only data) field."""
    return field_type(enc) is FieldType.EXIT_INFO


def make_encoding(width: FieldWidth, ftype: FieldType, index: int, high: bool = False) -> int:
    """The encoding of (width, type, index, access type)."""
    if not 0 <= index <= 0x1FF:
        raise ValueError(f"field index {index} does not fit bits 9:1")
    if high and FieldWidth(width) is not FieldWidth.BITS64:
        raise ValueError("only 64-bit fields have a high access")
    return (int(width) << 13) | (int(ftype) << 10) | (index << 1) | int(high)


# --------------------------------------------------------------------------
# Derived records, enum and lookups
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One VMCS field encoding (a 64-bit field has two: full and high)."""

    name: str
    encoding: int
    width: FieldWidth
    type: FieldType
    index: int
    high: bool
    #: Bytes this encoding reads or writes: 2, 4 or 8 (4 for a high access).
    size: int
    #: The encoding of the full field (== encoding unless ``high``).
    full: int
    description: str
    requires: Requirement

    @property
    def bits(self) -> int:
        return self.size * 8

    @property
    def read_only(self) -> bool:
        return self.type is FieldType.EXIT_INFO


def _build() -> tuple[tuple[FieldInfo, ...], list[tuple[str, int]]]:
    infos: list[FieldInfo] = []
    members: list[tuple[str, int]] = []
    seen_enc: dict[int, str] = {}
    for name, enc, desc, req in TABLE:
        if enc & ENCODING_RESERVED_MASK or enc & 1:
            raise AssertionError(f"{name}: {enc:#x} is not a full-field encoding")
        w, t = field_width(enc), field_type(enc)
        variants = [(name, enc, False)]
        if w is FieldWidth.BITS64:
            variants.append((name + "_HIGH", enc | 1, True))
        for vname, venc, high in variants:
            if venc in seen_enc:
                raise AssertionError(f"{vname} and {seen_enc[venc]} share encoding {venc:#x}")
            seen_enc[venc] = vname
            size = 4 if high else WIDTH_BYTES[w]
            infos.append(FieldInfo(vname, venc, w, t, field_index(venc), high, size, enc,
                                   desc + (" (high)" if high else ""), req))
            members.append((vname, venc))
    return tuple(infos), members


#: Every encoding in table order, a 64-bit field's high access right after its full one.
ALL_FIELDS, _members = _build()

#: Every VMCS field encoding by Linux's name (``VmcsField.GUEST_RIP == 0x681E``,
#: ``VmcsField.IO_BITMAP_A_HIGH == 0x2001``).  Built from :data:`TABLE`.
VmcsField = enum.IntEnum("VmcsField", _members, module=__name__)
VmcsField.__doc__ = "Every VMCS field encoding of SDM Appendix B, by Linux's enum vmcs_field names."
del _members

_BY_ENCODING: Mapping[int, FieldInfo] = MappingProxyType({f.encoding: f for f in ALL_FIELDS})
_BY_NAME: Mapping[str, FieldInfo] = MappingProxyType({f.name: f for f in ALL_FIELDS})


def field_info(enc: int) -> Optional[FieldInfo]:
    """The field an encoding names, or None if the SDM defines no such encoding."""
    return _BY_ENCODING.get(_check_encoding(enc))


def field_by_name(name: str) -> FieldInfo:
    """The field with this Linux-style name (``"GUEST_RIP"``, ``"TSC_OFFSET_HIGH"``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no VMCS field is named {name!r}") from None


def resolve(field: Union[int, str]) -> int:
    """An encoding from an encoding, a :class:`VmcsField` or a field name."""
    if isinstance(field, str):
        return field_by_name(field).encoding
    return _check_encoding(int(field))


def field_supported(field: Union[int, str, FieldInfo], may_be_1: Mapping[str, int]) -> bool:
    """Does the field exist on a processor whose controls may be 1 as given?

    ``may_be_1`` maps a control-table name ("PINBASED", "PROCBASED",
    "PROCBASED2", "PROCBASED3", "EXIT", "EXIT2", "ENTRY", "VMFUNC") to the
    allowed-1 settings the processor reports for it.  The SDM rule (Appendix
    B footnotes): a field exists only if the processor supports the 1-setting
    of a control that uses it; fields without such a footnote always exist.
    """
    info = field if isinstance(field, FieldInfo) else field_info(resolve(field))
    if info is None:
        return False
    if not info.requires:
        return True
    return any(may_be_1.get(table, 0) & mask for table, mask in info.requires)
