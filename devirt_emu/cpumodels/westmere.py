"""westmere: Intel Xeon 5600 series (Westmere-EP).

CPUID signature 06_2CH stepping 2 (family 6, model 0x2C), as the Intel Xeon
Processor 5600 Series Specification Update lists; MAXPHYADDR 40, 48-bit
linear addresses; AES-NI and PCLMULQDQ are not modelled.  1-GiB pages
(CPUID.80000001H:EDX[26]) and PCID (CPUID.01H:ECX[17]) are supported;
INVPCID is not (Haswell and later).

VMX: nehalem's, plus unrestricted guest and PAUSE-loop exiting (both
introduced with Westmere) and "store EFER.LMA" (IA32_VMX_MISC bit 5).
Still no EPT accessed/dirty flags (Haswell) and no 1-GiB EPT pages.  For a
part without unrestricted guest choose ``nehalem``.
"""
from devirt_emu.cpumodels import CpuModel, bits, intel_cpuid, intel_vmx_msrs, register
from devirt_emu.cpumodels import nehalem as nhm
from devirt_emu.cpumodels import skylake_server as skx
from devirt_emu.vmx import controls as c

SOURCES = (
    "Intel Xeon Processor 5600 Series Specification Update (document 323372): "
    "CPUID signature 0x206C2",
    "Intel 64 and IA-32 Architectures SDM Vol. 3D, Appendix A (VMX capability reporting)",
    "Linux arch/x86/include/asm/vmx.h, msr-index.h, cpufeatures.h (names)",
)

MAXPHYADDR, LINEAR_BITS = 40, 48
ALLOWED_1 = dict(nhm.ALLOWED_1)
ALLOWED_1["PROCBASED2"] |= c.SECONDARY_EXEC_UNRESTRICTED_GUEST | c.SECONDARY_EXEC_PAUSE_LOOP_EXITING
MISC = nhm.MISC | c.VMX_MISC_SAVE_EFER_LMA

CPUID = intel_cpuid(
    max_leaf=0xB, signature=0x000206C2,
    ecx1=nhm.CPUID[(1, 0)][2] | bits("pcid", table="1.ecx"), edx1=nhm.CPUID[(1, 0)][3],
    ext_ecx=bits("lahf_lm", table="ext.ecx"),
    ext_edx=bits("syscall", "nx", "pdpe1gb", "rdtscp", "lm", table="ext.edx"),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS, extra={(5, 0): nhm.CPUID[(5, 0)]})

MODEL = register(CpuModel(
    name="westmere", vendor="intel",
    description="Intel Xeon 5600 (Westmere-EP, 06_2CH): unrestricted guest, no EPT A/D",
    sources=SOURCES, cpuid=CPUID,
    vmx_msrs=intel_vmx_msrs(ALLOWED_1, misc=MISC, ept_vpid_cap=nhm.EPT_VPID_CAP,
                            cr4_fixed1=nhm.MODEL.vmx_msrs[0x489] | (1 << 17),   # + PCIDE
                            true_clearable=skx.TRUE_CLEARABLE),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS,
    notes=nhm.MODEL.notes))
