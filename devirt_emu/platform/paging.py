"""The guest's own page walk (SDM Vol. 3A, chapter "Paging"), as the platform makes it.

Unicorn translates the guest's memory accesses with QEMU's walker.  The
platform walks the guest's page tables itself for the accesses *it* makes on
the guest's behalf (pushing an interrupt frame, reading a gate, a descriptor
or a TSS, the memory side of INS/OUTS): :func:`translate`.  In virtual-TLB
mode (:mod:`devirt_emu.platform.tlb`) every guest access is translated by
:func:`walk` too, each paging-structure address then passed through a second
stage (EPT).

Paging modes (SDM "Paging Modes and Control Bits"; :func:`paging_mode`):

* paging off (CR0.PG = 0): linear = physical, 32 bits;
* 32-bit paging (CR0.PG = 1, CR4.PAE = 0): a page directory and page tables
  of 4-byte entries, 4-KiB pages, and 4-MiB pages when CR4.PSE = 1 and the
  PDE's PS bit is 1.  The modelled CPU has PSE-36 (CPUID.01H:EDX[17], read
  from :mod:`devirt_emu.platform.cpuid`): bits 20:13 of a 4-MiB PDE are then
  bits 39:32 of the page's address (M = min(MAXPHYADDR, 40)) and bits
  21:(M-19) are reserved; without PSE-36 bits 21:13 are reserved.  No other
  bit is reserved and there is no execute-disable bit;
* PAE paging (CR0.PG = 1, CR4.PAE = 1, not IA-32e mode): the four PDPTE
  registers (below), then page directories and page tables of 8-byte
  entries, 4-KiB and 2-MiB pages; bits 62:MAXPHYADDR are reserved (and bit
  63, XD, when IA32_EFER.NXE = 0), bits 20:13 too in a 2-MiB PDE;
* 4-level paging (IA-32e mode): 4-KiB, 2-MiB and 1-GiB pages; bits
  51:MAXPHYADDR reserved (bit 63 when NXE = 0), bit 7 of a PML4E, bits 29:13
  of a 1-GiB PDPTE and 20:13 of a 2-MiB PDE.  5-level paging (CR4.LA57) is
  not modelled: :class:`UnsupportedPaging`.

The PDPTE registers (SDM "PDPTE Registers"): with PAE paging the processor
does not read the page-directory-pointer table at each walk; it uses four
PDPTEs it loaded from the 32-byte table at CR3[31:5] when MOV to CR3 ran
with PAE paging on, when MOV to CR0 or CR4 turned PAE paging on or changed
CR0.CD/NW/PG or CR4.PAE/PGE/PSE/SMEP with it on (:func:`pdptes_reload`), at
a task switch that changed CR3, or at VM entry.  A loaded PDPTE with P = 1
and a reserved bit set (:func:`pdpte_reserved`: bits 2:1, 8:5 and
63:MAXPHYADDR) makes MOV to CR #GP(0) before anything changes.  :func:`walk`
takes the registers as an argument; the core keeps them and says when it
loads them (``PaeRegisters`` in :mod:`devirt_emu.platform.tlb`).

Faults are :class:`PageFault` with the SDM's error code ("Page-Fault
Exceptions"): P (a protection violation or a reserved bit, not a
not-present entry), W/R, U/S (the access was made at CPL 3), RSVD, and I/D
for an instruction fetch when CR4.PAE = 1 and IA32_EFER.NXE = 1.  Access
rights ("Access Rights", no SMEP, SMAP or protection keys: the modelled CPU
has none): a user access needs U/S = 1 in every entry used; a write needs
R/W = 1 in every entry for a user access, and for a supervisor access when
CR0.WP = 1; a fetch needs XD = 0 in every entry when NXE = 1 (PAE and 4-level
paging).  The PDPTE registers of PAE paging have no R/W, U/S or XD bit.

:func:`translate` has no side effect: it does not set accessed and dirty
flags (the two-stage walk of :mod:`devirt_emu.platform.tlb` does, from the
entries :func:`walk` reports).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..x86 import (EFER_LMA, EFER_LME, EFER_NX, X86_CR0_CD, X86_CR0_NW, X86_CR0_PG, X86_CR0_WP,
                   X86_CR4_LA57, X86_CR4_PAE, X86_CR4_PGE, X86_CR4_PSE, X86_CR4_SMEP)
from .cpuid import cpuid
from .lapic import MAXPHYADDR
from .memory import PhysMem

PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16

#: MOV to CR0/CR4 changing one of these reloads the PDPTEs if PAE paging is on after it.
CR0_PDPTE_BITS = X86_CR0_CD | X86_CR0_NW | X86_CR0_PG
CR4_PDPTE_BITS = X86_CR4_PAE | X86_CR4_PGE | X86_CR4_PSE | X86_CR4_SMEP

_P, _RW, _US, _PS = 1, 2, 4, 1 << 7
_XD = 1 << 63


def _bits(hi: int, lo: int) -> int:
    """Mask of bits hi..lo inclusive (0 when hi < lo)."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1) if hi >= lo else 0


#: CPUID.01H:EDX[17]: the 4-MiB pages of 32-bit paging reach physical bits 39:32.
PSE36 = bool(cpuid(1, 0, 0, 1)[3] & (1 << 17))
#: M of 32-bit paging's 4-MiB pages: min(MAXPHYADDR, 40) with PSE-36, else 32.
PSE_WIDTH = min(MAXPHYADDR, 40) if PSE36 else 32
_ADDR = _bits(MAXPHYADDR - 1, 12)                   # M-1:12, an 8-byte entry's address
_ADDR32 = _bits(31, 12)                             # a 4-byte entry's address
#: Reserved bits (SDM "Paging"; 4-level: "4-Level Paging and 5-Level Paging").
RSVD_32BIT_4M = _bits(21, PSE_WIDTH - 19)           # 32-bit PDE with PS = 1 (CR4.PSE = 1)
RSVD_PAE = _bits(62, MAXPHYADDR)                    # every PAE PDE and PTE
RSVD_4LEVEL = _bits(51, MAXPHYADDR)                 # every 4-level entry
RSVD_1G = _bits(29, 13)                             # PDPTE with PS = 1 (4-level)
RSVD_2M = _bits(20, 13)                             # PDE with PS = 1 (PAE and 4-level)
RSVD_PDPTE_LOW = _bits(8, 5) | _bits(2, 1)                       # a PAE PDPTE, below M
RSVD_PDPTE = _bits(63, MAXPHYADDR) | RSVD_PDPTE_LOW
_PAE_PDPTE_INDEX = 0x18                             # CR3[31:5] + 8 * linear[31:30]


class PageFault(Exception):
    def __init__(self, linear: int, error_code: int):
        super().__init__(f"#PF at {linear:#x} (error code {error_code:#x})")
        self.linear = linear
        self.error_code = error_code


class UnsupportedPaging(Exception):
    """A paging mode the platform's walker does not model (5-level paging)."""


class PagingMode(enum.Enum):
    OFF = "paging off"
    BITS32 = "32-bit paging"
    PAE = "PAE paging"
    LEVEL4 = "4-level paging"


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode in use (IA-32e mode is EFER.LMA)."""
    if not cr0 & X86_CR0_PG:
        return PagingMode.OFF
    if not cr4 & X86_CR4_PAE:
        return PagingMode.BITS32
    if efer & EFER_LMA:
        if cr4 & X86_CR4_LA57:
            raise UnsupportedPaging("5-level paging (CR4.LA57) is not modelled")
        return PagingMode.LEVEL4
    return PagingMode.PAE


# ---------------------------------------------------------------------- PDPTE registers
def pdpte_reserved(entry: int) -> int:
    """The reserved bits a PAE PDPTE sets, if it is present (0 if fine)."""
    return entry & RSVD_PDPTE if entry & _P else 0


def pdpt_address(cr3: int) -> int:
    """Physical (guest-physical under EPT) address of the 32-byte PDPT: CR3[31:5]."""
    return cr3 & 0xFFFF_FFE0


def pdptes_reload(cr: int, old_cr0: int, old_cr4: int, new_cr0: int, new_cr4: int,
                  efer: int) -> bool:
    """Does MOV to CR``cr`` (0, 3 or 4; the CR0/CR4 values before and after)
    load the PDPTE registers?  Yes if PAE paging is in use after it (CR0.PG,
    CR4.PAE, and IA32_EFER.LME = 0, so not IA-32e mode) and the instruction
    is a MOV to CR3, or changes CR0.CD/NW/PG or CR4.PAE/PGE/PSE/SMEP."""
    if not (new_cr0 & X86_CR0_PG and new_cr4 & X86_CR4_PAE and not efer & EFER_LME):
        return False
    if cr == 3:
        return True
    return bool((old_cr0 ^ new_cr0) & CR0_PDPTE_BITS or (old_cr4 ^ new_cr4) & CR4_PDPTE_BITS)


# ---------------------------------------------------------------------- the walk
@dataclass(slots=True)
class Walk:
    """A successful walk: ``pa`` the translation (guest-physical under a second
    stage), ``page_size``, ``entries`` the paging-structure entries read
    from memory as (address, value, size in bytes), top first (the PDPTE
    registers of PAE paging are not among them), and the rights they give:
    ``writable`` (R/W = 1 in all), ``user`` (U/S = 1 in all), ``xd`` (XD = 1
    in one)."""

    pa: int
    page_size: int
    entries: list
    writable: bool
    user: bool
    xd: bool


def error_code(mode: PagingMode, *, write: bool, user: bool, fetch: bool, nxe: bool) -> int:
    """The access bits of a #PF error code: W/R, U/S, and I/D (a fetch, with
    CR4.PAE = 1, i.e. PAE or 4-level paging, and IA32_EFER.NXE = 1)."""
    return ((PF_W if write else 0) | (PF_U if user else 0)
            | (PF_I if fetch and nxe and mode in (PagingMode.PAE, PagingMode.LEVEL4) else 0))


#: The levels of each mode's walk, top first: (shift, index mask, entry size, page
#: size if PS = 1 maps a page (0: PS is not a page-size bit there), bits always
#: reserved, bits reserved when PS = 1 maps a page, last level).
_PDE8 = (21, 0x1FF, 8, 1 << 21, 0, RSVD_2M, False)
_PTE8 = (12, 0x1FF, 8, 1 << 12, 0, 0, True)
_PTE4 = (12, 0x3FF, 4, 1 << 12, 0, 0, True)
LEVELS_4LEVEL = ((39, 0x1FF, 8, 0, _PS, 0, False),            # PML4E: PS is reserved
                 (30, 0x1FF, 8, 1 << 30, 0, RSVD_1G, False), _PDE8, _PTE8)
LEVELS_PAE = (_PDE8, _PTE8)                                  # below the PDPTE registers
LEVELS_32BIT_PSE = ((22, 0x3FF, 4, 1 << 22, 0, RSVD_32BIT_4M, False), _PTE4)   # CR4.PSE = 1
LEVELS_32BIT = ((22, 0x3FF, 4, 0, 0, 0, False), _PTE4)                         # CR4.PSE = 0


def walk(mode: PagingMode, linear: int, cr3: int, read_entry: Callable[[int, int], Optional[int]],
         *, code: int, pdptes: Optional[Sequence[int]] = None, pse: bool = False,
         nxe: bool = False) -> Walk:
    """Walk the paging structures of ``mode`` (not OFF) for ``linear``.

    ``read_entry(address, size)`` reads one entry (4 or 8 bytes) or returns
    None when there is no memory there (a not-present entry).  ``code`` is
    the error code's access bits (:func:`error_code`); ``pdptes`` the four
    PDPTE registers (PAE paging); ``pse`` CR4.PSE; ``nxe`` IA32_EFER.NXE.
    Raises :class:`PageFault` for a not-present entry (P = 0 in the error
    code) or a reserved bit (P and RSVD); rights are not checked here
    (:func:`check_rights`)."""
    if mode is PagingMode.LEVEL4:
        table = cr3 & _ADDR
        high = RSVD_4LEVEL | (0 if nxe else _XD)
        levels = LEVELS_4LEVEL
    elif mode is PagingMode.PAE:
        if pdptes is None:
            raise ValueError("PAE paging needs the PDPTE registers")
        pdpte = pdptes[(linear >> 30) & 3]
        if not pdpte & _P:
            raise PageFault(linear, code)
        if pdpte & RSVD_PDPTE:      # only a PDPTE loaded without its check (see PaeRegisters)
            raise PageFault(linear, code | PF_P | PF_RSVD)
        table = pdpte & _ADDR
        high = RSVD_PAE | (0 if nxe else _XD)
        levels = LEVELS_PAE
    elif mode is PagingMode.BITS32:
        table = cr3 & _ADDR32
        high = 0
        levels = LEVELS_32BIT_PSE if pse else LEVELS_32BIT
    else:
        raise ValueError(f"no walk with {mode.value}")
    entries = []
    writable = user = True
    xd = False
    for shift, index_mask, size, page, always, large_rsvd, last in levels:
        addr = table + ((linear >> shift) & index_mask) * size
        e = read_entry(addr, size)
        if e is None or not e & _P:
            raise PageFault(linear, code)
        large = page and not last and e & _PS
        if e & (high | always | (large_rsvd if large else 0)):
            raise PageFault(linear, code | PF_P | PF_RSVD)
        writable = writable and bool(e & _RW)
        user = user and bool(e & _US)
        xd = xd or bool(e & _XD)
        entries.append((addr, e, size))
        if large or last:
            if size == 4:
                base = e & _ADDR32 & ~(page - 1)
                if large:           # PSE-36: PDE bits (M-20):13 are address bits (M-1):32
                    base |= ((e >> 13) & ((1 << (PSE_WIDTH - 32)) - 1)) << 32
            else:
                base = e & _ADDR & ~(page - 1)
            return Walk(base | (linear & (page - 1)), page, entries, writable, user, xd)
        table = e & (_ADDR32 if size == 4 else _ADDR)
    raise AssertionError("unreachable")


def rights(w: Walk, *, user: bool, wp: bool, nxe: bool) -> tuple[bool, bool, bool]:
    """(read, write, fetch) allowed for an access at CPL 3 (``user``) or
    supervisor, with CR0.WP = ``wp`` and IA32_EFER.NXE = ``nxe``."""
    read_ok = w.user or not user
    write_ok = read_ok and (w.writable or (not user and not wp))
    exec_ok = read_ok and not (w.xd and nxe)
    return read_ok, write_ok, exec_ok


def check_rights(w: Walk, linear: int, code: int, *, write: bool, user: bool, fetch: bool,
                 wp: bool, nxe: bool) -> tuple[bool, bool, bool]:
    """:func:`rights`, raising the protection #PF (P set) if the access is not allowed."""
    read_ok = w.user or not user
    write_ok = read_ok and (w.writable or (not user and not wp))
    exec_ok = read_ok and not (w.xd and nxe)
    if not (exec_ok if fetch else write_ok if write else read_ok):
        raise PageFault(linear, code | PF_P)
    return read_ok, write_ok, exec_ok


def read_pdptes(read: Callable[[int, int], bytes], cr3: int) -> tuple[int, int, int, int]:
    """The four PDPTEs of the table at CR3[31:5] (no check)."""
    raw = read(pdpt_address(cr3), 32)
    return tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, 32, 8))


def translate(mem: PhysMem, cr0: int, cr3: int, cr4: int, efer: int, linear: int,
              *, write: bool = False, user: bool = False, fetch: bool = False,
              pdptes: Optional[Sequence[int]] = None) -> int:
    """Linear -> physical address for an access of the platform on the guest's
    behalf; raises PageFault or UnsupportedPaging.  ``pdptes`` are the PDPTE
    registers for PAE paging (read from the table at CR3 when None).  Sets
    no accessed or dirty flag."""
    mode = paging_mode(cr0, cr4, efer)
    if mode is PagingMode.OFF:
        return linear & 0xFFFF_FFFF
    if mode is not PagingMode.LEVEL4:
        linear &= 0xFFFF_FFFF
    if mode is PagingMode.PAE and pdptes is None:
        pdptes = read_pdptes(mem.read, cr3)
    nxe = bool(efer & EFER_NX)
    code = error_code(mode, write=write, user=user, fetch=fetch, nxe=nxe)

    def read_entry(pa: int, size: int) -> Optional[int]:
        if not mem.contains(pa, size):
            return None
        return mem.read_u64(pa) if size == 8 else mem.read_u32(pa)

    w = walk(mode, linear, cr3, read_entry, code=code, pdptes=pdptes, pse=bool(cr4 & X86_CR4_PSE),
             nxe=nxe)
    check_rights(w, linear, code, write=write, user=user, fetch=fetch, wp=bool(cr0 & X86_CR0_WP),
                 nxe=nxe)
    return w.pa
