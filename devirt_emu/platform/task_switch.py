"""Task switches on a core: when a far JMP/CALL, an IRET or an IDT gate attempts
one, the SDM's checks made before the switch, the TASK_SWITCH event, and the
switch itself: Unicorn performs those of far JMP/CALL and IRET, the platform
those through an IDT task gate (:meth:`TaskSwitcher.switch_for_event`).

:class:`TaskSwitcher` is a part of :class:`~devirt_emu.platform.core.Core`
(it uses the core's engine, memory and event plumbing through its public
methods); the checks and the TSS layouts are in :mod:`devirt_emu.platform.tasks`.
"""
from __future__ import annotations

import struct
from typing import Optional

from unicorn import x86_const as X

from ..x86 import X86_CR0_PG, X86_CR0_TS, X86_EFLAGS_NT, X86_EFLAGS_VM
from ..events import Event, Insn, Kind
from . import tasks
from .delivery import push_offsets, set_sp
from .descriptors import desc_type, descriptor_cache, flags_to_ar
from .errors import GuestError, _Fault
from .paging import PageFault, UnsupportedPaging
from .ucinternals import ENV_GDT, HF_LMA, HF_PE

#: DR7 L0-L3: the local breakpoint enables a task switch clears.
DR7_LOCAL_ENABLES = 0x55
#: Instructions that may attempt a task switch (see TaskSwitcher.far_transfer).
TASK_SWITCH_INSNS = frozenset({Kind.JMP_FAR, Kind.CALL_FAR, Kind.IRET})
_TASK_SWITCH_SOURCE = {Kind.JMP_FAR: "JMP", Kind.CALL_FAR: "CALL", Kind.IRET: "IRET"}


class TaskSwitcher:
    """The task switches of a core (a part of the core).

    ``core`` gives the engine's state (``probe``, ``uc``), CPL and RIP, segment
    loads, linear writes, the event plumbing (``count_event``, ``lazy_regs``,
    ``trace``, ``virt``), the single step of an instruction
    (``step_then_check``, ``rearm_after_step``) and ``after_mode_change``;
    ``tables`` reads the GDT/LDT.  ``stepping_from`` is (address, old TR) while
    Unicorn performs a far JMP/CALL/IRET task switch in a single step.
    """

    def __init__(self, core, tables):
        self.core = core
        self.tables = tables
        self.stepping_from: tuple[int, int] | None = None

    def far_transfer(self, address: int, insn: Insn) -> bool:
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
        core = self.core
        kind = insn.kind
        hf = core.probe.hflags()
        if not hf & HF_PE or hf & HF_LMA:
            return kind is not Kind.IRET
        fl = core.probe.reg(X.UC_X86_REG_EFLAGS)
        if fl & X86_EFLAGS_VM:
            return kind is not Kind.IRET
        if kind is Kind.IRET and not fl & X86_EFLAGS_NT:
            return False
        try:
            tss_selector = self._task_switch_target(address, insn)
        except (PageFault, UnsupportedPaging) as e:
            # the operand, the TSS link or a descriptor cannot be read by the platform
            # (not mapped): natively Unicorn decides; a VMX layer needs to know whether
            # this is a task switch
            if core.virt is not None:
                raise GuestError(f"core {core.index}: {insn.text} at {address:#x}: cannot "
                                 f"tell whether it switches tasks ({e})") from None
            tss_selector = -1
        if tss_selector is None:
            return True         # an ordinary far transfer
        if tss_selector < 0:
            core.step_then_check(address)
            core.rearm_after_step()
            return True
        core.count_event(Kind.TASK_SWITCH)
        event = Event(Kind.TASK_SWITCH, core.index, address, insn, regs=core.lazy_regs(),
                      extra={"tss_selector": tss_selector,
                             "task_switch_source": _TASK_SWITCH_SOURCE[kind]})
        if core.trace is not None:
            core.trace(core, event)
        if core.virt is not None and core.virt.on_event(core, event):
            return True
        self._h_task_switch(address, insn)
        return True

    def _task_switch_target(self, address: int, insn: Insn) -> int | None:
        """The selector of the TSS a far JMP/CALL or a task-return IRET switches to,
        after the checks made before the switch (raises TaskFault); None when the
        far transfer is not a task switch, or its selector is null or beyond its
        descriptor table (Unicorn raises that #GP itself).  Reading the operand or
        a table may raise PageFault or UnsupportedPaging."""
        read_gdt = self.tables.gdt_entry
        if insn.kind is Kind.IRET:
            _, tss_base, _, _ = self.core.probe.segment(7)
            link = struct.unpack("<H", self.tables.read_system(tss_base, 2))[0]
            return tasks.task_return_tss(link, read_gdt)
        selector = insn.selector
        if selector is None:             # FF /3, FF /5: m16:16 or m16:32, the selector last
            linear = self.core.mem_operand_linear(insn, address)
            self._check_segment_limit(insn, linear)
            selector = struct.unpack("<H", self.tables.read_system(linear + insn.op_size, 2))[0]
        if selector & ~3 == 0:
            return None
        desc = self.tables.ldt_entry(selector) if selector & 4 else read_gdt(selector)
        if desc is None or not tasks.is_task_descriptor(desc):
            return None
        return tasks.far_transfer_tss(selector, desc, self.core.cpl(), read_gdt)

    def idt_task_switch(self, vector: int, gate: int, soft: bool, error_code: Optional[int],
                         return_rip: int) -> bool:
        """Delivery of ``vector`` through the IDT task gate ``gate`` outside IA-32e
        mode (the gate's type, DPL and P bit checked by the caller): the checks on
        its TSS selector and the new TSS descriptor (raised as _Fault with EXT
        unless ``soft``; the caller applies the double-fault rules), then the
        TASK_SWITCH event: offered to a VMX layer, where it is a VM exit
        (returns True), else the platform switches tasks (returns False; see
        :meth:`switch_for_event`), the old task's EIP being ``return_rip``
        and ``error_code`` pushed onto the new task's stack.

        ``soft``: INT n, INT3 or INTO (the gate's DPL was checked, EXT is 0)."""
        try:
            tss_selector = tasks.idt_task_gate_tss(vector, gate, self.core.cpl(), self.tables.gdt_entry,
                                                   soft=soft)
        except tasks.TaskFault as f:
            raise _Fault(f.vector, f.error_code) from None
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        self.core.count_event(Kind.TASK_SWITCH)
        d = self.core.delivering
        insn = d.insn if d is not None else None     # the INT n / INT3 / INTO / INT1 delivered
        event = Event(Kind.TASK_SWITCH, self.core.index, self.core.rip(), insn, vector=vector,
                      error_code=error_code, regs=self.core.lazy_regs(),
                      extra={"tss_selector": tss_selector, "task_switch_source": "IDT"})
        if self.core.trace is not None:
            self.core.trace(self, event)
        if self.core.virt is not None and self.core.virt.on_event(self, event):
            return True
        self.switch_for_event(tss_selector, return_rip, error_code, 0 if soft else 1)
        return False

    def _h_task_switch(self, address: int, insn: Insn) -> None:
        """A task switch of a far JMP/CALL or an IRET (a TASK_SWITCH event, checked
        already): Unicorn performs it (measured correct on 2.1.4) when it runs the
        instruction alone; the scans are re-armed after it (the new task's CR3
        may differ)."""
        if insn.kind is Kind.IRET:
            self.core.nmi_blocked = False
        self.stepping_from = (address, self.core.probe.segment(7)[0])  # see SecondStage._after_task_switch_step
        self.core.step_then_check(address)
        self.core.rearm_after_step()

    def emulate(self, event: Event) -> None:
        """Perform the task switch of a TASK_SWITCH event for an L0 that emulates
        it: one of a far JMP/CALL or IRET by running the instruction (as
        _h_task_switch), one through an IDT task gate (``task_switch_source``
        "IDT") with :meth:`switch_for_event`, from ``event.extra``:
        ``tss_selector``, ``return_rip`` (the linear address the old task resumes
        at), ``ext`` (EXT of the error codes of faults in the switch) and
        ``event.error_code`` (pushed onto the new task's stack if not None)."""
        x = event.extra
        if x.get("task_switch_source") != "IDT":
            self._h_task_switch(event.rip, event.insn)
            return
        try:
            self.switch_for_event(x["tss_selector"], x["return_rip"], event.error_code, x["ext"])
        except UnsupportedPaging as e:
            raise GuestError(f"core {self.core.index}: task switch to {x['tss_selector']:#x}: {e}") from None

    # ------------------------------------------------------------------ the switch itself
    def switch_for_event(self, tss_selector: int, return_rip: int,
                              error_code: Optional[int], ext: int) -> None:
        """Switch tasks as an interrupt or exception through an IDT task gate does
        (SDM Vol. 3A "Task Switching", with nesting): the checks on the gate and
        on the new TSS descriptor (:func:`tasks.idt_task_gate_tss`) have passed.

        Before the commit point (a fault leaves the old task as it was, but for
        the bytes already written): the new TSS is read, the current task's
        state saved into its TSS (EIP = ``return_rip`` less CS.base, EFLAGS,
        the general registers, the segment selectors), the new TSS's
        previous-task link set to the current TSS and its descriptor marked
        busy (the old one stays busy).  Then TR, CR0.TS = 1, CR3 (32-bit TSS,
        paging on), EFLAGS with NT = 1, EIP, the general registers and the
        selectors are loaded, DR7's local breakpoint enables cleared, and the
        LDT and segment descriptors loaded with the checks of SDM Table 7-1
        (:mod:`devirt_emu.platform.tasks`; faults there occur in the new task,
        error codes with ``ext``).  Last the error code, if any, is pushed onto
        the new stack (a dword from a 32-bit TSS, a word from a 16-bit one;
        #SS(EXT) without room) and EIP checked against the CS limit (#GP(EXT)).
        A 16-bit TSS loads FS and GS null; the SDM says the upper 16 bits of the
        general registers "are modified and not maintained": they are set to
        FFFFH here, as Bochs and QEMU do.  The TSS's T flag
        (a debug trap on entry to the task) is not modelled."""
        new_desc = self.tables.gdt_entry(tss_selector)
        new_base, new_limit, new_flags = descriptor_cache(new_desc)
        new_type = desc_type(new_desc)
        new = tasks.tss_layout(new_type)
        image = self._read_tss(new_base, new.size)
        tr_sel, tr_base, _, tr_flags = self.core.probe.segment(7)
        old = tasks.tss_layout((tr_flags >> 8) & 0xF)
        # save the current task (the old TSS stays busy: nesting)
        p = self.core.probe
        cs_base = p.segment(1)[1]
        wfmt = "<I" if old.width == 4 else "<H"
        wmask = (1 << (8 * old.width)) - 1
        eflags = p.reg(X.UC_X86_REG_EFLAGS)
        self._write_tss(tr_base + old.eip, struct.pack(wfmt, (return_rip - cs_base) & wmask))
        self._write_tss(tr_base + old.eflags, struct.pack(wfmt, eflags & wmask))
        self._write_tss(tr_base + old.gprs, b"".join(
            struct.pack(wfmt, p.gpr(i) & wmask) for i in range(8)))
        for i in range(old.n_segs):
            self._write_tss(tr_base + old.segs + i * old.seg_stride, struct.pack("<H", p.segment(i)[0]))
        # link the new task back to this one, mark it busy
        self._write_tss(new_base + new.link, struct.pack("<H", tr_sel))
        gdt_base, _ = p.dtr(ENV_GDT)
        busy = new_type | 2
        self._write_tss(gdt_base + (tss_selector & ~7) + 5,
                        bytes([(new_desc >> 40) & 0xF0 | busy]))
        # commit: the new task's state
        self.core.write_segment(7, tss_selector, new_base, new_limit,
                           flags_to_ar((new_flags & ~0xF00) | (busy << 8)))
        uc = self.core.uc
        uc.reg_write(X.UC_X86_REG_CR0, p.cr(0) | X86_CR0_TS)
        rfmt = "<" + ("I" if new.width == 4 else "H")
        if new.cr3 is not None and p.cr(0) & X86_CR0_PG:
            uc.reg_write(X.UC_X86_REG_CR3, struct.unpack_from("<I", image, new.cr3)[0])
            self.core.after_mode_change()
        new_eip = struct.unpack_from(rfmt, image, new.eip)[0]
        new_eflags = struct.unpack_from(rfmt, image, new.eflags)[0] | X86_EFLAGS_NT
        upper = 0 if new.width == 4 else 0xFFFF0000
        for i in range(8):
            p.set_gpr(i, struct.unpack_from(rfmt, image, new.gprs + i * new.width)[0] | upper)
        sels = [struct.unpack_from("<H", image, new.segs + i * new.seg_stride)[0]
                for i in range(new.n_segs)] + [0] * (6 - new.n_segs)
        ldt_sel = struct.unpack_from("<H", image, new.ldt)[0]
        uc.reg_write(X.UC_X86_REG_EFLAGS, new_eflags)
        uc.reg_write(X.UC_X86_REG_DR7, p.reg(X.UC_X86_REG_DR7) & ~DR7_LOCAL_ENABLES)
        for i, sel in enumerate(sels):            # selectors first, descriptors checked below
            self.core.write_segment(i, sel, 0, 0, 1 << 16)
        self.core.write_segment(6, ldt_sel, 0, 0, 1 << 16)
        p.set_eip(new_eip)
        try:
            self._load_task_segments(sels, ldt_sel, bool(new_eflags & X86_EFLAGS_VM), ext)
        except tasks.TaskFault as f:
            raise _Fault(f.vector, f.error_code) from None
        _, cs_base, cs_limit, _ = p.segment(1)
        if error_code is not None:
            _, ss_base, ss_limit, ss_flags = p.segment(2)
            esp = p.gpr(4)
            pushed = push_offsets(esp, (new.width,), ss_limit, ss_flags)
            if pushed is None:
                raise _Fault(12, ext)
            (off,), sp = pushed
            try:
                self.core.write_linear((ss_base + off) & 0xFFFFFFFF,
                                  (error_code & ((1 << (8 * new.width)) - 1)).to_bytes(new.width, "little"))
            except PageFault as pf:
                raise _Fault(14, pf.error_code, pf.linear) from None
            set_sp(self.core.probe, esp, sp, ss_flags)
        if new_eip > cs_limit:
            raise _Fault(13, ext)

    def _load_task_segments(self, sels: list[int], ldt_sel: int, v86: bool, ext: int) -> None:
        """LDTR, CS, SS, ES, DS, FS and GS of the new task, with the checks of
        :mod:`tasks` (their order: LDT, CS, SS, then the data segments)."""
        if tasks.check_new_ldt(ldt_sel, self.tables.gdt_entry(ldt_sel) if not ldt_sel & 4 else None, ext):
            base, limit, flags = descriptor_cache(self.tables.gdt_entry(ldt_sel))
            self.core.write_segment(6, ldt_sel, base, limit, flags_to_ar(flags))
        if v86:
            # virtual-8086 mode: every segment is base = selector * 16, 64 KiB, DPL 3
            for i, sel in enumerate(sels):
                self.core.write_segment(i, sel, sel << 4, 0xFFFF, 0xF3)
            return
        es, cs, ss, ds, fs, gs = sels
        cs_desc = self.tables.segment_entry(cs) if cs & ~3 else None
        tasks.check_new_cs(cs, cs_desc, ext)
        cpl = cs & 3
        ss_desc = self.tables.segment_entry(ss) if ss & ~3 else None
        tasks.check_new_ss(ss, ss_desc, cpl, ext)
        loads = [(2, ss, ss_desc), (1, cs, cs_desc)]
        for i in (0, 3, 4, 5):
            sel = sels[i]
            desc = self.tables.segment_entry(sel) if sel & ~3 else None
            if tasks.check_new_data_segment(sel, desc, cpl, ext):
                loads.append((i, sel, desc))
        for i, sel, desc in loads:
            base, limit, flags = descriptor_cache(desc)
            self.core.write_segment(i, sel, base, limit, flags_to_ar(flags | (1 << 8)))

    def _read_tss(self, linear: int, n: int) -> bytes:
        try:
            return self.tables.read_system(linear, n)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None

    def _write_tss(self, linear: int, data: bytes) -> None:
        try:
            self.core.write_linear(linear, data)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None

    def _check_segment_limit(self, insn: Insn, linear: int) -> None:
        """The far pointer must lie within its segment: #GP(0), or #SS(0) for SS (SDM
        JMP/CALL "Protected Mode Exceptions"); a null (unusable) segment is #GP(0).
        Measured: Unicorn 2.1.4 does not check data-segment limits in protected mode
        (a MOV from beyond a 1-MiB DS limit reads memory), so the core does it here."""
        seg = insn.mem.seg
        _, base, limit, flags = self.core.probe.segment(seg)
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
