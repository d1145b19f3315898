"""nehalem: Intel Xeon 5500 series (Nehalem-EP), the first part with EPT and VPID.

CPUID signature 06_1AH stepping 5 (family 6, model 0x1A), as the Intel Xeon
Processor 5500 Series Specification Update lists; MAXPHYADDR 40, 48-bit
linear addresses.  No x2APIC, no TSC-deadline timer (both came with later
parts; CPUID does not advertise them, so IA32_TSC_DEADLINE and the x2APIC
MSRs #GP), no 1-GiB pages.

VMX: EPT (4-level, WB and UC, execute-only translations, 2-MiB pages,
INVEPT single/all-context) and
VPID with INVVPID, but NOT unrestricted guest (introduced with Westmere), NOT
EPT accessed/dirty flags (introduced with Haswell), no 1-GiB EPT pages, no
PAUSE-loop exiting (Westmere), no RDRAND/RDSEED exiting, INVPCID or
XSAVES controls (their instructions came later), NOT APIC-register
virtualization, virtual-interrupt delivery or posted interrupts (APICv came
with Ivy Bridge-EP); IA32_VMX_MISC does not report "store EFER.LMA" (bit 5,
Westmere and later) nor injection with instruction length 0 (bit 30, Skylake
and later).  It has "virtualize x2APIC mode" (advertised).  Not implemented
by devirt-emu and so not advertised although the part has them: the
PERF_GLOBAL_CTRL controls.
"""
from devirt_emu.cpumodels import CpuModel, bits, intel_cpuid, intel_vmx_msrs, register
from devirt_emu.cpumodels import skylake_server as skx
from devirt_emu.vmx import controls as c

SOURCES = (
    "Intel Xeon Processor 5500 Series Specification Update (document 321324): "
    "CPUID signature 0x106A5",
    "Intel 64 and IA-32 Architectures SDM Vol. 3D, Appendix A (VMX capability reporting)",
    "Intel 64 and IA-32 Architectures SDM Vol. 3C, 26.6 (unrestricted guest, EPT A/D flags: "
    "availability by IA32_VMX_PROCBASED_CTLS2 and IA32_VMX_EPT_VPID_CAP)",
    "Linux arch/x86/include/asm/vmx.h, msr-index.h, cpufeatures.h (names)",
)

MAXPHYADDR, LINEAR_BITS = 40, 48

ALLOWED_1 = dict(skx.ALLOWED_1)
ALLOWED_1["PINBASED"] = skx.ALLOWED_1["PINBASED"] & ~c.PIN_BASED_POSTED_INTR
ALLOWED_1["PROCBASED2"] = (c.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | c.SECONDARY_EXEC_ENABLE_EPT
                           | c.SECONDARY_EXEC_DESC | c.SECONDARY_EXEC_ENABLE_RDTSCP
                           | c.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
                           | c.SECONDARY_EXEC_ENABLE_VPID | c.SECONDARY_EXEC_WBINVD_EXITING)
MISC = (skx.MISC & ~(c.VMX_MISC_SAVE_EFER_LMA | c.VMX_MISC_ZERO_LEN_INS))
EPT_VPID_CAP = skx.EPT_VPID_CAP & ~(c.VMX_EPT_AD_BIT | c.VMX_EPT_1GB_PAGE_BIT)

CPUID = intel_cpuid(
    max_leaf=0xB, signature=0x000106A5,
    ecx1=bits("pni", "monitor", "ssse3", "cx16", "sse4_1", "sse4_2", "popcnt", table="1.ecx"),
    edx1=skx.CPUID[(1, 0)][3],
    ext_ecx=bits("lahf_lm", table="ext.ecx"),
    ext_edx=bits("syscall", "nx", "rdtscp", "lm", table="ext.edx"),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS, extra={(5, 0): skx.LEAF5})

MODEL = register(CpuModel(
    name="nehalem", vendor="intel",
    description="Intel Xeon 5500 (Nehalem-EP, 06_1AH): EPT and VPID, no unrestricted guest",
    sources=SOURCES, cpuid=CPUID,
    vmx_msrs=intel_vmx_msrs(ALLOWED_1, misc=MISC, ept_vpid_cap=EPT_VPID_CAP,
                            cr4_fixed1=skx.CR4_FIXED1 & ~((1 << 16) | (1 << 17) | (1 << 18)
                                                          | (1 << 20) | (1 << 21)),
                            true_clearable=skx.TRUE_CLEARABLE),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS,
    notes=("no x2APIC and no TSC-deadline timer: the firmware (firmware/boot.S) needs both, "
           "so guest programs run only with +x2apic,+tsc_deadline_timer; the case API needs "
           "neither",)))
