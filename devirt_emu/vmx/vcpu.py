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
the checks of the fields written (and without EPT those of a PAE guest's
PDPTEs, which every VM entry reads from memory again).

With "enable EPT" set, a VM entry switches the core to two-stage translation
through the guest's page tables and the EPT (:meth:`VmxVcpu._sync_ept`,
:mod:`devirt_emu.vmx.ept_mmu`, :mod:`devirt_emu.platform.tlb`): guest accesses
then cause EPT-violation and EPT-misconfiguration exits
(:meth:`VmxVcpu.on_stage2_fault`).  A guest entered with PAE paging gets its
PDPTEs from GUEST_PDPTR0-3 with EPT, from the table at its CR3 without
(:meth:`VmxVcpu._pdptes_at_entry`); the fields live in the core's PDPTE
registers while the VMCS is current, like the other guest state.

What VMX non-root operation changes for instructions that do not exit (SDM
"Changes to Instruction Behavior in VMX Non-Root Operation") is done here:
reads of CR0/CR4 see the read shadows for host-owned bits, writes leave the
host-owned bits alone, CLTS/LMSW likewise, and RDTSC/RDTSCP and RDMSR of IA32_TSC add
TSC_OFFSET.

APIC virtualization (SDM "APIC Virtualization and Virtual Interrupts"): the
TPR shadow and the APIC-access page as below; virtual-interrupt delivery,
x2APIC and APIC-register virtualization and posted-interrupt processing are
:mod:`devirt_emu.vmx.virtual_apic`'s (``self.vapic``), with the algorithms of
:mod:`devirt_emu.vmx.apicv`.  With "use TPR shadow" and "virtualize APIC
accesses" alone:

* with "use TPR shadow", MOV from CR8 reads VTPR[7:4] (byte 80H of the
  virtual-APIC page) and MOV to CR8 writes VTPR (bits 7:4 from the source,
  the rest of the 32-bit VTPR cleared), then TPR virtualization: a trap-like
  TPR-below-threshold exit if VTPR[7:4] < TPR_THRESHOLD[3:0].  The local
  APIC's TPR is not touched.
* with "virtualize APIC accesses", the core watches the APIC-access page
  (:meth:`~devirt_emu.platform.core.Core.watch_page`, armed at VM entry
  when the control or APIC_ACCESS_ADDR changed): an access to it is an
  APIC-access exit (fault-like) unless the rule virtualizes it (a read or
  write of at most 32 bits at offset 080H with "use TPR shadow"), in which
  case the instruction runs with offsets 080H-083H of the page backed by
  VTPR; a virtualized write then clears VTPR bytes 3:1 and performs TPR
  virtualization (SDM "APIC-Write Emulation").  The accesses the platform
  makes itself (event delivery: access type 3 with IDT-vectoring
  information; INS/OUTS: types 0 and 1) reach the same rule as they happen
  (:meth:`VmxVcpu._platform_apic_access`).
* with both, a VM entry is followed by a TPR-below-threshold exit, before
  any instruction and before any other event, if TPR_THRESHOLD[3:0] >
  VTPR[7:4] (SDM "VM Exits Induced by the TPR Threshold").
"""
from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Optional

from unicorn import x86_const as X

from ..x86 import (EFER_LMA, MSR_EFER, MSR_IA32_CR_PAT, MSR_IA32_TSC, X86_CR0_PG, X86_CR0_TS,
                   X86_CR4_PAE, X86_CR4_VMXE)
from ..events import Event, Kind
from ..virt import SOFTWARE_EVENT_TYPES, Delivery, EventType, VirtualizationLayer
from ..platform.core import GPR_IDS, GuestError, State, _Fault, flags_to_ar
from ..platform.memory import PhysicalAccessError
from ..platform.tlb import AccessAborted
from . import controls as C
from . import exit_reasons as er
from .entry import (EntryCaps, EntryFailure, FailureKind, check_event_injection,
                    check_guest_non_register_state, check_guest_pdptes, check_guest_rflags,
                    check_guest_rip, check_launch_state, check_vm_entry, is_canonical)
from .exit_reasons import Timing
from .fields import VmcsField as F
from .rules import Decision, PauseLoop, boundary_exit, decide, exit_decision
from .capabilities import model_of
from .ept import EptCaps
from .ept_mmu import EptStage2, ept_exit_decision
from .vmcs import FIELD_SLOTS, Vmcs, _key
from ..platform.monitor import triggered as monitor_triggered
from .virtual_apic import VirtualApic
from . import apicv
from ..platform.ucinternals import ENV_GDT, ENV_IDT, HF_CS64, HF_LMA


# Segment registers: (index in core.read_segment, VMCS selector field); the
# base, limit and access-rights fields follow the same naming.
_SEGMENTS = (
    (0, "ES"), (1, "CS"), (2, "SS"), (3, "DS"), (4, "FS"), (5, "GS"), (6, "LDTR"), (7, "TR"),
)
_SEG_FIELDS = [(i, F[f"GUEST_{n}_SELECTOR"], F[f"GUEST_{n}_BASE"], F[f"GUEST_{n}_LIMIT"],
                F[f"GUEST_{n}_AR_BYTES"]) for i, n in _SEGMENTS]

#: The PDPTE fields: the core's PDPTE registers (core.pae) hold them while the VMCS is current.
_PDPTR_FIELDS = (F.GUEST_PDPTR0, F.GUEST_PDPTR1, F.GUEST_PDPTR2, F.GUEST_PDPTR3)
#: Guest-state fields kept in the engine while the VMCS is current (see TrackedVmcs).
_TRACKED = (F.GUEST_RIP, F.GUEST_RSP, F.GUEST_RFLAGS, F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4,
            F.GUEST_DR7, F.GUEST_INTERRUPTIBILITY_INFO, F.GUEST_ACTIVITY_STATE,
            F.GUEST_IA32_EFER, F.GUEST_IA32_PAT, F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT,
            F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT,
            *[f for row in _SEG_FIELDS for f in row[1:]],
            *_PDPTR_FIELDS)
#: ... with the high-half encodings of the 64-bit ones (an access to either half syncs the field).
_TRACKED_ENCODINGS = frozenset(int(f) for f in _TRACKED) | {
    int(F.GUEST_IA32_EFER) | 1, int(F.GUEST_IA32_PAT) | 1, *(int(f) | 1 for f in _PDPTR_FIELDS)}

_HIGH_HALVES = frozenset({int(F.GUEST_IA32_EFER) | 1, int(F.GUEST_IA32_PAT) | 1,
                          *(int(f) | 1 for f in _PDPTR_FIELDS)})

def _check_rip(vcpu):
    if not vcpu.vmcs.peek(F.GUEST_RIP) >> 32:
        return None       # bits 63:32 clear: canonical, and fine outside 64-bit mode too
    return check_guest_rip(vcpu.vmcs, vcpu.caps)


def _check_rflags(vcpu):
    return check_guest_rflags(vcpu.vmcs, vcpu.caps)


def _check_injection(vcpu):
    # the injection checks, and those of the guest state they involve
    return (check_event_injection(vcpu.vmcs, vcpu.caps) or _check_rflags(vcpu)
            or _check_non_register(vcpu))


def _check_non_register(vcpu):
    return check_guest_non_register_state(vcpu.vmcs, vcpu.caps, vcpu.read_mem,
                                          current_vmcs_pa=vcpu.vmcs.pa)


def _no_check(vcpu):
    """The guest-interrupt status (RVI, SVI): no VM-entry check reads it (SDM
    "Checks on Guest Non-Register State" has none for it)."""
    return None


#: Fields an L0 commonly writes between VM exit and VMRESUME -> the one group
#: of VM-entry checks that reads them (any other written field: every check).
_RESUME_CHECKS = {
    int(F.GUEST_INTR_STATUS): _no_check,
    int(F.GUEST_RIP): _check_rip, int(F.GUEST_RFLAGS): _check_rflags,
    int(F.VM_ENTRY_INTR_INFO_FIELD): _check_injection,
    int(F.VM_ENTRY_EXCEPTION_ERROR_CODE): _check_injection,
    int(F.VM_ENTRY_INSTRUCTION_LEN): _check_injection,
    int(F.GUEST_ACTIVITY_STATE): _check_non_register,
    int(F.GUEST_INTERRUPTIBILITY_INFO): _check_non_register,
}
_RESUME_CHECK_FIELDS = frozenset(_RESUME_CHECKS)

#: The 32-bit exit-information fields every VM exit writes, consecutive 8-byte
#: slots of the region (vmcs.py lays slots out in encoding order): one pack.
_EXIT_INFO_FIELDS = (F.VM_EXIT_REASON, F.VM_EXIT_INTR_INFO, F.VM_EXIT_INTR_ERROR_CODE,
                     F.IDT_VECTORING_INFO_FIELD, F.IDT_VECTORING_ERROR_CODE,
                     F.VM_EXIT_INSTRUCTION_LEN, F.VMX_INSTRUCTION_INFO)
_EXIT_INFO_BLOCK = struct.Struct("<" + "I4x" * (len(_EXIT_INFO_FIELDS) - 1) + "I")
assert [FIELD_SLOTS[f][0] for f in _EXIT_INFO_FIELDS] == \
    [FIELD_SLOTS[_EXIT_INFO_FIELDS[0]][0] + 8 * i for i in range(len(_EXIT_INFO_FIELDS))], \
    "the exit-information slots are consecutive"

#: Fields _sync_ept reads.
_EPT_FIELDS = frozenset({int(F.CPU_BASED_VM_EXEC_CONTROL), int(F.SECONDARY_VM_EXEC_CONTROL),
                         int(F.EPT_POINTER), int(F.EPT_POINTER) | 1})

#: Controls _arm_timers reads.
_TIMER_CONTROLS = frozenset({int(F.CPU_BASED_VM_EXEC_CONTROL), int(F.PIN_BASED_VM_EXEC_CONTROL)})

_PAUSE_LOOP_AT_ENTRY = PauseLoop()
_INTR_INFO = int(F.VM_ENTRY_INTR_INFO_FIELD)
_ENTRY_CONTROLS = int(F.VM_ENTRY_CONTROLS)
_GUEST_RIP = int(F.GUEST_RIP)
_EXIT_INSTRUCTION_LEN = int(F.VM_EXIT_INSTRUCTION_LEN)
_tuple_new = tuple.__new__
# Enum members used on every exit, bound once (an Enum class attribute costs about
# 0.3 us on CPython 3.11: see vmx/rules.py).
_PAUSE, _TRAP, _KIND_VM_EXIT = Kind.PAUSE, Timing.TRAP, Kind.VM_EXIT
_KIND_TASK_SWITCH, _KIND_EXCEPTION = Kind.TASK_SWITCH, Kind.EXCEPTION
_WAIT_SIPI, _SHUTDOWN = State.WAIT_SIPI, State.SHUTDOWN     # (no TPR-threshold exit there)
_TPR_THRESHOLD = int(F.TPR_THRESHOLD)
_U64 = struct.Struct("<Q")

#: VTPR: the task-priority register's offset on the virtual-APIC and APIC-access pages.
APIC_TASKPRI = 0x80
#: Fields whose change can move or switch the APIC-access page or change the
#: TPR-threshold check (re-examined at VM entry).
_APIC_FIELDS = frozenset({int(F.CPU_BASED_VM_EXEC_CONTROL), int(F.SECONDARY_VM_EXEC_CONTROL),
                          int(F.APIC_ACCESS_ADDR), int(F.APIC_ACCESS_ADDR) | 1,
                          int(F.TPR_THRESHOLD), int(F.PIN_BASED_VM_EXEC_CONTROL),
                          int(F.POSTED_INTR_NV)})
#: The neutral event types of the seam (virt.EventType) as VMX interruption types
#: (bits 10:8 of the interruption-information fields), and back.
_VMX_INTR_TYPE = {
    EventType.EXTERNAL_INTERRUPT: C.INTR_TYPE_EXT_INTR, EventType.NMI: C.INTR_TYPE_NMI_INTR,
    EventType.HARDWARE_EXCEPTION: C.INTR_TYPE_HARD_EXCEPTION,
    EventType.SOFTWARE_INTERRUPT: C.INTR_TYPE_SOFT_INTR,
    EventType.PRIVILEGED_SOFTWARE_EXCEPTION: C.INTR_TYPE_PRIV_SW_EXCEPTION,
    EventType.SOFTWARE_EXCEPTION: C.INTR_TYPE_SOFT_EXCEPTION,
}
_EVENT_TYPE_OF = {vmx: neutral for neutral, vmx in _VMX_INTR_TYPE.items()}


def idt_vectoring_info(d: Optional[Delivery]) -> tuple[int, int]:
    """(IDT-vectoring information, its error code) for a VM exit during the
    delivery of ``d`` (SDM "Information for VM Exits During Event Delivery"):
    valid, the event's vector and type, whether it delivers an error code;
    (0, 0) when no delivery is in progress."""
    if d is None:
        return 0, 0
    ec = d.error_code
    info = C.VECTORING_INFO_VALID_MASK | _VMX_INTR_TYPE[d.type] | d.vector
    if ec is not None:
        info |= C.VECTORING_INFO_DELIVER_CODE_MASK
    return info, ec or 0


@functools.lru_cache(maxsize=64)
def _absolute_slots(pa: int) -> dict[int, tuple]:
    """The slot table of :class:`TrackedVmcs` for a region at ``pa``, shared by
    every TrackedVmcs there: never modified (a plain dict, for lookup speed)."""
    return {enc: (st.unpack_from, st.pack_into, pa + off, mask)
            for enc, (off, st, mask) in FIELD_SLOTS.items()}


class TrackedVmcs(Vmcs):
    """The current VMCS of a core, as the processor holds it.

    The SDM lets a processor keep the current VMCS's data in the processor
    (only VMCLEAR guarantees the region in memory is up to date).  This model
    keeps the guest-state fields of :data:`_TRACKED` in the Unicorn engine
    while the vCPU has been entered (``live``): in the region they are stale
    until an access to one of them through the accessors (VMREAD/VMWRITE,
    get/set, peek/put, items) copies the engine's current value in first
    (``fresh`` lists those copied since), so every reader sees the guest's
    live state; :meth:`flush` (also done by :meth:`clear`) copies all of them.
    A VM exit therefore saves nothing, and a VM entry loads only the
    guest-state fields written since the last one (``written``).
    """

    def __init__(self, mem, pa: int, fetch=None, model=None):
        super().__init__(mem, pa, model)
        if self._view is None:
            raise ValueError("a core's VMCS lives in the machine's RAM (PhysMem)")
        # encoding -> (unpack_from, pack_into, offset in RAM, mask): the accessors run
        # dozens of times per VM exit, so the slot arithmetic is done once per region
        # address (a harness creates a vCPU per case over the same region)
        self._abs = _absolute_slots(pa)
        self.written: set[int] = set()     # encodings written since the vCPU last looked
        self.live = False                  # the engine holds the tracked guest-state fields
        self.fresh: set[int] = set()       # tracked encodings copied from the engine since
        self._fetch = fetch                # fetch(enc): copy enc from the engine, add it to fresh
        self._exit_info_at = self._abs[_EXIT_INFO_FIELDS[0]][2]
        self._launch_state: Optional[str] = None    # read from the region at first use
        self._qualification_at = self._abs[F.EXIT_QUALIFICATION][2]

    @property
    def launch_state(self) -> str:
        """As the region holds it, kept in the processor too (read once; VMCLEAR
        and VMLAUNCH, through this object, keep both in step): the SDM lets a
        processor hold the current VMCS's data, and software must not write the
        region directly."""
        state = self._launch_state
        if state is None:
            state = self._launch_state = Vmcs.launch_state.fget(self)
        return state

    @launch_state.setter
    def launch_state(self, value: str) -> None:
        Vmcs.launch_state.fset(self, value)
        self._launch_state = value

    def engine_holds(self) -> None:
        """From now on the engine is the truth for every tracked field (VM entry,
        or the platform ran on the guest state)."""
        self.live = True
        self.fresh.clear()

    def flush(self) -> None:
        """Copy every stale guest-state field from the engine into the region."""
        if self.live:
            for enc in _TRACKED_ENCODINGS - self.fresh:
                if enc not in self.fresh:
                    self._fetch(enc)

    def clear(self) -> None:
        self.flush()
        super().clear()
        self._launch_state = "clear"

    def get(self, field) -> int:
        t = type(field)
        enc = field if t is int or t is F else _key(field)
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        if enc not in self._readable:
            return super().get(enc)        # (raises the error)
        unpack, _, off, _ = self._abs[enc]
        return unpack(self._view, off)[0]

    def vmread(self, enc: int) -> int:
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        if enc not in self._readable:
            return super().vmread(enc)     # (raises the error)
        unpack, _, off, _ = self._abs[enc]
        return unpack(self._view, off)[0]

    def items(self):
        self.flush()
        return super().items()

    def set(self, field, value: int) -> None:
        enc = field if type(field) is F or type(field) is int else _key(field)
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        super().set(enc, value)
        self.written.add(enc)

    def vmwrite(self, enc: int, value: int) -> None:
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        super().vmwrite(enc, value)
        self.written.add(enc)

    def put(self, enc: int, value: int) -> None:
        """The processor's own write of a field it knows fits (no checks)."""
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        _, pack, off, mask = self._abs[enc]
        pack(self._view, off, value & mask)
        self.written.add(enc)

    def peek(self, enc: int) -> int:
        if self.live and enc in _TRACKED_ENCODINGS and enc not in self.fresh:
            self._fetch(enc)
        unpack, _, off, _ = self._abs[enc]
        return unpack(self._view, off)[0]

    def store_exit_info(self, d: Decision, reason_field: int, vectoring: int,
                        vectoring_error_code: int) -> None:
        """The exit-information fields of decision ``d``, as the processor writes
        them on a VM exit (no checks): :data:`_EXIT_INFO_FIELDS` (consecutive
        slots: one pack), EXIT_QUALIFICATION, and the guest linear and physical
        addresses when ``d`` has them."""
        view = self._view
        _EXIT_INFO_BLOCK.pack_into(view, self._exit_info_at, reason_field, d.interruption_info,
                                   d.error_code or 0, vectoring, vectoring_error_code,
                                   d.instruction_length or 0, d.instruction_info or 0)
        _U64.pack_into(view, self._qualification_at, d.qualification)
        if d.guest_linear_address is not None:
            self.store(F.GUEST_LINEAR_ADDRESS, d.guest_linear_address)
        if d.guest_physical_address is not None:
            self.store(F.GUEST_PHYSICAL_ADDRESS, d.guest_physical_address)

    def store(self, enc: int, value: int) -> None:
        """Write a field's slot with no sync and no ``written`` mark: the exit
        information, and the engine's values copied in by a fetch."""
        _, pack, off, mask = self._abs[enc]
        pack(self._view, off, value & mask)


class ExitRecord(NamedTuple):
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


class VmxVcpu(VirtualizationLayer):
    """The VMX side of one core (its ``core.virt``): the virtualization layer of
    :mod:`devirt_emu.virt` for VMX non-root operation."""

    def __init__(self, core, vmcs_pa: int, l0, caps: EntryCaps | None = None,
                 record=None):
        self.core = core
        self.mem = core.mem
        #: The CPU model whose capabilities this vCPU has (the machine's).
        self.model = model_of(getattr(core, "cpu", None))
        self.vmcs = TrackedVmcs(core.mem, vmcs_pa, fetch=self._fetch, model=self.model)
        self.l0 = l0
        self.caps = caps or EntryCaps.for_model(self.model)
        self.ept_caps = EptCaps.for_model(self.model)
        #: The VMX-preemption timer counts down once every 2^ptimer_rate TSC ticks
        #: (IA32_VMX_MISC[4:0]).
        self.ptimer_rate = self.model.preemption_timer_rate
        self.record = record            # callable(ExitRecord), the machine's exit log
        self.active = False             # in VMX non-root operation
        self.blocked = False            # the L0 halted this vCPU (HLT exit), host context
        #: the L0 gave the core back to its host (KVM-devirt's take-back): nothing
        #: but the L0 makes it run again
        self.parked = False
        self.pause_loop = PauseLoop()
        self._mtf = False                     # monitor trap flag armed at the last entry
        self._mtf_wake = False                # ... and that entry was to HLT or shutdown
        self._entry_icount = 0
        self._ptimer_deadline: Optional[int] = None   # VMX-preemption timer, virtual ns
        self._timer_controls: Optional[tuple] = None  # (MTF, preemption timer) at the last entry
        #: The rule's decision of the last VM exit (traces and explanations only: the
        #: L0 reads the exit information from the VMCS).
        self.last_exit: Optional[Decision] = None
        self.stop_on_exit = None       # see VirtualizationLayer.stop_on_exit
        self.exit_pending = False
        self._exit_event: Optional[Event] = None   # the event of the last exit (the emulator's)
        self.last_failure: Optional[EntryFailure] = None
        #: The last event the rules let through, and their Decision (for a
        #: debugger's why-not; traces and explanations only, as last_exit).
        self.last_no_exit: Optional[tuple[Event, Decision]] = None
        self.read_mem = self.mem.read
        self._apic_page: Optional[int] = None      # the APIC-access page the core watches
        self._apic_stale = True                    # re-examine the APIC controls at next entry
        # Work VM entry does even when no field was written (each re-examined when one
        # of its fields was): the TPR-threshold check (APIC), a TLB flush without VPID
        # (EPT), arming the MTF and the preemption timer (timers)
        self._apic_work = self._ept_work = self._timer_work = True
        self._lma_saved: Optional[int] = None      # EFER.LMA (as HF_LMA) the control holds
        self._tpr_entry_check = False              # "use TPR shadow" and "virtualize APIC accesses"
        self._tpr_threshold = 0                    # TPR_THRESHOLD[3:0] at the last entry
        self._tpr_exit_pending: Optional[tuple] = None   # (threshold, VTPR) after this entry
        self._trap_exit_pending: Optional[Decision] = None   # after a platform access (below)
        #: virtual-interrupt delivery, x2APIC and APIC-register virtualization, posted interrupts
        self.vapic = VirtualApic(self)
        self.ept: Optional[EptStage2] = None     # the EPT the core translates through, when enabled
        #: (EPTP, EptStage2.translations()) that the first EPT with that EPTP starts
        #: with: a caller that knows the tables unchanged (the case runner) sets it
        self.ept_translations: Optional[tuple[int, dict]] = None
        self._ept_state: Optional[tuple] = None   # (EPTP or None, VPID on) read at the last entry

    # ------------------------------------------------------------------ guest state
    def _fetch(self, enc: int) -> None:
        """Copy the engine's current value of the stale field ``enc`` into the VMCS region."""
        v = self.vmcs
        full = enc & ~1 if enc in _HIGH_HALVES else enc
        v.store(full, _GETTERS[full](self))
        v.fresh.add(full)
        if full | 1 in _HIGH_HALVES:
            v.fresh.add(full | 1)

    def _segment_ar(self, idx: int) -> int:
        ar = flags_to_ar(self.core.probe.segment(idx)[3])
        if idx == 7 and ar & 0xF in (1, 9):
            ar |= 2     # LTR leaves TR busy; QEMU caches the type from before LTR set it
        return ar

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
        if st is State.HALTED and not self.blocked and not self.core.monitor.waiting:
            return C.GUEST_ACTIVITY_HLT        # (an MWAIT wait is not an activity state)
        if st is State.WAIT_SIPI:
            return C.GUEST_ACTIVITY_WAIT_SIPI
        if st is State.SHUTDOWN:
            return C.GUEST_ACTIVITY_SHUTDOWN
        return C.GUEST_ACTIVITY_ACTIVE

    def save_guest_state(self) -> None:
        """Copy the engine's whole current state into the VMCS guest-state area
        (the L0 adopting a running core's state as its guest's)."""
        self.vmcs.engine_holds()
        self.vmcs.flush()
        self._save_ia32e_mode()

    def _save_ia32e_mode(self) -> None:
        """A VM exit stores EFER.LMA into the "IA-32e mode guest" entry control
        (SDM "Saving Control Registers, Debug Registers, and MSRs").  vm_exit
        calls this only when LMA differs from what the last call saved
        (``_lma_saved``, forgotten when VM entry loads a written field)."""
        v = self.vmcs
        ent = v.peek(_ENTRY_CONTROLS)
        lma = self.core.probe.hflags() & HF_LMA
        if bool(ent & C.VM_ENTRY_IA32E_MODE) != bool(lma):
            v.store(_ENTRY_CONTROLS, ent ^ C.VM_ENTRY_IA32E_MODE)
        self._lma_saved = lma

    def load_guest_state(self, full: bool = False) -> None:
        """Load into the engine the guest-state fields written since the engine
        last held the guest state (all of them with ``full``)."""
        v = self.vmcs
        if full:
            v.flush()          # stale fields hold what the engine has: nothing to load for them
            loaders = range(len(_LOADERS))
        else:
            if not v.written:
                return
            loaders = {_LOADER_OF[f] for f in v.written if f in _LOADER_OF}
            if not loaders:
                return
            if len(loaders) > 1:
                loaders = sorted(loaders)
        for i in loaders:
            _LOADERS[i][1](self)

    def _load_control_registers(self) -> None:
        g, uc = self.vmcs.peek, self.core.uc
        efer = g(F.GUEST_IA32_EFER)
        cr0, cr3, cr4 = g(F.GUEST_CR0), g(F.GUEST_CR3), g(F.GUEST_CR4)
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        uc.reg_write(X.UC_X86_REG_CR4, cr4 & ~X86_CR4_VMXE)
        if not efer & EFER_LMA and self.core.probe.hflags() & HF_LMA:
            # leaving IA-32e mode: measured on Unicorn 2.1.4, a write of EFER keeps LMA
            # and only a CR0 write with PG clear clears it (else a guest entered with
            # legacy paging would run with 4-level paging)
            uc.reg_write(X.UC_X86_REG_CR0, cr0 & ~X86_CR0_PG)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, efer & ~EFER_LMA))
        uc.reg_write(X.UC_X86_REG_CR0, cr0)
        self.core.after_mode_change()

    def _load_pat(self) -> None:
        self.core.uc.reg_write(X.UC_X86_REG_MSR, (MSR_IA32_CR_PAT, self.vmcs.peek(F.GUEST_IA32_PAT)))

    def _load_gdtr(self) -> None:
        g = self.vmcs.peek
        self.core.uc.reg_write(X.UC_X86_REG_GDTR, (0, g(F.GUEST_GDTR_BASE), g(F.GUEST_GDTR_LIMIT), 0))

    def _load_idtr(self) -> None:
        g = self.vmcs.peek
        self.core.uc.reg_write(X.UC_X86_REG_IDTR, (0, g(F.GUEST_IDTR_BASE), g(F.GUEST_IDTR_LIMIT), 0))

    def _load_segment(self, idx: int) -> None:
        _, fsel, fbase, flimit, far = _SEG_FIELDS[idx]
        g = self.vmcs.peek
        self.core.write_segment(idx, g(fsel), g(fbase), g(flimit), g(far))

    def _load_interruptibility(self) -> None:
        core = self.core
        st = self.vmcs.peek(F.GUEST_INTERRUPTIBILITY_INFO)
        core.shadow_at = core.icount if st & (C.GUEST_INTR_STATE_STI | C.GUEST_INTR_STATE_MOV_SS) else -1
        core.nmi_blocked = bool(st & C.GUEST_INTR_STATE_NMI)

    def _load_activity(self) -> None:
        act = self.vmcs.peek(F.GUEST_ACTIVITY_STATE)
        state = {C.GUEST_ACTIVITY_HLT: State.HALTED,
                 C.GUEST_ACTIVITY_WAIT_SIPI: State.WAIT_SIPI,
                 C.GUEST_ACTIVITY_SHUTDOWN: State.SHUTDOWN}.get(act, State.RUNNING)
        self.core.state = state
        self.core.monitor.waiting = False      # an entry to HLT is HLT's wait, not MWAIT's
        if state is not State.RUNNING:
            self.core.request_stop("halt")   # an entry from an exit handler inside a run

    def _load_pdptes(self) -> None:
        """GUEST_PDPTR0-3 written: into the core's PDPTE registers, which hold the
        fields while the VMCS is current (the guest translates with them if it
        is entered with PAE paging and EPT; see _pdptes_at_entry)."""
        g = self.vmcs.peek
        self.core.pae.load([g(f) for f in _PDPTR_FIELDS])

    def _pdptes_at_entry(self) -> None:
        """SDM "Loading Page-Directory-Pointer-Table Entries": a guest entered
        with PAE paging (CR0.PG, CR4.PAE, not IA-32e mode) translates with the
        PDPTEs of GUEST_PDPTR0-3 when "enable EPT" is 1 (the core's registers
        hold those fields: _load_pdptes), else with the four PDPTEs at
        GUEST_CR3[31:5] in memory, loaded at every VM entry (their checks ran
        before: check_guest_pdptes, _check_pdptes_in_memory).  A VM exit then
        finds them in GUEST_PDPTR0-3 (SDM "Saving Non-Register State": with EPT
        and PAE paging the PDPTEs in use are saved; otherwise the fields are
        undefined, here the same registers)."""
        core = self.core
        p = core.probe
        if p.hflags() & HF_LMA or not (p.cr(0) & X86_CR0_PG and p.cr(4) & X86_CR4_PAE):
            return                              # (IA-32e mode first: one read for most guests)
        core.pae.load(core.pae.pdptes if self.ept is not None else core.pae.read(p.cr(3)))

    def _check_pdptes_in_memory(self) -> Optional[EntryFailure]:
        """Without EPT every VM entry loads a PAE guest's PDPTEs from memory, so
        VMRESUME checks them even when no field they depend on was written
        (memory may have changed since): VM-entry failure, qualification 2."""
        if self._ept_state is None or self._ept_state[0] is not None:
            return None
        p = self.core.probe
        if p.hflags() & HF_LMA or not (p.cr(0) & X86_CR0_PG and p.cr(4) & X86_CR4_PAE):
            return None
        return check_guest_pdptes(self.vmcs, self.caps, self.read_mem)

    # ------------------------------------------------------------------ VM entry
    def vm_entry(self, *, launch: bool = False) -> bool:
        """VMLAUNCH/VMRESUME.  Returns False when the entry failed (the L0 is told).

        A VMRESUME of a launched VMCS with no field written since the last entry
        passed every check then and loads nothing: only what depends on state
        outside the VMCS is redone (a PAE guest's PDPTEs in memory without EPT,
        the TPR-threshold check while TPR_THRESHOLD is not 0, a TLB flush
        without VPID, the MTF and the preemption timer)."""
        v = self.vmcs
        self.l0.prepare_entry(self)
        written = v.written
        if launch or written or v.launch_state != "launched":
            failure = self._entry_checks(launch)
        else:
            failure = self._check_pdptes_in_memory()     # (memory may have changed)
        if failure is not None:
            return self._entry_failed(failure)
        if launch or written:
            self.load_guest_state(full=launch)
            self._lma_saved = None      # the control or the mode may have changed: save at exit
            timers_changed = launch or not written.isdisjoint(_TIMER_CONTROLS)
            apic_changed = launch or not written.isdisjoint(_APIC_FIELDS)
            ept_changed = launch or not written.isdisjoint(_EPT_FIELDS)
            # (a VM exit leaves the valid bit clear: only a write can set it)
            inject = launch or _INTR_INFO in written
            written.clear()
        else:
            timers_changed = apic_changed = ept_changed = inject = False
        if apic_changed or self._apic_work:
            self._apic_at_entry(apic_changed)
            # (with TPR_THRESHOLD 0 no TPR-below-threshold exit can follow an entry)
            self._apic_work = self._apic_stale or (self._tpr_entry_check
                                                   and self._tpr_threshold != 0)
        if ept_changed or self._ept_work:
            self._sync_ept(ept_changed)
            self._ept_work = self.ept is not None and not self._ept_state[1]
        if timers_changed or self._timer_work:
            self._arm_timers(timers_changed)
            self._timer_work = self._mtf or self._ptimer_deadline is not None
        self._pdptes_at_entry()
        v.engine_holds()
        if launch:
            v.launch_state = "launched"
        self.pause_loop = _PAUSE_LOOP_AT_ENTRY
        self.active = True
        self.blocked = False
        # the monitor trap flag with an entry to HLT or shutdown: an MTF VM exit is
        # pending at once and wakes the processor (issue 14; SDM "Monitor Trap Flag")
        self._mtf_wake = self._mtf and self.core.state in (State.HALTED, State.SHUTDOWN)
        if self.vapic.vid:
            self.vapic.at_entry()       # PPR virtualization, evaluation of pending virtual interrupts
        if inject:
            info = v.peek(_INTR_INFO)
            if info & C.INTR_INFO_VALID_MASK:
                self._inject(info)
                return True
        if self._fetch_not_canonical():
            # (VM entry checks only bits 63:N of RIP: the first fetch faults)
            self.core.deliver_exception(13, 0)
        return True

    def _fetch_not_canonical(self) -> bool:
        """A 64-bit guest entered active at a RIP whose bits 63:N-1 are not identical
        (N the linear-address width): its first instruction fetch raises #GP(0)."""
        core = self.core
        # (the engine's state, not the VMCS copy: the guest-state fields stay in the
        # engine from here on)
        if core.state is not State.RUNNING or not core.probe.hflags() & HF_CS64:
            return False
        return not is_canonical(core.rip(), self.caps.linear_address_width)

    def _entry_checks(self, launch: bool) -> Optional[EntryFailure]:
        """The SDM's VM-entry checks.  VMLAUNCH runs them all; VMRESUME runs them
        all when a field outside :data:`_RESUME_CHECKS` was written since the last
        entry (the others passed then and are unchanged), else the launch-state
        check and the checks that read the fields written."""
        v = self.vmcs
        written = v.written
        if launch or not written <= _RESUME_CHECK_FIELDS:
            return check_vm_entry(v, self.caps, self.read_mem, launch=launch)
        failure = check_launch_state(False, v.launch_state)
        if failure is not None:
            return failure
        done = set()
        for f in written:
            check = _RESUME_CHECKS[f]
            if check not in done:
                done.add(check)
                failure = check(self)
                if failure is not None:
                    return failure
        return self._check_pdptes_in_memory()

    def _arm_timers(self, controls_changed: bool) -> None:
        """At VM entry: the monitor trap flag and the VMX-preemption timer, which
        counts down by 1 every 2^rate TSC ticks (rate = IA32_VMX_MISC[4:0]) from
        VMX_PREEMPTION_TIMER_VALUE, loaded at every entry."""
        v = self.vmcs
        core = self.core
        self._entry_icount = core.icount
        if controls_changed or self._timer_controls is None:
            self._timer_controls = (
                bool(v.peek(F.CPU_BASED_VM_EXEC_CONTROL) & C.CPU_BASED_MONITOR_TRAP_FLAG),
                bool(v.peek(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_VMX_PREEMPTION_TIMER))
        self._mtf, ptimer = self._timer_controls
        if ptimer:
            self._ptimer_deadline = core.now() + (v.peek(F.VMX_PREEMPTION_TIMER_VALUE) << self.ptimer_rate)
        else:
            self._ptimer_deadline = None

    def next_event_ns(self) -> Optional[int]:
        """When the VMX-preemption timer expires (the scheduler cuts runs there), or
        now while an MTF VM exit waits to wake the core from HLT or shutdown; the
        timer counts in HLT and shutdown too (not in wait-for-SIPI, where its
        expiry wakes nothing)."""
        if not self.active:
            return None
        if self._mtf_wake:
            return self.core.now()
        return self._ptimer_deadline

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
            # a VM exit clears the valid bit of the VM-entry interruption information
            # (after a successful entry, the injection did: see _inject)
            v = self.vmcs
            info = v.peek(_INTR_INFO)
            if info & C.INTR_INFO_VALID_MASK:
                v.store(_INTR_INFO, info & ~C.INTR_INFO_VALID_MASK)
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
        etype = _EVENT_TYPE_OF[itype]
        rip = core.rip()
        if etype in SOFTWARE_EVENT_TYPES:
            rip += v.get(F.VM_ENTRY_INSTRUCTION_LEN)
        # a VM exit during the delivery (an EPT violation on the stack, a fault the
        # exception bitmap takes) reports the injected event as IDT-vectoring information
        core.inject_event(vector, etype, ec, rip)

    # ------------------------------------------------------------------ VM exit
    def _write_exit_info(self, d: Decision, reason_field: int) -> None:
        """The exit-information fields, as the processor writes them."""
        vinfo, vec_ec = idt_vectoring_info(self.core.delivering)
        self.vmcs.store_exit_info(d, reason_field, vinfo, vec_ec)

    def _log(self, d: Decision, rip: int, entry_failure: bool = False) -> None:
        if self.record is not None:
            core = self.core
            in_window = bool(core.markers) and core.markers[-1][1] is None
            self.record(_tuple_new(ExitRecord, (core.index, d.reason, d.name, entry_failure,
                                                d.qualification, d.instruction_length, rip,
                                                in_window, d.cause)))

    def vm_exit(self, d: Decision, event: Optional[Event]) -> None:
        """A VM exit for decision ``d``; then the L0 handles it and re-enters."""
        core = self.core
        rip = event.rip if event is not None and event.insn is not None else core.rip()
        self.active = False
        self.last_exit = d
        v = self.vmcs
        self._write_exit_info(d, d.reason)
        if self._ptimer_deadline is not None and \
                v.peek(F.VM_EXIT_CONTROLS) & C.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER:
            left = max(0, self._ptimer_deadline - core.now()) >> self.ptimer_rate
            v.store(F.VMX_PREEMPTION_TIMER_VALUE, min(left, 0xFFFFFFFF))
        if core.probe.hflags() & HF_LMA != self._lma_saved:
            self._save_ia32e_mode()     # the rest of the guest state stays in the engine
        self._log(d, rip)
        core.count(_KIND_VM_EXIT)
        if core.trace is not None:
            core.trace(core, Event(Kind.VM_EXIT, core.index, rip,
                                   extra={"reason": d.reason, "name": d.name,
                                          "qualification": d.qualification}))
        self._exit_event = event
        if self.stop_on_exit is not None and self.stop_on_exit(d.reason):
            self.exit_pending = True
            if event is not None and event.insn is not None and event.kind is not _KIND_EXCEPTION:
                core.cancel_retirement()    # it retires when the L0 has completed it
            core.request_stop("vm-exit")
            return
        self.l0.handle_exit(self)
        if not self.active and self.l0.wants_entry(self):
            self.vm_entry()

    @property
    def last_exit_event(self) -> Optional[Event]:
        """The event of the last VM exit (None for an exit no event carries:
        windows, timers, MTF), for explanations."""
        return self._exit_event

    def complete_exit(self) -> None:
        """The exit the stepping API stopped at goes to the L0 now."""
        if not self.exit_pending:
            return
        self.exit_pending = False
        self.l0.handle_exit(self)
        if not self.active and self.l0.wants_entry(self):
            self.vm_entry()
        self.core.settle_pending_exit(self._exit_event, self.active)

    # ------------------------------------------------------------------ EPT at run time
    def _sync_ept(self, changed: bool) -> None:
        """At VM entry: the core translates through the EPT when the VMCS enables
        it (virtual-TLB mode), with QEMU's own walker otherwise.  A new EPTP
        (or EPT newly enabled) starts a fresh EPT cache and flushes the TLB;
        without VPID every VM entry flushes the TLB (SDM: VM entries invalidate
        the mappings of VPID 0000H); with VPID and the same EPTP nothing is
        flushed.  ``changed``: a field this reads was written since the last
        entry (else the last entry's reading stands)."""
        if changed or self._ept_state is None:
            v = self.vmcs
            primary = v.peek(F.CPU_BASED_VM_EXEC_CONTROL)
            sec = v.peek(F.SECONDARY_VM_EXEC_CONTROL) \
                if primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
            eptp = v.peek(F.EPT_POINTER) if sec & C.SECONDARY_EXEC_ENABLE_EPT else None
            self._ept_state = (eptp, bool(sec & C.SECONDARY_EXEC_ENABLE_VPID))
        eptp, vpid = self._ept_state
        core = self.core
        if eptp is None:
            if self.ept is not None:
                self.ept = None
                core.set_second_stage(None)
            return
        if self.ept is None or self.ept.eptp != eptp:
            reuse = self.ept_translations
            self.ept = EptStage2(self.mem, eptp, lambda: self.active, caps=self.ept_caps,
                                 cached=reuse[1] if reuse and reuse[0] == eptp else None)
            core.set_second_stage(self.ept)
        elif not vpid:
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
        delivering = core.delivering
        if delivering is not None and delivering.software:
            length = core.instruction_length_at_rip()     # INT n, INT3, INTO, INT1
        d = ept_exit_decision(fault.info, in_64bit_mode=bool(core.probe.hflags() & HF_CS64),
                              nmi_unblocked_by_iret=core.iret_unblocked_nmi,
                              instruction_length=length)
        self.vm_exit(d, None)
        return True

    # ------------------------------------------------------------------ L0 helpers
    def skip_instruction(self) -> None:
        """GUEST_RIP += VM-exit instruction length (KVM's skip_emulated_instruction).

        While the engine holds GUEST_RIP and nobody wrote the field since the
        exit, the new RIP goes straight into the engine, which is what the next
        VM entry would load; the entry's check of RIP can only refuse a value
        with bits 63:32 set, so such a value is written to the VMCS instead and
        VMRESUME checks it."""
        v = self.vmcs
        length = v.peek(_EXIT_INSTRUCTION_LEN)
        if v.live and _GUEST_RIP not in v.written:
            probe = self.core.probe
            rip = probe.eip() + length
            if not rip >> 32:
                probe.set_eip(rip)
                v.fresh.discard(_GUEST_RIP)     # the region's copy, if any, is stale again
                return
        v.put(_GUEST_RIP, v.peek(_GUEST_RIP) + length)

    def inject(self, vector: int, itype: int, error_code: int | None = None, length: int = 0) -> None:
        """Ask the next VM entry to inject an event (VM-entry interruption information)."""
        v = self.vmcs
        info = vector | itype | C.INTR_INFO_VALID_MASK
        if error_code is not None:
            info |= C.INTR_INFO_DELIVER_CODE_MASK
            v.set(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code)
        v.set(F.VM_ENTRY_INTR_INFO_FIELD, info)
        v.set(F.VM_ENTRY_INSTRUCTION_LEN, length)

    def emulate_on_platform(self, event: Optional[Event] = None) -> None:
        """Let the platform execute the exiting instruction (the L0's emulation of
        I/O, MSRs and the like; ``event``: another event to perform, e.g. a task
        switch the L0 emulates) on the guest state the engine holds (guest-state
        fields the L0 wrote before are loaded into it first)."""
        if event is None:
            event = self._exit_event
            if event is None or event.insn is None and event.kind is not _KIND_TASK_SWITCH:
                raise GuestError(f"core {self.core.index}: the L0 asked to emulate the exiting "
                                 "instruction of an exit that has none")
        v = self.vmcs
        if v.written:
            self.load_guest_state()
        try:
            self.core.run_native(event)
        finally:
            v.engine_holds()            # (again; also when the platform raised: the engine
                                        # may have changed)

    def abandon_exiting_instruction(self) -> None:
        """The hypervisor will not complete the instruction that exited (a test
        harness stopping at the exit): it does not retire."""
        ev = self._exit_event
        if ev is not None and ev.insn is not None and ev.kind is not _KIND_EXCEPTION:
            self.core.cancel_retirement()

    def step_watched_on_platform(self, ppage: int, window=None, *, writable: bool = False):
        """Let the platform execute the guest instruction at RIP once with the
        watched page ``ppage`` open (:meth:`Core.step_watched
        <devirt_emu.platform.watch.PageWatching.step_watched>`, same arguments
        and result): the L0's emulation of an APIC-access exit, on the guest
        state the engine holds (guest-state fields the L0 wrote before are
        loaded into it first)."""
        self.load_guest_state()
        try:
            return self.core.step_watched(ppage, window, writable=writable)
        finally:
            self.vmcs.engine_holds()

    # ------------------------------------------------------------------ the core's virt interface
    def on_event(self, core, event: Event) -> bool:
        """An instruction event (or triple fault): True when handled here."""
        if not self.active:
            return False
        out = decide(event, self.vmcs, self.read_mem,
                     pause_loop=self.pause_loop if event.kind is _PAUSE else None)
        if out.fault:
            raise _Fault(out.vector, out.error_code)
        if out.pause_loop is not None:
            self.pause_loop = out.pause_loop
        if out.exit:
            if out.timing is _TRAP:
                # TPR below threshold after a MOV to CR8: the instruction completes first
                self._nonroot(event)
                self.vm_exit(out, None)
                return True
            self.vm_exit(out, event)
            return True
        self.last_no_exit = (event, out)
        return self._nonroot(event)

    def on_exception(self, core, vector: int, error_code, cr2) -> bool:
        """A hardware exception about to be delivered: the exception bitmap decides.
        During the delivery of INT n, INT3, INTO or INT1 the event carries that
        instruction (the exit's instruction length is then defined: SDM "Information
        for VM Exits Due to Instruction Execution")."""
        if not self.active or vector == 2:
            return False
        d = core.delivering
        ev = Event(Kind.EXCEPTION, core.index, core.rip(), d.insn if d is not None else None,
                   vector=vector,
                   error_code=error_code, cr2=cr2, regs=core.lazy_regs())
        out = decide(ev, self.vmcs, self.read_mem)
        if out.exit:
            self.vm_exit(out, ev)      # a #PF that exits leaves CR2 alone: cr2 is the qualification
            return True
        self.last_no_exit = (ev, out)
        return False

    def wants_window(self) -> bool:
        """Is an interrupt-window or NMI-window exit armed (the core then checks
        the boundary as soon as interrupts may open)?"""
        if not self.active:
            return False
        return self.vapic.pending or bool(self.vmcs.get(F.CPU_BASED_VM_EXEC_CONTROL)
                                          & (C.CPU_BASED_INTR_WINDOW_EXITING
                                             | C.CPU_BASED_NMI_WINDOW_EXITING))

    def has_wakeup(self) -> Optional[bool]:
        """Scheduler: does this halted/waiting core have something to do now?
        None: decide as a native core would."""
        if self.parked:
            return False
        if not self.active and not self.blocked:
            return None
        if self.active and self.core.state is not State.WAIT_SIPI and (
                self._mtf_wake or (self._ptimer_deadline is not None
                                   and self.core.now() >= self._ptimer_deadline)):
            return True         # an MTF or preemption-timer exit wakes HLT and shutdown
        if self.active and self.core.monitor.waiting and monitor_triggered(self.core):
            return True         # a store to the monitored line ends MWAIT's wait
        lapic = self.core.lapic
        if lapic.init_pending or lapic.nmi_pending:
            return True
        if self.core.state is State.WAIT_SIPI:
            return lapic.sipi_pending is not None
        if self.blocked or self.vmcs.get(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_EXT_INTR_MASK:
            return lapic.pending_vector() is not None or self.l0.has_pending(self) \
                or (not self.blocked and self.vapic.pending
                    and bool(self.core.probe.reg(X.UC_X86_REG_EFLAGS) & 0x200))
        return None

    def boundary(self, core) -> bool:
        """Events on an instruction boundary in VMX non-root operation (replaces the
        native wake_check while active).  Returns True when it acted."""
        if self.parked:
            return False
        if self.blocked:
            return self.l0.unblock(self)
        if not self.active:
            return False
        if self._trap_exit_pending is not None:
            d, self._trap_exit_pending = self._trap_exit_pending, None
            self.vm_exit(d, None)
            return True
        if self._tpr_exit_pending is not None:
            threshold, vtpr = self._tpr_exit_pending
            self._tpr_exit_pending = None
            self.vm_exit(exit_decision(er.TPR_BELOW_THRESHOLD, (
                "CPU_BASED_TPR_SHADOW=1", "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES=1",
                f"TPR_THRESHOLD[3:0]={threshold:#x} > VTPR[7:4]={vtpr >> 4:#x} at VM entry")), None)
            return True
        lapic = core.lapic
        if lapic.take_init():
            core.count(Kind.INIT)
            return self._event_exit(Event(Kind.INIT, core.index, core.rip(), regs=core.lazy_regs()))
        vec = lapic.take_sipi()
        if vec is not None:
            core.count(Kind.SIPI)
            ev = Event(Kind.SIPI, core.index, core.rip(), vector=vec, regs=core.lazy_regs())
            ev.regs["activity_state"] = self._activity()
            return self._event_exit(ev)
        if core.state is State.WAIT_SIPI:
            return False
        v = self.vmcs
        d = boundary_exit(v, rflags=core.probe.reg(X.UC_X86_REG_EFLAGS),
                          interruptibility=self._interruptibility(),
                          activity_state=self._activity(),
                          mtf_pending=self._mtf and (core.icount > self._entry_icount
                                                     or self._mtf_wake),
                          preemption_timer_expired=self._ptimer_deadline is not None
                          and core.now() >= self._ptimer_deadline)
        if d.exit:
            self._mtf_wake = False
            self.vm_exit(d, None)
            return True
        if core.state is State.SHUTDOWN:
            # external interrupts are blocked in shutdown; an NMI is not (with NMI
            # exiting it causes a VM exit)
            if lapic.nmi_pending and v.get(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_NMI_EXITING:
                ev = Event(Kind.NMI, core.index, core.rip(), vector=2, regs=core.lazy_regs())
                out = decide(ev, v, self.read_mem)
                if out.exit:
                    lapic.take_nmi()
                    core.count(Kind.NMI)
                    self.vm_exit(out, ev)
                    return True
            return False
        if core.icount == core.shadow_at:
            return False
        if lapic.nmi_pending and not core.nmi_blocked:
            ev = Event(Kind.NMI, core.index, core.rip(), vector=2, regs=core.lazy_regs())
            out = decide(ev, v, self.read_mem)
            if out.exit:
                lapic.take_nmi()
                core.count(Kind.NMI)
                self.vm_exit(out, ev)
                return True
            return False          # delivered natively by the core
        vec = lapic.pending_vector()
        vapic = self.vapic
        if vec is not None and v.get(F.PIN_BASED_VM_EXEC_CONTROL) & C.PIN_BASED_EXT_INTR_MASK:
            ev = Event(Kind.INTERRUPT, core.index, core.rip(), vector=vec, regs=core.lazy_regs())
            out = decide(ev, v, self.read_mem)
            if out.exit:
                core.count(Kind.INTERRUPT)
                if v.get(F.VM_EXIT_CONTROLS) & C.VM_EXIT_ACK_INTR_ON_EXIT:
                    lapic.acknowledge()
                self.vm_exit(out, ev)
                return True
            if vapic.posted and vec == vapic.nv:
                # SDM "Posted-Interrupt Processing": acknowledged, processed, no exit
                core.count(Kind.INTERRUPT)
                lapic.acknowledge()
                if core.trace is not None:
                    core.trace(core, ev)
                vapic.process_posted()
                if core.state is State.HALTED and vapic.pending:
                    core.state = State.RUNNING
        if vapic.pending and vapic.deliverable(core.probe.reg(X.UC_X86_REG_EFLAGS),
                                               core.icount == core.shadow_at):
            if core.state is State.HALTED:
                core.state = State.RUNNING
            core.count(Kind.INTERRUPT)
            vector = vapic.deliver()
            if core.trace is not None:
                core.trace(core, Event(Kind.INTERRUPT, core.index, core.rip(), vector=vector,
                                       extra={"virtual": True}))
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
        if k in (Kind.MOV_FROM_CR, Kind.MOV_TO_CR) and insn.cr == 8:
            return self._cr8_tpr_shadow(ev)
        if (k is Kind.RDMSR or k is Kind.WRMSR) and self.vapic.x2apic and self._x2apic_msr(ev):
            return True
        if k is Kind.MOV_FROM_CR and insn.cr in (0, 4):
            mask, shadow = self._mask_shadow(insn.cr)
            real = core.probe.reg(X.UC_X86_REG_CR0 if insn.cr == 0 else X.UC_X86_REG_CR4)
            if insn.cr == 4:
                real |= X86_CR4_VMXE
            uc.reg_write(GPR_IDS[insn.gpr], (real & ~mask) | (shadow & mask))
            core.set_rip(ev.rip + insn.length)
            return True
        if k is Kind.MOV_TO_CR and insn.cr in (0, 4):
            mask, _ = self._mask_shadow(insn.cr)
            rid = X.UC_X86_REG_CR0 if insn.cr == 0 else X.UC_X86_REG_CR4
            real = core.probe.reg(rid)
            new = (real & mask) | (core.probe.reg(GPR_IDS[insn.gpr]) & ~mask)
            if insn.cr == 4:
                new &= ~X86_CR4_VMXE
                core.check_mov_to_cr4(new | X86_CR4_VMXE)   # the model's CR4 features: #GP(0)
            core.pae.load_for_mov_cr(insn.cr, new)     # PAE paging: #GP(0) or the PDPTEs loaded
            uc.reg_write(rid, new)
            core.set_rip(ev.rip + insn.length)
            core.after_mode_change()
            return True
        if k is Kind.CLTS:
            mask, _ = self._mask_shadow(0)
            if mask & X86_CR0_TS:
                core.set_rip(ev.rip + insn.length)     # TS is host-owned: CLTS leaves it
                return True
            return False
        if k in (Kind.RDTSC, Kind.RDTSCP) or (k is Kind.RDMSR
                                              and core.probe.gpr(1) & 0xFFFFFFFF == MSR_IA32_TSC):
            # SDM "Changes to Instruction Behavior in VMX Non-Root Operation": RDTSC,
            # RDTSCP and RDMSR of IA32_TIME_STAMP_COUNTER return TSC + TSC_OFFSET with
            # "use TSC offsetting" (TSC scaling is not advertised)
            primary = v.get(F.CPU_BASED_VM_EXEC_CONTROL)
            if primary & C.CPU_BASED_USE_TSC_OFFSETTING:
                core.tsc_adjust = v.get(F.TSC_OFFSET)
                try:
                    core.run_native(ev)
                finally:
                    core.tsc_adjust = 0
                return True
        return False

    # ------------------------------------------------------------------ APIC virtualization
    def _vapic_read(self, offset: int, n: int) -> bytes:
        """Bytes of the virtual-APIC page (outside RAM they read as all ones)."""
        try:
            return self.mem.read(self.vmcs.peek(F.VIRTUAL_APIC_PAGE_ADDR) + offset, n)
        except PhysicalAccessError:
            return b"\xff" * n

    def _vapic_write(self, offset: int, data: bytes) -> None:
        """A store into the virtual-APIC page (outside RAM it is lost)."""
        pa = self.vmcs.peek(F.VIRTUAL_APIC_PAGE_ADDR) + offset
        if self.mem.contains(pa, len(data)):
            self.core.machine.write_phys(pa, data)

    def _cr8_tpr_shadow(self, ev: Event) -> bool:
        """MOV from/to CR8 that did not exit, with "use TPR shadow" 1 (SDM
        "Virtualizing CR8-Based TPR Accesses"); False without it (the
        platform accesses the TPR)."""
        if not self.vmcs.peek(F.CPU_BASED_VM_EXEC_CONTROL) & C.CPU_BASED_TPR_SHADOW:
            return False
        insn = ev.insn
        uc = self.core.uc
        if ev.kind is Kind.MOV_FROM_CR:
            uc.reg_write(GPR_IDS[insn.gpr], self._vapic_read(APIC_TASKPRI, 1)[0] >> 4)
        else:
            value = uc.reg_read(GPR_IDS[insn.gpr]) & 0xF     # the rule made 63:4 set a #GP
            self._vapic_write(APIC_TASKPRI, (value << 4).to_bytes(4, "little"))
            if self.vapic.vid:
                # TPR virtualization with virtual-interrupt delivery: PPR virtualization,
                # evaluation of pending virtual interrupts (no TPR-threshold exit)
                self.vapic.apply(apicv.WriteEffect(self.vapic.status, tpr=True), ())
        self.core.set_rip(ev.rip + insn.length)
        return True

    def _x2apic_msr(self, ev: Event) -> bool:
        """RDMSR/WRMSR of an x2APIC MSR that did not exit, with "virtualize x2APIC
        mode" (SDM "Virtualizing MSR-Based APIC Accesses"): a virtualized access
        uses the virtual-APIC page (a write may end in a trap-like EOI-induced or
        APIC-write exit, after the instruction); False when it operates normally
        (the platform accesses the physical x2APIC)."""
        core = self.core
        probe = core.probe
        msr = probe.gpr(1) & 0xFFFFFFFF
        if not 0x800 <= msr <= 0x8FF:
            return False
        if ev.kind is Kind.RDMSR:
            value = self.vapic.rdmsr(msr)
            if value is None:
                return False
            probe.set_gpr(0, value & 0xFFFFFFFF)
            probe.set_gpr(2, value >> 32)
            core.set_rip(ev.rip + ev.insn.length)
            return True
        value = (probe.gpr(2) & 0xFFFFFFFF) << 32 | (probe.gpr(0) & 0xFFFFFFFF)
        w = self.vapic.wrmsr(msr, value)
        if w.fault:
            raise _Fault(13, 0)
        if not w.virtualized:
            return False
        core.set_rip(ev.rip + ev.insn.length)
        d = self.vapic.apply(w.effect, ("SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE=1",
                                        f"WRMSR {msr:#x} virtualized"))
        if d is not None:
            self.vm_exit(d, None)        # trap-like: after the instruction
        return True

    def _apic_at_entry(self, changed: bool) -> None:
        """At VM entry: watch the APIC-access page if "virtualize APIC accesses"
        is 1 (re-examined when ``changed``: VMLAUNCH, or a control,
        APIC_ACCESS_ADDR or TPR_THRESHOLD was written), and
        with "use TPR shadow" too, arm the TPR-threshold exit that follows the
        entry when TPR_THRESHOLD[3:0] > VTPR[7:4] (not in the shutdown or
        wait-for-SIPI state; it wakes the HLT state)."""
        v = self.vmcs
        core = self.core
        if changed or self._apic_stale:
            self._apic_stale = False
            self.vapic.read_controls()
            primary = v.peek(F.CPU_BASED_VM_EXEC_CONTROL)
            secondary = v.peek(F.SECONDARY_VM_EXEC_CONTROL) \
                if primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
            page = v.peek(F.APIC_ACCESS_ADDR) & ~0xFFF \
                if secondary & C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES else None
            if page != self._apic_page:
                if self._apic_page is not None:
                    core.unwatch_page(self._apic_page)
                if page is not None:
                    core.watch_page(page, self._on_apic_page_access)
                self._apic_page = page
            self._tpr_entry_check = page is not None and bool(primary & C.CPU_BASED_TPR_SHADOW) \
                and not secondary & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
        self._tpr_exit_pending = self._trap_exit_pending = None
        state = core.state
        threshold = self._tpr_threshold = v.peek(_TPR_THRESHOLD) & 0xF
        if self._tpr_entry_check and state is not _WAIT_SIPI and state is not _SHUTDOWN:
            vtpr = self._vapic_read(APIC_TASKPRI, 1)[0] if threshold else 0   # (0 > nothing)
            if threshold > vtpr >> 4:
                self._tpr_exit_pending = (threshold, vtpr)
                if core.state is State.HALTED:
                    core.state = State.RUNNING
                if core.in_run:
                    core.request_stop("check")

    def _on_apic_page_access(self, core, access) -> None:
        """The core's watcher of the APIC-access page (SDM "Virtualizing
        Memory-Mapped APIC Accesses"): called with RIP at the instruction,
        which has had no effect yet."""
        page = access.pa & ~0xFFF
        if not self.active:
            # not in VMX non-root operation: the page is ordinary memory again
            core.unwatch_page(page)
            self._apic_page, self._apic_stale = None, True
            self._apic_work = True
            return
        if access.platform:
            return self._platform_apic_access(core, access)
        core.count(Kind.APIC_ACCESS)
        for _ in range(3):      # at most: read, then write, of one instruction
            extra = {"gpa": access.pa, "access": access.access, "size": access.size}
            if access.value is not None:
                extra["value"] = access.value
            ev = Event(Kind.APIC_ACCESS, core.index, core.rip(), regs=core.lazy_regs(), extra=extra)
            if core.trace is not None:
                core.trace(core, ev)
            out = decide(ev, self.vmcs, self.read_mem)
            if out.exit and out.reason == er.APIC_ACCESS:
                self.vm_exit(out, ev)             # fault-like: the instruction has no effect
                return
            # virtualized: run the instruction with the register's bytes 3:0 of the
            # virtual-APIC page behind the APIC-access page (VTPR at 080H unless
            # APIC-register virtualization or virtual-interrupt delivery is on)
            write = access.access == "write"
            offset = access.pa & 0xFFF
            reg = offset & ~0xF if self.vapic.any else APIC_TASKPRI
            step = core.step_watched(page, (reg, self._vapic_read(reg, 4)), writable=write)
            if step.denied is not None:
                access = step.denied              # e.g. the write of a read-modify-write
                continue
            if write and step.retired:
                if not self.vapic.any:
                    # APIC-write emulation for 080H: VTPR bytes 3:1 cleared, then TPR
                    # virtualization
                    self._vapic_write(APIC_TASKPRI, step.window[:1] + bytes(3))
                    if out.exit:
                        self.vm_exit(out, None)   # TPR below threshold: trap-like
                    return
                self._vapic_write(reg, step.window[:4])
                d = self._apic_write_emulation(offset)
                if d is not None:
                    self.vm_exit(d, None)         # APIC write, EOI-induced: trap-like
            return
        raise GuestError(f"core {core.index}: an instruction at {core.rip():#x} accesses the "
                         "APIC-access page more often than the model handles")

    def _platform_apic_access(self, core, access):
        """An access the platform makes itself to the APIC-access page (see
        Core.watch_page): during event delivery (an APIC-access exit's access
        type 3, with the event as IDT-vectoring information) or during an
        instruction the platform executes (INS/OUTS: types 0 and 1).  An exit is
        taken at once (fault-like: AccessAborted ends the access and what it was
        part of); a virtualized read returns VTPR's bytes, a virtualized write
        goes to VTPR with APIC-write emulation (bytes 3:1 cleared), and a
        TPR-below-threshold exit that follows it is trap-like: taken at the next
        instruction boundary the core checks (the end of the current instruction
        or delivery when the access happens during a run)."""
        core.count(Kind.APIC_ACCESS)
        d = core.delivering
        insn = d.insn if d is not None else None
        extra = {"gpa": access.pa, "access": access.access, "size": access.size,
                 "during_delivery": access.during_delivery}
        if access.value is not None:
            extra["value"] = access.value
        ev = Event(Kind.APIC_ACCESS, core.index, core.rip(), insn, regs=core.lazy_regs(),
                   extra=extra)
        if core.trace is not None:
            core.trace(core, ev)
        out = decide(ev, self.vmcs, self.read_mem)
        if out.exit and out.reason == er.APIC_ACCESS:
            self.vm_exit(out, None)     # (as an EPT violation there: not an instruction's event)
            raise AccessAborted()
        if access.access == "read":
            return self._vapic_read(access.pa & 0xFFF, access.size)
        if self.vapic.any:
            offset = access.pa & 0xFFF
            self._vapic_write(offset, (access.value & ((1 << 8 * access.size) - 1))
                              .to_bytes(access.size, "little"))
            out = self._apic_write_emulation(offset) or out
        else:
            self._vapic_write(APIC_TASKPRI, bytes([access.value & 0xFF, 0, 0, 0]))
        if out.exit:
            self._trap_exit_pending = out
            if core.in_run:
                core.request_stop("check")
        return True

    def _apic_write_emulation(self, offset: int) -> Optional[Decision]:
        """After a virtualized write of the APIC-access page at ``offset`` with
        APIC-register virtualization or virtual-interrupt delivery: APIC-write
        emulation (:func:`apicv.apic_write_emulation`); the trap-like exit that
        follows, if any."""
        vapic = self.vapic
        eff = apicv.apic_write_emulation(
            vapic.page, vapic.status, offset, virtual_intr_delivery=vapic.vid,
            eoi_exit_bitmap=vapic.eoi_exit_bitmap() if vapic.vid else 0)
        return vapic.apply(eff, ("SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES=1",
                                 f"virtualized write at APIC-page offset {offset:#x}",
                                 "APIC-write emulation"))

    def _mask_shadow(self, cr: int):
        v = self.vmcs
        if cr == 0:
            return v.get(F.CR0_GUEST_HOST_MASK), v.get(F.CR0_READ_SHADOW)
        return v.get(F.CR4_GUEST_HOST_MASK), v.get(F.CR4_READ_SHADOW)



def _segment_getters(idx, fsel, fbase, flimit, far):
    return {fsel: lambda vcpu: vcpu.core.probe.segment(idx)[0],
            fbase: lambda vcpu: vcpu.core.probe.segment(idx)[1],
            flimit: lambda vcpu: vcpu.core.probe.segment(idx)[2],
            far: lambda vcpu: vcpu._segment_ar(idx)}


#: tracked field -> how to read its current value from the engine
_GETTERS = {
    F.GUEST_RIP: lambda vcpu: vcpu.core.probe.eip(),
    F.GUEST_RSP: lambda vcpu: vcpu.core.probe.gpr(4),
    F.GUEST_RFLAGS: lambda vcpu: vcpu.core.probe.reg(X.UC_X86_REG_EFLAGS),
    F.GUEST_CR0: lambda vcpu: vcpu.core.probe.cr(0),
    F.GUEST_CR3: lambda vcpu: vcpu.core.probe.cr(3),
    F.GUEST_CR4: lambda vcpu: vcpu.core.probe.cr(4) | X86_CR4_VMXE,
    F.GUEST_DR7: lambda vcpu: vcpu.core.probe.reg(X.UC_X86_REG_DR7),
    F.GUEST_IA32_EFER: lambda vcpu: vcpu.core.rdmsr_raw(MSR_EFER),
    F.GUEST_IA32_PAT: lambda vcpu: vcpu.core.rdmsr_raw(MSR_IA32_CR_PAT),
    F.GUEST_GDTR_BASE: lambda vcpu: vcpu.core.probe.dtr(ENV_GDT)[0],
    F.GUEST_GDTR_LIMIT: lambda vcpu: vcpu.core.probe.dtr(ENV_GDT)[1],
    F.GUEST_IDTR_BASE: lambda vcpu: vcpu.core.probe.dtr(ENV_IDT)[0],
    F.GUEST_IDTR_LIMIT: lambda vcpu: vcpu.core.probe.dtr(ENV_IDT)[1],
    F.GUEST_INTERRUPTIBILITY_INFO: VmxVcpu._interruptibility,
    F.GUEST_ACTIVITY_STATE: VmxVcpu._activity,
    **{f: (lambda n: lambda vcpu: vcpu.core.pae.pdptes[n])(n) for n, f in enumerate(_PDPTR_FIELDS)},
}
for _row in _SEG_FIELDS:
    _GETTERS.update(_segment_getters(*_row))
assert set(_GETTERS) | _HIGH_HALVES == _TRACKED_ENCODINGS, "every tracked field has an engine getter"

def _reg_loader(field, reg):
    def load(vcpu):
        vcpu.core.uc.reg_write(reg, vcpu.vmcs.peek(field))
    return load


def _enc_set(*fields) -> frozenset:
    return frozenset(e for f in fields for e in (int(f), int(f) | 1) if e in _TRACKED_ENCODINGS)


#: (guest-state fields, how VM entry loads them), in the order of SDM "Loading
#: Guest State": control registers and EFER first (they set the mode the rest
#: is loaded in), then PAT, descriptor tables, segments, DR7, RSP/RIP/RFLAGS,
#: the PDPTEs, then the non-register state.
_LOADERS = (
    (_enc_set(F.GUEST_CR0, F.GUEST_CR3, F.GUEST_CR4, F.GUEST_IA32_EFER), VmxVcpu._load_control_registers),
    (_enc_set(F.GUEST_IA32_PAT), VmxVcpu._load_pat),
    (_enc_set(F.GUEST_GDTR_BASE, F.GUEST_GDTR_LIMIT), VmxVcpu._load_gdtr),
    (_enc_set(F.GUEST_IDTR_BASE, F.GUEST_IDTR_LIMIT), VmxVcpu._load_idtr),
    *((_enc_set(*row[1:]), (lambda i: lambda vcpu: vcpu._load_segment(i))(row[0])) for row in _SEG_FIELDS),
    (_enc_set(F.GUEST_DR7), _reg_loader(F.GUEST_DR7, X.UC_X86_REG_DR7)),
    (_enc_set(F.GUEST_RSP), _reg_loader(F.GUEST_RSP, X.UC_X86_REG_RSP)),
    (_enc_set(F.GUEST_RFLAGS), _reg_loader(F.GUEST_RFLAGS, X.UC_X86_REG_EFLAGS)),
    (_enc_set(F.GUEST_RIP), lambda vcpu: vcpu.core.probe.set_eip(vcpu.vmcs.peek(F.GUEST_RIP))),
    (_enc_set(*_PDPTR_FIELDS), VmxVcpu._load_pdptes),
    (_enc_set(F.GUEST_INTERRUPTIBILITY_INFO), VmxVcpu._load_interruptibility),
    (_enc_set(F.GUEST_ACTIVITY_STATE), VmxVcpu._load_activity),
)
#: tracked field -> index of its loader in _LOADERS
_LOADER_OF = {f: i for i, (fields, _) in enumerate(_LOADERS) for f in fields}
assert set(_LOADER_OF) == _TRACKED_ENCODINGS, "every tracked field is loaded"
