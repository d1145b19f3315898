"""icelake-server: Intel Xeon Scalable processor, third generation (Ice Lake-SP).

CPUID signature 06_6AH stepping 6 (family 6, model 0x6A), as the 3rd
Generation Intel Xeon Scalable Processors Specification Update lists; MAXPHYADDR 46.
The part supports 5-level paging (CPUID.7.0:ECX.LA57, 57-bit linear
addresses); devirt-emu does not model 5-level paging, so LA57 is not
advertised and the linear-address width is 48 (the width without LA57).

VMX as skylake-server (the same implemented subset; see that module for what
the part has and devirt-emu does not advertise), plus CR4.UMIP may be 1 in
VMX operation (Ice Lake has UMIP).  Not advertised although the part has
them, beyond skylake-server's list: "enable user wait and pause" is absent
from Ice Lake server (it is a Tremont/Sapphire Rapids feature); PT
guest-physical addresses, sub-page write permissions and "virtualize
IA32_SPEC_CTRL"-era controls are not implemented.
"""
from devirt_emu.cpumodels import CpuModel, bits, intel_cpuid, intel_vmx_msrs, register
from devirt_emu.cpumodels import skylake_server as skx

SOURCES = (
    "3rd Generation Intel Xeon Scalable Processors Specification Update (document 637780): "
    "CPUID signature 0x606A6",
    "Intel 64 and IA-32 Architectures SDM Vol. 3D, Appendix A (VMX capability reporting)",
    "Intel 64 and IA-32 Architectures SDM Vol. 3A, 4.5 (5-level paging, CPUID.7.0:ECX[16])",
    "Linux arch/x86/include/asm/vmx.h, msr-index.h, cpufeatures.h (names)",
)

MAXPHYADDR, LINEAR_BITS = 46, 48
CR4_FIXED1 = skx.CR4_FIXED1 | (1 << 11)          # + UMIP

CPUID = intel_cpuid(
    max_leaf=0xB, signature=0x000606A6,
    ecx1=skx.CPUID[(1, 0)][2], edx1=skx.CPUID[(1, 0)][3],
    ext_ecx=bits("lahf_lm", table="ext.ecx"),
    ext_edx=bits("syscall", "nx", "pdpe1gb", "rdtscp", "lm", table="ext.edx"),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS, extra={(5, 0): skx.LEAF5, (7, 0): skx.LEAF7})

MODEL = register(CpuModel(
    name="icelake-server", vendor="intel",
    description="Intel Xeon Scalable 3rd generation (Ice Lake-SP, 06_6AH)",
    sources=SOURCES, cpuid=CPUID,
    vmx_msrs=intel_vmx_msrs(skx.ALLOWED_1, misc=skx.MISC, ept_vpid_cap=skx.EPT_VPID_CAP,
                            cr4_fixed1=CR4_FIXED1, true_clearable=skx.TRUE_CLEARABLE),
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS,
    notes=("5-level paging not modelled: LA57 cleared, linear-address width 48",)))
