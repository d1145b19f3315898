"""What the direct case APIs (VMX's vmx_case and SVM's svm_case) share: their
error, the assembly of a case's code, and the L0 of a case, which takes the
first VM exit or the failed VM entry, records it and ends the run."""
from __future__ import annotations

from typing import Mapping

from ..asm import AsmError, assemble
from ..virt import Hypervisor


class CaseError(ValueError):
    """A case that cannot be run as given (unknown field, value too wide,
    code that does not assemble, malformed bitmap or register)."""


def check_int(what: str, value) -> None:
    """``value`` must be a non-negative int (not a bool): else a CaseError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaseError(f"{what}: expected an int, not {type(value).__name__}")
    if value < 0:
        raise CaseError(f"{what}: {value} is negative")


def case_memory(memory, ram_size: int, reserved: tuple[int, int], reserved_what: str,
                advice: str) -> list[tuple[int, bytes]]:
    """A case's ``memory`` ({physical address: bytes}) as (address, bytes) pairs, each
    checked: inside the RAM of ``ram_size`` bytes and clear of the ``reserved``
    [lo, hi) range that holds ``reserved_what`` (``advice`` says what to use instead)."""
    if memory is None:
        return []
    if not isinstance(memory, Mapping):
        raise CaseError(f"memory maps physical addresses to bytes, not {type(memory).__name__}")
    lo, hi = reserved
    out = []
    for pa, blob in memory.items():
        check_int("memory address", pa)
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise CaseError(f"memory at {pa:#x}: expected bytes, not {type(blob).__name__}")
        blob = bytes(blob)
        if pa + len(blob) > ram_size:
            raise CaseError(f"memory at {pa:#x}+{len(blob):#x} is outside the {ram_size >> 20} MiB "
                            f"of RAM")
        if pa < hi and pa + len(blob) > lo:
            raise CaseError(f"memory at {pa:#x}+{len(blob):#x} overlaps {reserved_what} "
                            f"({lo:#x}-{hi:#x}): {advice}")
        out.append((pa, blob))
    return out


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
