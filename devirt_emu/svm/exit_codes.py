"""Every SVM #VMEXIT code, in one table.

Source: AMD64 APM Volume 2, Appendix C "SVM Intercept Exit Codes" (Table
C-1).  Names are Linux's ``SVM_EXIT_*`` (``arch/x86/include/uapi/asm/svm.h``)
without the prefix, except that the code -1, which Linux calls
``SVM_EXIT_ERR``, is named ``INVALID`` as the APM names it (VMEXIT_INVALID:
VMRUN's consistency checks failed); ``ERR`` is kept as an alias.  ``BUSY``
(-2, APM VMEXIT_BUSY) is listed so that it decodes; nothing here produces it.

An exit code is written into EXITCODE (``exit_code`` and ``exit_code_hi``
of the VMCB: one 64-bit value, so -1 is all ones).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping


def _table() -> dict[str, int]:
    t: dict[str, int] = {}
    for n in range(16):
        t[f"READ_CR{n}"] = 0x000 + n
        t[f"WRITE_CR{n}"] = 0x010 + n
        t[f"READ_DR{n}"] = 0x020 + n
        t[f"WRITE_DR{n}"] = 0x030 + n
    for v in range(32):
        t[f"EXCP_{v}"] = 0x040 + v          # Linux: SVM_EXIT_EXCP_BASE + vector
    for i, name in enumerate((
            "INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ",
            "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE",
            "RDTSC", "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "SWINT", "INVD",
            "PAUSE", "HLT", "INVLPG", "INVLPGA", "IOIO", "MSR", "TASK_SWITCH", "FERR_FREEZE",
            "SHUTDOWN", "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT",
            "RDTSCP", "ICEBP", "WBINVD", "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU",
            "EFER_WRITE_TRAP")):
        t[name] = 0x060 + i
    for n in range(16):
        t[f"CR{n}_WRITE_TRAP"] = 0x090 + n
    for i, name in enumerate(("INVLPGB", "INVLPGB_ILLEGAL", "INVPCID", "MCOMMIT", "TLBSYNC",
                              "BUS_LOCK", "IDLE_HLT")):
        t[name] = 0x0A0 + i
    t.update(NPF=0x400, AVIC_INCOMPLETE_IPI=0x401, AVIC_UNACCELERATED_ACCESS=0x402,
             VMGEXIT=0x403, INVALID=-1, BUSY=-2)
    return t


#: name -> exit code.
TABLE: Mapping[str, int] = MappingProxyType(_table())
#: exit code -> name.
BY_CODE: Mapping[int, str] = MappingProxyType({c: n for n, c in TABLE.items()})
assert len(BY_CODE) == len(TABLE)

globals().update(TABLE)     # CPUID, HLT, IOIO, ... as module constants
ERR = INVALID               # noqa: F821  (Linux's name for -1)
EXCP_BASE = 0x040
LAST_EXCP = 0x05F


def name_of(code: int) -> str:
    """The name of exit code ``code`` (signed or as the 64-bit EXITCODE)."""
    if code >= 1 << 63:
        code -= 1 << 64
    return BY_CODE.get(code, f"UNKNOWN_{code:#x}")
