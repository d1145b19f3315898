"""What the direct case APIs (VMX's vmx_case and SVM's svm_case) share: their
error, the assembly of a case's code, and the L0 of a case, which takes the
first VM exit or the failed VM entry, records it and ends the run."""
from __future__ import annotations

from ..asm import AsmError, assemble
from ..virt import Hypervisor


class CaseError(ValueError):
    """A case that cannot be run as given (unknown field, value too wide,
    code that does not assemble, malformed bitmap or register)."""


def case_code(code, cache: dict, base: int, limit: int) -> tuple[bytes, dict[str, int]]:
    """(bytes, symbols) of a case's ``code``: assembly text (assembled at ``base``,
    cached in ``cache`` by its text) or bytes; at most ``limit`` - 1 bytes (the
    byte after the code is the HLT the case ends on)."""
    if isinstance(code, str):
        hit = cache.get(code)
        if hit is None:
            try:
                hit = assemble(code, base, "<case>")
            except AsmError as e:
                raise CaseError(f"the guest code does not assemble: {e}") from e
            if len(cache) > 4096:
                cache.clear()
            cache[code] = hit
        data, symbols = hit
    elif isinstance(code, (bytes, bytearray, memoryview)):
        data, symbols = bytes(code), {}
    else:
        raise CaseError(f"code is assembly text or bytes, not {type(code).__name__}")
    if not data:
        raise CaseError("the guest code is empty")
    if len(data) + 1 > limit:
        raise CaseError(f"the guest code is {len(data)} bytes; at most {limit - 1} fit")
    return data, symbols


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
