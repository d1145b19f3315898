"""Firmware-free 16/32-bit protected-mode guests, shared by test files: GDT, IDT
and TSS images, the VMCS guest state of a flat 32-bit guest, a machine natively
or under the stock L0, a core put straight into protected mode, and the run to
its end."""
from __future__ import annotations

import struct

from unicorn import x86_const as X

from devirt_emu.machine import Machine
from devirt_emu.platform.core import State

ES, CS, SS, DS, FS, GS, LDTR, TR = range(8)     # Core.load_segment/write_segment indices


def legacy_machine(*, under_l0: bool, max_ns: int) -> Machine:
    """One core with 16 MiB without VMX, or, ``under_l0``, with 32 MiB under the
    stock L0 (``--arch vmx --config stock``)."""
    return Machine(cores=1, mem_mb=32 if under_l0 else 16, max_ns=max_ns, wall_timeout_s=60,
                   **({"arch": "vmx", "config": "stock"} if under_l0 else {}))


def gdt_image(descriptors: dict[int, int], limit: int) -> bytes:
    """``limit`` + 1 bytes of GDT with the 8-byte ``descriptors`` (selector ->
    descriptor) at their selectors' offsets, zero elsewhere."""
    table = bytearray(limit + 1)
    for selector, d in descriptors.items():
        struct.pack_into("<Q", table, selector, d)
    return bytes(table)


def idt_image(gates: dict[int, int]) -> bytes:
    """A 256-entry protected-mode IDT with the 8-byte ``gates`` (vector -> gate),
    zero (not present) elsewhere."""
    table = bytearray(256 * 8)
    for vector, g in gates.items():
        struct.pack_into("<Q", table, vector * 8, g)
    return bytes(table)


def flat_pm32_fields(*, gdt: tuple[int, int], idt: tuple[int, int],
                     tr: tuple[int, int, int, int], rsp: int, rflags: int = 0x2) -> dict[str, int]:
    """VMCS guest-state fields of a 32-bit protected-mode guest at CPL 0 on flat
    segments: GDTR and IDTR = (base, limit); CS = 08H (base 0, limit FFFFFFFFH,
    access rights C09BH); SS, DS, ES, FS, GS = 10H (the same, C093H); TR =
    (selector, base, limit, access rights); RFLAGS, RSP.  LDTR, the control
    registers and the controls are the caller's."""
    f = {
        "GUEST_GDTR_BASE": gdt[0], "GUEST_GDTR_LIMIT": gdt[1],
        "GUEST_IDTR_BASE": idt[0], "GUEST_IDTR_LIMIT": idt[1],
        "GUEST_CS_SELECTOR": 0x08, "GUEST_CS_BASE": 0, "GUEST_CS_LIMIT": 0xFFFFFFFF,
        "GUEST_CS_AR_BYTES": 0xC09B,
        "GUEST_TR_SELECTOR": tr[0], "GUEST_TR_BASE": tr[1], "GUEST_TR_LIMIT": tr[2],
        "GUEST_TR_AR_BYTES": tr[3],
        "GUEST_RFLAGS": rflags, "GUEST_RSP": rsp,
    }
    for s in ("SS", "DS", "ES", "FS", "GS"):
        f.update({f"GUEST_{s}_SELECTOR": 0x10, f"GUEST_{s}_BASE": 0,
                  f"GUEST_{s}_LIMIT": 0xFFFFFFFF, f"GUEST_{s}_AR_BYTES": 0xC093})
    return f


def with_task_state(tss: bytes, *, eip: int, esp: int, eflags: int = 0x2,
                    cr3: int | None = None, cs: int = 0x08, data: int = 0x10) -> bytes:
    """``tss`` (a 32-bit TSS) with a task's state written in: CR3 (offset 1CH,
    when given), EIP (20H), EFLAGS (24H), ESP (38H), ES, CS, SS, DS, FS, GS
    (48H-5CH, 4 bytes each) = ``data``, ``cs``, ``data`` ... (SDM vol. 3A
    "32-Bit Task-State Segment (TSS)")."""
    b = bytearray(tss)
    if cr3 is not None:
        struct.pack_into("<I", b, 0x1C, cr3)
    struct.pack_into("<II", b, 0x20, eip, eflags)
    struct.pack_into("<I", b, 0x38, esp)
    struct.pack_into("<6I", b, 0x48, data, cs, data, data, data, data)
    return bytes(b)


def enter_protected_mode(core, *, gdt: tuple[int, int], idt: tuple[int, int], cr0: int,
                         tr: tuple[int, int, int, int], cs: int, data: int, esp: int,
                         eip: int, cr3: int | None = None, eflags: int = 0x2) -> None:
    """Put ``core`` in protected mode and make it RUNNING: GDTR and IDTR =
    (base, limit), CR3 (when given, before CR0), CR0, CS = ``cs`` and ES, SS,
    DS, FS, GS = ``data`` loaded from that GDT, TR = (selector, base, limit,
    access rights) written as is, then ESP, EFLAGS and EIP."""
    uc = core.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, *gdt, 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, *idt, 0))
    if cr3 is not None:
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
    uc.reg_write(X.UC_X86_REG_CR0, cr0)
    core.load_segment(CS, cs)
    for s in (ES, SS, DS, FS, GS):
        core.load_segment(s, data)
    core.write_segment(TR, *tr)
    uc.reg_write(X.UC_X86_REG_ESP, esp)
    uc.reg_write(X.UC_X86_REG_EFLAGS, eflags)
    uc.reg_write(X.UC_X86_REG_RIP, eip)
    core.state = State.RUNNING


def run_to_end(m: Machine, *, under_l0: bool) -> Machine:
    """Run ``m`` until its verdict; ``under_l0``: the L0 first attaches (the
    core's current state becomes its guest state) and launches."""
    if under_l0:
        m.l0.attach()
        m.l0.launch()
    m.boot(prepared=True)
    m.run()
    return m
