"""Symbols for the debugger: labels of the assembled image (firmware and guest)
and the symbol table of an ELF guest, both ways (name -> address, address ->
nearest name + offset)."""
from __future__ import annotations

import bisect
from pathlib import Path


class SymbolTable:
    """Names and linear addresses.  ``add`` keeps the first name given to an
    address for reverse lookups (later names still resolve forwards)."""

    def __init__(self, symbols: dict[str, int] | None = None):
        self.by_name: dict[str, int] = {}
        self._addrs: list[int] = []
        self._names: list[str] = []
        for name, addr in (symbols or {}).items():
            self.add(name, addr)

    def add(self, name: str, addr: int) -> None:
        if name in self.by_name:
            return
        self.by_name[name] = addr
        i = bisect.bisect_left(self._addrs, addr)
        if i < len(self._addrs) and self._addrs[i] == addr:
            return
        self._addrs.insert(i, addr)
        self._names.insert(i, name)

    def add_elf(self, path: str | Path) -> int:
        """Add the STT_FUNC/STT_OBJECT/STT_NOTYPE symbols of an ELF file's
        symbol tables; returns how many were added."""
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection
        n = 0
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if not isinstance(sec, SymbolTableSection):
                    continue
                for sym in sec.iter_symbols():
                    kind = sym["st_info"]["type"]
                    if not sym.name or kind not in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") \
                            or sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    self.add(sym.name, sym["st_value"])
                    n += 1
        return n

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> int:
        return self.by_name[name]

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def lookup(self, addr: int, max_offset: int = 0x10000) -> tuple[str, int] | None:
        """The nearest symbol at or below ``addr`` and the offset from it."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or addr - self._addrs[i] > max_offset:
            return None
        return self._names[i], addr - self._addrs[i]

    def describe(self, addr: int) -> str:
        """``name+0x12`` (or ``name``), empty when no symbol is near."""
        hit = self.lookup(addr)
        if hit is None:
            return ""
        name, off = hit
        return f"{name}+{off:#x}" if off else name
