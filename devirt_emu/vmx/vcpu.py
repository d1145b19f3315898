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
cache, and so does the processor's share of the guest state: the VMCS is a
:class:`TrackedVmcs`, whose guest-state fields are read from the engine when
they are accessed (the SDM lets a processor hold the current VMCS's data
inside it).  A VM exit writes the exit information and saves nothing else; a
VM entry loads into the engine the guest-state fields written since the last
one.  VMLAUNCH runs every VM-entry check; VMRESUME runs every check when a
field other than the few an L0 writes on each exit (GUEST_RIP, GUEST_RFLAGS,
the injection fields, activity and interruptibility state) was written, else
the checks of the fields written.

With "enable EPT" set, a VM entry switches the core to two-stage translation
through the guest's page tables and the EPT (:meth:`VmxVcpu._sync_ept`,
:mod:`devirt_emu.vmx.ept_mmu`, :mod:`devirt_emu.platform.tlb`): guest accesses
then cause EPT-violation and EPT-misconfiguration exits
(:meth:`VmxVcpu.on_stage2_fault`).

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
from ..platform.tlb import AccessAborted
from . import controls as C
from .entry import (EntryCaps, EntryFailure, FailureKind, check_event_injection,
                    check_guest_non_register_state, check_guest_rip_rflags, check_vm_entry)
from .fields import VmcsField as F
from .rules import Decision, PauseLoop, boundary_exit, decide, exit_decision
from .capabilities import MSR_IA32_VMX_MISC, VMX_CAPABILITY_MSRS
from .ept import EptCaps
from .ept_mmu import EptStage2, ept_exit_decision
from .vmcs import FIELD_SLOTS, Vmcs, _key
from ..platform.ucinternals import ENV_GDT, ENV_IDT, HF_CS64, HF_LMA

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

#: Guest-state fields kept in the engine while the VMCS is current (see TrackedVmcs).
_TRACKED = (F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
            F.GUEST_DR7, F.GUEST_INTERRUPTIBILITY_INFO, F.GUEST_ACTIVITY_STATE,
            F.GUEST_IA32_EFER, F.GUEST_IA32_PAT, F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT,
            F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
            *[f for row in _SEG_FIELDS for f in row[1:]])
#: ... with the high-half encodings of the 64-bit ones (an access to either half syncs the field).
_TRACKED_ENCODINGS = frozenset(int(f) for f in _TRACKED) | {
    int(F.GUEST_IA32_EFER) | 1, int(F.GUEST_IA32_PAT) | 1}

_HAS_HIGH = frozenset({int(F.GUEST_IA32_EFER), int(F.GUEST_IA32_PAT)})
_HIGH_HALVES = frozenset(f | 1 for f in _HAS_HIGH)
#: tracked encoding -> its group (the fields read from the engine together)
_GROUP_OF: dict[int, tuple] = {}

def _check_rip_rflags(vcpu):
    return check_guest_rip_rflags(vcpu.vmcs, vcpu.caps)


def _check_injection(vcpu):
    return check_event_injection(vcpu.vmcs, vcpu.caps)


def _check_non_register(vcpu):
    return check_guest_non_register_state(vcpu.vmcs, vcpu.caps, vcpu.read_mem,
                                          current_vmcs_pa=vcpu.vmcs.pa)


#: Fields an L0 commonly writes between VM exit and VMRESUME -> the one group
#: of VM-entry checks that reads them (any other written field: every check).
_RESUME_CHECKS = {
    int(F.GUEST_RIP): _check_rip_rflags, int(F.GUEST_RFLAGS): _check_rip_rflags,
    int(F.VM_ENTRY_INTR_INFO_FIELD): _check_injection,
    int(F.VM_ENTRY_EXCEPTION_ERROR_CODE): _check_injection,
    int(F.VM_ENTRY_INSTRUCTION_LEN): _check_injection,
    int(F.GUEST_ACTIVITY_STATE): _check_non_register,
    int(F.GUEST_INTERRUPTIBILITY_INFO): _check_non_register,
}
_RESUME_CHECK_FIELDS = frozenset(_RESUME_CHECKS)

MSR_IA32_CR_PAT = 0x277
#: The VMX-preemption timer's rate: it counts down once every 2^PTIMER_RATE TSC ticks.
PTIMER_RATE = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_MISC] & 0x1F
MSR_EFER = 0xC0000080
_EPT_CAPS = EptCaps.modelled()
#: Interruption types (bits 10:8) of software interrupts and exceptions: 4, 5, 6.
_SOFTWARE_EVENT_TYPES = frozenset(t >> 8 for t in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_PRIV_SW_EXCEPTION,
                                                   C.INTR_TYPE_SOFT_EXCEPTION))


class TrackedVmcs(Vmcs):
    """The current VMCS of a core, as the processor holds it.

    The SDM lets a processor keep the current VMCS's data in the processor
    (only VMCLEAR guarantees the region in memory is up to date).  This model
    keeps the guest-state fields of :data:`_TRACKED` in the Unicorn engine
    while the vCPU has been entered: they are ``stale`` in the region, and an
    access to one of them through the accessors (VMREAD/VMWRITE, get/set,
    peek/put, items) first copies the engine's current value of its group
    (a segment register's four fields, GDTR, ...) into the region, so every
    reader sees the guest's live state; :meth:`flush` (also done by
    :meth:`clear`) copies all of them.  A VM exit therefore saves nothing, and
    a VM entry loads only the guest-state fields written since (``written``).
    """

    def __init__(self, mem, pa: int, fetch=None):
        super().__init__(mem, pa)
        self.written: set[int] = set()     # encodings written since the vCPU last looked
        self.stale: set[int] = set()       # tracked encodings whose value is in the engine
        self._fetch = fetch                # fetch(enc): copy enc's group from the engine

    def _sync(self, enc: int) -> None:
        if enc in self.stale:
            self._fetch(enc)

    def flush(self) -> None:
        """Copy every stale guest-state field from the engine into the region."""
        while self.stale:
            self._fetch(next(iter(self.stale)))

    def clear(self) -> None:
        self.flush()
        super().clear()

    def get(self, field) -> int:
        enc = field if type(field) is F or type(field) is int else _key(field)
        if enc in self.stale:
            self._fetch(enc)
        return super().get(enc)

    def vmread(self, enc: int) -> int:
        if enc in self.stale:
            self._fetch(enc)
        return super().vmread(enc)

    def items(self):
        self.flush()
        return super().items()

    def set(self, field, value: int) -> None:
        enc = field if type(field) is F or type(field) is int else _key(field)
        if enc in self.stale:
            self._fetch(enc)
        super().set(enc, value)
        self.written.add(enc)

    def vmwrite(self, enc: int, value: int) -> None:
        if enc in self.stale:
            self._fetch(enc)
        super().vmwrite(enc, value)
        self.written.add(enc)

    def put(self, enc: int, value: int) -> None:
        """The processor's own write of a field it knows fits (no checks)."""
        if enc in self.stale:
            self._fetch(enc)
        off, st, mask = FIELD_SLOTS[enc]
        self._write(off, st, value & mask)
        self.written.add(enc)

    def peek(self, enc: int) -> int:
        if enc in self.stale:
            self._fetch(enc)
        off, st, _ = FIELD_SLOTS[enc]
        return self._read(off, st)

    def store(self, enc: int, value: int) -> None:
        """Write a field's slot with no sync and no ``written`` mark: the exit
        information, and the engine's values copied in by a fetch."""
        off, st, mask = FIELD_SLOTS[enc]
        self._write(off, st, value & mask)


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
        self.vmcs = TrackedVmcs(core.mem, vmcs_pa, fetch=self._fetch)
        self.l0 = l0
        self.caps = caps or EntryCaps.modelled()
        self.record = record            # callable(ExitRecord), the machine's exit log
        self.active = False             # in VMX non-root operation
        self.blocked = False            # the L0 halted this vCPU (HLT exit), host context
        self.pause_loop = PauseLoop()
        self._mtf = False                     # monitor trap flag armed at the last entry
        self._entry_icount = 0
        self._ptimer_deadline: Optional[int] = None   # VMX-preemption timer, virtual ns
        self.last_exit: Optional[Decision] = None
        self.last_failure: Optional[EntryFailure] = None
        self.read_mem = self.mem.read
        self.ept: Optional[EptStage2] = None     # the EPT the core translates through, when enabled

    # ------------------------------------------------------------------ guest state
    def _fetch(self, enc: int) -> None:
        """Copy the engine's current value of ``enc``'s group into the VMCS
        region (the fields of the group still stale only)."""
        v = self.vmcs
        group = _GROUP_OF[enc]
        stale = v.stale
        for f, val in zip(group, self._GETTERS[group](self)):
            if f in stale:
                v.store(f, val)
                stale.discard(f)
                if f in _HAS_HIGH:
                    stale.discard(f | 1)

    def _get_segment(self, idx: int) -> tuple:
        sel, base, limit, ar = self.core.read_segment(idx)
        if idx == 7 and ar & 0xF in (1, 9):
            ar |= 2     # LTR leaves TR busy; QEMU caches the type from before LTR set it
        return sel, base, limit & 0xFFFFFFFF, ar

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

    #: group of fields -> how to read it from the engine (a tuple in group order)
    _GETTERS = {
        (F.GUEST_RIP,): lambda self: (self.core.probe.eip(),),
        (F.GUEST_RSP,): lambda self: (self.core.probe.gpr(4),),
        (F.GUEST_RFLAGS,): lambda self: (self.core.uc.reg_read(X.UC_X86_REG_EFLAGS),),
        (F.GUEST_CR0,): lambda self: (self.core.probe.cr(0),),
        (F.GUEST_CR3,): lambda self: (self.core.probe.cr(3),),
        (F.GUEST_CR4,): lambda self: (self.core.probe.cr(4) | CR4_VMXE,),
        (F.GUEST_DR7,): lambda self: (self.core.uc.reg_read(X.UC_X86_REG_DR7),),
        (F.GUEST_IA32_EFER,): lambda self: (self.core.rdmsr_raw(MSR_EFER),),
        (F.GUEST_IA32_PAT,): lambda self: (self.core.rdmsr_raw(MSR_IA32_CR_PAT),),
        (F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT): lambda self: self.core.probe.dtr(ENV_GDT),
        (F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT): lambda self: self.core.probe.dtr(ENV_IDT),
        (F.GUEST_INTERRUPTIBILITY_INFO,): lambda self: (self._interruptibility(),),
        (F.GUEST_ACTIVITY_STATE,): lambda self: (self._activity(),),
        **{row[1:]: (lambda i: lambda self: self._get_segment(i))(row[0]) for row in _SEG_FIELDS},
    }

    def save_guest_state(self) -> None:
        """Copy the engine's whole current state into the VMCS guest-state area
        (the L0 adopting a running core's state as its guest's)."""
        self._engine_holds_guest_state()
        self.vmcs.flush()
        self._save_ia32e_mode()

    def _save_ia32e_mode(self) -> None:
        """A VM exit stores EFER.LMA into the "IA-32e mode guest" entry control
        (SDM "Saving Control Registers, Debug Registers, and MSRs")."""
        v = self.vmcs
        ent = v.peek(F.VM_ENTRY_CONTROLS)
        if bool(ent & C.VM_ENTRY_IA32E_MODE) != bool(self.core.probe.hflags() & HF_LMA):
            v.store(F.VM_ENTRY_CONTROLS, ent ^ C.VM_ENTRY_IA32E_MODE)

    def _engine_holds_guest_state(self) -> None:
        """From now on the engine is the truth for every tracked field."""
        self.vmcs.stale.update(_TRACKED_ENCODINGS)

    def load_guest_state(self, full: bool = False) -> None:
        """Load into the engine the guest-state fields written since the engine
        last held the guest state (all of them with ``full``)."""
        core, uc, v = self.core, self.core.uc, self.vmcs
        if full:
            v.flush()          # stale fields hold what the engine has: nothing to load for them
            changed = set(_TRACKED)
        else:
            changed = _TRACKED_ENCODINGS & v.written
            if not changed:
                return
            changed = {f & ~1 if f in _HIGH_HALVES else f for f in changed}
        g = v.peek
        if changed & {F.GUEST_IA32_EFER, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4}:
            efer = g(F.GUEST_IA32_EFER)
            cr0, cr3, cr4 = g(F.GUEST_CR0), g(F.GUEST_CR3), g(F.GUEST_CR4)
            uc.reg_write(X.UC_X86_REG_CR3, cr3)
            uc.reg_write(X.UC_X86_REG_CR4, cr4 & ~CR4_VMXE)
            uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer & ~EFER_LMA))
            uc.reg_write(X.UC_X86_REG_CR0, cr0)
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
        failure = self._entry_checks(launch)
        if failure is not None:
            return self._entry_failed(failure)
        self.load_guest_state(full=launch)
        self._sync_ept()
        v.written.clear()
        self._engine_holds_guest_state()
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

    def _entry_checks(self, launch: bool) -> Optional[EntryFailure]:
        """The SDM's VM-entry checks.  VMLAUNCH runs them all; VMRESUME runs them
        all when a field outside :data:`_RESUME_CHECKS` was written since the last
        entry (the others passed then and are unchanged), else the checks that
        read the fields written."""
        v = self.vmcs
        written = v.written
        if launch or not written <= _RESUME_CHECK_FIELDS:
            return check_vm_entry(v, self.caps, self.read_mem, launch=launch)
        done = set()
        for f in written:
            check = _RESUME_CHECKS[f]
            if check not in done:
                done.add(check)
                failure = check(self)
                if failure is not None:
                    return failure
        return None

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
        v.store(F.VM_ENTRY_INTR_INFO_FIELD, info & ~C.INTR_INFO_VALID_MASK)
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
        # a VM exit during the delivery (an EPT violation on the stack, a fault the
        # exception bitmap takes) reports the injected event as IDT-vectoring information
        outer = core._delivering
        core._delivering = (vector, itype >> 8, ec)
        try:
            core.deliver_event(vector, ec, rip, exception=itype == C.INTR_TYPE_HARD_EXCEPTION,
                               soft=itype in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_SOFT_EXCEPTION),
                               external=itype == C.INTR_TYPE_EXT_INTR)
        except _Fault as f:
            core.deliver_exception(f.vector, f.error_code, f.cr2)
        except AccessAborted:
            pass            # the delivery ended in a VM exit, taken
        finally:
            core._delivering = outer

    # ------------------------------------------------------------------ VM exit
    def _write_exit_info(self, d: Decision, reason_field: int) -> None:
        """The exit-information fields, as the processor writes them."""
        v = self.vmcs
        store = v.store
        store(F.VM_EXIT_REASON, reason_field)
        store(F.EXIT_QUALIFICATION, d.qualification)
        store(F.VM_EXIT_INSTRUCTION_LEN, d.instruction_length or 0)
        store(F.VMX_INSTRUCTION_INFO, d.instruction_info or 0)
        store(F.VM_EXIT_INTR_INFO, d.interruption_info)
        store(F.VM_EXIT_INTR_ERROR_CODE, d.error_code or 0)
        vinfo, vec_ec = self.core.vectoring_info()
        store(F.IDT_VECTORING_INFO_FIELD, vinfo)
        if vinfo:
            store(F.IDT_VECTORING_ERROR_CODE, vec_ec)
        if d.guest_linear_address is not None:
            store(F.GUEST_LINEAR_ADDRESS, d.guest_linear_address)
        if d.guest_physical_address is not None:
            store(F.GUEST_PHYSICAL_ADDRESS, d.guest_physical_address)
        info = v.peek(F.VM_ENTRY_INTR_INFO_FIELD)
        if info & C.INTR_INFO_VALID_MASK:
            store(F.VM_ENTRY_INTR_INFO_FIELD, info & ~C.INTR_INFO_VALID_MASK)

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
            self.vmcs.store(F.VMX_PREEMPTION_TIMER_VALUE, min(left, 0xFFFFFFFF))
        self._save_ia32e_mode()     # the rest of the guest state stays in the engine
        self._log(d, rip)
        core._count(Kind.VM_EXIT)
        if core.trace is not None:
            core.trace(core, Event(Kind.VM_EXIT, core.index, rip,
                                   extra={"reason": d.reason, "name": d.name,
                                          "qualification": d.qualification}))
        self.l0.handle_exit(self, d, event)
        if not self.active and self.l0.wants_entry(self):
            self.vm_entry()

    # ------------------------------------------------------------------ EPT at run time
    def _sync_ept(self) -> None:
        """At VM entry: the core translates through the EPT when the VMCS enables
        it (virtual-TLB mode), with QEMU's own walker otherwise.  A new EPTP
        (or EPT newly enabled) starts a fresh EPT cache and flushes the TLB;
        without VPID every VM entry flushes the TLB (SDM: VM entries invalidate
        the mappings of VPID 0000H); with VPID and the same EPTP nothing is
        flushed."""
        v = self.vmcs
        primary = v.peek(F.CPU_BASED_VM_EXEC_CONTROL)
        sec = v.peek(F.SECONDARY_VM_EXEC_CONTROL) if primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
        core = self.core
        if not sec & C.SECONDARY_EXEC_ENABLE_EPT:
            if self.ept is not None:
                self.ept = None
                core.set_second_stage(None)
            return
        eptp = v.peek(F.EPT_POINTER)
        if self.ept is None or self.ept.eptp != eptp:
            self.ept = EptStage2(self.mem, eptp, lambda: self.active, caps=_EPT_CAPS)
            core.set_second_stage(self.ept)
        elif not sec & C.SECONDARY_EXEC_ENABLE_VPID:
            core.flush_tlb()

    def invept(self) -> None:
        """INVEPT for this vCPU's EPTP (the L0 after reducing rights or remapping):
        forget the cached EPT translations and flush the core's TLB."""
        if self.ept is not None:
            self.ept.invalidate()
            self.core.flush_tlb()

    def on_stage2_fault(self, core, fault) -> bool:
        """The core's virtual TLB met an EPT violation or misconfiguration: the
        VM exit (fault-like: the access did not happen, RIP stays at the
        instruction or at the event being delivered).  Bit 12 of an EPT-violation
        qualification is set when the access was part of an IRET that unblocked
        NMIs (SDM "Exit Qualification for EPT Violations"); NMI blocking stays
        cleared, as the SDM says for such an exit."""
        if not self.active:
            return False
        length = None
        delivering = core._delivering
        if delivering is not None and delivering[1] in _SOFTWARE_EVENT_TYPES:
            length = core.instruction_length_at_rip()     # INT n, INT3, INTO, INT1
        d = ept_exit_decision(fault.info, in_64bit_mode=bool(core.probe.hflags() & HF_CS64),
                              nmi_unblocked_by_iret=core.iret_unblocked_nmi,
                              instruction_length=length)
        self.vm_exit(d, None)
        return True

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
        I/O, MSRs and the like) on the guest state the engine holds (guest-state
        fields the L0 wrote before are loaded into it first)."""
        self.load_guest_state()
        self.core.run_native(event)
        self._engine_holds_guest_state()

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


for _group in VmxVcpu._GETTERS:
    for _f in _group:
        _GROUP_OF[int(_f)] = _group
        if _f in _HAS_HIGH:
            _GROUP_OF[int(_f) | 1] = _group
assert set(_GROUP_OF) == _TRACKED_ENCODINGS, "every tracked field has one engine getter"
