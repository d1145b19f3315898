"""Task switches on a core: when a far JMP/CALL, an IRET or an IDT gate attempts
one, the SDM's checks made before the switch, and the TASK_SWITCH event.

A mixin of :class:`~devirt_emu.platform.core.Core` (it uses the core's engine,
memory and event plumbing); the checks themselves are the pure functions of
:mod:`devirt_emu.platform.tasks`.
"""
from __future__ import annotations

import struct
import time
from typing import Optional

from unicorn import x86_const as X

from ..events import Event, Insn, Kind
from . import tasks
from .errors import GuestError, _Fault
from .paging import PageFault, UnsupportedPaging
from .ucinternals import ENV_GDT, HF_LMA, HF_PE

RFLAGS_NT = 1 << 14
RFLAGS_VM = 1 << 17
#: Instructions that may attempt a task switch (see TaskSwitching._task_switch_insn).
TASK_SWITCH_INSNS = frozenset({Kind.JMP_FAR, Kind.CALL_FAR, Kind.IRET})
_TASK_SWITCH_SOURCE = {Kind.JMP_FAR: "JMP", Kind.CALL_FAR: "CALL", Kind.IRET: "IRET"}


class TaskSwitching:
    """The task-switch half of a Core."""

    def _task_switch_insn(self, address: int, insn: Insn) -> bool:
        """A far JMP/CALL or an IRET is about to execute: does it attempt a task switch?

        Only outside IA-32e mode, in protected mode (not virtual-8086): a far
        JMP/CALL whose selector names a TSS descriptor or a task gate, an IRET
        with RFLAGS.NT = 1 (a task return).  The checks made before the switch
        (:mod:`devirt_emu.platform.tasks`) may fault; if they pass, the attempt
        is a TASK_SWITCH event (counted, traced, offered to the VMX layer, where
        it is a VM exit).  Without a VM exit Unicorn performs the switch (measured:
        Unicorn 2.1.4 does JMP, CALL, task-gate and IRET task switches as the SDM
        says), and the scans are re-armed after it since the new task's CR3 may
        differ.

        Returns False for an IRET that is not a task return (its usual path
        follows), True otherwise: an ordinary far transfer is left to Unicorn,
        which also raises its faults, and so is every far transfer in real,
        virtual-8086 and IA-32e mode (where a TSS or task gate is #GP).
        """
        kind = insn.kind
        hf = self.probe.hflags()
        if not hf & HF_PE or hf & HF_LMA:
            return kind is not Kind.IRET
        fl = self.probe.reg(X.UC_X86_REG_EFLAGS)
        if fl & RFLAGS_VM:
            return kind is not Kind.IRET
        if kind is Kind.IRET and not fl & RFLAGS_NT:
            return False
        t0 = time.perf_counter_ns()
        try:
            try:
                tss_selector = self._task_switch_target(address, insn)
            except (PageFault, UnsupportedPaging) as e:
                # the operand, the TSS link or a descriptor cannot be read by the platform
                # (not mapped): natively Unicorn decides; a VMX layer needs to know whether
                # this is a task switch
                if self.virt is not None:
                    raise GuestError(f"core {self.index}: {insn.text} at {address:#x}: cannot "
                                     f"tell whether it switches tasks ({e})") from None
                tss_selector = -1
            if tss_selector is None:
                return True         # an ordinary far transfer
            if tss_selector < 0:
                self._step_then_check(address)
                self._rearm_after_step = True
                return True
            self._count(Kind.TASK_SWITCH)
            self._run_events += 1
            event = Event(Kind.TASK_SWITCH, self.index, address, insn, regs=self.lazy_regs(),
                          extra={"tss_selector": tss_selector,
                                 "task_switch_source": _TASK_SWITCH_SOURCE[kind]})
            if self.trace is not None:
                self.trace(self, event)
            if self.virt is not None and self.virt.on_event(self, event):
                return True
            self._h_task_switch(address, insn)
        except Exception as e:
            self._hook_failed(e)
        finally:
            self._hook_ns += time.perf_counter_ns() - t0
        return True

    def _task_switch_target(self, address: int, insn: Insn) -> int | None:
        """The selector of the TSS a far JMP/CALL or a task-return IRET switches to,
        after the checks made before the switch (raises TaskFault); None when the
        far transfer is not a task switch, or its selector is null or beyond its
        descriptor table (Unicorn raises that #GP itself).  Reading the operand or
        a table may raise PageFault or UnsupportedPaging."""
        read_gdt = self._gdt_entry
        if insn.kind is Kind.IRET:
            _, tss_base, _, _ = self.probe.segment(7)
            link = struct.unpack("<H", self._read_system(tss_base, 2))[0]
            return tasks.task_return_tss(link, read_gdt)
        selector = insn.selector
        if selector is None:             # FF /3, FF /5: m16:16 or m16:32, the selector last
            linear = self.mem_operand_linear(insn, address)
            self._check_segment_limit(insn, linear)
            selector = struct.unpack("<H", self._read_system(linear + insn.op_size, 2))[0]
        if selector & ~3 == 0:
            return None
        desc = self._ldt_entry(selector) if selector & 4 else read_gdt(selector)
        if desc is None or not tasks.is_task_descriptor(desc):
            return None
        return tasks.far_transfer_tss(selector, desc, self.cpl(), read_gdt)

    def _idt_task_switch(self, vector: int, soft: bool, hardware: bool) -> bool:
        """Delivery of ``vector`` in protected mode outside IA-32e mode: if its IDT gate
        is a task gate, the task switch it attempts, after the checks made before it
        (raised as _Fault; the caller applies the double-fault rules).  Returns True
        when a VMX layer took it as a VM exit, False when the gate is not a task gate
        (interrupt and trap gates outside IA-32e mode are not modelled).  Natively a
        task switch through the IDT is a GuestError: the platform does not perform it.

        ``soft``: INT n or INT3 (the gate's DPL is checked, EXT is 0); ``hardware``:
        an exception or external interrupt (no instruction length); otherwise INT1.
        """
        uc = self.uc
        if not self.probe.hflags() & HF_PE or self.probe.reg(X.UC_X86_REG_EFLAGS) & RFLAGS_VM:
            return False
        _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 8 + 7 > idt_limit:
            raise _Fault(13, vector * 8 + 2 + (0 if soft else 1))
        try:
            gate = struct.unpack("<Q", self._read_system(idt_base + vector * 8, 8))[0]
            if (gate >> 44) & 1 or (gate >> 40) & 0xF != tasks.TASK_GATE:
                return False
            tss_selector = tasks.idt_task_gate_tss(vector, gate, self.cpl(), self._gdt_entry,
                                                   soft=soft)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        except UnsupportedPaging:
            return False
        except tasks.TaskFault as f:
            raise _Fault(f.vector, f.error_code) from None
        self._count(Kind.TASK_SWITCH)
        self._run_events += 1
        insn = None if hardware else self._soft_insn     # the INT n / INT3 / INT1 delivered
        event = Event(Kind.TASK_SWITCH, self.index, self.rip(), insn, vector=vector,
                      regs=self.lazy_regs(),
                      extra={"tss_selector": tss_selector, "task_switch_source": "IDT"})
        if self.trace is not None:
            self.trace(self, event)
        if self.virt is not None and self.virt.on_event(self, event):
            return True
        self._h_task_switch(self.rip(), None, vector, tss_selector)
        return True

    def _h_task_switch(self, address: int, insn: Optional[Insn], vector: int | None = None,
                       tss_selector: int | None = None) -> None:
        """A task switch (a TASK_SWITCH event, checked already): Unicorn performs
        those of far JMP/CALL and IRET (measured correct on 2.1.4) when it runs the
        instruction alone; the scans are re-armed after it (the new task's CR3 may
        differ).  One through an IDT task gate (``insn`` None or the INT n) is not
        performed by the platform: a guest error."""
        if insn is None or insn.kind not in TASK_SWITCH_INSNS:
            what = f"vector {vector}" if vector is not None else "an event"
            tss = f" (TSS {tss_selector:#x})" if tss_selector is not None else ""
            raise GuestError(f"core {self.index}: {what} at {address:#x} goes through a task "
                             f"gate{tss}: task switches through the IDT are not performed by "
                             "the platform")
        if insn.kind is Kind.IRET:
            self.nmi_blocked = False
        self._task_switch_from = (address, self.probe.segment(7)[0])   # see _after_task_switch_step
        self._step_then_check(address)
        self._rearm_after_step = True

    def _check_segment_limit(self, insn: Insn, linear: int) -> None:
        """The far pointer must lie within its segment: #GP(0), or #SS(0) for SS (SDM
        JMP/CALL "Protected Mode Exceptions"); a null (unusable) segment is #GP(0).
        Measured: Unicorn 2.1.4 does not check data-segment limits in protected mode
        (a MOV from beyond a 1-MiB DS limit reads memory), so the core does it here."""
        seg = insn.mem.seg
        _, base, limit, flags = self.probe.segment(seg)
        if not flags & (1 << 15):
            raise _Fault(13, 0)
        first = (linear - base) & 0xFFFFFFFF
        last = first + insn.mem.size - 1
        if flags & (1 << 12) and not flags & (1 << 11) and flags & (1 << 10):
            # expand-down data segment: valid offsets are limit+1 .. FFFFH or FFFFFFFFH (B bit)
            outside = first <= limit or last > (0xFFFFFFFF if flags & (1 << 22) else 0xFFFF)
        else:
            outside = last > limit
        if outside:
            raise _Fault(12 if seg == 2 else 13, 0)

    def _gdt_entry(self, selector: int) -> int | None:
        """The GDT entry of ``selector`` (its TI bit ignored), None beyond the GDT limit."""
        base, limit = self.probe.dtr(ENV_GDT)
        return self._table_entry(base, limit, selector)

    def _ldt_entry(self, selector: int) -> int | None:
        """The LDT entry of ``selector``, None beyond the LDT limit (or without an LDT)."""
        _, base, limit, flags = self.probe.segment(6)
        if not flags & (1 << 15):         # LDTR not present: null or unusable
            return None
        return self._table_entry(base, limit, selector)

    def _table_entry(self, base: int, limit: int, selector: int) -> int | None:
        idx = selector & ~7
        if idx + 7 > limit:
            return None
        return struct.unpack("<Q", self._read_system(base + idx, 8))[0]

    def _read_system(self, linear: int, n: int) -> bytes:
        """read_linear, without the page walk (and its register reads) when paging is
        off: a far transfer's operand and descriptors (measured: 19 us per descriptor
        through read_linear, 2 us this way)."""
        if not self.probe.cr(0) & (1 << 31):
            pa = linear & 0xFFFFFFFF
            if self.mem.contains(pa, n):
                return self.mem.read(pa, n)
        return self.read_linear(linear, n)
