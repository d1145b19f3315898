"""sapphire-rapids: Intel Xeon Scalable processor, fourth generation (Sapphire Rapids).

CPUID signature 06_8FH stepping 8 (family 6, model 0x8F), as the 4th
Generation Intel Xeon Scalable Processors Specification Update lists;
MAXPHYADDR 46.  Like Ice Lake the part has 5-level paging, which devirt-emu
does not model: LA57 is not advertised and the linear-address width is 48.

VMX: skylake-server's implemented subset plus "enable user wait and pause"
(SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE, with WAITPKG), which Sapphire Rapids
has; CR4.UMIP may be 1.  The part also has tertiary controls (IPI
virtualization, HLAT), bus-lock detection and notify VM exits, which
devirt-emu does not implement and so does not advertise (with the
skylake-server list).  CPUID.7.0:ECX.WAITPKG is not advertised: UMONITOR,
UMWAIT and TPAUSE are not implemented natively.
"""
from devirt_emu.cpumodels import CpuModel, bits, intel_cpuid, intel_vmx_msrs, register
from devirt_emu.cpumodels import skylake_server as skx
from devirt_emu.vmx import controls as c

SOURCES = (
    "4th Generation Intel Xeon Scalable Processors Specification Update (document 772415): "
    "CPUID signature 0x806F8",
    "Intel 64 and IA-32 Architectures SDM Vol. 3D, Appendix A (VMX capability reporting)",
    "Intel 64 and IA-32 Architectures SDM Vol. 3C, 26.6.2 (enable user wait and pause)",
    "Linux arch/x86/include/asm/vmx.h, msr-index.h, cpufeatures.h (names)",
)

MAXPHYADDR, LINEAR_BITS = 46, 48
CR4_FIXED1 = skx.CR4_FIXED1 | (1 << 11)          # + UMIP
ALLOWED_1 = dict(skx.ALLOWED_1)
ALLOWED_1["PROCBASED2"] |= c.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE

CPUID = intel_cpuid(
    max_leaf=0xB, signature=0x000806F8,
    ecx1=skx.CPUID[(1, 0)][2], edx1=skx.CPUID[(1, 0)][3],
    ext_ecx=bits("lahf_lm", table="ext.ecx"),
    ext_edx=bits("syscall", "nx", "pdpe1gb", "rdtscp", "lm", table="ext.edx"),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS, extra={(5, 0): skx.LEAF5, (7, 0): skx.LEAF7})

MODEL = register(CpuModel(
    name="sapphire-rapids", vendor="intel",
    description="Intel Xeon Scalable 4th generation (Sapphire Rapids, 06_8FH)",
    sources=SOURCES, cpuid=CPUID,
    vmx_msrs=intel_vmx_msrs(ALLOWED_1, misc=skx.MISC, ept_vpid_cap=skx.EPT_VPID_CAP,
                            cr4_fixed1=CR4_FIXED1, true_clearable=skx.TRUE_CLEARABLE),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS,
    notes=("5-level paging not modelled: LA57 cleared, linear-address width 48",)))
