"""Host-physical RAM: one buffer shared by every core.

Every core maps the same buffer with ``mem_map_ptr``, so a store by one core
is seen by the others (and by Python) at once.  Python reads and writes it
through :class:`PhysMem`; the VMX/SVM layers use it as their memory reader
for bitmaps, the VMCS region and page tables.

A store by Python into a page that a core has already translated as code is
not seen by that core until its translation cache is dropped: callers that
write code go through the machine (which invalidates), not through here.
"""
from __future__ import annotations

import ctypes
import struct

PAGE_SIZE = 4096

#: The local APIC's MMIO page (IA32_APIC_BASE default).  RAM never covers it.
LAPIC_MMIO_BASE = 0xFEE00000

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class PhysicalAccessError(Exception):
    """An access outside RAM (a bus error on real hardware)."""


class PhysMem:
    """RAM from physical address 0 to ``size`` (a multiple of 4 KiB)."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of 4 KiB, not {size:#x}")
        if size > LAPIC_MMIO_BASE:
            raise ValueError(
                f"RAM of {size >> 20} MiB would cover the LAPIC MMIO hole at {LAPIC_MMIO_BASE:#x}")
        self.size = size
        self.buf = (ctypes.c_ubyte * size)()
        self.ptr = ctypes.addressof(self.buf)
        self.view = memoryview(self.buf).cast("B")

    def _check(self, pa: int, n: int) -> None:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise PhysicalAccessError(f"physical access {pa:#x}+{n} outside RAM (size {self.size:#x})")

    def contains(self, pa: int, n: int = 1) -> bool:
        return 0 <= pa and pa + n <= self.size

    def read(self, pa: int, n: int) -> bytes:
        self._check(pa, n)
        return bytes(self.view[pa:pa + n])

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        self.view[pa:pa + len(data)] = data

    def read_u8(self, pa: int) -> int:
        self._check(pa, 1)
        return self.view[pa]

    def read_u32(self, pa: int) -> int:
        self._check(pa, 4)
        return _U32.unpack_from(self.view, pa)[0]

    def read_u64(self, pa: int) -> int:
        self._check(pa, 8)
        return _U64.unpack_from(self.view, pa)[0]

    def write_u8(self, pa: int, v: int) -> None:
        self._check(pa, 1)
        self.view[pa] = v & 0xFF

    def write_u32(self, pa: int, v: int) -> None:
        self._check(pa, 4)
        _U32.pack_into(self.view, pa, v & 0xFFFFFFFF)

    def write_u64(self, pa: int, v: int) -> None:
        self._check(pa, 8)
        _U64.pack_into(self.view, pa, v & 0xFFFFFFFFFFFFFFFF)
