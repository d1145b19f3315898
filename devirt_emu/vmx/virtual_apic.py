"""The vCPU's share of APIC virtualization: virtual-interrupt delivery, x2APIC
virtualization, APIC-register virtualization and posted-interrupt processing
applied to a running core (the algorithms are :mod:`devirt_emu.vmx.apicv`'s).

Where the SDM places each step ("APIC Virtualization and Virtual Interrupts"):

* VM entry with virtual-interrupt delivery: RVI and SVI come from the
  guest-interrupt status, then PPR virtualization and the evaluation of pending
  virtual interrupts (:meth:`VirtualApic.at_entry`).
* On an instruction boundary, after the exits and interrupts of higher priority
  (the vCPU's ``boundary``): a recognized virtual interrupt is delivered when
  RFLAGS.IF is 1 and there is no blocking by STI or MOV SS; it wakes a core in
  the HLT state.  An external interrupt with the notification vector, under
  "process posted interrupts", is acknowledged and processed without an exit.
* After a non-exiting RDMSR/WRMSR of an x2APIC MSR with "virtualize x2APIC
  mode" (MSR virtualization), after MOV to CR8 with virtual-interrupt delivery
  (TPR virtualization), and after a virtualized write of the APIC-access page
  (APIC-write emulation): the trap-like EOI-induced and APIC-write exits.

The guest-interrupt status lives in its VMCS field (read and written as the
processor does, without marking it written by the L0).
"""
from __future__ import annotations

from typing import Optional

from ..platform.memory import PhysicalAccessError
from ..virt import EventType
from . import apicv as A
from . import controls as C
from . import exit_reasons as er
from .fields import VmcsField as F
from .rules import exit_decision

_STATUS = int(F.GUEST_INTR_STATUS)
_PROC = int(F.CPU_BASED_VM_EXEC_CONTROL)
_EOI_BITMAPS = tuple(int(F[f"EOI_EXIT_BITMAP{n}"]) for n in range(4))


class VmcsPage:
    """The virtual-APIC page at VIRTUAL_APIC_PAGE_ADDR, in guest memory (a :class:`apicv.Page`)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu

    def _pa(self, offset: int) -> int:
        return self.vcpu.vmcs.peek(F.VIRTUAL_APIC_PAGE_ADDR) + offset

    def get32(self, offset: int) -> int:
        try:
            return int.from_bytes(self.vcpu.mem.read(self._pa(offset), 4), "little")
        except PhysicalAccessError:
            return 0xFFFFFFFF

    def set32(self, offset: int, value: int) -> None:
        pa = self._pa(offset)
        if self.vcpu.mem.contains(pa, 4):
            self.vcpu.mem.write(pa, (value & 0xFFFFFFFF).to_bytes(4, "little"))


class VirtualApic:
    """One vCPU's APIC virtualization (``vcpu.vapic``)."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.page = VmcsPage(vcpu)
        self.vid = self.x2apic = self.apicrv = self.posted = False
        self.nv: Optional[int] = None
        #: a virtual interrupt is recognized (the last evaluation)
        self.pending = False

    # ------------------------------------------------------------------ state
    def read_controls(self) -> None:
        """At VM entry, when a control was written: which of the features are on."""
        v = self.vcpu.vmcs
        primary = v.peek(_PROC)
        sec = v.peek(F.SECONDARY_VM_EXEC_CONTROL) \
            if primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
        pin = v.peek(F.PIN_BASED_VM_EXEC_CONTROL)
        self.vid = bool(sec & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)
        self.x2apic = bool(sec & C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE)
        self.apicrv = bool(sec & C.SECONDARY_EXEC_APIC_REGISTER_VIRT)
        self.posted = bool(pin & C.PIN_BASED_POSTED_INTR)
        self.nv = v.peek(F.POSTED_INTR_NV) & 0xFF if self.posted else None
        if not self.vid:
            self.pending = False

    @property
    def any(self) -> bool:
        return self.vid or self.x2apic or self.apicrv

    @property
    def status(self) -> int:
        return self.vcpu.vmcs.peek(_STATUS)

    @status.setter
    def status(self, value: int) -> None:
        self.vcpu.vmcs.store(_STATUS, value)

    def eoi_exit_bitmap(self) -> int:
        v = self.vcpu.vmcs
        return A.eoi_exit_bitmap(tuple(v.peek(f) for f in _EOI_BITMAPS))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> bool:
        """Evaluation of pending virtual interrupts; a recognized one makes the core
        look at its boundary (and wakes it from HLT when it can be delivered)."""
        window = bool(self.vcpu.vmcs.peek(_PROC) & C.CPU_BASED_INTR_WINDOW_EXITING)
        self.pending = A.pending_virtual_interrupt(self.page, self.status, window)
        if self.pending:
            core = self.vcpu.core
            if core.in_run:
                core.request_stop("check")
        return self.pending

    def at_entry(self) -> None:
        """VM entry with virtual-interrupt delivery: PPR virtualization, then evaluation."""
        if not self.vid:
            return
        A.ppr_virtualization(self.page, self.status)
        self.evaluate()

    def deliverable(self, rflags: int, shadow: bool) -> bool:
        """A recognized virtual interrupt can be delivered at this boundary."""
        return self.pending and bool(rflags & 0x200) and not shadow

    def deliver(self) -> int:
        """Virtual-interrupt delivery: the VISR/SVI/VPPR/VIRR/RVI updates, then the
        vector through the guest IDT as an external interrupt."""
        vector, self.status = A.deliver_virtual_interrupt(self.page, self.status)
        self.pending = False
        core = self.vcpu.core
        core.inject_event(vector, EventType.EXTERNAL_INTERRUPT, None, core.rip())
        return vector

    # ------------------------------------------------------------------ posted interrupts
    def process_posted(self) -> None:
        """Posted-interrupt processing (the notification vector was acknowledged):
        ON cleared, 0 written to the local APIC's EOI register, PIR into VIRR,
        RVI updated, then evaluation."""
        vcpu = self.vcpu
        addr = vcpu.vmcs.peek(F.POSTED_INTR_DESC_ADDR)
        mem = vcpu.mem
        raw = mem.read(addr, A.PID_SIZE) if mem.contains(addr, A.PID_SIZE) else bytes(A.PID_SIZE)
        vcpu.core.lapic.eoi()                                              # step 3
        # steps 2 (ON cleared), 4 (PIR into VIRR, PIR cleared) and 5 (RVI)
        new, self.status = A.posted_interrupt_processing(raw, self.page, self.status)
        if mem.contains(addr, A.PID_SIZE):
            mem.write(addr, new)
        self.evaluate()                                                    # step 6

    # ------------------------------------------------------------------ trap-like effects
    def apply(self, effect: A.WriteEffect, cause: tuple) -> Optional[object]:
        """What APIC-write emulation or a virtualized WRMSR asks for: the new
        status, TPR virtualization, evaluation; returns the trap-like exit's
        Decision, if one follows."""
        self.status = effect.status
        if effect.tpr:
            if self.vid:
                A.ppr_virtualization(self.page, self.status)
                self.evaluate()
            else:
                threshold = self.vcpu.vmcs.peek(F.TPR_THRESHOLD)
                if A.tpr_below_threshold(self.page, threshold):
                    return exit_decision(er.TPR_BELOW_THRESHOLD, cause + (
                        "VTPR[7:4] below TPR_THRESHOLD[3:0] after the write",))
        if effect.evaluate:
            self.evaluate()
        if effect.exit is not None:
            reason, qual = effect.exit
            return exit_decision(reason, cause, qualification=qual)
        return None

    def rdmsr(self, msr: int) -> Optional[int]:
        """A non-exiting RDMSR of x2APIC MSR ``msr``: its virtualized value, or None
        (the instruction operates normally)."""
        if not self.x2apic or not 0x800 <= msr <= 0x8FF:
            return None
        return A.x2apic_read(self.page, msr, apic_register_virt=self.apicrv)

    def wrmsr(self, msr: int, value: int) -> A.X2apicWrite:
        """A non-exiting WRMSR of an x2APIC MSR (see :func:`apicv.x2apic_write`)."""
        if not self.x2apic or not 0x800 <= msr <= 0x8FF:
            return A.X2apicWrite()
        return A.x2apic_write(self.page, self.status, msr, value, virtual_intr_delivery=self.vid,
                              eoi_exit_bitmap=self.eoi_exit_bitmap() if self.vid else 0)
