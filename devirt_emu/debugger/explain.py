"""Explanations: what a VMX control bit or field does, and why an exit fired
(or did not) given the rule's Decision and its cause.

The cause lines are the rules' own (``devirt_emu.vmx.rules``); this module
derives what a user needs next from them: where an MSR-bitmap or I/O-bitmap
bit lives in memory, which CR bits differ between the new value and the read
shadow under the guest/host mask, which exception and which #PF error-code
bits the exception-bitmap test looked at.  Control-bit descriptions are
written after the SDM Vol. 3C chapter "Virtual Machine Control Structures"
(the tables of pin-based, processor-based, VM-exit and VM-entry controls).
"""
from __future__ import annotations

import re
from typing import Optional

from .. import x86
from ..vmx import exit_reasons as ER
from ..vmx import rules as R
from ..vmx.fields import VmcsField as F
from .state import CR0_BITS, CR4_BITS

VECTOR_NAMES = x86.EXCEPTION_NAMES
#: #PF error-code bits (SDM Vol. 3A "Interrupt 14 - Page-Fault Exception").
PFEC_BITS = (("P", 0), ("W/R", 1), ("U/S", 2), ("RSVD", 3), ("I/D", 4), ("PK", 5), ("SS", 6),
             ("HLAT", 7), ("SGX", 15))

#: What each control bit does, one line each (SDM Vol. 3C, the control tables).
CONTROL_DOCS = {
    "PIN_BASED_EXT_INTR_MASK": "External interrupts cause VM exits instead of being delivered "
                               "through the guest IDT.",
    "PIN_BASED_NMI_EXITING": "NMIs cause VM exits instead of being delivered through the guest IDT.",
    "PIN_BASED_VIRTUAL_NMIS": "NMI blocking is tracked as virtual-NMI blocking (needs NMI "
                              "exiting); enables NMI-window exiting.",
    "PIN_BASED_VMX_PREEMPTION_TIMER": "The VMX-preemption timer counts down in non-root operation "
                                      "and causes a VM exit at 0.",
    "PIN_BASED_POSTED_INTR": "Interrupts with the posted-interrupt notification vector are "
                             "processed from the posted-interrupt descriptor, not exited on.",
    "CPU_BASED_INTR_WINDOW_EXITING": "A VM exit at the start of any instruction where RFLAGS.IF=1 "
                                     "and nothing blocks interrupts.",
    "CPU_BASED_USE_TSC_OFFSETTING": "RDTSC/RDTSCP (and IA32_TIME_STAMP_COUNTER reads) return the "
                                    "TSC plus TSC_OFFSET.",
    "CPU_BASED_HLT_EXITING": "HLT causes a VM exit.",
    "CPU_BASED_INVLPG_EXITING": "INVLPG causes a VM exit.",
    "CPU_BASED_MWAIT_EXITING": "MWAIT causes a VM exit.",
    "CPU_BASED_RDPMC_EXITING": "RDPMC causes a VM exit.",
    "CPU_BASED_RDTSC_EXITING": "RDTSC and RDTSCP cause VM exits.",
    "CPU_BASED_CR3_LOAD_EXITING": "MOV to CR3 exits unless the value is one of the CR3-target "
                                  "values (CR3_TARGET_COUNT of them).",
    "CPU_BASED_CR3_STORE_EXITING": "MOV from CR3 causes a VM exit.",
    "CPU_BASED_ACTIVATE_TERTIARY_CONTROLS": "The tertiary processor-based controls are used.",
    "CPU_BASED_CR8_LOAD_EXITING": "MOV to CR8 causes a VM exit.",
    "CPU_BASED_CR8_STORE_EXITING": "MOV from CR8 causes a VM exit.",
    "CPU_BASED_TPR_SHADOW": "TPR virtualization through the virtual-APIC page (CR8 accesses "
                            "read and write VTPR).",
    "CPU_BASED_NMI_WINDOW_EXITING": "A VM exit at the start of any instruction where there is no "
                                    "virtual-NMI blocking.",
    "CPU_BASED_MOV_DR_EXITING": "MOV to and from debug registers cause VM exits.",
    "CPU_BASED_UNCOND_IO_EXITING": "Every I/O instruction exits (ignored when I/O bitmaps are used).",
    "CPU_BASED_USE_IO_BITMAPS": "I/O bitmaps A (ports 0-0x7FFF) and B (0x8000-0xFFFF) decide "
                                "which ports exit: a set bit for any byte of the access exits.",
    "CPU_BASED_MONITOR_TRAP_FLAG": "A VM exit after each instruction (monitor trap flag).",
    "CPU_BASED_USE_MSR_BITMAPS": "The 4 KiB MSR bitmap decides which RDMSR/WRMSR exit (read-low at "
                                 "+0, read-high +0x400, write-low +0x800, write-high +0xC00; "
                                 "MSRs outside both ranges always exit).",
    "CPU_BASED_MONITOR_EXITING": "MONITOR causes a VM exit.",
    "CPU_BASED_PAUSE_EXITING": "PAUSE causes a VM exit.",
    "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS": "The secondary processor-based controls are used.",
    "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES": "Accesses to the APIC-access page are virtualized "
                                               "(APIC-access VM exits or the virtual-APIC page).",
    "SECONDARY_EXEC_ENABLE_EPT": "Extended page tables: guest-physical addresses are translated "
                                 "through the EPT at EPT_POINTER.",
    "SECONDARY_EXEC_DESC": "LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT, STR cause VM exits.",
    "SECONDARY_EXEC_ENABLE_RDTSCP": "RDTSCP is allowed (else #UD).",
    "SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE": "x2APIC MSR accesses to the TPR go to the "
                                             "virtual-APIC page.",
    "SECONDARY_EXEC_ENABLE_VPID": "Cached translations are tagged with VIRTUAL_PROCESSOR_ID.",
    "SECONDARY_EXEC_WBINVD_EXITING": "WBINVD and WBNOINVD cause VM exits.",
    "SECONDARY_EXEC_UNRESTRICTED_GUEST": "The guest may run unpaged or in real mode (needs EPT).",
    "SECONDARY_EXEC_APIC_REGISTER_VIRT": "APIC register reads are satisfied from the "
                                         "virtual-APIC page.",
    "SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY": "Virtual-interrupt delivery through RVI/SVI.",
    "SECONDARY_EXEC_PAUSE_LOOP_EXITING": "A PAUSE loop at CPL 0 longer than PLE_WINDOW (PAUSEs "
                                         "at most PLE_GAP apart) causes a VM exit.",
    "SECONDARY_EXEC_RDRAND_EXITING": "RDRAND causes a VM exit.",
    "SECONDARY_EXEC_ENABLE_INVPCID": "INVPCID is allowed (else #UD).",
    "SECONDARY_EXEC_ENABLE_VMFUNC": "VMFUNC is allowed.",
    "SECONDARY_EXEC_SHADOW_VMCS": "VMREAD/VMWRITE may access a shadow VMCS (bitmaps decide).",
    "SECONDARY_EXEC_RDSEED_EXITING": "RDSEED causes a VM exit.",
    "SECONDARY_EXEC_ENABLE_XSAVES": "XSAVES/XRSTORS are allowed (the XSS-exiting bitmap decides).",
    "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE": "TPAUSE, UMONITOR, UMWAIT are allowed.",
    "VM_EXIT_SAVE_DEBUG_CONTROLS": "DR7 and IA32_DEBUGCTL are saved on VM exit.",
    "VM_EXIT_HOST_ADDR_SPACE_SIZE": "The host runs in 64-bit mode after VM exit.",
    "VM_EXIT_ACK_INTR_ON_EXIT": "An external-interrupt exit acknowledges the interrupt and stores "
                                "its vector in the exit interruption information.",
    "VM_EXIT_SAVE_IA32_PAT": "IA32_PAT is saved on VM exit.",
    "VM_EXIT_LOAD_IA32_PAT": "IA32_PAT is loaded from HOST_IA32_PAT on VM exit.",
    "VM_EXIT_SAVE_IA32_EFER": "IA32_EFER is saved on VM exit.",
    "VM_EXIT_LOAD_IA32_EFER": "IA32_EFER is loaded from HOST_IA32_EFER on VM exit.",
    "VM_EXIT_SAVE_VMX_PREEMPTION_TIMER": "The preemption timer's value is saved on VM exit.",
    "VM_ENTRY_LOAD_DEBUG_CONTROLS": "DR7 and IA32_DEBUGCTL are loaded on VM entry.",
    "VM_ENTRY_IA32E_MODE": "The guest is in IA-32e mode after VM entry (EFER.LMA).",
    "VM_ENTRY_SMM": "Entry to SMM (dual-monitor treatment only).",
    "VM_ENTRY_LOAD_IA32_PAT": "IA32_PAT is loaded from GUEST_IA32_PAT on VM entry.",
    "VM_ENTRY_LOAD_IA32_EFER": "IA32_EFER is loaded from GUEST_IA32_EFER on VM entry.",
    "SECONDARY_EXEC_ENCLS_EXITING": "ENCLS leaf functions exit as the ENCLS-exiting bitmap says.",
    "SECONDARY_EXEC_ENABLE_PML": "Page-modification logging: the GPA of each page whose EPT dirty "
                                 "flag gets set is logged to the PML buffer.",
    "SECONDARY_EXEC_EPT_VIOLATION_VE": "Some EPT violations become virtualization exceptions "
                                       "(#VE) in the guest instead of VM exits.",
    "SECONDARY_EXEC_PT_CONCEAL_VMX": "Intel PT hides that the processor is in non-root operation.",
    "SECONDARY_EXEC_PASID_TRANSLATION": "ENQCMD/ENQCMDS PASIDs are translated through the PASID "
                                        "directory.",
    "SECONDARY_EXEC_MODE_BASED_EPT_EXEC": "EPT execute permission is split into supervisor and "
                                          "user-mode execute bits.",
    "SECONDARY_EXEC_EPT_SUB_PAGE_WRITE": "EPT write permission may be given per 128-byte sub-page.",
    "SECONDARY_EXEC_PT_USE_GPA": "Intel PT output addresses are guest-physical (translated by EPT).",
    "SECONDARY_EXEC_TSC_SCALING": "RDTSC/RDTSCP results are multiplied by TSC_MULTIPLIER before "
                                  "the offset is added.",
    "SECONDARY_EXEC_ENABLE_PCONFIG": "PCONFIG is allowed (else #UD).",
    "SECONDARY_EXEC_ENCLV_EXITING": "ENCLV leaf functions exit as the ENCLV-exiting bitmap says.",
    "SECONDARY_EXEC_BUS_LOCK_DETECTION": "A bus lock causes a VM exit (after the instruction).",
    "SECONDARY_EXEC_NOTIFY_VM_EXITING": "An instruction that blocks event windows longer than the "
                                        "notify window causes a VM exit.",
    "TERTIARY_EXEC_LOADIWKEY_EXITING": "LOADIWKEY causes a VM exit.",
    "TERTIARY_EXEC_ENABLE_HLAT": "Hypervisor-managed linear-address translation.",
    "TERTIARY_EXEC_EPT_PAGING_WRITE": "EPT paging-write control for guest paging-structure updates.",
    "TERTIARY_EXEC_GUEST_PAGING_VERIFY": "Guest-paging verification of EPT mappings.",
    "TERTIARY_EXEC_IPI_VIRT": "IPI virtualization: ICR writes are sent through the PID-pointer "
                              "table without a VM exit.",
    "TERTIARY_EXEC_VIRT_SPEC_CTRL": "IA32_SPEC_CTRL is virtualized with a mask and a shadow.",
    "VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL": "IA32_PERF_GLOBAL_CTRL is loaded from the host field on "
                                          "VM exit.",
    "VM_EXIT_CLEAR_BNDCFGS": "IA32_BNDCFGS is cleared on VM exit.",
    "VM_EXIT_PT_CONCEAL_PIP": "Intel PT hides the VM exit (no PIP packet).",
    "VM_EXIT_CLEAR_IA32_RTIT_CTL": "IA32_RTIT_CTL is cleared on VM exit.",
    "VM_EXIT_CLEAR_IA32_LBR_CTL": "IA32_LBR_CTL is cleared on VM exit.",
    "VM_EXIT_CLEAR_UINV": "The user-interrupt notification vector is cleared on VM exit.",
    "VM_EXIT_LOAD_CET_STATE": "The host's CET state is loaded on VM exit.",
    "VM_EXIT_LOAD_IA32_PKRS": "IA32_PKRS is loaded from the host field on VM exit.",
    "VM_EXIT_SAVE_IA32_PERF_GLOBAL_CTRL": "IA32_PERF_GLOBAL_CTRL is saved on VM exit.",
    "VM_EXIT_ACTIVATE_SECONDARY_CONTROLS": "The secondary VM-exit controls are used.",
    "SECONDARY_VM_EXIT_SAVE_IA32_FRED": "The guest's FRED MSRs are saved on VM exit.",
    "SECONDARY_VM_EXIT_LOAD_IA32_FRED": "The host's FRED MSRs are loaded on VM exit.",
    "VM_ENTRY_DEACT_DUAL_MONITOR": "Deactivate the dual-monitor treatment (SMM only).",
    "VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL": "IA32_PERF_GLOBAL_CTRL is loaded from the guest field "
                                           "on VM entry.",
    "VM_ENTRY_LOAD_BNDCFGS": "IA32_BNDCFGS is loaded from the guest field on VM entry.",
    "VM_ENTRY_PT_CONCEAL_PIP": "Intel PT hides the VM entry (no PIP packet).",
    "VM_ENTRY_LOAD_IA32_RTIT_CTL": "IA32_RTIT_CTL is loaded from the guest field on VM entry.",
    "VM_ENTRY_LOAD_UINV": "The user-interrupt notification vector is loaded on VM entry.",
    "VM_ENTRY_LOAD_CET_STATE": "The guest's CET state is loaded on VM entry.",
    "VM_ENTRY_LOAD_IA32_LBR_CTL": "IA32_LBR_CTL is loaded from the guest field on VM entry.",
    "VM_ENTRY_LOAD_IA32_PKRS": "IA32_PKRS is loaded from the guest field on VM entry.",
    "VM_ENTRY_LOAD_IA32_FRED": "The guest's FRED MSRs are loaded on VM entry.",
    "VMX_VMFUNC_EPTP_SWITCHING": "VM function 0: the guest may switch to another EPTP of the "
                                 "EPTP list.",
    "GUEST_INTR_STATE_ENCLAVE_INTR": "The VM exit came from inside an enclave (SGX).",
    "GUEST_INTR_STATE_STI": "Blocking by STI: interrupts are blocked for one instruction.",
    "GUEST_INTR_STATE_MOV_SS": "Blocking by MOV SS/POP SS for one instruction.",
    "GUEST_INTR_STATE_SMI": "Blocking by SMI.",
    "GUEST_INTR_STATE_NMI": "Blocking by NMI (or virtual-NMI blocking).",
}

#: A few fields whose role is worth more than their SDM name.
FIELD_DOCS = {
    "EXCEPTION_BITMAP": "Bit n set: exception n exits (for #PF, combined with the error-code "
                        "mask/match test: exits iff (PFEC & MASK) == MATCH when bit 14 is 1, and "
                        "iff not equal when it is 0).",
    "CR0_GUEST_HOST_MASK": "Bits set are host-owned: a MOV to CR0 that would change one of them "
                           "relative to CR0_READ_SHADOW exits; guest reads of them see the shadow.",
    "CR4_GUEST_HOST_MASK": "As CR0_GUEST_HOST_MASK, for CR4 and CR4_READ_SHADOW.",
    "CR0_READ_SHADOW": "What the guest reads for the host-owned CR0 bits.",
    "CR4_READ_SHADOW": "What the guest reads for the host-owned CR4 bits.",
    "MSR_BITMAP": "Host-physical address of the 4 KiB MSR bitmap (used with "
                  "CPU_BASED_USE_MSR_BITMAPS).",
    "IO_BITMAP_A": "Host-physical address of the bitmap of ports 0-0x7FFF.",
    "IO_BITMAP_B": "Host-physical address of the bitmap of ports 0x8000-0xFFFF.",
    "PAGE_FAULT_ERROR_CODE_MASK": "With PAGE_FAULT_ERROR_CODE_MATCH, filters which #PF exit "
                                  "(see EXCEPTION_BITMAP).",
    "PAGE_FAULT_ERROR_CODE_MATCH": "See PAGE_FAULT_ERROR_CODE_MASK.",
    "VM_EXIT_REASON": "Bits 15:0 the basic exit reason; bit 31 a VM-entry failure.",
    "EXIT_QUALIFICATION": "Reason-specific detail of the exit (port, CR number, address...).",
}


def rule_name(d, event) -> str:
    """Where the decision was made."""
    if d.reason in (ER.BY_NAME["EPT_VIOLATION"].number, ER.BY_NAME["EPT_MISCONFIG"].number):
        return "devirt_emu.vmx.ept.ept_walk (the EPT walk of the access)"
    if event is None:
        if d.name in ("INVALID_STATE", "MSR_LOAD_FAIL", "MCE_DURING_VMENTRY"):
            return "devirt_emu.vmx.entry (the VM-entry checks)"
        return "devirt_emu.vmx.rules.boundary_exit (exits on an instruction boundary)"
    rule = R.RULES.get(event.kind)
    name = getattr(rule, "__qualname__", "")
    where = f"devirt_emu.vmx.rules.{name.split('.')[0]}" if name else "devirt_emu.vmx.rules"
    return f"{where} for a {event.kind.value} event at {event.rip:#x}"


def _control_detail(line: str, vmcs) -> Optional[str]:
    from .views import CONTROL_BITS
    m = re.match(r"([A-Z0-9_]+)=([01])\b", line)
    if m is None or m.group(1) not in CONTROL_BITS:
        return None
    fname, mask = CONTROL_BITS[m.group(1)]
    value = vmcs.get(getattr(F, fname))
    return (f"{m.group(1)} is bit {mask.bit_length() - 1} of {fname} "
            f"(now {value:#x}, bit {value >> (mask.bit_length() - 1) & 1})")


_MSR_QUARTERS = {"read-low": (0x000, 0), "read-high": (0x400, 0xC0000000),
                 "write-low": (0x800, 0), "write-high": (0xC00, 0xC0000000)}


def _bitmap_detail(line: str, vmcs) -> Optional[str]:
    m = re.search(r"MSR bitmap (\S+) bit (0x[0-9a-f]+|\d+)=(\d)", line)
    if m is not None:
        off, msr_base = _MSR_QUARTERS[m.group(1)]
        n = int(m.group(2), 0)
        base = vmcs.get(F.MSR_BITMAP)
        return (f"MSR {msr_base + n:#x}: its {m.group(1)} bit is byte {base + off + (n >> 3):#x} "
                f"(MSR_BITMAP {base:#x} + {off:#x} + {n >> 3:#x}), bit {n & 7}; it is {m.group(3)}")
    m = re.search(r"I/O bitmap ([AB]) bit (0x[0-9a-f]+|\d+)=(\d)", line)
    if m is not None:
        port = int(m.group(2), 0)
        fname = "IO_BITMAP_A" if m.group(1) == "A" else "IO_BITMAP_B"
        base = vmcs.get(getattr(F, fname))
        n = port & 0x7FFF
        return (f"port {port:#x}: byte {base + (n >> 3):#x} ({fname} {base:#x} + {n >> 3:#x}), "
                f"bit {n & 7}; it is {m.group(3)}")
    return None


def _cr_detail(cause: tuple) -> list[str]:
    text = " ".join(cause)
    m = re.search(r"CR([04])_GUEST_HOST_MASK=(0x[0-9a-f]+)", text)
    s = re.search(r"CR[04]_READ_SHADOW=(0x[0-9a-f]+)", text)
    v = re.search(r"new CR[04] (0x[0-9a-f]+)", text)
    if not (m and s and v):
        return []
    cr, mask, shadow, new = int(m.group(1)), int(m.group(2), 0), int(s.group(1), 0), int(v.group(1), 0)
    table = CR0_BITS if cr == 0 else CR4_BITS
    names = dict((b, n) for n, b in table)
    out = []
    for bit in range(64):
        if mask >> bit & 1:
            differs = (new ^ shadow) >> bit & 1
            if differs:
                out.append(f"CR{cr}.{names.get(bit, f'bit{bit}')} (bit {bit}) is host-owned "
                           f"(mask 1): new {new >> bit & 1} vs shadow {shadow >> bit & 1}: differs")
    if not out:
        owned = [names.get(b, f"bit{b}") for b in range(64) if mask >> b & 1]
        out.append(f"host-owned CR{cr} bits {', '.join(owned) or 'none'}: new value equals "
                   "the shadow in all of them")
    return out


def _exception_detail(cause: tuple) -> list[str]:
    out = []
    for line in cause:
        m = re.search(r"EXCEPTION_BITMAP bit (\d+)=(\d)", line)
        if m:
            v = int(m.group(1))
            out.append(f"vector {v} is {VECTOR_NAMES.get(v, 'exception')}; its "
                       f"EXCEPTION_BITMAP bit is {m.group(2)}")
        m = re.search(r"PFEC (0x[0-9a-f]+)", line)
        if m:
            pfec = int(m.group(1), 0)
            bits = [n for n, b in PFEC_BITS if pfec >> b & 1]
            out.append(f"the #PF error code {pfec:#x} has {' '.join(bits) or 'no bits'} set")
    return out


def details(cause: tuple, vmcs) -> list[str]:
    out = []
    for line in cause:
        for fn in (_control_detail, _bitmap_detail):
            d = fn(line, vmcs)
            if d:
                out.append(d)
    return out + _cr_detail(cause) + _exception_detail(cause)


def explain_exit(d, event, vmcs):
    from .views import Explanation
    head = f"VM exit {d.name} (reason {d.reason}), qualification {d.qualification:#x}"
    return Explanation(head, rule_name(d, event), tuple(d.cause), details(tuple(d.cause), vmcs))


def explain_no_exit(d, event, vmcs):
    from .views import Explanation
    what = event.kind.value + (f" (vector {event.vector})" if event.vector is not None else "")
    head = f"no VM exit for {what} at {event.rip:#x}"
    return Explanation(head, rule_name(d, event), tuple(d.cause), details(tuple(d.cause), vmcs))
