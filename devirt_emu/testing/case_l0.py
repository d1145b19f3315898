"""The L0 of a direct case (VMX's and SVM's alike): it takes the first VM exit, or
the failed VM entry, records it and ends the run, re-entering never."""
from __future__ import annotations

from ..virt import Hypervisor


class FirstExitL0(Hypervisor):
    """Records the first exit with :meth:`record` (the architecture's result) and
    ends the run with verdict pass; a failed VM entry is recorded as ``failure``.
    ``EXIT`` and ``ENTRY`` name the architecture's events in the run's message."""

    EXIT = "VM exit"
    ENTRY = "VM entry"

    def __init__(self, machine):
        self.machine = machine
        self.exit = None
        self.failure = None

    def record(self, vcpu):
        """The case's exit from the vCPU's exit information (a subclass's)."""
        raise NotImplementedError

    def record_failure(self, vcpu):
        """The exit to record with a failed VM entry (None: none; SVM's is #VMEXIT -1)."""
        return None

    def prepare_entry(self, vcpu) -> None:
        pass

    def wants_entry(self, vcpu) -> bool:
        return False

    def has_pending(self, vcpu) -> bool:
        return False

    def unblock(self, vcpu) -> bool:
        return False

    def entry_failed(self, vcpu, failure) -> None:
        self.failure = failure
        self.exit = self.record_failure(vcpu)
        self.machine.finish("pass", f"{self.ENTRY} failed: {failure}")
        if vcpu.core.in_run:
            vcpu.core.request_stop("exit")

    def handle_exit(self, vcpu) -> None:
        if self.exit is None:
            self.exit = self.record(vcpu)
        self.machine.finish("pass", f"{self.EXIT} {vcpu.last_exit.name}")
        # the exiting instruction does not execute: it does not retire
        vcpu.abandon_exiting_instruction()
        # stop the core, also when the exit was found between engine runs (an EPT
        # violation or a fault the engine reported): the run loop checks this
        vcpu.core.request_stop("exit")
