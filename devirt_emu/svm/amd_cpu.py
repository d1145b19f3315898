"""What SVM reads about the processor: the SVM feature bits, the SVM MSRs, the
EFER and CR4 bits VMRUN checks, and :class:`SvmCaps`, built from a CPU model.

The numbers of a part (its CPUID leaves, MAXPHYADDR, NASID, which SVM
features it has) are data in its CPU model (``devirt_emu/cpumodels/``,
``epyc_rome.py``); this module holds the architectural bit positions that
read them.  Sources: AMD64 APM Vol. 2, Section 15.4 "Enabling SVM" (CPUID
Fn8000_0001_ECX[SVM], EFER.SVME), Section 15.30 "SVM Related MSRs" (VM_CR
C001_0114h, VM_HSAVE_PA C001_0117h); APM Vol. 3, Appendix E "CPUID
Fn8000_000A" (SVM revision in EAX, NASID in EBX, features in EDX; Linux
X86_FEATURE_* names).
"""
from __future__ import annotations

from dataclasses import dataclass

# Fn8000_0001_ECX
CPUID_80000001_ECX_SVM = 1 << 2
# Fn8000_000A_EDX feature bits (APM Vol. 3 Appendix E; Linux X86_FEATURE_* names)
SVM_FEATURE_NPT = 1 << 0
SVM_FEATURE_LBRV = 1 << 1
SVM_FEATURE_SVML = 1 << 2
SVM_FEATURE_NRIPS = 1 << 3
SVM_FEATURE_TSC_RATE = 1 << 4
SVM_FEATURE_VMCB_CLEAN = 1 << 5
SVM_FEATURE_FLUSH_BY_ASID = 1 << 6
SVM_FEATURE_DECODE_ASSISTS = 1 << 7
SVM_FEATURE_PAUSE_FILTER = 1 << 10
SVM_FEATURE_PFTHRESHOLD = 1 << 12
SVM_FEATURE_AVIC = 1 << 13
SVM_FEATURE_V_VMSAVE_VMLOAD = 1 << 15
SVM_FEATURE_VGIF = 1 << 16

#: The SVM features devirt-emu gives semantics to (a model advertises no others).
IMPLEMENTED_SVM_FEATURES = (SVM_FEATURE_NPT | SVM_FEATURE_NRIPS | SVM_FEATURE_FLUSH_BY_ASID
                            | SVM_FEATURE_DECODE_ASSISTS | SVM_FEATURE_PAUSE_FILTER
                            | SVM_FEATURE_PFTHRESHOLD)

# MSRs (APM 15.30; Linux msr-index.h)
MSR_VM_CR = 0xC0010114
MSR_VM_HSAVE_PA = 0xC0010117
MSR_VM_IGNNE = 0xC0010115
VM_CR_DPD, VM_CR_R_INIT, VM_CR_DIS_A20M, VM_CR_LOCK, VM_CR_SVMDIS = 1, 2, 4, 8, 16

# EFER (APM Vol. 2, 3.1.7) bits this part implements
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX, EFER_SVME = 1, 1 << 8, 1 << 10, 1 << 11, 1 << 12
EFER_FFXSR, EFER_TCE = 1 << 14, 1 << 15
EFER_VALID = EFER_SCE | EFER_LME | EFER_LMA | EFER_NX | EFER_SVME | EFER_FFXSR | EFER_TCE

# CR4 (APM Vol. 2, 3.1.3) bits this part implements: VME..UMIP (11:0), FSGSBASE,
# PCIDE, OSXSAVE, SMEP, SMAP.  VMXE (13) and SMXE (14) are MBZ on AMD.
CR4_VALID = 0xFFF | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 20 | 1 << 21


@dataclass(frozen=True)
class SvmCaps:
    """What VMRUN's checks and the intercept rules read about the processor.
    The defaults are the ``epyc-rome`` model's (:meth:`from_model`)."""

    maxphyaddr: int = 48
    efer_valid: int = EFER_VALID
    cr4_valid: int = CR4_VALID
    long_mode: bool = True
    features: int = IMPLEMENTED_SVM_FEATURES
    nasid: int = 0x8000

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    @classmethod
    def from_model(cls, model) -> "SvmCaps":
        """The capabilities of a CPU model (a CpuModel with SVM): MAXPHYADDR,
        Fn8000_000A's NASID and features (only the implemented ones)."""
        _, nasid, _, edx = model.cpuid.get((0x8000000A, 0), (0, 0, 0, 0))
        return cls(maxphyaddr=model.maxphyaddr, features=edx & IMPLEMENTED_SVM_FEATURES,
                   nasid=nasid)


def guest_cpuid(regs: tuple[int, int, int, int], leaf: int) -> tuple[int, int, int, int]:
    """A leaf of the processor's CPUID as a KVM guest without nested
    virtualization sees it: SVM (Fn8000_0001_ECX[2]) clear, Fn8000_000A zero."""
    a, b, c, d = regs
    if leaf == 0x80000001:
        c &= ~CPUID_80000001_ECX_SVM
    elif leaf == 0x8000000A:
        return (0, 0, 0, 0)
    return (a, b, c, d)
