"""Process-context identifiers and INVPCID (SDM Vol. 3A 4.10.1 "Process-Context
Identifiers", 4.10.4.1; Vol. 2A "INVPCID"; "MOV—Move to/from Control Registers").

Present on a core whose CPU model advertises CPUID.01H:ECX.PCID[17]
(CR4.PCIDE) and CPUID.(EAX=07H,ECX=0):EBX.INVPCID[10] (the instruction; #UD
without it).

* MOV to CR4 setting PCIDE: #GP(0) unless the model has PCID, IA32_EFER.LMA
  is 1 and CR3[11:0] is 0.
* MOV to CR3 with CR4.PCIDE = 1: bits 11:0 are the PCID; bit 63 of the
  source ("do not invalidate") is not loaded into CR3.
* INVPCID type (register), descriptor (16 bytes in memory: PCID in bits
  11:0, bits 63:12 reserved, then a linear address): #GP(0) at CPL > 0, for a
  type above 3, a reserved descriptor bit, a non-canonical address with type 0,
  or a PCID other than 0 with type 0 or 1 while CR4.PCIDE = 0.

The TLB model: the platform's TLBs (Unicorn's and, with a second stage, the
virtual TLB) hold no PCID tags, so every PCID operation invalidates all
translations.  The SDM allows a processor to invalidate more than an
operation requires (4.10.4: entries may be invalidated at any time), never
less, so MOV to CR3 keeping a PCID's translations (bit 63 = 1) and each
INVPCID type are exact in what software can observe but cost a full flush.
"""
from __future__ import annotations

import struct
from typing import Optional

from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

CR4_PCIDE = 1 << 17
CR3_NOFLUSH = 1 << 63
EFER_LMA = 1 << 10
PCID_MASK = 0xFFF
#: INVPCID types: individual address, single context, all contexts with
#: globals, all contexts but globals.
INVPCID_TYPE_INDIV_ADDR, INVPCID_TYPE_SINGLE_CTXT, INVPCID_TYPE_ALL_INCL_GLOBAL, \
    INVPCID_TYPE_ALL_NON_GLOBAL = 0, 1, 2, 3


def flush_all(core) -> None:
    """Invalidate every translation of the core (Unicorn's TLB, the virtual TLB, the scans)."""
    core.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    core.rearm_all()


def cr4_write_problem(has_pcid: bool, old_cr4: int, new_cr4: int, cr3: int, efer: int) -> Optional[str]:
    """Why MOV to CR4 of ``new_cr4`` raises #GP(0) for PCIDE, or None."""
    if not new_cr4 & CR4_PCIDE or old_cr4 & CR4_PCIDE:
        return None
    if not has_pcid:
        return "CR4.PCIDE is reserved without CPUID.01H:ECX.PCID"
    if not efer & EFER_LMA:
        return "CR4.PCIDE may be set only in IA-32e mode"
    if cr3 & PCID_MASK:
        return "CR4.PCIDE may be set only with CR3[11:0] = 0"
    return None


def cr3_value(source: int, cr4: int) -> int:
    """What MOV to CR3 loads: without bit 63 when CR4.PCIDE = 1."""
    return source & ~CR3_NOFLUSH if cr4 & CR4_PCIDE else source


def invpcid_problem(kind: int, descriptor: bytes, cr4: int, canonical) -> Optional[str]:
    """Why INVPCID of ``kind`` with the 16-byte ``descriptor`` raises #GP(0), or None."""
    if kind > INVPCID_TYPE_ALL_NON_GLOBAL:
        return f"INVPCID type {kind} is not 0-3"
    low, address = struct.unpack("<QQ", descriptor)
    if low & ~PCID_MASK:
        return "INVPCID descriptor bits 63:12 are reserved"
    pcid = low & PCID_MASK
    if kind == INVPCID_TYPE_INDIV_ADDR and not canonical(address):
        return f"INVPCID type 0 with non-canonical address {address:#x}"
    if kind in (INVPCID_TYPE_INDIV_ADDR, INVPCID_TYPE_SINGLE_CTXT) and pcid and not cr4 & CR4_PCIDE:
        return f"INVPCID type {kind} of PCID {pcid} with CR4.PCIDE = 0"
    return None
