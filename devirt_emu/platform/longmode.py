"""A documented fresh 64-bit state, without firmware.

Used by platform unit tests (and meant for the VMX direct-case API): it
writes a GDT, a TSS, an IDT and identity page tables into RAM and loads a
core with them, as firmware would at the end of boot.

Layout (physical = linear, identity mapped with 2 MiB pages over all RAM):

=============  ===========================================================
0x0001_0000    GDT: 0 null, 0x08 64-bit code DPL0, 0x10 data, 0x18 TSS (16 bytes),
               0x28 64-bit code DPL3, 0x30 data DPL3
0x0001_1000    TSS (RSP0 = 0x9F000, IST1 = 0x9E000)
0x0001_2000    IDT, 256 gates, all not present unless given
0x0002_0000    PML4, then PDPT (0x21000), then page directories (0x22000...)
0x0009_F000    top of the default stack (RSP)
=============  ===========================================================

Registers: CR0 = PE|MP|ET|NE|WP|PG (0x80010033), CR4 = PAE (0x20),
EFER = LME|LMA|NXE (0xD00), CS = 0x08, SS = DS = ES = 0x10, FS = GS = 0,
RFLAGS = 0x2 (interrupts off), RSP = 0x9F000.
"""
from __future__ import annotations

import struct

from unicorn import x86_const as X

from ..x86 import MSR_EFER

GDT = 0x10000
TSS = 0x11000
IDT = 0x12000
PML4 = 0x20000
STACK_TOP = 0x9F000
IST1_TOP = 0x9E000
CR0 = 0x80010033
CR4 = 0x20
EFER = 0xD00
KERNEL_CS, KERNEL_DS, TSS_SEL, USER_CS, USER_DS = 0x08, 0x10, 0x18, 0x2B, 0x33


def idt_gate(handler: int, *, selector: int = KERNEL_CS, ist: int = 0, dpl: int = 0,
             trap: bool = False, present: bool = True) -> bytes:
    """One 16-byte IA-32e mode IDT gate (SDM "64-Bit IDT Gate Descriptors")."""
    typ = 0xF if trap else 0xE
    lo = (handler & 0xFFFF) | (selector << 16) | (ist << 32) | (typ << 40) | (dpl << 45) \
        | (int(present) << 47) | (((handler >> 16) & 0xFFFF) << 48)
    return struct.pack("<QQ", lo, handler >> 32)


def write_environment(machine, idt: dict[int, bytes] | None = None) -> None:
    """Write GDT, TSS, IDT and page tables into the machine's RAM."""
    mem = machine.mem
    tss_lo = (0x67) | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xFF) << 56)
    gdt = [0, 0x00209A0000000000, 0x00CF92000000FFFF, tss_lo, TSS >> 32,
           0x0020FA0000000000, 0x00CFF2000000FFFF]
    machine.write_phys(GDT, struct.pack(f"<{len(gdt)}Q", *gdt))
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, STACK_TOP)
    struct.pack_into("<Q", tss, 0x24, IST1_TOP)
    struct.pack_into("<H", tss, 0x66, 0x68)
    machine.write_phys(TSS, bytes(tss))
    table = bytearray(256 * 16)
    for vec, gate in (idt or {}).items():
        table[vec * 16:vec * 16 + 16] = gate
    machine.write_phys(IDT, bytes(table))
    gib = (mem.size + (1 << 30) - 1) >> 30
    pdpt = PML4 + 0x1000
    machine.write_phys(PML4, struct.pack("<Q", pdpt | 3))
    for g in range(gib):
        pd = pdpt + 0x1000 * (1 + g)
        machine.write_phys(pdpt + 8 * g, struct.pack("<Q", pd | 3))
        entries = [((g << 30) | (i << 21) | 0x83) for i in range(512)
                   if (g << 30) | (i << 21) < mem.size]
        machine.write_phys(pd, struct.pack(f"<{len(entries)}Q", *entries))


def enter(core, rip: int, rsp: int = STACK_TOP) -> None:
    """Load ``core`` with the 64-bit state above and make it runnable at ``rip``."""
    from .core import State
    uc = core.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 7 * 8 - 1, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 16 - 1, 0))
    uc.reg_write(X.UC_X86_REG_CR3, PML4)
    uc.reg_write(X.UC_X86_REG_CR4, CR4)
    uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, EFER & ~0x400))
    uc.reg_write(X.UC_X86_REG_CR0, CR0)
    core.load_segment(1, KERNEL_CS)
    for seg in (0, 2, 3):
        core.load_segment(seg, KERNEL_DS)
    core.load_segment(4, 0)
    core.load_segment(5, 0)
    core.write_segment(7, TSS_SEL, TSS, 0x67, 0x8B)      # busy 64-bit TSS
    core.write_segment(6, 0, 0, 0, 1 << 16)               # LDTR unusable
    uc.reg_write(X.UC_X86_REG_RSP, rsp)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
    uc.reg_write(X.UC_X86_REG_RIP, rip)
    core.state = State.RUNNING
