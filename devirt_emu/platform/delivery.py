"""Interrupt and exception delivery outside IA-32e mode, on a core.

Unicorn delivers no event through the guest's IDT (DESIGN.md: exceptions and
INT n reach UC_HOOK_INTR or our hooks); the core does it.  IA-32e mode
(64-bit gates) is in :meth:`Core.deliver_event`; :class:`LegacyDelivery`, a part
of :class:`~devirt_emu.platform.core.Core`, does the rest, as the "Operation" of
INT n/INTO/INT3/INT1 in the Intel SDM Vol. 2 and Vol. 3A "Interrupt and
Exception Handling" describe it:

* real-address mode: the vector's 4-byte IP:CS entry at IDTR.base + 4 * vector
  (beyond IDTR.limit: #GP), FLAGS, CS and IP pushed (a stack without room for
  the 6 bytes: #SS), IF, TF, AC and RF cleared; no error code is pushed.  An
  exception during delivery follows the double-fault rules; one during the
  delivery of #DF shuts the processor down (the core's deliver_exception).
* protected mode, virtual-8086 mode included: the 8-byte gate (beyond the IDT
  limit, not a task, interrupt or trap gate: #GP(vector * 8 + 2 + EXT); an
  INT n, INT3 or INTO through a gate whose DPL < CPL: #GP(vector * 8 + 2);
  not present: #NP(vector * 8 + 2 + EXT)); a task gate switches tasks
  (:mod:`devirt_emu.platform.task_switch`); an interrupt or trap gate (16- or
  32-bit) enters its code segment at the same privilege level, at a more
  privileged one with the stack of that level from the current TSS (#TS,
  #SS, #NP, #GP with the selectors the SDM names), or, from virtual-8086
  mode, at level 0 with GS, FS, DS and ES pushed and then nulled.  The frame
  (SS and ESP on a stack switch, EFLAGS, CS, EIP, the error code) has the
  gate's size; TF, NT, VM and RF are cleared, IF too through an interrupt gate.
  INT n in virtual-8086 mode with IOPL < 3 is #GP(0) (:meth:`LegacyDelivery.check_v86_int`);
  the virtual-8086 mode extensions (CR4.VME: the redirection of INT n to the
  8086 vector table) are not modelled and end the run with a guest error.

EXT (bit 0 of the error codes) is 1 unless the event is INT n, INT3 or INTO.
The stack checks are made before anything is written, per push (a push must
lie within the stack segment: expand-up or expand-down, 16- or 32-bit).
Every read and write goes through ``Core.read_linear``/``write_linear``, so
paging, a second stage (EPT) and watched pages apply to them.
"""
from __future__ import annotations

import struct
from typing import Optional

from unicorn import x86_const as X

from ..x86 import (X86_CR4_VME, X86_EFLAGS_AC, X86_EFLAGS_IF, X86_EFLAGS_NT, X86_EFLAGS_RF,
                   X86_EFLAGS_TF, X86_EFLAGS_VM)
from . import descriptors as D
from .descriptors import descriptor_cache, flags_to_ar, selector_error_code
from .errors import GuestError, _Fault
from .paging import PageFault, UnsupportedPaging
from .tasks import tss_layout
from .ucinternals import ENV_IDT

GP, NP, SS, TS, PF = 13, 11, 12, 10, 14
_DESC_B = 1 << 22                 # SegmentCache.flags: the B (big) bit of a stack segment
_FLAGS_CODE, _FLAGS_EXPAND_DOWN = 1 << 11, 1 << 10


def push_offsets(sp: int, sizes, limit: int, flags: int) -> Optional[tuple[list[int], int]]:
    """The stack offsets of consecutive pushes of ``sizes`` bytes from ``sp``
    into a stack segment of byte-granular ``limit`` and QEMU cache ``flags``,
    and the stack pointer after them; None when one of them does not lie
    within the segment.  SS.B = 0: a 16-bit stack pointer (SP wraps at 64 KiB).
    An expand-up segment holds offsets 0..limit, an expand-down one
    limit+1..FFFFH (or FFFFFFFFH with B = 1)."""
    top = 0xFFFFFFFF if flags & _DESC_B else 0xFFFF
    down = not flags & _FLAGS_CODE and bool(flags & _FLAGS_EXPAND_DOWN)
    out = []
    for size in sizes:
        sp = (sp - size) & top
        last = sp + size - 1
        if (sp <= limit or last > top) if down else last > limit:
            return None
        out.append(sp)
    return out, sp


def set_sp(probe, old_esp: int, new_sp: int, ss_flags: int) -> None:
    """ESP after pushes: all 32 bits with a 32-bit stack (SS.B = 1), else SP only."""
    if not ss_flags & _DESC_B:
        new_sp = (old_esp & ~0xFFFF) | (new_sp & 0xFFFF)
    probe.set_gpr(4, new_sp & 0xFFFFFFFF)


class LegacyDelivery:
    """The outside-IA-32e-mode half of a core's event delivery (a part of the core).

    ``core`` gives the engine's state (``probe``, ``uc``), CPL and RIP, segment
    loads (``write_segment``), linear reads and writes, and its task switcher
    (``task_switcher``: delivery through an IDT task gate); ``tables`` reads the GDT/LDT.
    """

    def __init__(self, core, tables):
        self.core = core
        self.tables = tables

    def deliver(self, vector: int, error_code: Optional[int], return_rip: int, *,
                        soft: bool) -> bool:
        """Deliver ``vector`` in real-address or protected mode (``return_rip``:
        the linear address to return to; ``soft``: INT n, INT3 or INTO).
        Raises _Fault for an exception during delivery.  Returns False when the
        delivery ended in a VM exit (an IDT task gate under VMX)."""
        try:
            if not self.core.probe.cr(0) & 1:
                self._deliver_real(vector, return_rip)
                return True
            return self._deliver_protected(vector, error_code, return_rip, soft=soft)
        except UnsupportedPaging as e:
            raise GuestError(f"core {self.core.index}: delivering vector {vector}: {e}") from None

    # ------------------------------------------------------------------ real-address mode
    def _deliver_real(self, vector: int, return_rip: int) -> None:
        idt_base, idt_limit = self.core.probe.dtr(ENV_IDT)
        if vector * 4 + 3 > idt_limit:
            raise _Fault(GP, 0)
        cs_sel, cs_base, cs_limit, cs_flags = self.core.probe.segment(1)
        flags = self.core.probe.reg(X.UC_X86_REG_EFLAGS)
        ss_sel, ss_base, ss_limit, ss_flags = self.core.probe.segment(2)
        esp = self.core.probe.gpr(4)
        pushes = push_offsets(esp, (2, 2, 2), ss_limit, ss_flags)
        if pushes is None:
            raise _Fault(SS, 0)
        ip, cs = struct.unpack("<HH", self._read_linear_fault(idt_base + vector * 4, 4))
        offsets, sp = pushes
        for off, value in zip(offsets, (flags, cs_sel, return_rip - cs_base)):
            self._write_linear_fault(ss_base + off, (value & 0xFFFF).to_bytes(2, "little"))
        set_sp(self.core.probe, esp, sp, ss_flags)
        self.core.uc.reg_write(X.UC_X86_REG_EFLAGS, flags & ~(X86_EFLAGS_IF | X86_EFLAGS_TF | X86_EFLAGS_AC | X86_EFLAGS_RF))
        # a real-mode load of CS changes its selector and base only
        self.core.probe.set_segment(1, cs, cs << 4, cs_limit, cs_flags)
        self.core.probe.fix_hflags()
        self.core.probe.set_eip(ip)

    # ------------------------------------------------------------------ protected mode
    def _deliver_protected(self, vector: int, error_code: Optional[int], return_rip: int, *,
                           soft: bool) -> bool:
        ext = 0 if soft else 1
        idt_ec = vector * 8 + 2 + ext
        fl = self.core.probe.reg(X.UC_X86_REG_EFLAGS)
        v86 = bool(fl & X86_EFLAGS_VM)
        cpl = self.core.cpl()
        idt_base, idt_limit = self.core.probe.dtr(ENV_IDT)
        if vector * 8 + 7 > idt_limit:
            raise _Fault(GP, idt_ec)
        gate = struct.unpack("<Q", self._read_linear_fault(idt_base + vector * 8, 8))[0]
        gtype = D.desc_type(gate)
        if not D.is_system(gate) or gtype not in D.IDT_GATE_TYPES:
            raise _Fault(GP, idt_ec)
        if soft and D.desc_dpl(gate) < cpl:
            raise _Fault(GP, vector * 8 + 2)
        if not D.is_present(gate):
            raise _Fault(NP, idt_ec)
        if gtype == D.TASK_GATE:
            return not self.core.task_switcher.idt_task_switch(vector, gate, soft, error_code, return_rip)
        selector = D.gate_selector(gate)
        offset = D.gate_offset(gate)
        if selector & ~3 == 0:
            raise _Fault(GP, ext)
        sel_ec = selector_error_code(selector, ext)
        desc = self.tables.segment_entry(selector)
        if desc is None or not D.is_code(desc) or D.desc_dpl(desc) > cpl:
            raise _Fault(GP, sel_ec)
        if not D.is_present(desc):
            raise _Fault(NP, sel_ec)
        dpl = D.desc_dpl(desc)
        if not D.is_conforming_code(desc) and dpl < cpl:
            if v86 and dpl != 0:
                raise _Fault(GP, sel_ec)
            new_cpl = dpl
        else:
            if v86:
                raise _Fault(GP, sel_ec)
            new_cpl = cpl
        size = 4 if gtype & 8 else 2
        cs_base, cs_limit, cs_flags = descriptor_cache(desc)
        old_cs, old_cs_base = self.core.probe.segment(1)[:2]
        old_ss, old_ss_base, old_ss_limit, old_ss_flags = self.core.probe.segment(2)
        old_esp = self.core.probe.gpr(4)
        tail = [fl, old_cs, return_rip - old_cs_base]
        if error_code is not None:
            tail.append(error_code)
        if new_cpl < cpl:
            new_ss, new_esp, ss_desc = self._inner_stack(new_cpl, ext)
            ss_ec = selector_error_code(new_ss, ext)
            ss_base, ss_limit, ss_flags = descriptor_cache(ss_desc)
            frame = [old_ss, old_esp] + tail
            if v86:
                frame = [self.core.probe.segment(s)[0] for s in (5, 4, 3, 0)] + frame   # GS FS DS ES
            pushes = push_offsets(new_esp, (size,) * len(frame), ss_limit, ss_flags)
            if pushes is None:
                raise _Fault(SS, ss_ec)
        else:
            new_ss, new_esp = old_ss, old_esp
            ss_base, ss_limit, ss_flags = old_ss_base, old_ss_limit, old_ss_flags
            frame = tail
            pushes = push_offsets(old_esp, (size,) * len(frame), ss_limit, ss_flags)
            if pushes is None:
                raise _Fault(SS, ext)
        if offset > cs_limit:
            raise _Fault(GP, ext)
        offsets, sp = pushes
        mask = (1 << (8 * size)) - 1
        for off, value in zip(offsets, frame):
            self._write_linear_fault(ss_base + off, (value & mask).to_bytes(size, "little"))
        # the frame is on the stack: load the handler's state
        if new_cpl < cpl:
            self.core.write_segment(2, (new_ss & ~3) | new_cpl, ss_base, ss_limit,
                               flags_to_ar(ss_flags | (1 << 8)))
            if v86:
                for s in (0, 3, 4, 5):
                    self.core.write_segment(s, 0, 0, 0, 1 << 16)     # null: unusable
        self.core.write_segment(1, (selector & ~3) | new_cpl, cs_base, cs_limit,
                           flags_to_ar(cs_flags | (1 << 8)))
        set_sp(self.core.probe, new_esp, sp, ss_flags)
        new_flags = fl & ~(X86_EFLAGS_TF | X86_EFLAGS_NT | X86_EFLAGS_VM | X86_EFLAGS_RF)
        if not gtype & 1:                      # an interrupt gate (a trap gate leaves IF)
            new_flags &= ~X86_EFLAGS_IF
        self.core.uc.reg_write(X.UC_X86_REG_EFLAGS, new_flags)
        self.core.probe.set_eip(offset)
        return True

    def _inner_stack(self, new_cpl: int, ext: int) -> tuple[int, int, int]:
        """The stack of privilege level ``new_cpl`` from the current TSS, checked
        (SDM INT n, INTER-PRIVILEGE-LEVEL-INTERRUPT): (SS, ESP, SS descriptor)."""
        tr_sel, tr_base, tr_limit, tr_flags = self.core.probe.segment(7)
        layout = tss_layout((tr_flags >> 8) & 0xF)
        at_sp, at_ss = layout.stack(new_cpl)
        if at_ss + 1 > tr_limit:
            raise _Fault(TS, selector_error_code(tr_sel, ext))
        fmt = "<I" if layout.width == 4 else "<H"
        esp = struct.unpack(fmt, self._read_linear_fault(tr_base + at_sp, layout.width))[0]
        ss = struct.unpack("<H", self._read_linear_fault(tr_base + at_ss, 2))[0]
        if ss & ~3 == 0:
            raise _Fault(TS, ext)
        ss_ec = selector_error_code(ss, ext)
        desc = self.tables.segment_entry(ss)
        if desc is None or ss & 3 != new_cpl:
            raise _Fault(TS, ss_ec)
        if D.desc_dpl(desc) != new_cpl or not D.is_writable_data(desc):
            raise _Fault(TS, ss_ec)
        if not D.is_present(desc):
            raise _Fault(SS, ss_ec)
        return ss, esp, desc

    # ------------------------------------------------------------------ helpers
    def _read_linear_fault(self, linear: int, n: int) -> bytes:
        """read_linear for delivery: a page fault is the guest's #PF."""
        try:
            return self.core.read_linear(linear & 0xFFFFFFFF, n)
        except PageFault as pf:
            raise _Fault(PF, pf.error_code, pf.linear) from None

    def _write_linear_fault(self, linear: int, data: bytes) -> None:
        try:
            self.core.write_linear(linear & 0xFFFFFFFF, data)
        except PageFault as pf:
            raise _Fault(PF, pf.error_code, pf.linear) from None

    def check_v86_int(self) -> None:
        """INT n in virtual-8086 mode: #GP(0) when IOPL < 3; with CR4.VME = 1 the
        redirection of INT n to the 8086 vector table is not modelled."""
        fl = self.core.probe.reg(X.UC_X86_REG_EFLAGS)
        if not fl & X86_EFLAGS_VM or not self.core.probe.cr(0) & 1:
            return
        if self.core.probe.cr(4) & X86_CR4_VME:
            raise GuestError(f"core {self.core.index}: INT n in virtual-8086 mode with CR4.VME=1 at "
                             f"{self.core.rip():#x}: the virtual-8086 mode extensions are not modelled")
        if (fl >> 12) & 3 < 3:
            raise _Fault(GP, 0)
