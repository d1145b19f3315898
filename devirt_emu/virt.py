"""The two seams between the physical machine, a virtualization layer and a hypervisor.

devirt-emu runs a guest in one of two layers of the architecture: VMX (Intel)
or SVM (AMD).  Both plug into the platform in the same two places, declared
here as protocols so that an SVM vCPU, a test double or a user's own layer
can take the place of the VMX one:

* :class:`VirtualizationLayer` -- what a :class:`~devirt_emu.platform.core.Core`
  in non-root operation (VMX) or in a guest (SVM) asks of the layer attached
  to it (``core.virt``): may this sensitive instruction, exception or event
  run, or is it a VM exit?  What happens at an instruction boundary, when may
  an interrupt be taken and what wakes a halted core, what is the second
  stage of translation (EPT, NPT) saying, when does a timer of the layer
  (the VMX-preemption timer) expire, must the core stop after every
  instruction (the monitor trap flag)?
* :class:`Hypervisor` -- what a vCPU asks of the hypervisor model above it
  (the L0, :mod:`devirt_emu.hypervisor`): handle this VM exit, prepare the
  next VM entry, was a VM entry refused, may the vCPU run, does it have an
  interrupt to take, can a vCPU blocked in the host (HLT) wake.  A
  hypervisor reads the exit information only from the VMCS (VMREAD) or the
  VMCB, as a real one does; the rule's decision (``last_exit``) is for
  traces and explanations.

What crosses the seams is architecture-neutral: :class:`~devirt_emu.events.Event`
(the contract of every ``regs`` name and ``extra`` key is in events.py) and
the event whose delivery through the IDT is in progress, :class:`Delivery`,
which VMX turns into IDT-vectoring information and SVM into EXITINTINFO.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

from .events import Event, Insn


class EventType(enum.IntEnum):
    """The kinds of event a processor delivers through the IDT (neutral: VMX's
    interruption types and SVM's EVENTINJ/EXITINTINFO types are two encodings
    of these)."""

    EXTERNAL_INTERRUPT = 0
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4           # INT n
    PRIVILEGED_SOFTWARE_EXCEPTION = 5   # INT1 (ICEBP)
    SOFTWARE_EXCEPTION = 6           # INT3, INTO


#: The software events: delivered by an instruction, resumed after it.
SOFTWARE_EVENT_TYPES = frozenset({EventType.SOFTWARE_INTERRUPT,
                                  EventType.PRIVILEGED_SOFTWARE_EXCEPTION,
                                  EventType.SOFTWARE_EXCEPTION})


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event whose delivery through the IDT is in progress on a core.

    A VM exit during it (an EPT violation on the stack, a fault the exception
    bitmap intercepts, a task switch through a task gate) reports it: VMX as
    IDT-vectoring information, SVM as EXITINTINFO.  ``error_code`` is the one
    it pushes (None: none); ``insn`` is the INT n, INT3, INTO or INT1 that
    delivers a software event (None for the others)."""

    vector: int
    type: EventType
    error_code: Optional[int] = None
    insn: Optional[Insn] = None

    @property
    def software(self) -> bool:
        return self.type in SOFTWARE_EVENT_TYPES


@runtime_checkable
class VirtualizationLayer(Protocol):
    """What a core asks of the virtualization layer attached to it (``core.virt``).

    Every method is called by the core (or the machine's scheduler) with the
    layer's own core; a layer that is not in non-root operation at the moment
    (before VM entry, after a failed one, while the hypervisor runs) answers as
    if it were not there: False, None.
    """

    def on_event(self, core, event: Event) -> bool:
        """A sensitive instruction (``event.insn``), a triple fault or a task
        switch about to happen: True when the layer took it (a VM exit, or the
        instruction done as non-root operation changes it); False to let the
        platform execute it.  May raise the platform's fault exception for a
        fault that comes before the exit."""

    def on_exception(self, core, vector: int, error_code: Optional[int],
                     cr2: Optional[int]) -> bool:
        """A hardware exception about to be delivered: True when it is a VM exit
        (exception bitmap, #PF error-code mask and match)."""

    def on_stage2_fault(self, core, fault) -> bool:
        """The second stage of translation refused an access (EPT violation or
        misconfiguration, nested page fault): True when that is a VM exit,
        taken now (the access does not happen)."""

    def boundary(self, core) -> bool:
        """An instruction boundary between engine runs: the exits not tied to an
        instruction (interrupt and NMI windows, INIT, SIPI, the preemption
        timer, the monitor trap flag, external interrupts and NMIs the controls
        intercept, pending trap-like exits).  True when the layer acted (the
        core then checks the boundary again before it runs)."""

    def wants_window(self) -> bool:
        """Is an interrupt-window or NMI-window exit armed (the core then stops
        as soon as interrupts may be taken)?"""

    def has_wakeup(self) -> Optional[bool]:
        """Does this halted or waiting core have something to do now?  None: let
        the core decide as a native one does."""

    def next_event_ns(self) -> Optional[int]:
        """The virtual time at which a timer of the layer expires (the scheduler
        ends the core's run there), or None."""

    def single_step(self) -> bool:
        """Must the core stop after every instruction (monitor trap flag)?"""

    # What the machine's stepping API asks of the layer (a debugger's "stop at
    # the VM exit, before the hypervisor handles it"):
    #: ``stop_on_exit(reason) -> bool``, or None: after the processor has
    #: written the exit information of an exit for which it answers True, the
    #: layer asks the core to stop and leaves the exit to :meth:`complete_exit`.
    stop_on_exit: Optional[Callable[[int], bool]]
    #: An exit is waiting for :meth:`complete_exit`.
    exit_pending: bool

    def complete_exit(self) -> None:
        """Hand the pending exit to the hypervisor (and enter again if it wants)."""


@runtime_checkable
class Hypervisor(Protocol):
    """What a vCPU asks of the hypervisor model that runs it (its L0)."""

    def prepare_entry(self, vcpu) -> None:
        """Just before a VM entry: inject what is pending, arm the windows,
        hand the TPR over (KVM's vcpu_enter_guest before vmx_vcpu_run)."""

    def handle_exit(self, vcpu) -> None:
        """A VM exit was taken: handle it, reading the exit information from
        the VMCS or VMCB.  The vCPU enters again afterwards if
        :meth:`wants_entry` says so."""

    def wants_entry(self, vcpu) -> bool:
        """After an exit was handled: enter the guest again now?  (False: the
        vCPU is blocked in the host, or the machine is finishing.)"""

    def entry_failed(self, vcpu, failure) -> None:
        """A VM entry failed (VMfailValid, an entry-failure exit, VMRUN's
        consistency checks)."""

    def has_pending(self, vcpu) -> bool:
        """Is an interrupt pending for the guest in the hypervisor's own state
        (KVM's virtual IRR)?"""

    def unblock(self, vcpu) -> bool:
        """A vCPU blocked in the host (HLT exit) may have something to do: wake
        and re-enter it when it has; True when it did."""


@runtime_checkable
class MachineHypervisor(Hypervisor, Protocol):
    """A hypervisor model the machine runs its guest under (``Machine(arch=...)``):
    besides the vCPU's side, what the machine asks of it at boot."""

    #: Bytes of RAM the guest owns from address 0 (the hypervisor keeps the rest).
    guest_ram: int

    def attach(self) -> None:
        """Create a vCPU on every core of the machine (``core.virt``), with the
        guest state the core has now."""

    def launch(self) -> None:
        """The first VM entry on every vCPU."""
