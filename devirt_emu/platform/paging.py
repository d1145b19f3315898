"""The guest's own page walk, for the accesses the platform makes itself.

Unicorn translates the guest's memory accesses with its own walker; the
platform needs a walker of its own for the accesses *it* makes on the guest's
behalf (pushing an interrupt frame, reading a gate, the memory side of
INS/OUTS).  IA-32e 4-level paging (4 KiB, 2 MiB and 1 GiB pages) and paging
off are modelled; a fault is reported as :class:`PageFault` with the #PF error
code the SDM defines (P, W/R, U/S, RSVD, I/D).
"""
from __future__ import annotations

from .memory import PhysMem

PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
_ADDR = 0x000F_FFFF_FFFF_F000


class PageFault(Exception):
    def __init__(self, linear: int, error_code: int):
        super().__init__(f"#PF at {linear:#x} (error code {error_code:#x})")
        self.linear = linear
        self.error_code = error_code


class UnsupportedPaging(Exception):
    """A paging mode the platform's own walker does not model (32-bit or PAE legacy paging)."""


def translate(mem: PhysMem, cr0: int, cr3: int, cr4: int, efer: int, linear: int,
              *, write: bool = False, user: bool = False, fetch: bool = False) -> int:
    """Linear -> physical address; raises PageFault or UnsupportedPaging."""
    if not cr0 & (1 << 31):
        return linear & 0xFFFFFFFF
    if not (efer & (1 << 10) and cr4 & (1 << 5)):
        raise UnsupportedPaging("only IA-32e (4-level) paging is modelled for platform accesses")
    wp = bool(cr0 & (1 << 16))
    nxe = bool(efer & (1 << 11))
    code = (PF_W if write else 0) | (PF_U if user else 0) | (PF_I if fetch and nxe else 0)
    table = cr3 & _ADDR
    writable = usr = True
    nx = False
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        pa = table + ((linear >> shift) & 0x1FF) * 8
        if not mem.contains(pa, 8):
            raise PageFault(linear, code)
        entry = mem.read_u64(pa)
        if not entry & 1:
            raise PageFault(linear, code)
        writable &= bool(entry & 2)
        usr &= bool(entry & 4)
        nx |= bool(entry & (1 << 63)) and nxe
        large = level in (3, 2) and entry & 0x80
        if large or level == 1:
            size = 1 << shift
            base = entry & _ADDR & ~(size - 1)
            if write and not writable and (user or wp):
                raise PageFault(linear, code | PF_P)
            if user and not usr:
                raise PageFault(linear, code | PF_P)
            if fetch and nx:
                raise PageFault(linear, code | PF_P)
            return base | (linear & (size - 1))
        table = entry & _ADDR
    raise AssertionError("unreachable")
