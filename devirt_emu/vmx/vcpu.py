"""VMX non-root operation on one core: VM entry, VM exit, and the behaviour
of the instructions that do not exit.

A :class:`VmxVcpu` sits between a :class:`~devirt_emu.platform.core.Core` and
an L0 hypervisor model (``devirt_emu.hypervisor``).  The core hands it every
event (``core.virt``); the exit rules (:mod:`devirt_emu.vmx.rules`, pure)
decide; on an exit the vCPU does what the processor does on a VM exit (SDM
"VM Exits": record the exit information, save the guest state into the VMCS)
and calls the L0's handler, then performs the VM entry (checks, guest-state
load, event injection: SDM "VM Entries").

There is no host code to run: the L0 is Python.  The guest's registers stay
in the Unicorn engine while the L0 runs, as KVM keeps them in its register
cache: the L0 reads and writes the guest's GPRs on the core, and the VMCS
guest-state area.  At each exit the processor's share of the guest state is
saved into the VMCS (RIP, RSP, RFLAGS, CR0, CR3, CR4, DR7, the segment
registers, GDTR/IDTR, interruptibility and activity state, EFER/PAT when the
exit controls save them); at VM entry every guest-state field the L0 changed
is loaded back into the engine, and the full set when the VMCS was written
from outside (VMLAUNCH of a prepared VMCS).  The full VM-entry checks run on
VMLAUNCH and whenever the L0 says it changed controls (``controls_changed``).

What VMX non-root operation changes for instructions that do not exit (SDM
"Changes to Instruction Behavior in VMX Non-Root Operation") is done here:
reads of CR0/CR4 see the read shadows for host-owned bits, writes leave the
host-owned bits alone, CLTS/LMSW likewise, and RDTSC/RDTSCP add TSC_OFFSET.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from unicorn import x86_const as X

from ..events import Event, Kind
from ..platform.core import GPR_IDS, State, _Fault
from . import controls as C
from .entry import EntryCaps, EntryFailure, FailureKind, check_vm_entry
from .fields import VmcsField as F
from .rules import Decision, PauseLoop, boundary_exit, decide, exit_decision
from .capabilities import MSR_IA32_VMX_MISC, VMX_CAPABILITY_MSRS
from .vmcs import FIELD_SLOTS, Vmcs, _key
from ..platform.ucinternals import ENV_GDT, ENV_IDT

CR0_PE, CR0_TS, CR0_NE, CR0_PG = 1, 1 << 3, 1 << 5, 1 << 31
CR4_VMXE = 1 << 13
RFLAGS_IF = 1 << 9
EFER_LMA = 1 << 10

# Segment registers: (index in core.read_segment, VMCS selector field); the
# base, limit and access-rights fields follow the same naming.
_SEGMENTS = (
    (0, "ES"), (1, "CS"), (2, "SS"), (3, "DS"), (4, "FS"), (5, "GS"), (6, "LDTR"), (7, "TR"),
)
_SEG_FIELDS = [(i, F[f"GUEST_{n}_SELECTOR"], F[f"GUEST_{n}_BASE"], F[f"GUEST_{n}_LIMIT"],
                F[f"GUEST_{n}_AR_BYTES"]) for i, n in _SEGMENTS]

#: Guest-state fields the vCPU saves at every exit and compares at entry.
_TRACKED = (F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
            F.GUEST_DR7, F.GUEST_INTERRUPTIBILITY_INFO, F.GUEST_ACTIVITY_STATE,
            F.GUEST_IA32_EFER, F.GUEST_IA32_PAT, F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT,
            F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
            *[f for row in _SEG_FIELDS for f in row[1:]])

_TRACKED_SET = frozenset(int(f) for f in _TRACKED)
#: Guest-state fields whose load invalidates the cached EFER/PAT/DR7 (see save_guest_state).
_MSR_STATE = frozenset({F.GUEST_IA32_EFER, F.GUEST_IA32_PAT, F.GUEST_DR7, F.GUEST_CR0})

MSR_IA32_CR_PAT = 0x277
#: The VMX-preemption timer's rate: it counts down once every 2^PTIMER_RATE TSC ticks.
PTIMER_RATE = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_MISC] & 0x1F
MSR_EFER = 0xC0000080


class TrackedVmcs(Vmcs):
    """A Vmcs that remembers which fields were written since the vCPU last looked
    (``written``), so that VM entry loads only what the L0 changed."""

    def __init__(self, mem, pa: int):
        super().__init__(mem, pa)
        self.written: set[int] = set()

    def set(self, field, value: int) -> None:
        super().set(field, value)
        self.written.add(_key(field))

    def put(self, enc: int, value: int) -> None:
        """The processor's own write of a field it knows fits (no checks): the exit
        path writes dozens per exit."""
        off, st, mask = FIELD_SLOTS[enc]
        self._write(off, st, value & mask)
        self.written.add(enc)

    def peek(self, enc: int) -> int:
        off, st, _ = FIELD_SLOTS[enc]
        return self._read(off, st)


@dataclass
class ExitRecord:
    """One VM exit as the CLI reports it (``--json`` ``exits``)."""

    core: int
    reason: int
    name: str
    entry_failure: bool
    qualification: int
    instruction_length: Optional[int]
    rip: int
    in_window: bool
    cause: tuple = ()

    def to_json(self) -> dict:
        return {"core": self.core, "reason": self.reason, "name": self.name,
                "entry_failure": self.entry_failure, "qualification": self.qualification,
                "instruction_length": self.instruction_length, "rip": self.rip,
                "in_window": self.in_window}


class VmxVcpu:
    """The VMX side of one core (its ``core.virt``)."""

    def __init__(self, core, vmcs_pa: int, l0, caps: EntryCaps | None = None,
                 record=None):
        self.core = core
        self.mem = core.mem
        self.vmcs = TrackedVmcs(core.mem, vmcs_pa)
        self.l0 = l0
        self.caps = caps or EntryCaps.modelled()
        self.record = record            # callable(ExitRecord), the machine's exit log
        self.active = False             # in VMX non-root operation
        self.blocked = False            # the L0 halted this vCPU (HLT exit), host context
        self.controls_changed = True    # run the full entry checks at the next entry
        self.pause_loop = PauseLoop()
        self._mtf = False                     # monitor trap flag armed at the last entry
        self._entry_icount = 0
        self._ptimer_deadline: Optional[int] = None   # VMX-preemption timer, virtual ns
        self._saved: dict[int, int] = {}     # tracked guest fields as the VMCS holds them
        self._segs_raw = b""                  # QEMU's segment caches at the last save
        self._msr_epoch = None                # event counts when EFER/PAT/DR7 were read
        self._entries = 0                     # VM entries that loaded EFER/PAT/DR7/CR0
        self.last_exit: Optional[Decision] = None
        self.last_failure: Optional[EntryFailure] = None
        self.read_mem = self.mem.read

    # ------------------------------------------------------------------ guest state
    def save_guest_state(self, rip: int | None = None) -> None:
        """Store the processor's share of the guest state into the VMCS.

        ``rip``: the linear address of the instruction the exit is about (GUEST_RIP
        holds the offset in CS, so CS.base is taken off); default: the current RIP.
        """
        core, uc, v = self.core, self.core.uc, self.vmcs
        probe = core.probe
        eip = probe.eip() if rip is None else \
            (rip - core.read_segment(1)[1]) & 0xFFFF_FFFF_FFFF_FFFF
        gbase, glimit = probe.dtr(ENV_GDT)
        ibase, ilimit = probe.dtr(ENV_IDT)
        vals = {
            F.GUEST_RIP: eip,
            F.GUEST_RSP: probe.gpr(4),
            F.GUEST_RFLAGS: uc.reg_read(X.UC_X86_REG_EFLAGS),
            F.GUEST_CR0: probe.cr(0), F.GUEST_CR3: probe.cr(3), F.GUEST_CR4: probe.cr(4) | CR4_VMXE,
            F.GUEST_INTERRUPTIBILITY_INFO: self._interruptibility(),
            F.GUEST_ACTIVITY_STATE: self._activity(),
            F.GUEST_GDTR_BASE: gbase, F.GUEST_GDTR_LIMIT: glimit,
            F.GUEST_IDTR_BASE: ibase, F.GUEST_IDTR_LIMIT: ilimit,
        }
        # EFER, PAT and DR7 change only through WRMSR, MOV to CR0 (EFER.LMA), MOV to
        # DR and VM entry: read them (Unicorn calls) only when one of those happened
        ev = core.events
        epoch = (ev.get("WRMSR", 0), ev.get("MOV_TO_CR", 0), ev.get("MOV_TO_DR", 0), self._entries)
        if epoch != self._msr_epoch or not self._saved:
            self._msr_epoch = epoch
            vals[F.GUEST_DR7] = uc.reg_read(X.UC_X86_REG_DR7)
            vals[F.GUEST_IA32_EFER] = core.rdmsr_raw(MSR_EFER)
            vals[F.GUEST_IA32_PAT] = core.rdmsr_raw(MSR_IA32_CR_PAT)
        segs = probe.segments_raw()
        if segs != self._segs_raw or not self._saved:
            self._segs_raw = segs
            for idx, fsel, fbase, flimit, far in _SEG_FIELDS:
                sel, base, limit, ar = core.read_segment(idx)
                if idx == 7 and ar & 0xF in (1, 9):
                    # LTR leaves TR busy; QEMU caches the descriptor's type from before LTR set it
                    ar |= 2
                vals.update({fsel: sel, fbase: base, flimit: limit & 0xFFFFFFFF, far: ar})
        saved = self._saved
        put = v.put
        for f, val in vals.items():
            if saved.get(f) != val:           # the VMCS holds what was saved or loaded last
                put(f, val)
                saved[f] = val
        # the exit control "save IA32_EFER" aside, IA-32e mode guest follows EFER.LMA
        ent = v.peek(F.VM_ENTRY_CONTROLS)
        want = ent | C.VM_ENTRY_IA32E_MODE if self._saved[F.GUEST_IA32_EFER] & EFER_LMA \
            else ent & ~C.VM_ENTRY_IA32E_MODE
        if want != ent:
            v.set(F.VM_ENTRY_CONTROLS, want)
        v.written.clear()

    def _interruptibility(self) -> int:
        core = self.core
        state = 0
        if core.icount == core.shadow_at:
            state |= C.GUEST_INTR_STATE_STI
        if core.nmi_blocked:
            state |= C.GUEST_INTR_STATE_NMI
        return state

    def _activity(self) -> int:
        st = self.core.state
        if st is State.HALTED and not self.blocked:
            return C.GUEST_ACTIVITY_HLT
        if st is State.WAIT_SIPI:
            return C.GUEST_ACTIVITY_WAIT_SIPI
        if st is State.SHUTDOWN:
            return C.GUEST_ACTIVITY_SHUTDOWN
        return C.GUEST_ACTIVITY_ACTIVE

    def load_guest_state(self, full: bool = False) -> None:
        """Load into the engine every guest-state field that differs from what
        the last exit saved (all of them with ``full``)."""
        core, uc, v = self.core, self.core.uc, self.vmcs
        saved = self._saved
        candidates = _TRACKED if full else _TRACKED_SET & v.written
        v.written.clear()
        g = v.peek
        changed = {f for f in candidates if full or saved.get(f) != g(f)}
        if not changed:
            return
        if changed & _MSR_STATE:
            self._entries += 1
        for f in changed:
            saved[f] = g(f)
        if changed & {F.GUEST_IA32_EFER, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4}:
            efer = g(F.GUEST_IA32_EFER)
            uc.reg_write(X.UC_X86_REG_CR3, g(F.GUEST_CR3))
            uc.reg_write(X.UC_X86_REG_CR4, g(F.GUEST_CR4) & ~CR4_VMXE)
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer & ~EFER_LMA))
            uc.reg_write(X.UC_X86_REG_CR0, g(F.GUEST_CR0))
            core.after_mode_change()
        if F.GUEST_IA32_PAT in changed:
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_IA32_CR_PAT, g(F.GUEST_IA32_PAT)))
        if changed & {F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT}:
            uc.reg_write(X.UC_X86_REG_GDTR, (0, g(F.GUEST_GDTR_BASE), g(F.GUEST_GDTR_LIMIT), 0))
        if changed & {F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT}:
            uc.reg_write(X.UC_X86_REG_IDTR, (0, g(F.GUEST_IDTR_BASE), g(F.GUEST_IDTR_LIMIT), 0))
        for idx, fsel, fbase, flimit, far in _SEG_FIELDS:
            if changed & {fsel, fbase, flimit, far}:
                core.write_segment(idx, g(fsel), g(fbase), g(flimit), g(far))
        if F.GUEST_DR7 in changed:
            uc.reg_write(X.UC_X86_REG_DR7, g(F.GUEST_DR7))
        if F.GUEST_RSP in changed:
            uc.reg_write(X.UC_X86_REG_RSP, g(F.GUEST_RSP))
        if F.GUEST_RFLAGS in changed:
            uc.reg_write(X.UC_X86_REG_EFLAGS, g(F.GUEST_RFLAGS))
        if F.GUEST_RIP in changed:
            uc.reg_write(X.UC_X86_REG_RIP, g(F.GUEST_RIP))
        if F.GUEST_INTERRUPTIBILITY_INFO in changed:
            st = g(F.GUEST_INTERRUPTIBILITY_INFO)
            core.shadow_at = core.icount if st & (C.GUEST_INTR_STATE_STI | C.GUEST_INTR_STATE_MOV_SS) else -1
            core.nmi_blocked = bool(st & C.GUEST_INTR_STATE_NMI)
        if F.GUEST_ACTIVITY_STATE in changed:
            act = g(F.GUEST_ACTIVITY_STATE)
            core.state = {C.GUEST_ACTIVITY_HLT: State.HALTED,
                          C.GUEST_ACTIVITY_WAIT_SIPI: State.WAIT_SIPI,
                          C.GUEST_ACTIVITY_SHUTDOWN: State.SHUTDOWN}.get(act, State.RUNNING)

    # ------------------------------------------------------------------ VM entry
    def vm_entry(self, *, launch: bool = False) -> bool:
        """VMLAUNCH/VMRESUME.  Returns False when the entry failed (the L0 is told)."""
        v = self.vmcs
        self.l0.before_entry(self)
        if launch or self.controls_changed:
            failure = check_vm_entry(v, self.caps, self.read_mem, launch=launch)
            if failure is not None:
                return self._entry_failed(failure)
            self.controls_changed = False
        self.load_guest_state(full=launch)
        if launch:
            v.launch_state = "launched"
        self.pause_loop = PauseLoop()
        self.active = True
        self.blocked = False
        self._arm_timers()
        info = v.get(F.VM_ENTRY_INTR_INFO_FIELD)
        if info & C.INTR_INFO_VALID_MASK:
            self._inject(info)
        return True

    def _arm_timers(self) -> None:
        """At VM entry: the monitor trap flag and the VMX-preemption timer, which
        counts down by 1 every 2^rate TSC ticks (rate = IA32_VMX_MISC[4:0])."""
        v = self.vmcs
        core = self.core
        self._mtf = bool(v.peek(F.CPU_BASED_VM_EXEC_CONTROL) & C.CPU_BASED_MONITOR_TRAP_FLAG)
        self._entry_icount = core.icount
        if v.peek(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_VMX_PREEMPTION_TIMER:
            self._ptimer_deadline = core.now() + (v.peek(F.VMX_PREEMPTION_TIMER_VALUE) << PTIMER_RATE)
        else:
            self._ptimer_deadline = None

    def next_event_ns(self) -> Optional[int]:
        """When the VMX-preemption timer expires (the scheduler cuts runs there)."""
        return self._ptimer_deadline if self.active else None

    def single_step(self) -> bool:
        """The monitor trap flag is armed: the core must stop after every instruction."""
        return self.active and self._mtf

    def _entry_failed(self, failure: EntryFailure) -> bool:
        self.last_failure = failure
        self.active = False
        if failure.kind is FailureKind.VMFAIL_VALID:
            self.vmcs.vmfail_valid(failure.error)      # writes VM_INSTRUCTION_ERROR
        if failure.kind is FailureKind.ENTRY_FAILURE_EXIT:
            d = exit_decision(failure.basic_reason, (failure.check,),
                              qualification=failure.qualification)
            self._write_exit_info(d, failure.exit_reason)
            self._log(d, self.core.rip(), entry_failure=True)
        self.l0.entry_failed(self, failure)
        return False

    def _inject(self, info: int) -> None:
        """Event injection (SDM "Event Injection"): deliver through the guest IDT now."""
        v = self.vmcs
        v.set(F.VM_ENTRY_INTR_INFO_FIELD, info & ~C.INTR_INFO_VALID_MASK)
        vector = info & C.INTR_INFO_VECTOR_MASK
        itype = info & C.INTR_INFO_INTR_TYPE_MASK
        ec = v.get(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if info & C.INTR_INFO_DELIVER_CODE_MASK else None
        core = self.core
        rip = core.rip()
        soft = itype in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_SOFT_EXCEPTION, C.INTR_TYPE_PRIV_SW_EXCEPTION)
        if soft:
            rip += v.get(F.VM_ENTRY_INSTRUCTION_LEN)
        if core.state is State.HALTED:
            core.state = State.RUNNING
        try:
            core.deliver_event(vector, ec, rip, exception=itype == C.INTR_TYPE_HARD_EXCEPTION,
                               soft=itype in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_SOFT_EXCEPTION),
                               external=itype == C.INTR_TYPE_EXT_INTR)
        except _Fault as f:
            core.deliver_exception(f.vector, f.error_code, f.cr2)

    # ------------------------------------------------------------------ VM exit
    def _write_exit_info(self, d: Decision, reason_field: int) -> None:
        v = self.vmcs
        put = v.put
        put(F.VM_EXIT_REASON, reason_field)
        put(F.EXIT_QUALIFICATION, d.qualification)
        put(F.VM_EXIT_INSTRUCTION_LEN, d.instruction_length or 0)
        put(F.VMX_INSTRUCTION_INFO, d.instruction_info or 0)
        put(F.VM_EXIT_INTR_INFO, d.interruption_info)
        put(F.VM_EXIT_INTR_ERROR_CODE, d.error_code or 0)
        vinfo, vec_ec = self.core.vectoring_info()
        put(F.IDT_VECTORING_INFO_FIELD, vinfo)
        if vinfo:
            put(F.IDT_VECTORING_ERROR_CODE, vec_ec)
        if d.guest_linear_address is not None:
            put(F.GUEST_LINEAR_ADDRESS, d.guest_linear_address)
        if d.guest_physical_address is not None:
            put(F.GUEST_PHYSICAL_ADDRESS, d.guest_physical_address)
        info = v.peek(F.VM_ENTRY_INTR_INFO_FIELD)
        if info & C.INTR_INFO_VALID_MASK:
            put(F.VM_ENTRY_INTR_INFO_FIELD, info & ~C.INTR_INFO_VALID_MASK)

    def _log(self, d: Decision, rip: int, entry_failure: bool = False) -> None:
        core = self.core
        in_window = bool(core.markers) and core.markers[-1][1] is None
        rec = ExitRecord(core.index, d.reason, d.name, entry_failure, d.qualification,
                         d.instruction_length, rip, in_window, d.cause)
        if self.record is not None:
            self.record(rec)

    def vm_exit(self, d: Decision, event: Optional[Event]) -> None:
        """A VM exit for decision ``d``; then the L0 handles it and re-enters."""
        core = self.core
        rip = event.rip if event is not None and event.insn is not None else core.rip()
        self.active = False
        self.last_exit = d
        self._write_exit_info(d, d.reason)
        if self._ptimer_deadline is not None and \
                self.vmcs.peek(F.VM_EXIT_CONTROLS) & C.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER:
            left = max(0, self._ptimer_deadline - core.now()) >> PTIMER_RATE
            self.vmcs.put(F.VMX_PREEMPTION_TIMER_VALUE, min(left, 0xFFFFFFFF))
        self.save_guest_state(rip)
        self._log(d, rip)
        core._count(Kind.VM_EXIT)
        if core.trace is not None:
            core.trace(core, Event(Kind.VM_EXIT, core.index, rip,
                                   extra={"reason": d.reason, "name": d.name,
                                          "qualification": d.qualification}))
        self.l0.handle_exit(self, d, event)
        if not self.active and self.l0.wants_entry(self):
            self.vm_entry()

    # ------------------------------------------------------------------ L0 helpers
    def skip_instruction(self) -> None:
        """GUEST_RIP += VM-exit instruction length (KVM's skip_emulated_instruction)."""
        v = self.vmcs
        v.set(F.GUEST_RIP, v.get(F.GUEST_RIP) + v.get(F.VM_EXIT_INSTRUCTION_LEN))

    def inject(self, vector: int, itype: int, error_code: int | None = None, length: int = 0) -> None:
        """Ask the next VM entry to inject an event (VM-entry interruption information)."""
        v = self.vmcs
        info = vector | itype | C.INTR_INFO_VALID_MASK
        if error_code is not None:
            info |= C.INTR_INFO_DELIVER_CODE_MASK
            v.set(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        v.set(F.VM_ENTRY_INTR_INFO_FIELD, info)
        v.set(F.VM_ENTRY_INSTRUCTION_LEN, length)

    def emulate_on_platform(self, event: Event) -> None:
        """Let the platform execute the exiting instruction (the L0's emulation of
        I/O, MSRs and the like), then keep the VMCS in step with the engine."""
        core = self.core
        core.run_native(event)
        v = self.vmcs
        for f, val in ((F.GUEST_RIP, core.uc.reg_read(X.UC_X86_REG_RIP)),
                       (F.GUEST_ACTIVITY_STATE, self._activity())):
            v.set(f, val)
            self._saved[f] = val          # the engine already has it: nothing to load

    # ------------------------------------------------------------------ the core's virt interface
    def on_event(self, core, event: Event) -> bool:
        """An instruction event (or triple fault): True when handled here."""
        if not self.active:
            return False
        out = decide(event, self.vmcs, self.read_mem,
                     pause_loop=self.pause_loop if event.kind is Kind.PAUSE else None)
        if out.fault:
            raise _Fault(out.vector, out.error_code)
        if out.pause_loop is not None:
            self.pause_loop = out.pause_loop
        if out.exit:
            self.vm_exit(out, event)
            return True
        return self._nonroot(event)

    def on_exception(self, core, vector: int, error_code, cr2, insn=None) -> bool:
        """A hardware exception about to be delivered: the exception bitmap decides."""
        if not self.active or vector == 2:
            return False
        ev = Event(Kind.EXCEPTION, core.index, core.rip(), insn, vector=vector,
                   error_code=error_code, cr2=cr2, regs=core.lazy_regs())
        out = decide(ev, self.vmcs, self.read_mem)
        if out.exit:
            self.vm_exit(out, ev)      # a #PF that exits leaves CR2 alone: cr2 is the qualification
            return True
        return False

    def wants_window(self) -> bool:
        """Is an interrupt-window or NMI-window exit armed (the core then checks
        the boundary as soon as interrupts may open)?"""
        if not self.active:
            return False
        return bool(self.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL)
                    & (C.CPU_BASED_INTR_WINDOW_EXITING | C.CPU_BASED_NMI_WINDOW_EXITING))

    def has_wakeup(self) -> Optional[bool]:
        """Scheduler: does this halted/waiting core have something to do now?
        None: decide as a native core would."""
        if not self.active and not self.blocked:
            return None
        lapic = self.core.lapic
        if lapic.init_pending or lapic.nmi_pending:
            return True
        if self.core.state is State.WAIT_SIPI:
            return lapic.sipi_pending is not None
        if self.blocked or self.vmcs.get(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_EXT_INTR_MASK:
            return lapic.pending_vector() is not None or self.l0.has_pending(self)
        return None

    def boundary(self, core) -> bool:
        """Events on an instruction boundary in VMX non-root operation (replaces the
        native wake_check while active).  Returns True when it acted."""
        if self.blocked:
            return self.l0.unblock(self)
        if not self.active:
            return False
        lapic = core.lapic
        if lapic.take_init():
            core._count(Kind.INIT)
            return self._event_exit(Event(Kind.INIT, core.index, core.rip(), regs=core.lazy_regs()))
        vec = lapic.take_sipi()
        if vec is not None:
            core._count(Kind.SIPI)
            ev = Event(Kind.SIPI, core.index, core.rip(), vector=vec, regs=core.lazy_regs())
            ev.regs.cache["activity_state"] = self._activity()
            return self._event_exit(ev)
        if core.state in (State.WAIT_SIPI, State.SHUTDOWN):
            return False
        v = self.vmcs
        d = boundary_exit(v, rflags=core.uc.reg_read(X.UC_X86_REG_EFLAGS),
                          interruptibility=self._interruptibility(),
                          activity_state=self._activity(),
                          mtf_pending=self._mtf and core.icount > self._entry_icount,
                          preemption_timer_expired=self._ptimer_deadline is not None
                          and core.now() >= self._ptimer_deadline)
        if d.exit:
            self.vm_exit(d, None)
            return True
        if core.icount == core.shadow_at:
            return False
        if lapic.nmi_pending and not core.nmi_blocked:
            ev = Event(Kind.NMI, core.index, core.rip(), vector=2, regs=core.lazy_regs())
            out = decide(ev, v, self.read_mem)
            if out.exit:
                lapic.take_nmi()
                core._count(Kind.NMI)
                self.vm_exit(out, ev)
                return True
            return False          # delivered natively by the core
        vec = lapic.pending_vector()
        if vec is not None and v.get(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_EXT_INTR_MASK:
            ev = Event(Kind.INTERRUPT, core.index, core.rip(), vector=vec, regs=core.lazy_regs())
            out = decide(ev, v, self.read_mem)
            if out.exit:
                core._count(Kind.INTERRUPT)
                if v.get(F.VM_EXIT_CONTROLS) & C.VM_EXIT_ACK_INTR_ON_EXIT:
                    lapic.acknowledge()
                self.vm_exit(out, ev)
                return True
        return False

    def _event_exit(self, ev: Event) -> bool:
        out = decide(ev, self.vmcs, self.read_mem)
        if out.exit:
            self.vm_exit(out, ev)
            return True
        return False

    # ------------------------------------------------------------------ non-root behaviour
    def _nonroot(self, ev: Event) -> bool:
        k = ev.kind
        v = self.vmcs
        core = self.core
        uc = core.uc
        insn = ev.insn
        if k is Kind.MOV_FROM_CR and insn.cr in (0, 4):
            mask, shadow = self._mask_shadow(insn.cr)
            real = uc.reg_read(X.UC_X86_REG_CR0 if insn.cr == 0 else X.UC_X86_REG_CR4)
            if insn.cr == 4:
                real |= CR4_VMXE
            uc.reg_write(GPR_IDS[insn.gpr], (real & ~mask) | (shadow & mask))
            core.set_rip(ev.rip + insn.length)
            return True
        if k is Kind.MOV_TO_CR and insn.cr in (0, 4):
            mask, _ = self._mask_shadow(insn.cr)
            rid = X.UC_X86_REG_CR0 if insn.cr == 0 else X.UC_X86_REG_CR4
            real = uc.reg_read(rid)
            new = (real & mask) | (uc.reg_read(GPR_IDS[insn.gpr]) & ~mask)
            if insn.cr == 4:
                new &= ~CR4_VMXE
            uc.reg_write(rid, new)
            core.set_rip(ev.rip + insn.length)
            core.after_mode_change()
            return True
        if k is Kind.CLTS:
            mask, _ = self._mask_shadow(0)
            if mask & CR0_TS:
                core.set_rip(ev.rip + insn.length)     # TS is host-owned: CLTS leaves it
                return True
            return False
        if k in (Kind.RDTSC, Kind.RDTSCP):
            primary = v.get(F.CPU_BASED_VM_EXEC_CONTROL)
            if primary & C.CPU_BASED_USE_TSC_OFFSETTING:
                core.tsc_adjust = v.get(F.TSC_OFFSET)
                try:
                    core.run_native(ev)
                finally:
                    core.tsc_adjust = 0
                return True
        return False

    def _mask_shadow(self, cr: int):
        v = self.vmcs
        if cr == 0:
            return v.get(F.CR0_GUEST_HOST_MASK), v.get(F.CR0_READ_SHADOW)
        return v.get(F.CR4_GUEST_HOST_MASK), v.get(F.CR4_READ_SHADOW)
