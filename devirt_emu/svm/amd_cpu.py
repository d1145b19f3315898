"""The modelled AMD CPU's numbers, in one place (they move to the CPU-model
package when it lands): what SVM reads about the processor.

An AMD EPYC 7002 ("Rome", family 17h model 31h) core, trimmed to what the
SVM layer gives semantics to.  Sources: AMD64 APM Vol. 2, Section 15.4
"Enabling SVM" (CPUID Fn8000_0001_ECX[SVM], EFER.SVME), Section 15.30 "SVM
Related MSRs" (VM_CR C001_0114h, VM_HSAVE_PA C001_0117h), APM Vol. 3,
Appendix E "CPUID Fn8000_000A" (SVM revision, NASID, the feature bits in
EDX), the PPR for family 17h model 31h for MAXPHYADDR (48 bits without SME)
and the CR4/EFER bits the part implements.

Only the features with semantics behind them in :mod:`devirt_emu.svm` are
advertised in Fn8000_000A_EDX: NP, NRIPS, flush-by-ASID, decode assists,
PAUSE filter and PAUSE filter threshold.  LBR virtualization, SVM lock,
VMCB clean bits, virtual VMLOAD/VMSAVE, vGIF and AVIC are not.
"""
from __future__ import annotations

from dataclasses import dataclass

VENDOR = "AuthenticAMD"
#: CPUID Fn0000_0000 EBX, EDX, ECX spell "Auth" "enti" "cAMD".
VENDOR_REGS = (0x68747541, 0x69746E65, 0x444D4163)   # EBX, EDX, ECX
FAMILY_MODEL_STEPPING = 0x00830F10   # family 17h (0Fh + 08h), model 31h, stepping 0

MAXPHYADDR = 48
LINEAR_BITS = 48

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

SVM_REVISION = 1
#: Number of ASIDs (Fn8000_000A_EBX); ASID 0 is the host's.
NASID = 0x8000
SVM_FEATURES = (SVM_FEATURE_NPT | SVM_FEATURE_NRIPS | SVM_FEATURE_FLUSH_BY_ASID
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
    """What VMRUN's checks and the intercept rules read about the processor."""

    maxphyaddr: int = MAXPHYADDR
    efer_valid: int = EFER_VALID
    cr4_valid: int = CR4_VALID
    long_mode: bool = True
    features: int = SVM_FEATURES
    nasid: int = NASID

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)


def cpuid_8000000a() -> tuple[int, int, int, int]:
    """CPUID Fn8000_000A: (EAX revision, EBX NASID, ECX 0, EDX features)."""
    return (SVM_REVISION, NASID, 0, SVM_FEATURES)
