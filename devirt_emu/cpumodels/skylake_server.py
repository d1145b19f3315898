"""skylake-server: Intel Xeon Scalable processor, first generation (Skylake-SP).

The default model.  CPUID signature 06_55H stepping 4 (family 6, model 0x55),
as the Intel Xeon Processor Scalable Family Specification Update lists for
the H0/M0/U0 steppings; MAXPHYADDR 46 and 48-bit linear addresses (4-level
paging; 5-level paging came with Ice Lake).

VMX (SDM Vol. 3D, Appendix A, and the per-feature "introduced with" notes of
SDM Vol. 3C): a Skylake-SP core has every control listed below, APIC
virtualization included (process posted interrupts, virtualize x2APIC mode,
APIC-register virtualization, virtual-interrupt delivery: APICv, which Linux's
``cpu_has_vmx_apicv`` and ``cpu_has_vmx_posted_intr`` find on it).  Controls
the part has but devirt-emu does not implement are not advertised: VM
functions (EPTP switching), VMCS shadowing,
ENCLS exiting, PML, EPT-violation #VE, conceal VMX from PT, mode-based
execute control for EPT, TSC scaling, the PERF_GLOBAL_CTRL and BNDCFGS
entry/exit controls, the Intel PT controls; IA32_VMX_MISC bits 14, 15, 28
and 29 (PT in VMX operation, RDMSR of SMBASE in SMM, VMXOFF blocking SMIs,
VMWRITE to exit-information fields).  EPT execute-only translations
(IA32_VMX_EPT_VPID_CAP bit 0) and injection with instruction length 0
(IA32_VMX_MISC bit 30) are advertised.  The part
does NOT have "enable user wait and pause" (WAITPKG arrived with Tremont and
Sapphire Rapids), nor tertiary controls.

CPUID advertises only what the platform implements (see
``devirt_emu/platform/cpuid.py``): MONITOR/MWAIT (``platform/monitor.py``,
leaf 5), PCID and INVPCID (``platform/pcid.py``), but no architectural PMU,
no XSAVE, no other leaf 7 feature; the maximum basic leaf is
0xB (the leaves between 2 and 0xA that a real part has are not modelled).
The VMX-preemption timer rate (IA32_VMX_MISC[4:0]) is 5 and the TSC runs at
the virtual clock's 1 GHz (a real part's nominal TSC rate is per SKU).
"""
from devirt_emu.cpumodels import CpuModel, IMPLEMENTED_VMX, bits, intel_cpuid, intel_vmx_msrs, register
from devirt_emu.vmx import controls as c

SOURCES = (
    "Intel Xeon Processor Scalable Family Specification Update (document 336065): "
    "CPUID signature 0x50654",
    "Intel 64 and IA-32 Architectures SDM Vol. 3D, Appendix A (VMX capability reporting)",
    "Intel 64 and IA-32 Architectures SDM Vol. 4, Table 2-1 and the Skylake MSR tables",
    "Linux arch/x86/include/asm/vmx.h, msr-index.h, cpufeatures.h (names)",
)

MAXPHYADDR, LINEAR_BITS = 46, 48

ALLOWED_1 = {
    "PINBASED": IMPLEMENTED_VMX["PINBASED"],
    "PROCBASED": IMPLEMENTED_VMX["PROCBASED"],
    "PROCBASED2": IMPLEMENTED_VMX["PROCBASED2"] & ~c.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE,
    "EXIT": IMPLEMENTED_VMX["EXIT"],
    "ENTRY": IMPLEMENTED_VMX["ENTRY"],
}
#: Default1 bits the TRUE MSRs report as may-be-0 (SDM A.3.2, A.4, A.5).
TRUE_CLEARABLE = {
    "PROCBASED": c.CPU_BASED_CR3_LOAD_EXITING | c.CPU_BASED_CR3_STORE_EXITING,
    "EXIT": c.VM_EXIT_SAVE_DEBUG_CONTROLS,
    "ENTRY": c.VM_ENTRY_LOAD_DEBUG_CONTROLS,
}
#: Bit 30: a software interrupt or exception may be injected with instruction
#: length 0 (Skylake and later parts).
MISC = (5 | c.VMX_MISC_SAVE_EFER_LMA | c.VMX_MISC_ACTIVITY_HLT | c.VMX_MISC_ACTIVITY_SHUTDOWN
        | c.VMX_MISC_ACTIVITY_WAIT_SIPI | (4 << c.VMX_MISC_CR3_COUNT_SHIFT)
        | c.VMX_MISC_ZERO_LEN_INS)
EPT_VPID_CAP = IMPLEMENTED_VMX["EPT_VPID_CAP"]
#: CR4 bits allowed 1 in VMX operation: VME..OSXMMEXCPT (10:0), VMXE, FSGSBASE,
#: PCIDE, OSXSAVE, SMEP, SMAP (Skylake has no UMIP; SMX is not modelled).
CR4_FIXED1 = 0x7FF | (1 << 13) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21)

#: CPUID leaf 5 (MONITOR/MWAIT): 64-byte monitor lines (EAX, EBX), MWAIT extensions
#: enumerated and interrupts as break events when masked (ECX[1:0]); EDX: two C1
#: sub-states (the only MWAIT state modelled: hints are accepted and ignored).
LEAF5 = (0x40, 0x40, 0x3, 0x20)
#: CPUID leaf 7 subleaf 0: only INVPCID (EBX[10]) of the part's structured
#: features is modelled (platform/pcid.py); EAX = 0: no further subleaves.
LEAF7 = (0, bits("invpcid", table="7.ebx"), 0, 0)

CPUID = intel_cpuid(
    max_leaf=0xB, signature=0x00050654,
    ecx1=bits("pni", "monitor", "ssse3", "cx16", "pcid", "sse4_1", "sse4_2", "x2apic", "popcnt",
              "tsc_deadline_timer", table="1.ecx"),
    edx1=bits("fpu", "pse", "tsc", "msr", "pae", "cx8", "apic", "sep", "pge", "cmov", "pat",
              "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "ht", table="1.edx"),
    ext_ecx=bits("lahf_lm", table="ext.ecx"),
    ext_edx=bits("syscall", "nx", "pdpe1gb", "rdtscp", "lm", table="ext.edx"),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS, extra={(5, 0): LEAF5, (7, 0): LEAF7})

MODEL = register(CpuModel(
    name="skylake-server", vendor="intel",
    description="Intel Xeon Scalable 1st generation (Skylake-SP, 06_55H)",
    sources=SOURCES, cpuid=CPUID,
    vmx_msrs=intel_vmx_msrs(ALLOWED_1, misc=MISC, ept_vpid_cap=EPT_VPID_CAP,
                            cr4_fixed1=CR4_FIXED1, true_clearable=TRUE_CLEARABLE),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS))
