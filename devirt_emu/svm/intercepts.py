"""Every SVM intercept bit, in one table.

Source: AMD64 APM Volume 2, Appendix B, Table B-1 "VMCB Layout, Control
Area": the intercept vectors at offsets 000h (CR reads and writes), 004h
(DR reads and writes), 008h (exception vectors), 00Ch and 010h (instruction
and event intercepts; 010h bits 31:15 are the EFER and CR0-CR15 write traps)
and 014h (INVLPGB, INVPCID, MCOMMIT, TLBSYNC, ...).

A bit is numbered as Linux numbers it (``arch/x86/include/asm/svm.h``,
``enum intercept_words`` / the ``INTERCEPT_*`` enum): 32 * word + bit, word
``k`` being the 32-bit vector at offset 4 * k (:data:`vmcb.INTERCEPT_WORDS`).
Names are Linux's: ``INTERCEPT_CR0_READ`` .. ``INTERCEPT_CR15_WRITE``,
``INTERCEPT_DR0_READ`` .. ``INTERCEPT_DR15_WRITE``, ``INTERCEPT_EXCEPTION_0``
.. ``_31`` (Linux has only ``INTERCEPT_EXCEPTION_OFFSET``: the vector is
added to it), the word-3/4/5 names, and the write traps as Linux spells them
(``TRAP_EFER_WRITE``, ``TRAP_CR0_WRITE`` .. ``TRAP_CR15_WRITE``).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Mapping

CR_WORD, DR_WORD, EXCEPTION_WORD, WORD3, WORD4, WORD5 = range(6)

INTERCEPT_CR0_READ = 0
INTERCEPT_CR0_WRITE = 16
INTERCEPT_DR0_READ = 32
INTERCEPT_DR0_WRITE = 48
INTERCEPT_EXCEPTION_OFFSET = 64

#: Word 3 (offset 00Ch), bits 0-31.
_WORD3 = ("INTERCEPT_INTR", "INTERCEPT_NMI", "INTERCEPT_SMI", "INTERCEPT_INIT",
          "INTERCEPT_VINTR", "INTERCEPT_SELECTIVE_CR0", "INTERCEPT_STORE_IDTR",
          "INTERCEPT_STORE_GDTR", "INTERCEPT_STORE_LDTR", "INTERCEPT_STORE_TR",
          "INTERCEPT_LOAD_IDTR", "INTERCEPT_LOAD_GDTR", "INTERCEPT_LOAD_LDTR",
          "INTERCEPT_LOAD_TR", "INTERCEPT_RDTSC", "INTERCEPT_RDPMC", "INTERCEPT_PUSHF",
          "INTERCEPT_POPF", "INTERCEPT_CPUID", "INTERCEPT_RSM", "INTERCEPT_IRET",
          "INTERCEPT_INTn", "INTERCEPT_INVD", "INTERCEPT_PAUSE", "INTERCEPT_HLT",
          "INTERCEPT_INVLPG", "INTERCEPT_INVLPGA", "INTERCEPT_IOIO_PROT",
          "INTERCEPT_MSR_PROT", "INTERCEPT_TASK_SWITCH", "INTERCEPT_FERR_FREEZE",
          "INTERCEPT_SHUTDOWN")
#: Word 4 (offset 010h), bits 0-15; bits 16-31 are the CR0-CR15 write traps.
_WORD4 = ("INTERCEPT_VMRUN", "INTERCEPT_VMMCALL", "INTERCEPT_VMLOAD", "INTERCEPT_VMSAVE",
          "INTERCEPT_STGI", "INTERCEPT_CLGI", "INTERCEPT_SKINIT", "INTERCEPT_RDTSCP",
          "INTERCEPT_ICEBP", "INTERCEPT_WBINVD", "INTERCEPT_MONITOR", "INTERCEPT_MWAIT",
          "INTERCEPT_MWAIT_COND", "INTERCEPT_XSETBV", "INTERCEPT_RDPRU", "TRAP_EFER_WRITE")
#: Word 5 (offset 014h), bits 0-6.
_WORD5 = ("INTERCEPT_INVLPGB", "INTERCEPT_INVLPGB_ILLEGAL", "INTERCEPT_INVPCID",
          "INTERCEPT_MCOMMIT", "INTERCEPT_TLBSYNC", "INTERCEPT_BUSLOCK", "INTERCEPT_IDLE_HLT")


def _table() -> dict[str, int]:
    t: dict[str, int] = {}
    for n in range(16):
        t[f"INTERCEPT_CR{n}_READ"] = INTERCEPT_CR0_READ + n
        t[f"INTERCEPT_CR{n}_WRITE"] = INTERCEPT_CR0_WRITE + n
        t[f"INTERCEPT_DR{n}_READ"] = INTERCEPT_DR0_READ + n
        t[f"INTERCEPT_DR{n}_WRITE"] = INTERCEPT_DR0_WRITE + n
    for v in range(32):
        t[f"INTERCEPT_EXCEPTION_{v}"] = INTERCEPT_EXCEPTION_OFFSET + v
    for i, name in enumerate(_WORD3):
        t[name] = 32 * WORD3 + i
    for i, name in enumerate(_WORD4):
        t[name] = 32 * WORD4 + i
    for n in range(16):
        t[f"TRAP_CR{n}_WRITE"] = 32 * WORD4 + 16 + n
    for i, name in enumerate(_WORD5):
        t[name] = 32 * WORD5 + i
    return t


#: name -> bit number (32 * word + bit), every intercept bit of the APM's vectors.
TABLE: Mapping[str, int] = MappingProxyType(_table())
BY_BIT: Mapping[int, str] = MappingProxyType({b: n for n, b in TABLE.items()})
assert len(BY_BIT) == len(TABLE), "one name per bit"

globals().update(TABLE)     # INTERCEPT_CPUID etc. as module constants


def bit(name: str) -> int:
    """The bit number of intercept ``name`` (a clear KeyError otherwise)."""
    try:
        return TABLE[name]
    except KeyError:
        raise KeyError(f"no SVM intercept is named {name!r}") from None


def exception_bit(vector: int) -> int:
    return INTERCEPT_EXCEPTION_OFFSET + vector


def words_from_names(names: Iterable[str]) -> list[int]:
    """The six intercept words with the bits of ``names`` set."""
    words = [0] * 6
    for name in names:
        b = bit(name)
        words[b >> 5] |= 1 << (b & 31)
    return words


def names_from_words(words) -> list[str]:
    """The names of the bits set in the six intercept words (in bit order)."""
    out = []
    for w, value in enumerate(words):
        for i in range(32):
            if value >> i & 1:
                name = BY_BIT.get(32 * w + i)
                out.append(name if name is not None else f"word{w}.bit{i}")
    return out


def is_set(words, b: int) -> bool:
    """Is intercept bit ``b`` set in the six words ``words`` (a sequence)?"""
    return bool(words[b >> 5] >> (b & 31) & 1)
