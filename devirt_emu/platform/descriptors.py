"""Segment and gate descriptors: their fields, and the segment caches QEMU keeps.

Pure functions of 8-byte descriptor values (Intel SDM Vol. 3A "Segment
Descriptors", "Code- and Data-Segment Types", "System Descriptor Types" and
"Gate Descriptors"), plus the conversions between QEMU's ``SegmentCache.flags``
and the VMCS access-rights format.  The one table of system-descriptor types
outside IA-32e mode is here, and so is :class:`DescriptorTables`, the part of
a core that reads its GDT and LDT.
"""
from __future__ import annotations

import struct

from .ucinternals import ENV_GDT

#: System-descriptor types outside IA-32e mode (S = 0; SDM "System-Segment and
#: Gate-Descriptor Types").
TSS16_AVAILABLE = 1
LDT = 2
TSS16_BUSY = 3
CALL_GATE16 = 4
TASK_GATE = 5
INTR_GATE16 = 6
TRAP_GATE16 = 7
TSS32_AVAILABLE = 9
TSS32_BUSY = 11
CALL_GATE32 = 12
INTR_GATE32 = 14
TRAP_GATE32 = 15
#: The gates an IDT may hold outside IA-32e mode.
IDT_GATE_TYPES = frozenset({TASK_GATE, INTR_GATE16, TRAP_GATE16, INTR_GATE32, TRAP_GATE32})

#: Type bits of code and data segments (S = 1).
SEG_ACCESSED = 1
SEG_WRITABLE_OR_READABLE = 2     # data: writable; code: readable
SEG_EXPAND_DOWN_OR_CONFORMING = 4  # data: expand-down; code: conforming
SEG_CODE = 8


def desc_type(desc: int) -> int:
    """Bits 43:40: the type."""
    return (desc >> 40) & 0xF


def is_system(desc: int) -> bool:
    """S (bit 44) clear: a system segment or a gate."""
    return not (desc >> 44) & 1


def desc_dpl(desc: int) -> int:
    return (desc >> 45) & 3


def is_present(desc: int) -> bool:
    return bool((desc >> 47) & 1)


def desc_base(desc: int) -> int:
    return ((desc >> 16) & 0xFFFFFF) | ((desc >> 56) << 24)


def desc_limit(desc: int) -> int:
    """The byte-granular limit (G = 1 scales the 20-bit limit by 4 KiB, low bits set)."""
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    return (limit << 12) | 0xFFF if (desc >> 55) & 1 else limit


def is_code(desc: int) -> bool:
    return not is_system(desc) and bool(desc_type(desc) & SEG_CODE)


def is_conforming_code(desc: int) -> bool:
    return is_code(desc) and bool(desc_type(desc) & SEG_EXPAND_DOWN_OR_CONFORMING)


def is_writable_data(desc: int) -> bool:
    t = desc_type(desc)
    return not is_system(desc) and not t & SEG_CODE and bool(t & SEG_WRITABLE_OR_READABLE)


def is_readable(desc: int) -> bool:
    """A data segment, or a readable code segment."""
    t = desc_type(desc)
    return not is_system(desc) and (not t & SEG_CODE or bool(t & SEG_WRITABLE_OR_READABLE))


def gate_selector(gate: int) -> int:
    """Bits 31:16 of an interrupt, trap or task gate: the segment (or TSS) selector."""
    return (gate >> 16) & 0xFFFF


def gate_offset(gate: int) -> int:
    """The entry point of a 16-bit (bits 15:0) or 32-bit (bits 63:48, 15:0) gate."""
    off = gate & 0xFFFF
    if desc_type(gate) & 8:
        off |= ((gate >> 48) & 0xFFFF) << 16
    return off


def descriptor_cache(desc: int) -> tuple[int, int, int]:
    """(base, byte-granular limit, flags) of an 8-byte segment descriptor, the
    flags in QEMU's SegmentCache layout (the descriptor's bits 55:40 at 23:8)."""
    return desc_base(desc), desc_limit(desc), (desc >> 32) & 0x00F0FF00


def flags_to_ar(flags: int) -> int:
    """QEMU's SegmentCache.flags -> VMCS access rights (bit 16: unusable)."""
    ar = ((flags >> 8) & 0xFF) | (((flags >> 20) & 0xF) << 12)
    return ar if flags & (1 << 15) else ar | (1 << 16)


def ar_to_flags(ar: int) -> int:
    """VMCS access rights -> QEMU's SegmentCache.flags (unusable: not present)."""
    if ar & (1 << 16):
        return 0
    return ((ar & 0xFF) << 8) | (((ar >> 12) & 0xF) << 20)


def selector_error_code(selector: int, ext: int = 0) -> int:
    """The error code of a fault that names a selector: index and TI, IDT = 0, EXT."""
    return (selector & 0xFFFC) | ext


class DescriptorTables:
    """A core's GDT and LDT, read as the processor reads them (a part of the core,
    shared by event delivery and task switching).

    ``core`` gives the engine's state (``probe``: GDTR, LDTR, CR0), its RAM
    (``mem``), its watched pages (``watched_pages``) and linear reads
    (``read_linear``, which raises PageFault)."""

    def __init__(self, core):
        self.core = core

    def gdt_entry(self, selector: int) -> int | None:
        """The GDT entry of ``selector`` (its TI bit ignored), None beyond the GDT limit."""
        base, limit = self.core.probe.dtr(ENV_GDT)
        return self._entry(base, limit, selector)

    def ldt_entry(self, selector: int) -> int | None:
        """The LDT entry of ``selector``, None beyond the LDT limit (or without an LDT)."""
        _, base, limit, flags = self.core.probe.segment(6)
        if not flags & (1 << 15):         # LDTR not present: null or unusable
            return None
        return self._entry(base, limit, selector)

    def segment_entry(self, selector: int) -> int | None:
        """The descriptor ``selector`` names in the GDT or the LDT (its TI bit),
        None beyond the table's limit."""
        return self.ldt_entry(selector) if selector & 4 else self.gdt_entry(selector)

    def read_system(self, linear: int, n: int) -> bytes:
        """read_linear, without the page walk (and its register reads) when paging is
        off: a far transfer's operand and descriptors (measured: 19 us per descriptor
        through read_linear, 2 us this way)."""
        core = self.core
        if not core.probe.cr(0) & (1 << 31):
            pa = linear & 0xFFFFFFFF
            if core.mem.contains(pa, n) and not core.watches(pa, n):
                return core.mem.read(pa, n)
        return core.read_linear(linear, n)

    def _entry(self, base: int, limit: int, selector: int) -> int | None:
        idx = selector & ~7
        if idx + 7 > limit:
            return None
        return struct.unpack("<Q", self.read_system(base + idx, 8))[0]
