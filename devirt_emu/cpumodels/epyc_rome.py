"""epyc_rome: AMD EPYC 7002 series (Rome, Zen 2), the model for ``--arch svm``.

CPUID signature family 17h model 31h stepping 0 (Fn0000_0001_EAX 0x00830F10,
as AMD's Processor Programming Reference for family 17h model 31h gives it),
vendor "AuthenticAMD", MAXPHYADDR 48 (without SME), 48-bit linear addresses.
No VMX capability MSRs: AMD has SVM (Fn8000_0001_ECX[2]) and leaf Fn8000_000A
(SVM revision 1, 32768 ASIDs), of whose features only those devirt-emu gives
semantics to are advertised: nested paging, NRIP save, flush by ASID, decode
assists, the PAUSE filter and its threshold.  The part also has LBR
virtualization, SVM lock, VMCB clean bits, virtual VMLOAD/VMSAVE, vGIF and
AVIC, which devirt-emu does not model (their bits are clear).  VM_CR and
VM_HSAVE_PA exist with SVM (platform/msrs.py).

One deviation, as on KVM: the TSC-deadline timer (Fn0000_0001_ECX[24]) is
advertised although EPYC parts have none; KVM emulates it for its guests on
AMD hosts, and the firmware uses it (this model's L0 emulates the guest's on
the platform's).
"""
from devirt_emu.cpumodels import CpuModel, bits, register

SOURCES = (
    "AMD Processor Programming Reference (PPR) for AMD Family 17h Model 31h (Rome): "
    "CPUID Fn0000_0001_EAX 0x00830F10, Fn8000_0008_EAX address sizes",
    "AMD64 Architecture Programmer's Manual Vol. 3, Appendix E (CPUID Fn8000_000A)",
    "AMD64 Architecture Programmer's Manual Vol. 2, 15.4 and 15.30 (SVM enable, SVM MSRs)",
    "Linux arch/x86/include/asm/cpufeatures.h (feature names)",
)

MAXPHYADDR, LINEAR_BITS = 48, 48
SIGNATURE = 0x00830F10
_AUTHENTIC_AMD = (0x68747541, 0x444D4163, 0x69746E65)   # "Auth", "cAMD", "enti" as EBX, ECX, EDX
SVM_REVISION, NASID = 1, 0x8000

CPUID = {
    (0, 0): (0xB, *_AUTHENTIC_AMD),
    (1, 0): (SIGNATURE, 8 << 8,
             bits("pni", "ssse3", "cx16", "sse4_1", "sse4_2", "x2apic", "popcnt",
                  "tsc_deadline_timer", table="1.ecx"),
             bits("fpu", "pse", "tsc", "msr", "pae", "cx8", "apic", "sep", "pge", "cmov", "pat",
                  "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "ht", table="1.edx")),
    (0xB, 0): (0, 0, 0, 0),
    (0x80000000, 0): (0x8000000A, *_AUTHENTIC_AMD),
    (0x80000001, 0): (SIGNATURE, 0, bits("lahf_lm", "svm", table="ext.ecx"),
                      bits("syscall", "nx", "pdpe1gb", "rdtscp", "lm", table="ext.edx")),
    (0x80000008, 0): (LINEAR_BITS << 8 | MAXPHYADDR, 0, 0, 0),
    # Fn8000_000A: EAX SVM revision, EBX NASID, EDX the modelled features
    (0x8000000A, 0): (SVM_REVISION, NASID, 0,
                      (1 << 0) | (1 << 3) | (1 << 6) | (1 << 7) | (1 << 10) | (1 << 12)),
}

MODEL = register(CpuModel(
    name="epyc-rome", vendor="amd",
    description="AMD EPYC 7002 (Rome, family 17h model 31h): SVM with NPT, NRIPS, decode assists",
    sources=SOURCES, cpuid=CPUID, vmx_msrs={},
    maxphyaddr=MAXPHYADDR, linear_bits=LINEAR_BITS,
    notes=("TSC-deadline advertised as KVM does for its guests on AMD (the part has none)",)))
