"""EPT: translation of guest-physical addresses as the SDM defines it.

SDM Vol. 3C, chapter "VMX Support for Address Translation", sections on the
EPT translation mechanism, EPT misconfigurations, EPT violations and the
accessed and dirty flags for EPT.

:func:`ept_walk` is a pure function of the EPT paging structures (read
through ``read_mem``) apart from the accessed/dirty flags it sets through
``write_mem`` when the EPTP enables them.  Its result is one of

* :class:`EptTranslation`: the host-physical address, the page size and the
  access rights;
* :class:`EptViolation`: the exit qualification of an EPT violation (SDM
  table "Exit Qualification for EPT Violations") and the guest-physical
  address;
* :class:`EptMisconfig`: an EPT misconfiguration at the guest-physical
  address, with the entry that caused it.

Scope and choices:

* Only 4-level EPT (EPTP page-walk length 4) is modelled; 5-level EPT,
  mode-based execute control (bit 10 of the entries, bit 6 of the
  qualification), sub-page write permissions, supervisor shadow stacks,
  guest-paging verification and the EPT-violation #VE (bit 63) are not:
  those bits are treated as the SDM says they are when the feature is off
  (ignored).
* Accessed and dirty flags are written only when the translation succeeds
  (as KVM's nested EPT walker does); a walk that ends in a violation or a
  misconfiguration leaves memory unchanged.
* Caching is not modelled: every call walks the structures in memory.  There
  are no EPT TLBs or paging-structure caches here, so INVEPT has nothing to
  invalidate in this module; INVEPT semantics (and any cache a caller keeps)
  are the caller's.
* Bit 12 of the qualification (NMI unblocking due to IRET) depends on the
  instruction being executed and is the caller's to OR in
  (``controls.INTR_INFO_UNBLOCK_NMI``).
* ``read_mem(pa, n) -> bytes`` and ``write_mem(pa, data)`` are host-physical
  accessors such as :meth:`PhysMem.read` and :meth:`PhysMem.write`; an
  entry outside RAM raises whatever they raise
  (:class:`~devirt_emu.platform.memory.PhysicalAccessError` for PhysMem).

:class:`EptBuilder` writes EPT paging structures into a :class:`PhysMem`
(used by tests and by the L0 model).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

from devirt_emu.platform.lapic import MAXPHYADDR
from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx import capabilities as _vcaps
from devirt_emu.vmx.controls import (
    MEMTYPE_WB, VMX_EPT_1GB_PAGE_BIT, VMX_EPT_2MB_PAGE_BIT,
    VMX_EPT_ACCESS_BIT, VMX_EPT_AD_BIT, VMX_EPT_ADVANCED_EXIT_INFO_BIT, VMX_EPT_DIRTY_BIT,
    VMX_EPT_EXECUTE_ONLY_BIT, VMX_EPT_IPAT_BIT, VMX_EPT_LARGE_PAGE_BIT, VMX_EPT_MT_EPTE_SHIFT,
    VMX_EPT_RWX_MASK, VMX_EPTP_AD_ENABLE_BIT, VMX_EPTP_MT_WB, VMX_EPTP_PWL_4, VMX_EPTP_PWL_MASK)

# EPT memory types (SDM "Memory Types and Their Properties"; UC and WB come
# from controls.py: MEMTYPE_UC, MEMTYPE_WB).  Values 2, 3 and 7 are reserved in a leaf EPT entry.
MEMTYPE_WC, MEMTYPE_WT, MEMTYPE_WP = 1, 4, 5
RESERVED_EPT_MEMORY_TYPES = frozenset({2, 3, 7})

# --- Exit qualification for EPT violations (SDM table of the same name) ---
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_READABLE = 1 << 3
EPT_VIOLATION_WRITABLE = 1 << 4
EPT_VIOLATION_EXECUTABLE = 1 << 5
EPT_VIOLATION_RWX_SHIFT = 3
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8
#: Bits 9-11, reported only with advanced VM-exit information for EPT
#: violations, for an access to the translation of a linear address.
EPT_VIOLATION_GVA_USER = 1 << 9
EPT_VIOLATION_GVA_WRITABLE = 1 << 10
EPT_VIOLATION_GVA_EXECUTABLE = 1 << 11
# Bit 12 (NMI unblocking due to IRET) is INTR_INFO_UNBLOCK_NMI, the caller's to set.

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
#: 4-level EPT translates 48-bit guest-physical addresses.
GPA_WIDTH_4_LEVEL = 48

_LEVEL_NAMES = {4: "EPT PML4E", 3: "EPT PDPTE", 2: "EPT PDE", 1: "EPT PTE"}
_LEVEL_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
_LEAF_PAGE_SIZE = {3: PAGE_1G, 2: PAGE_2M, 1: PAGE_4K}
_U64 = struct.Struct("<Q")


def _bits(hi: int, lo: int) -> int:
    """Mask of bits hi..lo inclusive."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


class EptAccess(enum.IntFlag):
    """The kind of access being translated; values are bits 2:0 of the
    EPT-violation exit qualification.  ``READ | WRITE`` is a
    read-modify-write (both bits are reported on a violation)."""

    READ = EPT_VIOLATION_ACC_READ
    WRITE = EPT_VIOLATION_ACC_WRITE
    FETCH = EPT_VIOLATION_ACC_INSTR


@dataclass(frozen=True)
class EptCaps:
    """The EPT capabilities that change a walk's outcome.

    ``maxphyaddr`` is the physical-address width M (bits 51:M of every
    entry are reserved).  The flags mirror IA32_VMX_EPT_VPID_CAP bits 0,
    16, 17, 21 and 22.  :meth:`for_model` gives a CPU model's;
    :meth:`modelled` (and :data:`DEFAULT_EPT_CAPS`) the default model's.
    """

    maxphyaddr: int = MAXPHYADDR
    execute_only: bool = False
    pages_2m: bool = True
    pages_1g: bool = True
    ad_flags: bool = True
    advanced_exit_info: bool = False

    def __post_init__(self):
        if not 36 <= self.maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR must be 36..52, not {self.maxphyaddr}")

    @classmethod
    def from_msr(cls, ept_vpid_cap: int, maxphyaddr: int) -> "EptCaps":
        """Capabilities read from an IA32_VMX_EPT_VPID_CAP value."""
        return cls(maxphyaddr=maxphyaddr,
                   execute_only=bool(ept_vpid_cap & VMX_EPT_EXECUTE_ONLY_BIT),
                   pages_2m=bool(ept_vpid_cap & VMX_EPT_2MB_PAGE_BIT),
                   pages_1g=bool(ept_vpid_cap & VMX_EPT_1GB_PAGE_BIT),
                   ad_flags=bool(ept_vpid_cap & VMX_EPT_AD_BIT),
                   advanced_exit_info=bool(ept_vpid_cap & VMX_EPT_ADVANCED_EXIT_INFO_BIT))

    @classmethod
    def modelled(cls) -> "EptCaps":
        """The default CPU model's (see :meth:`for_model`)."""
        return cls.for_model(None)

    @classmethod
    def for_model(cls, model=None) -> "EptCaps":
        """A CPU model's: its IA32_VMX_EPT_VPID_CAP (0 if it has none) and MAXPHYADDR.
        ``model``: a CpuModel, a spec string or None (the default model)."""
        m = _vcaps.model_of(model)
        return cls.from_msr(m.vmx_msrs.get(_vcaps.MSR_IA32_VMX_EPT_VPID_CAP, 0), m.maxphyaddr)

    @property
    def address_mask(self) -> int:
        """Bits M-1:12: where an entry or the EPTP holds a physical address."""
        return _bits(self.maxphyaddr - 1, 12)

    @property
    def high_reserved(self) -> int:
        """Bits 51:M, reserved in every entry (and in the EPTP)."""
        return _bits(51, self.maxphyaddr) if self.maxphyaddr < 52 else 0


DEFAULT_EPT_CAPS = EptCaps.modelled()


@dataclass(frozen=True)
class LinearRights:
    """Rights of the guest's own (linear) translation, reported in bits 9-11
    of the qualification with advanced VM-exit information: user-mode
    address, writable page, executable page."""

    user: bool
    writable: bool
    executable: bool


@dataclass(frozen=True)
class WalkStep:
    """One EPT paging-structure entry read during a walk."""

    level: int          # 4 = PML4E ... 1 = PTE
    entry_pa: int       # host-physical address of the entry
    entry: int          # its value as read (before any A/D update)

    @property
    def name(self) -> str:
        return _LEVEL_NAMES[self.level]


@dataclass(frozen=True)
class EptTranslation:
    """A successful translation.

    ``rights`` are the effective R/W/X rights (bits 2:0: the AND of bits
    2:0 of every entry used), ``leaf_rights`` those of the leaf alone.
    """

    gpa: int
    hpa: int
    page_size: int
    rights: int
    leaf_rights: int
    memory_type: int
    ignore_pat: bool
    path: tuple[WalkStep, ...]


@dataclass(frozen=True)
class EptViolation:
    """An EPT violation: exit reason EPT_VIOLATION (48).

    ``qualification`` is the exit qualification, ``gpa`` the value of the
    GUEST_PHYSICAL_ADDRESS field, ``gla`` the GUEST_LINEAR_ADDRESS field
    (None when bit 7 of the qualification is clear).  ``reason`` says which
    entry refused the access.
    """

    gpa: int
    qualification: int
    gla: Optional[int]
    reason: str
    path: tuple[WalkStep, ...]


@dataclass(frozen=True)
class EptMisconfig:
    """An EPT misconfiguration: exit reason EPT_MISCONFIG (49); ``gpa`` is
    the GUEST_PHYSICAL_ADDRESS field.  ``reason`` names the faulty setting of
    the entry ``path[-1]``."""

    gpa: int
    reason: str
    path: tuple[WalkStep, ...]


EptResult = Union[EptTranslation, EptViolation, EptMisconfig]


def reserved_bits(level: int, leaf: bool, caps: EptCaps = DEFAULT_EPT_CAPS) -> int:
    """Bits that must be 0 in a present EPT entry at ``level`` (4 = PML4E).

    ``leaf`` says whether the entry maps a page (a PTE, or a PDPTE/PDE with
    bit 7 set).  Bit 7 of a PDPTE (PDE) is reserved when 1-GiB (2-MiB) pages
    are not supported, so such an entry is "leaf" with a reserved bit set.
    """
    if level not in _LEVEL_NAMES:
        raise ValueError(f"EPT level must be 1..4, not {level}")
    mask = caps.high_reserved
    if level == 4:
        return mask | _bits(7, 3)
    if level == 1:
        return mask
    if not leaf:
        return mask | _bits(6, 3)
    if level == 3:
        return mask | _bits(29, 12) | (0 if caps.pages_1g else VMX_EPT_LARGE_PAGE_BIT)
    return mask | _bits(20, 12) | (0 if caps.pages_2m else VMX_EPT_LARGE_PAGE_BIT)


def misconfiguration(entry: int, level: int, caps: EptCaps = DEFAULT_EPT_CAPS) -> Optional[str]:
    """Why a present EPT entry is an EPT misconfiguration, or None.

    SDM "EPT Misconfigurations": bits 2:0 write-only (010b) or
    write/execute (110b); execute-only (100b) without the capability; a
    reserved bit set; a leaf with memory type 2, 3 or 7.
    """
    name = _LEVEL_NAMES[level]
    rwx = entry & VMX_EPT_RWX_MASK
    if rwx in (0b010, 0b110):
        return f"{name} bits 2:0 = {rwx:03b}b: write without read is a misconfiguration"
    if rwx == 0b100 and not caps.execute_only:
        return f"{name} bits 2:0 = 100b: execute-only is not supported (IA32_VMX_EPT_VPID_CAP bit 0)"
    leaf = level == 1 or (level in (2, 3) and bool(entry & VMX_EPT_LARGE_PAGE_BIT))
    bad = entry & reserved_bits(level, leaf, caps)
    if bad:
        return f"{name} has reserved bits set: {bad:#x}"
    if leaf:
        mt = (entry >> VMX_EPT_MT_EPTE_SHIFT) & 7
        if mt in RESERVED_EPT_MEMORY_TYPES:
            return f"{name} memory type {mt} is reserved"
    return None


def ept_walk(read_mem: Callable[[int, int], bytes],
             write_mem: Callable[[int, bytes], None],
             eptp: int, gpa: int, access: EptAccess, *,
             gla: Optional[int] = None, gla_is_translation: bool = False,
             guest_rights: Optional[LinearRights] = None,
             caps: EptCaps = DEFAULT_EPT_CAPS) -> EptResult:
    """Translate ``gpa`` for ``access`` through the EPT rooted at ``eptp``.

    ``gla`` is the guest linear address whose use caused the access (None
    for accesses with no valid linear address, such as the loads of the
    PDPTEs by MOV to CR with PAE paging).  ``gla_is_translation`` is True
    when ``gpa`` is the translation of ``gla`` (the final access), False
    when it is the guest-physical address of one of the guest's own
    paging-structure entries used to translate ``gla``.  When the EPTP
    enables accessed and dirty flags, such paging-structure accesses are
    treated as writes (W permission required, dirty flag set, bits 0 and 1
    both reported on a violation).  ``guest_rights`` feeds bits 9-11 of the
    qualification when ``caps.advanced_exit_info`` is set.

    The walk stops at the first not-present entry (a violation) or
    misconfigured entry; a misconfiguration takes precedence over a
    permission violation.  Bad arguments raise ValueError.
    """
    access = _check_access(access)
    if (eptp & VMX_EPTP_PWL_MASK) != VMX_EPTP_PWL_4:
        raise ValueError(f"EPTP {eptp:#x}: only a page-walk length of 4 is modelled")
    if not 0 <= gpa < (1 << GPA_WIDTH_4_LEVEL):
        raise ValueError(f"guest-physical address {gpa:#x} is outside the 48 bits of 4-level EPT")
    if gla_is_translation and gla is None:
        raise ValueError("gla_is_translation needs the guest linear address (gla)")
    ad = bool(eptp & VMX_EPTP_AD_ENABLE_BIT)
    if ad and not caps.ad_flags:
        raise ValueError(f"EPTP {eptp:#x} enables accessed/dirty flags, which these caps do not support")
    if (caps.advanced_exit_info and gla_is_translation and guest_rights is None):
        raise ValueError("advanced VM-exit information needs guest_rights for a translation access")

    effective = access
    if ad and gla is not None and not gla_is_translation:
        effective = EptAccess.READ | EptAccess.WRITE

    path: list[WalkStep] = []
    combined = VMX_EPT_RWX_MASK
    table = eptp & caps.address_mask
    level = 4
    while True:
        entry_pa = table + 8 * ((gpa >> _LEVEL_SHIFT[level]) & 0x1FF)
        entry = _U64.unpack(read_mem(entry_pa, 8))[0]
        path.append(WalkStep(level, entry_pa, entry))
        combined &= entry
        if not entry & VMX_EPT_RWX_MASK:
            return _violation(gpa, effective, combined, gla, gla_is_translation, guest_rights,
                              caps, f"{_LEVEL_NAMES[level]} is not present", path)
        problem = misconfiguration(entry, level, caps)
        if problem is not None:
            return EptMisconfig(gpa, problem, tuple(path))
        if level == 1 or entry & VMX_EPT_LARGE_PAGE_BIT:
            break
        table = entry & caps.address_mask
        level -= 1

    missing = int(effective) & ~combined & VMX_EPT_RWX_MASK
    if missing:
        refused = "/".join(n for bit, n in ((1, "read"), (2, "write"), (4, "execute")) if missing & bit)
        return _violation(gpa, effective, combined, gla, gla_is_translation, guest_rights, caps,
                          f"{refused} not allowed by the EPT entries (rights {combined & 7:03b}b)",
                          path)

    page_size = _LEAF_PAGE_SIZE[level]
    leaf = path[-1].entry
    if ad:
        for i, step in enumerate(path):
            new = step.entry | VMX_EPT_ACCESS_BIT
            if i == len(path) - 1 and effective & EptAccess.WRITE:
                new |= VMX_EPT_DIRTY_BIT
            if new != step.entry:
                write_mem(step.entry_pa, _U64.pack(new))
    return EptTranslation(
        gpa=gpa,
        hpa=(leaf & caps.address_mask & ~(page_size - 1)) | (gpa & (page_size - 1)),
        page_size=page_size,
        rights=combined & VMX_EPT_RWX_MASK,
        leaf_rights=leaf & VMX_EPT_RWX_MASK,
        memory_type=(leaf >> VMX_EPT_MT_EPTE_SHIFT) & 7,
        ignore_pat=bool(leaf & VMX_EPT_IPAT_BIT),
        path=tuple(path))


_VALID_ACCESSES = (EptAccess.READ, EptAccess.WRITE, EptAccess.READ | EptAccess.WRITE, EptAccess.FETCH)


def _check_access(access) -> EptAccess:
    if isinstance(access, bool) or not isinstance(access, int) or access not in _VALID_ACCESSES:
        raise ValueError(f"access must be EptAccess READ, WRITE, READ|WRITE or FETCH, not {access!r}")
    return EptAccess(access)


def _violation(gpa, effective, combined, gla, gla_is_translation, guest_rights, caps,
               reason, path) -> EptViolation:
    q = int(effective) | ((combined & VMX_EPT_RWX_MASK) << EPT_VIOLATION_RWX_SHIFT)
    if gla is not None:
        q |= EPT_VIOLATION_GVA_IS_VALID
        if gla_is_translation:
            q |= EPT_VIOLATION_GVA_TRANSLATED
            if caps.advanced_exit_info:
                q |= ((EPT_VIOLATION_GVA_USER if guest_rights.user else 0)
                      | (EPT_VIOLATION_GVA_WRITABLE if guest_rights.writable else 0)
                      | (EPT_VIOLATION_GVA_EXECUTABLE if guest_rights.executable else 0))
    return EptViolation(gpa, q, gla, reason, tuple(path))


class EptBuildError(ValueError):
    """A mapping request the builder cannot honour (bad alignment, a clash
    with an existing mapping of another size, the table pool exhausted)."""


class EptBuilder:
    """Writes 4-level EPT paging structures into a :class:`PhysMem`.

    Tables are allocated from ``[pool_base, pool_base + pool_size)``, a
    4-KiB-aligned region of ``mem`` that the builder owns (it zeroes each
    table it takes).  Non-leaf entries are written with R/W/X all set, so
    the rights of a mapping are those of its leaf.  :attr:`eptp` is the EPTP
    value to load (write-back paging structures, page-walk length 4, A/D
    flags enabled iff ``ad``).
    """

    def __init__(self, mem: PhysMem, pool_base: int, pool_size: int, *,
                 ad: bool = False, caps: EptCaps = DEFAULT_EPT_CAPS):
        if pool_base % PAGE_4K or pool_size % PAGE_4K or pool_size <= 0:
            raise EptBuildError(f"table pool {pool_base:#x}+{pool_size:#x} must be 4 KiB aligned and non-empty")
        if not mem.contains(pool_base, pool_size):
            raise EptBuildError(f"table pool {pool_base:#x}+{pool_size:#x} is outside RAM")
        self.mem = mem
        self.caps = caps
        self._next = pool_base
        self._end = pool_base + pool_size
        self.pml4 = self._alloc_table()
        self.eptp = self.pml4 | VMX_EPTP_MT_WB | VMX_EPTP_PWL_4 | (VMX_EPTP_AD_ENABLE_BIT if ad else 0)

    def _alloc_table(self) -> int:
        if self._next >= self._end:
            raise EptBuildError("EPT table pool exhausted")
        pa = self._next
        self._next += PAGE_4K
        self.mem.write(pa, bytes(PAGE_4K))
        return pa

    def map(self, gpa: int, hpa: int, size: int, *, rights: int = VMX_EPT_RWX_MASK,
            page_size: int = PAGE_4K, memory_type: int = MEMTYPE_WB, ignore_pat: bool = False) -> None:
        """Map ``[gpa, gpa + size)`` to ``[hpa, hpa + size)`` with leaves of
        ``page_size`` (4 KiB, 2 MiB or 1 GiB) carrying ``rights`` (bits 2:0)
        and ``memory_type``.  Existing leaves of the same size are replaced.
        Any ``rights`` value is written as given (tests build misconfigured
        entries this way); ``rights = 0`` writes not-present leaves."""
        if page_size not in (PAGE_4K, PAGE_2M, PAGE_1G):
            raise EptBuildError(f"page size must be 4 KiB, 2 MiB or 1 GiB, not {page_size:#x}")
        if gpa % page_size or hpa % page_size or size % page_size or size <= 0:
            raise EptBuildError(f"gpa {gpa:#x}, hpa {hpa:#x} and size {size:#x} must be multiples of the page size {page_size:#x}")
        if gpa + size > (1 << GPA_WIDTH_4_LEVEL) or hpa + size > (1 << self.caps.maxphyaddr):
            raise EptBuildError("address beyond the guest-physical or physical address width")
        if rights & ~VMX_EPT_RWX_MASK or memory_type & ~7:
            raise EptBuildError(f"rights {rights:#x} must fit bits 2:0 and memory type {memory_type} 0..7")
        leaf_level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}[page_size]
        flags = rights | (memory_type << VMX_EPT_MT_EPTE_SHIFT) | (VMX_EPT_IPAT_BIT if ignore_pat else 0)
        if leaf_level > 1:
            flags |= VMX_EPT_LARGE_PAGE_BIT
        for off in range(0, size, page_size):
            slot = self._slot(gpa + off, leaf_level, create=True)
            old = self.mem.read_u64(slot)
            if old & VMX_EPT_RWX_MASK and leaf_level > 1 and not old & VMX_EPT_LARGE_PAGE_BIT:
                raise EptBuildError(f"gpa {gpa + off:#x} is already mapped with smaller pages")
            self.mem.write_u64(slot, (hpa + off) | flags)

    def unmap(self, gpa: int, size: int) -> None:
        """Clear every leaf inside ``[gpa, gpa + size)``; a leaf that is only
        partly inside is an error.  Unmapped parts are skipped."""
        if gpa % PAGE_4K or size % PAGE_4K or size <= 0:
            raise EptBuildError(f"gpa {gpa:#x} and size {size:#x} must be 4 KiB multiples")
        addr, end = gpa, gpa + size
        while addr < end:
            found = self.leaf(addr)
            if found is None:
                addr += PAGE_4K
                continue
            slot, level = found
            span = _LEAF_PAGE_SIZE[level]
            start = addr & ~(span - 1)
            if start < gpa or start + span > end:
                raise EptBuildError(f"the {span:#x}-byte page at gpa {start:#x} is only partly inside the range")
            self.mem.write_u64(slot, 0)
            addr = start + span

    def snapshot(self) -> tuple[int, bytes]:
        """The tables written so far (the used part of the pool), for :meth:`restore`."""
        return self._next, self.mem.read(self.pml4, self._next - self.pml4)

    def restore(self, snap: tuple[int, bytes]) -> None:
        """Put back the tables of a :meth:`snapshot` taken from a builder over the
        same pool (a cheap way to rebuild the same EPT many times)."""
        nxt, data = snap
        if nxt > self._end or self.pml4 + len(data) != nxt:
            raise EptBuildError("the snapshot was not taken from a builder over this pool")
        self.mem.write(self.pml4, data)
        self._next = nxt

    def leaf(self, gpa: int) -> Optional[tuple[int, int]]:
        """(host-physical address of the present leaf entry mapping ``gpa``,
        its level), or None if no present leaf maps it."""
        table = self.pml4
        for level in (4, 3, 2, 1):
            slot = table + 8 * ((gpa >> _LEVEL_SHIFT[level]) & 0x1FF)
            entry = self.mem.read_u64(slot)
            if not entry & VMX_EPT_RWX_MASK:
                return None
            if level == 1 or (level in (2, 3) and entry & VMX_EPT_LARGE_PAGE_BIT):
                return slot, level
            table = entry & self.caps.address_mask
        raise AssertionError("unreachable")

    def entry_address(self, gpa: int, level: int) -> int:
        """Host-physical address of the entry at ``level`` (4 = PML4E) on
        the walk of ``gpa``; the tables above it must exist."""
        return self._slot(gpa, level, create=False)

    def _slot(self, gpa: int, level: int, *, create: bool) -> int:
        table = self.pml4
        for lv in range(4, level, -1):
            slot = table + 8 * ((gpa >> _LEVEL_SHIFT[lv]) & 0x1FF)
            entry = self.mem.read_u64(slot)
            if entry & VMX_EPT_LARGE_PAGE_BIT and lv in (2, 3) and entry & VMX_EPT_RWX_MASK:
                raise EptBuildError(f"gpa {gpa:#x} is already mapped by a larger page ({_LEVEL_NAMES[lv]})")
            if not entry & VMX_EPT_RWX_MASK:
                if not create:
                    raise EptBuildError(f"no {_LEVEL_NAMES[lv - 1]} table for gpa {gpa:#x}")
                entry = self._alloc_table() | VMX_EPT_RWX_MASK
                self.mem.write_u64(slot, entry)
            table = entry & self.caps.address_mask
        return table + 8 * ((gpa >> _LEVEL_SHIFT[level]) & 0x1FF)
