"""Nested paging (NPT) as the second stage of a core's virtual TLB, and the
nested page faults it causes.

Source: AMD64 APM Vol. 2, Section 15.25 "Nested Paging": the nested page
tables are ordinary long-mode page tables in the host's format, rooted at
``nested_cr3``, walked for every guest-physical address the guest uses (its
own page-table entries as well as the final page); every nested access is a
user access (15.25.5: "accesses to guest page tables and the final guest
physical address are treated as user accesses"), so a nested entry with
U/S clear denies it, and writes need R/W set in every level whatever CR0.WP
says.  A refused access is a #VMEXIT with exit code NPF (15.25.6): EXITINFO1
is a #PF-format error code (P, RW, US, RSV, ID) with bit 32 set when the
access was the final guest-physical address and bit 33 when it was a guest
page-table access (Linux ``PFERR_GUEST_FINAL_MASK``, ``PFERR_GUEST_PAGE_MASK``),
EXITINFO2 the faulting guest-physical address.  The processor sets the
accessed flags of the nested entries it uses and the dirty flag of the leaf
for a write.

The walk reuses the platform's 4-level walker (:func:`devirt_emu.platform.paging.walk`)
over host-physical memory: the host is a 64-bit one with EFER.NXE set.

Caching: successful translations are cached per 4-KiB guest-physical page
until :meth:`NptStage2.invalidate` (VMRUN with a TLB flush, or a new
``nested_cr3``); failures are never cached.  A cached page grants the TLB the
write right only once the walk for a write set its dirty flag.

While the vCPU is not in the guest (the L0 emulating on the guest's behalf)
guest-physical addresses are host-physical ones.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Optional

from ..platform.paging import PF_P, PF_U, PF_W, PageFault, PagingMode, check_rights, walk
from ..platform.tlb import ACC_FETCH, ACC_READ, ACC_WRITE, Stage2Fault

#: NPF EXITINFO1 bits beyond the #PF error code (Linux PFERR_GUEST_*_MASK).
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PF_I = 1 << 4
_A, _D = 1 << 5, 1 << 6
_RWX = ACC_READ | ACC_WRITE | ACC_FETCH
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class NptFault:
    """A refused nested access: the NPF's EXITINFO1 and EXITINFO2."""

    exit_info_1: int
    gpa: int
    reason: str


def npf_exit_info_1(pf_code: int, *, final: bool) -> int:
    """EXITINFO1 of an NPF (APM 15.25.6): the #PF-format error code of the
    nested walk with bit 32 (final guest-physical address) or bit 33 (guest
    page-table access)."""
    return pf_code | (PFERR_GUEST_FINAL_MASK if final else PFERR_GUEST_PAGE_MASK)


def npt_walk(mem, ncr3: int, gpa: int, access: int, *, final: bool, set_flags: bool):
    """Translate ``gpa`` through the nested tables at ``ncr3``: (hpa, rights)
    or :class:`NptFault`.  ``access`` is ACC_READ, ACC_WRITE (a read-modify-
    write is both) or ACC_FETCH."""
    write = bool(access & ACC_WRITE)
    fetch = access == ACC_FETCH
    code = PF_U | (PF_W if write else 0) | (PF_I if fetch else 0)

    def read_entry(pa: int, size: int) -> Optional[int]:
        if not mem.contains(pa, size):          # outside RAM: not present
            return None
        return mem.read_u64(pa)

    try:
        w = walk(PagingMode.LEVEL4, gpa, ncr3, read_entry, code=code, nxe=True)
        allowed = check_rights(w, gpa, code, write=write, user=True, fetch=fetch, wp=True,
                               nxe=True)
    except PageFault as pf:
        what = "reserved bit" if pf.error_code & 8 else \
            "not present" if not pf.error_code & PF_P else "rights"
        return NptFault(npf_exit_info_1(pf.error_code, final=final), gpa,
                        f"nested walk of {gpa:#x}: {what}")
    if set_flags:
        last = len(w.entries) - 1
        for i, (addr, e, _) in enumerate(w.entries):
            new = e | _A | (_D if write and i == last else 0)
            if new != e:
                mem.write_u64(addr, new)
    rights = (ACC_READ if allowed[0] else 0) | (ACC_WRITE if allowed[1] else 0) | \
        (ACC_FETCH if allowed[2] else 0)
    return w.pa, rights


class NptStage2:
    """Guest-physical -> host-physical through the nested tables at ``ncr3``."""

    def __init__(self, mem, ncr3: int, active: Callable[[], bool]):
        self.mem = mem
        self.ncr3 = ncr3
        self._active = active
        self._cache: dict[int, tuple[int, int]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def translate(self, gpa: int, access: int, gla: Optional[int], translation: bool,
                  peek: bool) -> tuple[int, int]:
        if not self._active():
            return gpa, _RWX
        page = gpa >> 12
        hit = self._cache.get(page)
        if hit is not None and access & hit[1] == access:
            return hit[0] | (gpa & 0xFFF), hit[1]
        r = npt_walk(self.mem, self.ncr3, gpa, access, final=translation, set_flags=not peek)
        if type(r) is NptFault:
            raise Stage2Fault(r)
        hpa, rights = r
        if not access & ACC_WRITE:
            rights &= ~ACC_WRITE         # the first write walks again and sets the dirty flag
        if not peek:
            self._cache[page] = (hpa & ~0xFFF, rights)
        return hpa, rights


class NptBuilder:
    """Nested page tables in a pool of host-physical memory (for tests and the
    case API): 4-level tables with 4-KiB or 2-MiB leaves."""

    def __init__(self, mem, pool: int, size: int):
        self.mem = mem
        self.pool, self.end = pool, pool + size
        self.next = pool + 0x1000
        self.root = pool
        mem.write(pool, bytes(0x1000))

    def _table(self) -> int:
        if self.next + 0x1000 > self.end:
            raise ValueError("the NPT pool is full")
        t = self.next
        self.next += 0x1000
        self.mem.write(t, bytes(0x1000))
        return t

    def entry_address(self, gpa: int, level: int) -> int:
        """The address of the entry at ``level`` (4 = PML4E ... 1 = PTE) on the walk of
        ``gpa``, creating the tables above it."""
        table = self.root
        for lvl in (4, 3, 2, 1):
            addr = table + ((gpa >> (12 + 9 * (lvl - 1))) & 0x1FF) * 8
            if lvl == level:
                return addr
            e = self.mem.read_u64(addr)
            if not e & 1:
                t = self._table()
                self.mem.write_u64(addr, t | 7)            # P, RW, US
                e = t | 7
            elif e & 0x80:                                 # split a 2-MiB page into 4-KiB ones
                t = self._table()
                base, flags = e & 0x000F_FFFF_FFE0_0000, e & (0xFFF ^ 0x80) | e & 1 << 63
                self.mem.write(t, b"".join(_U64.pack(base + 0x1000 * i | flags)
                                           for i in range(512)))
                self.mem.write_u64(addr, t | 7)
                e = t | 7
            table = e & 0x000F_FFFF_FFFF_F000
        raise ValueError(f"level {level} is 1-4")

    def map(self, gpa: int, hpa: int, size: int = 0x1000, *, writable: bool = True,
            user: bool = True, nx: bool = False, page_size: int = 0x1000,
            present: bool = True) -> None:
        level = {0x1000: 1, 0x200000: 2}[page_size]
        flags = (1 if present else 0) | (2 if writable else 0) | (4 if user else 0) | \
            (0x80 if level == 2 else 0) | (1 << 63 if nx else 0)
        for off in range(0, size, page_size):
            self.mem.write_u64(self.entry_address(gpa + off, level), (hpa + off) | flags)
