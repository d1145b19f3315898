"""Architectural state of one core, read and decoded for people: registers with
RFLAGS/CR0/CR4/EFER as named bits, segments with their descriptor caches, the
GDT and IDT, the page walk level by level (through EPT when the vCPU uses
it), the local APIC's registers, and disassembly.

Bit names follow Linux's ``arch/x86/include/uapi/asm/processor-flags.h`` and
``msr-index.h`` without the ``X86_`` prefixes; positions are the SDM's (Vol. 1
"EFLAGS Register", Vol. 3A "Control Registers", "IA32_EFER MSR", "Segment
Descriptors", "Gate Descriptors in IA-32e Mode", "4-Level Paging").
Every reader here is side-effect free for the guest (``peek`` walks).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import x86_const as X

from .. import x86
from ..events import GPR_NAMES, SEG_NAMES
from ..vmx import controls as _C
from ..platform import paging as P
from ..platform.descriptors import desc_base, desc_dpl, desc_limit, desc_type, is_present, is_system

# ---------------------------------------------------------------- bit tables
def _bits_of(module, prefix: str, exclude=()) -> tuple:
    """(short name, bit) of every single-bit constant ``prefix*`` of ``module``,
    lowest bit first: the display tables are derived from the one table of
    each architectural list (devirt_emu/x86.py, vmx/controls.py)."""
    out = []
    for name, v in vars(module).items():
        if name.startswith(prefix) and name not in exclude and isinstance(v, int) \
                and v > 0 and not v & (v - 1):
            out.append((name[len(prefix):], v.bit_length() - 1))
    return tuple(sorted(out, key=lambda t: t[1]))


#: RFLAGS bits (IOPL, a 2-bit field, is shown as IOPL=n; bit 1 is always 1).
RFLAGS_BITS = _bits_of(x86, "X86_EFLAGS_", exclude=("X86_EFLAGS_FIXED",))
CR0_BITS = _bits_of(x86, "X86_CR0_")
CR4_BITS = _bits_of(x86, "X86_CR4_")
EFER_BITS = _bits_of(x86, "EFER_")
#: EPT paging-structure entry bits (vmx/controls.py).
EPT_BITS = (("R", _C.VMX_EPT_READABLE_MASK.bit_length() - 1),
            ("W", _C.VMX_EPT_WRITABLE_MASK.bit_length() - 1),
            ("X", _C.VMX_EPT_EXECUTABLE_MASK.bit_length() - 1),
            ("IPAT", _C.VMX_EPT_IPAT_BIT.bit_length() - 1),
            ("LARGE", _C.VMX_EPT_LARGE_PAGE_BIT.bit_length() - 1),
            ("A", _C.VMX_EPT_ACCESS_BIT.bit_length() - 1),
            ("D", _C.VMX_EPT_DIRTY_BIT.bit_length() - 1),
            ("XU", _C.VMX_EPT_USER_EXECUTABLE_MASK.bit_length() - 1),
            ("SVE", _C.VMX_EPT_SUPPRESS_VE_BIT.bit_length() - 1))
#: Segment access rights in the VMCS layout (SDM "Guest Register State").
AR_BITS = (("S", 4), ("P", 7), ("AVL", 12), ("L", 13), ("DB", 14), ("G", 15), ("UNUSABLE", 16))
#: Paging-structure entry bits of 4-level, PAE and 32-bit paging (SDM Vol. 3A
#: "Formats of Paging-Structure Entries"; the platform's walk keeps its own
#: private masks).
PTE_BITS = (("P", 0), ("RW", 1), ("US", 2), ("PWT", 3), ("PCD", 4), ("A", 5), ("D", 6),
            ("PS", 7), ("G", 8), ("XD", 63))


def decode(table, value: int) -> list[str]:
    """Names of the set bits of ``value`` in ``table`` (lowest first)."""
    return [name for name, bit in table if value >> bit & 1]


def rflags_text(value: int) -> str:
    names = decode(RFLAGS_BITS, value)
    names.append(f"IOPL={(value >> 12) & 3}")
    return " ".join(names)


def bits_text(table, value: int) -> str:
    return " ".join(decode(table, value)) or "-"


# ---------------------------------------------------------------- registers
#: Control registers by the names of Event.regs.
CONTROL_REGS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = x86.MSR_FS_BASE, x86.MSR_GS_BASE, x86.MSR_KERNEL_GS_BASE


def gprs(core) -> dict[str, int]:
    """The 16 GPRs, RIP (the linear address of the next instruction) and RFLAGS."""
    out = {n: core.read_reg(n) for n in GPR_NAMES}
    out["rip"] = core.rip()
    out["rflags"] = core.read_reg("rflags")
    return out


def control_regs(core) -> dict[str, int]:
    return {n: core.read_reg(n) for n in CONTROL_REGS}


@dataclass(frozen=True)
class Segment:
    name: str
    selector: int
    base: int
    limit: int
    ar: int          # VMCS access-rights layout

    def describe(self) -> str:
        if self.ar & (1 << 16):
            return f"{self.name.upper()} {self.selector:#06x} unusable"
        flags = " ".join(n for n, b in AR_BITS if self.ar >> b & 1)
        return (f"{self.name.upper()} {self.selector:#06x} base={self.base:#x} "
                f"limit={self.limit:#x} type={self.ar & 0xF:#x} dpl={(self.ar >> 5) & 3} {flags}")


def segments(core) -> list[Segment]:
    """ES..GS, LDTR and TR with their hidden parts (the descriptor caches)."""
    names = SEG_NAMES + ("ldtr", "tr")
    return [Segment(n, *core.read_segment(i)) for i, n in enumerate(names)]


def descriptor_tables(core) -> dict[str, tuple[int, int]]:
    """GDTR and IDTR as (base, limit)."""
    out = {}
    for name, reg in (("gdtr", X.UC_X86_REG_GDTR), ("idtr", X.UC_X86_REG_IDTR)):
        _, base, limit, _ = core.uc.reg_read(reg)
        out[name] = (base, limit)
    return out


def long_mode(core) -> bool:
    return bool(core.read_reg("efer") & (1 << 10))


def gdt_entries(core, max_entries: int = 64) -> list[tuple[int, str]]:
    """(selector, description) of each non-null GDT slot after the null
    descriptor (16-byte system descriptors in IA-32e mode take two slots)."""
    base, limit = descriptor_tables(core)["gdtr"]
    lm = long_mode(core)
    out = []
    off = 0
    while off + 7 <= limit and len(out) < max_entries:
        raw = core.read_linear(base + off, 8, peek=True)
        d = struct.unpack("<Q", raw)[0]
        size = 8
        if d == 0:
            off += 8
            if off == 8:
                out.append((0, "null"))
            continue
        elif is_system(d):
            t = desc_type(d)
            kind = {2: "LDT", 9: "TSS (available)", 0xB: "TSS (busy)", 1: "TSS16 (available)",
                    3: "TSS16 (busy)", 0xC: "call gate"}.get(t, f"system type {t:#x}")
            b = desc_base(d)
            if lm and t in (2, 9, 0xB, 0xC) and off + 15 <= limit:
                hi = struct.unpack("<Q", core.read_linear(base + off + 8, 8, peek=True))[0]
                b |= (hi & 0xFFFFFFFF) << 32
                size = 16
            text = f"{kind} base={b:#x} limit={desc_limit(d):#x} dpl={desc_dpl(d)}"
        else:
            t = desc_type(d)
            code = t & 8
            flags = []
            if code:
                flags.append("code" + (" L" if d >> 53 & 1 else "") + (" D" if d >> 54 & 1 else ""))
                flags.append("readable" if t & 2 else "execute-only")
            else:
                flags.append("data" + (" B" if d >> 54 & 1 else ""))
                flags.append("writable" if t & 2 else "read-only")
            text = (f"base={desc_base(d):#x} limit={desc_limit(d):#x} dpl={desc_dpl(d)} "
                    + " ".join(flags))
        if not is_present(d) and d:
            text += " (not present)"
        out.append((off, text))
        off += size
    return out


def idt_entries(core, vectors=range(256)) -> list[tuple[int, str]]:
    """(vector, description) of each present gate (16-byte gates in IA-32e
    mode, 8-byte ones otherwise)."""
    base, limit = descriptor_tables(core)["idtr"]
    lm = long_mode(core)
    size = 16 if lm else 8
    out = []
    for v in vectors:
        off = v * size
        if off + size - 1 > limit:
            break
        raw = core.read_linear(base + off, size, peek=True)
        lo = struct.unpack_from("<Q", raw)[0]
        if not is_present(lo):
            continue
        t = desc_type(lo)
        target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16
        if lm:
            target |= (struct.unpack_from("<Q", raw, 8)[0] & 0xFFFFFFFF) << 32
        kind = {0xE: "interrupt gate", 0xF: "trap gate", 5: "task gate", 6: "interrupt gate16",
                7: "trap gate16"}.get(t, f"type {t:#x}")
        ist = f" ist={lo >> 32 & 7}" if lm else ""
        out.append((v, f"{kind} {(lo >> 16) & 0xFFFF:#06x}:{target:#x} dpl={desc_dpl(lo)}{ist}"))
    return out


# ---------------------------------------------------------------- the page walk
@dataclass(frozen=True)
class WalkLevel:
    name: str
    entry_address: int      # guest-physical address of the entry (host-physical without EPT)
    value: int
    host_address: int | None = None   # under EPT: where the entry lives in host memory


_LEVEL_NAMES = {P.PagingMode.LEVEL4: ("PML4E", "PDPTE", "PDE", "PTE"),
                P.PagingMode.PAE: ("PDE", "PTE"),
                P.PagingMode.BITS32: ("PDE", "PTE")}


def ept_translate(mem, eptp: int, gpa: int):
    """The EPT walk for a read of ``gpa`` (nothing written back)."""
    from ..vmx.ept import EptAccess, ept_walk
    return ept_walk(mem.read, lambda pa, data: None, eptp, gpa, EptAccess.READ)


def page_walk(core, linear: int, eptp: int | None = None) -> dict:
    """The guest's walk of ``linear``, level by level, then (``eptp``) the EPT
    walk of the guest-physical result.  Returns a dict: ``mode``, ``levels``
    (WalkLevel list), ``gpa`` or ``fault``, ``ept`` (the EPT result or None)."""
    cr0, cr3, cr4, efer = (core.read_reg(n) for n in ("cr0", "cr3", "cr4", "efer"))
    mode = P.paging_mode(cr0, cr4, efer)
    mem = core.mem
    levels: list[WalkLevel] = []
    result: dict = {"mode": mode.value, "levels": levels, "gpa": None, "fault": None, "ept": None}

    def host(gpa: int) -> int | None:
        if eptp is None:
            return gpa
        from ..vmx.ept import EptTranslation
        r = ept_translate(mem, eptp, gpa)
        return r.hpa if isinstance(r, EptTranslation) else None

    def read_entry(addr: int, size: int):
        hpa = host(addr)
        if hpa is None or not mem.contains(hpa, size):
            return None
        return int.from_bytes(mem.read(hpa, size), "little")

    if mode is P.PagingMode.OFF:
        result["gpa"] = linear & 0xFFFFFFFF
    else:
        pdptes = None
        if mode is P.PagingMode.PAE:
            pdptes = [read_entry((cr3 & ~0x1F) + 8 * i, 8) or 0 for i in range(4)]
        try:
            w = P.walk(mode, linear, cr3, read_entry, code=0, pdptes=pdptes,
                       pse=bool(cr4 & (1 << 4)), nxe=bool(efer & (1 << 11)))
        except P.PageFault as f:
            result["fault"] = f"page fault (error code {f.error_code:#x})"
            w = None
        names = _LEVEL_NAMES.get(mode, ())
        entries = w.entries if w is not None else _partial_entries(mode, linear, cr3, read_entry,
                                                                   pdptes)
        if mode is P.PagingMode.PAE:
            levels.append(WalkLevel("PDPTE register", (cr3 & ~0x1F) + 8 * ((linear >> 30) & 3),
                                    pdptes[(linear >> 30) & 3]))
        for i, (addr, value, _size) in enumerate(entries):
            levels.append(WalkLevel(names[i] if i < len(names) else f"level {i}", addr, value,
                                    host(addr) if eptp is not None else None))
        if w is not None:
            result["gpa"] = w.pa
            result["page_size"] = w.page_size
    if eptp is not None and result["gpa"] is not None:
        result["ept"] = ept_translate(mem, eptp, result["gpa"])
    return result


def _partial_entries(mode, linear, cr3, read_entry, pdptes):
    """The entries a failed walk read, up to the one that stopped it."""
    if mode is P.PagingMode.LEVEL4:
        table, levels = cr3 & ~0xFFF & ((1 << 52) - 1), P.LEVELS_4LEVEL
    elif mode is P.PagingMode.PAE:
        pd = pdptes[(linear >> 30) & 3]
        if not pd & 1:
            return []
        table, levels = pd & ~0xFFF & ((1 << 52) - 1), P.LEVELS_PAE
    else:
        table, levels = cr3 & ~0xFFF & 0xFFFFFFFF, P.LEVELS_32BIT
    out = []
    for shift, index_mask, size, page, _always, _large, last in levels:
        addr = table + ((linear >> shift) & index_mask) * size
        e = read_entry(addr, size)
        out.append((addr, e or 0, size))
        if e is None or not e & 1 or last or (page and e & (1 << 7)):
            break
        table = e & ~0xFFF & ((1 << 52) - 1)
    return out


# ---------------------------------------------------------------- the local APIC
def apic_registers(lapic) -> list[tuple[str, int, str]]:
    """(name, value, decoded) for each readable register in the APIC's current
    mode (xAPIC by MMIO offset, x2APIC by MSR)."""
    from ..platform.lapic import APIC_REGISTERS
    out = [("IA32_APIC_BASE", lapic.apic_base, _apic_base_text(lapic.apic_base))]
    x2 = lapic.x2apic_enabled
    if not x2 and not lapic.xapic_enabled:
        return out
    for reg in APIC_REGISTERS:
        if x2:
            if not reg.x2apic or "r" not in reg.msr_access:
                continue
            value = lapic.rdmsr(reg.msr)
        else:
            if not reg.xapic or "r" not in reg.access:
                continue
            value = lapic.mmio_read(reg.offset, 4)
        out.append((reg.x2apic_name if x2 else reg.name, value, _apic_text(reg.name, value)))
    return out


_DELIVERY_MODES = {0: "fixed", 1: "lowest-priority", 2: "SMI", 4: "NMI", 5: "INIT", 6: "SIPI",
                   7: "ExtINT"}
_TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline", 3: "reserved"}


def _apic_base_text(v: int) -> str:
    parts = [f"base={v & ~0xFFF & ((1 << 52) - 1):#x}"]
    for name, bit in (("BSP", 8), ("EXTD", 10), ("EN", 11)):
        if v >> bit & 1:
            parts.append(name)
    return " ".join(parts)


def _apic_text(name: str, v: int) -> str:
    if name.startswith("APIC_LVT"):
        parts = [f"vector={v & 0xFF:#x}"]
        if name == "APIC_LVTT":
            parts.append(_TIMER_MODES[(v >> 17) & 3])
        elif name != "APIC_LVTERR":
            parts.append(_DELIVERY_MODES.get((v >> 8) & 7, "reserved"))
        if v >> 16 & 1:
            parts.append("masked")
        if v >> 12 & 1:
            parts.append("send-pending")
        return " ".join(parts)
    if name == "APIC_SPIV":
        return f"spurious={v & 0xFF:#x}" + (" enabled" if v >> 8 & 1 else " disabled") + \
            (" directed-EOI" if v >> 12 & 1 else "")
    if name == "APIC_ICR":
        dest = v >> 32
        short = ("", "self", "all-including-self", "all-excluding-self")[(v >> 18) & 3]
        return (f"vector={v & 0xFF:#x} {_DELIVERY_MODES.get((v >> 8) & 7, 'reserved')} "
                f"{'logical' if v >> 11 & 1 else 'physical'} dest={dest:#x}"
                + (f" shorthand={short}" if short else ""))
    if name[:8] in ("APIC_ISR", "APIC_IRR", "APIC_TMR") and v:
        word = int(name[-1])
        return "vectors " + ",".join(f"{32 * word + b:#x}" for b in range(32) if v >> b & 1)
    if name in ("APIC_TASKPRI", "APIC_PROCPRI", "APIC_ARBPRI"):
        return f"class={(v >> 4) & 0xF} sub={v & 0xF}"
    if name == "APIC_ID":
        return f"id={v >> 24 if v >> 24 else v}"
    return ""


# ---------------------------------------------------------------- disassembly
_CS_MODES = {}


def disassemble(code: bytes, address: int, bits: int, count: int):
    """Up to ``count`` (address, bytes, mnemonic, operands) from ``code``."""
    import capstone
    md = _CS_MODES.get(bits)
    if md is None:
        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
        md = _CS_MODES[bits] = capstone.Cs(capstone.CS_ARCH_X86, mode)
    out = []
    for insn in md.disasm(code, address):
        out.append((insn.address, bytes(insn.bytes), insn.mnemonic, insn.op_str))
        if len(out) >= count:
            break
    return out
