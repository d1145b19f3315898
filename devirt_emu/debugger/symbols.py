"""Symbols for the debugger: labels of the assembled image (firmware and guest)
and the symbol table of an ELF guest, both ways (name -> address, address ->
nearest name + offset)."""
from __future__ import annotations

import bisect
import struct
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


def write_symbol_elf(path: str | Path, symbols: dict[str, int], code_end: int) -> None:
    """Write an ELF64 x86-64 file that holds only a symbol table (for GDB's
    ``symbol-file``): labels below ``code_end`` are functions in an
    allocated, executable ``.text`` of no file data (SHT_NOBITS), the others
    objects in a ``.data`` of the same kind.  Layout after the System V gABI
    (ELF header, section headers, Elf64_Sym entries of 24 bytes)."""
    items = sorted(symbols.items(), key=lambda kv: kv[1])
    code = [a for _, a in items if a < code_end] or [0]
    data = [a for _, a in items if a >= code_end] or [code_end]
    text_lo, text_hi = min(code), code_end
    data_lo, data_hi = min(data), max(data) + 1
    strtab = bytearray(b"\0")
    symtab = bytearray(bytes(24))
    for name, addr in items:
        off = len(strtab)
        strtab += name.encode() + b"\0"
        in_code = addr < code_end
        info = (1 << 4) | (2 if in_code else 1)          # STB_GLOBAL, STT_FUNC / STT_OBJECT
        symtab += struct.pack("<IBBHQQ", off, info, 0, 1 if in_code else 2, addr, 0)
    shstr = b"\0.text\0.data\0.symtab\0.strtab\0.shstrtab\0"

    def name_off(n: bytes) -> int:
        return shstr.index(n + b"\0")

    body = bytes(symtab) + bytes(strtab) + shstr
    sym_off = 64
    str_off = sym_off + len(symtab)
    shs_off = str_off + len(strtab)
    sh_off = (shs_off + len(shstr) + 7) & ~7
    sh = bytes(64)
    sh += struct.pack("<IIQQQQIIQQ", name_off(b".text"), 8, 0x6, text_lo, 0, text_hi - text_lo,
                      0, 0, 16, 0)
    sh += struct.pack("<IIQQQQIIQQ", name_off(b".data"), 8, 0x3, data_lo, 0, data_hi - data_lo,
                      0, 0, 8, 0)
    sh += struct.pack("<IIQQQQIIQQ", name_off(b".symtab"), 2, 0, 0, sym_off, len(symtab),
                      4, 1, 8, 24)
    sh += struct.pack("<IIQQQQIIQQ", name_off(b".strtab"), 3, 0, 0, str_off, len(strtab),
                      0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", name_off(b".shstrtab"), 3, 0, 0, shs_off, len(shstr),
                      0, 0, 1, 0)
    ident = b"\x7fELF" + bytes((2, 1, 1, 0)) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 6, 5)
    out = header + body
    out += bytes(sh_off - len(out)) + sh
    Path(path).write_bytes(out)
