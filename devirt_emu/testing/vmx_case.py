"""Direct VMX cases: run a few guest instructions under a VMCS you write, get the first VM exit.

A *case* is guest code (Intel-syntax assembly or raw bytes), VMCS fields by
their Linux names, MSR and I/O bitmap contents and initial guest registers.
:func:`run_case` loads the code into a fresh 64-bit guest (see below),
performs VMLAUNCH with the full SDM VM-entry checks and runs the guest on a
real core until the first VM exit or a step limit, and returns a
:class:`CaseResult`: the exit (:class:`CaseExit`), the VM-entry failure
(:class:`~devirt_emu.vmx.entry.EntryFailure`) or why it stopped without an
exit (:class:`NoExit`).  No L0 handles the exit: the case ends there.

    >>> from devirt_emu.testing.vmx_case import run_case
    >>> r = run_case("cpuid")
    >>> r.exit.reason, r.exit.name, r.exit.instruction_length
    (10, 'CPUID', 2)

Control values are used as given: ``vmcs={"CPU_BASED_VM_EXEC_CONTROL": X}``
writes X, even if VM entry then fails its allowed-settings check.  With
``legal=True`` every control word you give is first made legal by the
capability MSRs (the allowed-0 bits set, the bits not allowed to be 1
cleared: :func:`legal_controls`), so ``{"CPU_BASED_VM_EXEC_CONTROL":
CPU_BASED_HLT_EXITING}, legal=True`` means "HLT exiting and whatever the CPU
forces".

The fresh state (what you get before ``vmcs`` and ``regs`` are applied)
-----------------------------------------------------------------------
Guest: the state of :mod:`devirt_emu.platform.longmode` (64-bit mode, CPL 0,
identity paging with 2 MiB pages over the 16 MiB of RAM, CR0 = 0x80010033,
CR4 = 0x20, EFER = 0xD00, CS = 0x08, SS = DS = ES = 0x10, RFLAGS = 0x2,
RSP = 0x9F000, every IDT gate not present), RIP = :data:`CODE_BASE`, every
other GPR 0, DR7 = 0x400, interruptibility and activity state 0 (active),
pending debug exceptions 0.  The code is followed by one HLT byte
(:attr:`CaseResult.code_end` is its address).  An exception the exception
bitmap does not intercept is delivered through the guest IDT, whose gates
are all zero (an invalid gate type): delivery raises #GP(vector * 8 + 2 + EXT),
and unless the bitmap intercepts one of them the guest goes on to #DF and a
triple fault (exit reason 2).

Controls (:data:`DEFAULT_CONTROLS`): each control word is what the
capability MSRs force when 0 is requested (``make_legal(ctl, 0)``: no
exiting control is set), plus "IA-32e mode guest" in the VM-entry controls
and "host address-space size" in the VM-exit controls (the guest and the
host are 64-bit); the secondary controls are 0 (and not activated).

Other fields: EXCEPTION_BITMAP, PAGE_FAULT_ERROR_CODE_MASK/MATCH,
CR3_TARGET_COUNT, CR0/CR4_GUEST_HOST_MASK, TSC_OFFSET are 0; the CR0 and CR4
read shadows hold the guest's CR0 and CR4; VMCS_LINK_POINTER is all ones;
MSR_BITMAP, IO_BITMAP_A and IO_BITMAP_B hold the addresses of the bitmaps
below (written whether or not a control uses them); the host-state area is
a 64-bit Linux host's (the one :mod:`devirt_emu.hypervisor.kvm` uses).

Bitmaps: all zero (nothing intercepted) unless given.  ``msr_bitmap`` is 4096
bytes or ``{"read": MSRs, "write": MSRs}`` (see :func:`msr_bitmap`);
``io_bitmap_a`` / ``io_bitmap_b`` are 4096 bytes each or an iterable of the
ports to intercept (0-0x7FFF in A, 0x8000-0xFFFF in B; see :func:`io_bitmaps`).

Memory: ``memory`` maps physical addresses to bytes written after the fresh
state is set up: IDT gates for a handler in your code, EPT tables, data.

Registers: ``regs`` maps "rax".."r15" (the engine's GPRs), "rip", "rflags"
(written to GUEST_RIP / GUEST_RFLAGS; "rsp" goes to GUEST_RSP) and "cr2" to
values.  Giving a register and its VMCS field both is an error.

Memory map (physical = linear):

==============  ========================================================
0x0001_0000     GDT, TSS, IDT, page tables (rewritten for every case)
0x0009_F000     top of the guest stack
0x0010_0000     :data:`CODE_BASE`: the code (at most :data:`CODE_LIMIT` bytes)
0x0040_0000     :data:`SCRATCH_BASE`: free for the guest (up to 0xF00000)
0x00F0_0000     the VMCS, then the MSR bitmap, I/O bitmaps A and B (to 0xF05000)
0x00F0_8000     :data:`EPT_POOL`: the EPT paging structures of ``ept=`` (to 0x1000000)
==============  ========================================================

Nothing stops the guest from writing anywhere in RAM unless ``ept=`` says
otherwise (the default controls have no EPT): each case starts again from
the state above.

EPT
---
``ept=`` writes EPT paging structures into :data:`EPT_POOL`, sets EPT_POINTER
to them (write-back, 4-level; bit 6, accessed and dirty flags, when
``ept_ad=True``) and turns on "activate secondary controls" and "enable EPT"
in whatever control words are in effect (giving EPT_POINTER in ``vmcs`` as
well is an error).  Every guest access then goes through the guest's page
tables and the EPT at run time (virtual-TLB mode, see
:mod:`devirt_emu.platform.tlb`): an EPT violation or misconfiguration is the
case's VM exit, fault-like, with its qualification, GUEST_LINEAR_ADDRESS and
GUEST_PHYSICAL_ADDRESS.  The forms, applied in order (later items replace
what earlier ones mapped):

* ``"identity"``: GPA = HPA over the 16 MiB of RAM with 4-KiB pages, read/
  write/execute, write-back;
* ``{gpa: (hpa, rights)}`` or ``{gpa: (hpa, rights, page_size)}``: one page
  each (``rights`` 0 writes a not-present entry);
* :class:`EptMap` (a range, rights, page size, memory type) and
  :class:`EptEntry` (a raw entry value at a level of a walk: the way to a
  misconfigured entry);
* a list of any of these, e.g. ``["identity", {SCRATCH_BASE: (SCRATCH_BASE, 1)}]``
  (a read-only scratch page).

A larger page replaces the smaller ones mapped there before; a smaller page
inside an earlier larger one is a :class:`CaseError`.  After the run,
:attr:`CaseRunner.ept` is the EptBuilder of the case (``entry_address(gpa,
level)`` to read an entry's accessed and dirty flags).

Steps and outcomes
------------------
``max_steps`` counts retired guest instructions.  The run stops at the first
VM exit (an exiting instruction does not retire), at a VM-entry failure (then
nothing runs), when the step limit is reached, when the guest halts (HLT
without HLT exiting, or the HLT after the code) or when the machine ends the
run for another reason (an OUT to the test-exit port 0xF4 that does not
exit, a condition the platform does not model): see :class:`NoExit`.

Reuse and speed
---------------
:func:`run_case` uses one :class:`CaseRunner` per CPU model per process: one
machine, reset for each case by restoring a snapshot (the CPU context, the
core's model state, local APIC and clock, the RAM pages written since the last
reset, the VMCS region as filled for every case), never rebuilt; a case gives
what it gives on a fresh runner (docs/vmx-cases.md, "Reuse and speed").
Assembly is cached by source text.  A case with ``ept=`` (without
``ept_ad``) starts with the EPT translations cached by the last case with the
same EPT, if that case left the EPT tables as built: the tables are the same,
so are the walks.  A runner is not thread-safe; make one per thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from time import perf_counter
from types import MappingProxyType
from typing import Iterable, Mapping, Optional, Union

from unicorn import UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from ..events import GPR_NAMES
from ..platform import longmode
from ..platform.core import GPR_IDS, GuestError, State
from ..platform.memory import PAGE_SIZE
from .case_common import CaseError, FirstExitL0, case_code, case_memory, check_int
from ..vmx import capabilities as caps
from ..vmx import controls as C
from ..vmx import exit_reasons
from ..vmx.entry import EntryFailure
from ..vmx.ept import PAGE_4K, EptBuilder, EptBuildError
from ..vmx.fields import VmcsField as F
from ..vmx.fields import field_by_name, field_info
from ..vmx.rules import Decision
from ..vmx.vcpu import VmxVcpu
from ..vmx.vmcs import VMCS_REGION_SIZE, Vmcs

__all__ = [
    "CODE_BASE", "CODE_LIMIT", "SCRATCH_BASE", "VMCS_PA", "MSR_BITMAP_PA", "IO_BITMAP_A_PA",
    "IO_BITMAP_B_PA", "MEM_MB", "DEFAULT_CONTROLS", "CaseError", "CaseExit", "NoExit",
    "CaseResult", "CaseRunner", "run_case", "legal_controls", "msr_bitmap", "io_bitmaps",
    "XAPIC_BASE", "XAPIC_PD", "xapic_mapping",
    "EptMap", "EptEntry", "EPT_POOL", "EPT_POOL_END",
]

MEM_MB = 16
CODE_BASE = 0x100000
CODE_LIMIT = 0x10000
SCRATCH_BASE = 0x400000
VMCS_PA = 0xF00000
MSR_BITMAP_PA = 0xF01000
IO_BITMAP_A_PA = 0xF02000
IO_BITMAP_B_PA = 0xF03000
HOST_CR3 = 0xF04000
RESERVED_END = 0xF05000
EPT_POOL = 0xF08000            # the EPT paging structures built for ept=
EPT_POOL_END = 0x1000000
BITMAP_SIZE = 4096
HLT = b"\xf4"
_U64 = (1 << 64) - 1
#: The local APIC's xAPIC MMIO page (the default IA32_APIC_BASE), where KVM puts APIC_ACCESS_ADDR.
XAPIC_BASE = 0xFEE00000
#: The page directory :func:`xapic_mapping` uses (the last scratch page).
XAPIC_PD = 0xEFF000

@lru_cache(maxsize=32)
def _default_controls(model) -> Mapping[str, int]:
    return MappingProxyType({
        "PIN_BASED_VM_EXEC_CONTROL": caps.make_legal("PINBASED", 0, model=model),
        "CPU_BASED_VM_EXEC_CONTROL": caps.make_legal("PROCBASED", 0, model=model),
        "SECONDARY_VM_EXEC_CONTROL": 0,
        "VM_EXIT_CONTROLS": caps.make_legal("EXIT", C.VM_EXIT_HOST_ADDR_SPACE_SIZE, model=model),
        "VM_ENTRY_CONTROLS": caps.make_legal("ENTRY", C.VM_ENTRY_IA32E_MODE, model=model),
    })


def default_controls(model=None) -> Mapping[str, int]:
    """The control words of a fresh case on a CPU model (a CpuModel, a spec
    string or None for the default), by VMCS field name (see the module docstring)."""
    return _default_controls(caps.model_of(model))


#: The control words of a fresh case on the default CPU model.
DEFAULT_CONTROLS: Mapping[str, int] = default_controls(None)

# Control-word field name -> capability table name ("PINBASED", ...).
_CONTROL_TABLE = {F(enc).name: table for table, enc in caps.CONTROL_FIELDS.items()}

_MSR_LOW_MAX = 0x1FFF
_MSR_HIGH_MIN, _MSR_HIGH_MAX = 0xC0000000, 0xC0001FFF


# --------------------------------------------------------------------------- helpers
def legal_controls(vmcs: Mapping[str, int], model=None) -> dict[str, int]:
    """``vmcs`` with each control word made legal by the capability MSRs.

    Control words are PIN_BASED_VM_EXEC_CONTROL, CPU_BASED_VM_EXEC_CONTROL,
    SECONDARY_VM_EXEC_CONTROL, TERTIARY_VM_EXEC_CONTROL, VM_EXIT_CONTROLS,
    SECONDARY_VM_EXIT_CONTROLS, VM_ENTRY_CONTROLS and VM_FUNCTION_CONTROL:
    the must-be-1 bits are set and the bits that may not be 1 cleared
    (the TRUE capability MSRs, as VM entry reads them) of the CPU ``model``
    (a CpuModel, a spec string, or None for the default ``skylake-server``).
    Other fields are returned unchanged.
    """
    out = {}
    for name, value in vmcs.items():
        key = _field_name(name)
        table = _CONTROL_TABLE.get(key)
        if table is not None:
            check_int(key, value)
            value = caps.make_legal(table, value, model=model)
        out[name] = value
    return out


def msr_bitmap(read: Iterable[int] = (), write: Iterable[int] = ()) -> bytes:
    """A 4 KiB MSR bitmap intercepting RDMSR of ``read`` and WRMSR of ``write``.

    SDM layout: read bitmap for MSRs 0-0x1FFF at byte 0, for
    0xC0000000-0xC0001FFF at 1024; the write bitmaps at 2048 and 3072.  An
    MSR outside those two ranges has no bit (RDMSR/WRMSR of it always
    exits): naming one is a :class:`CaseError`.
    """
    bm = bytearray(BITMAP_SIZE)
    for msrs, base in ((read, 0), (write, 2048)):
        for msr in msrs:
            check_int("MSR number", msr)
            if msr <= _MSR_LOW_MAX:
                off, bit = base, msr
            elif _MSR_HIGH_MIN <= msr <= _MSR_HIGH_MAX:
                off, bit = base + 1024, msr - _MSR_HIGH_MIN
            else:
                raise CaseError(f"MSR {msr:#x} is outside the MSR bitmap's ranges "
                                "(0-0x1FFF, 0xC0000000-0xC0001FFF): its RDMSR/WRMSR always exit")
            bm[off + bit // 8] |= 1 << (bit % 8)
    return bytes(bm)


def io_bitmaps(ports: Iterable[int]) -> tuple[bytes, bytes]:
    """I/O bitmaps A (ports 0-0x7FFF) and B (0x8000-0xFFFF) intercepting ``ports``."""
    a, b = bytearray(BITMAP_SIZE), bytearray(BITMAP_SIZE)
    for port in ports:
        check_int("port", port)
        if not 0 <= port <= 0xFFFF:
            raise CaseError(f"port {port:#x} is not a 16-bit I/O port")
        bm = a if port < 0x8000 else b
        p = port & 0x7FFF
        bm[p // 8] |= 1 << (p % 8)
    return bytes(a), bytes(b)


def xapic_mapping() -> dict[int, bytes]:
    """``memory`` entries that map the xAPIC page :data:`XAPIC_BASE` at the
    same linear address, which the fresh state leaves unmapped: PDPT entry 3
    points to a page directory at :data:`XAPIC_PD` whose entry for
    0xFEE00000 is a 2 MiB page (present, writable).  Add your own entries
    beside them: ``memory={**xapic_mapping(), ...}``."""
    pdpt = longmode.PML4 + 0x1000
    gib = XAPIC_BASE >> 30
    pde = (XAPIC_BASE >> 21) & 0x1FF
    return {pdpt + 8 * gib: (XAPIC_PD | 3).to_bytes(8, "little"),
            XAPIC_PD + 8 * pde: ((XAPIC_BASE & ~0x1FFFFF) | 0x83).to_bytes(8, "little")}


def _field_name(key) -> str:
    """The Linux name of a VMCS field given by name, VmcsField or encoding."""
    if isinstance(key, str):
        try:
            return field_by_name(key).name
        except KeyError:
            raise CaseError(f"no VMCS field is named {key!r}") from None
    if isinstance(key, bool) or not isinstance(key, int):
        raise CaseError(f"a VMCS field is a name or an encoding, not {key!r}")
    try:
        info = field_info(int(key))
    except (ValueError, TypeError):
        info = None
    if info is None:
        raise CaseError(f"{int(key):#x} is not a VMCS field encoding")
    return info.name


def _bitmap_bytes(what: str, value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) != BITMAP_SIZE:
            raise CaseError(f"{what} is {BITMAP_SIZE} bytes, not {len(data)}")
        return data
    raise CaseError(f"{what}: expected {BITMAP_SIZE} bytes, not {type(value).__name__}")


# --------------------------------------------------------------------------- EPT shortcut
@dataclass(frozen=True)
class EptMap:
    """An EPT mapping for ``ept=``: ``[gpa, gpa + size)`` to ``[hpa, hpa + size)``
    with leaves of ``page_size`` (4 KiB, 2 MiB or 1 GiB) carrying ``rights``
    (bits 2:0: R=1, W=2, X=4) and ``memory_type`` (bits 5:3; 6 = WB).  A
    mapping replaces what earlier items mapped there with pages of its size or
    smaller; a smaller page inside an earlier larger one is a CaseError."""

    gpa: int
    hpa: int
    size: int = PAGE_4K
    rights: int = 7
    page_size: int = PAGE_4K
    memory_type: int = 6


@dataclass(frozen=True)
class EptEntry:
    """A raw EPT entry for ``ept=``: ``value`` is written as the entry at
    ``level`` (4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE) on the walk of ``gpa``,
    after the mappings before it (the tables above that level must exist).
    The way to build a misconfigured or not-present entry."""

    gpa: int
    level: int
    value: int


_LEVELS = {PAGE_4K: 1, 2 << 20: 2, 1 << 30: 3}


def _ept_items(ept) -> tuple:
    """``ept=`` as a tuple of EptMap / EptEntry (see run_case)."""
    if isinstance(ept, str):
        if ept != "identity":
            raise CaseError(f"ept is 'identity', a mapping, EptMap/EptEntry or a list of them, not {ept!r}")
        return (EptMap(0, 0, MEM_MB << 20),)
    if isinstance(ept, (EptMap, EptEntry)):
        return (ept,)
    if isinstance(ept, Mapping):
        out = []
        for gpa, spec in ept.items():
            if not isinstance(spec, tuple) or len(spec) not in (2, 3):
                raise CaseError(f"ept[{gpa!r}]: expected (hpa, rights) or (hpa, rights, page_size), "
                                f"not {spec!r}")
            hpa, rights, *size = spec
            ps = size[0] if size else PAGE_4K
            out.append(EptMap(gpa, hpa, ps, rights, ps))
        return tuple(out)
    if isinstance(ept, (list, tuple)):
        return tuple(x for item in ept for x in _ept_items(item))
    raise CaseError(f"ept is 'identity', a mapping, EptMap/EptEntry or a list of them, not "
                    f"{type(ept).__name__}")


def _build_ept(builder: EptBuilder, items: tuple) -> None:
    mem = builder.mem
    for item in items:
        for name in ("gpa", "hpa", "size", "rights", "page_size", "memory_type", "level", "value"):
            if hasattr(item, name):
                check_int(f"{type(item).__name__}.{name}", getattr(item, name))
        try:
            if isinstance(item, EptEntry):
                if item.level not in (1, 2, 3, 4):
                    raise CaseError(f"{item}: level is 4 (PML4E), 3, 2 or 1 (PTE)")
                if item.value > _U64:
                    raise CaseError(f"{item}: value does not fit 64 bits")
                mem.write_u64(builder.entry_address(item.gpa, item.level), item.value)
                continue
            level = _LEVELS.get(item.page_size)
            if level is None:
                raise CaseError(f"{item}: page_size is 4 KiB, 2 MiB or 1 GiB")
            if level > 1 and item.gpa % item.page_size == 0:
                # a larger page replaces the smaller pages mapped there before
                for g in range(item.gpa, item.gpa + max(item.size, 0), item.page_size):
                    try:
                        slot = builder.entry_address(g, level)
                    except EptBuildError:
                        continue
                    if mem.read_u64(slot) & 7 and not mem.read_u64(slot) & 0x80:
                        mem.write_u64(slot, 0)
            builder.map(item.gpa, item.hpa, item.size, rights=item.rights, page_size=item.page_size,
                        memory_type=item.memory_type)
        except EptBuildError as e:
            raise CaseError(f"ept: {item}: {e}") from None


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CaseExit:
    """The first VM exit, as the processor wrote it into the VMCS.

    ``reason`` is the basic exit reason (bits 15:0 of VM_EXIT_REASON) and
    ``exit_reason`` the whole field.  ``instruction_length`` and
    ``instruction_info`` are None where the SDM leaves VM_EXIT_INSTRUCTION_LEN
    / VMX_INSTRUCTION_INFO undefined for this exit; ``error_code`` is None
    unless ``interruption_info`` has bits 31 and 11 set (an error code was
    delivered), ``idt_vectoring_error_code`` likewise for
    ``idt_vectoring_info``.  ``guest_rip`` is GUEST_RIP.  ``regs`` holds the
    GPRs ("rax".."r15", RSP from GUEST_RSP) and "rip", "rflags", "cr0",
    "cr3", "cr4" as saved in the guest-state area (the real CR0/CR4, not the
    read shadows) and "cr2".  ``cause`` is what the exit rule looked at
    (control bits, bitmap bits, mask and shadow); ``decision`` is the rule's
    whole :class:`~devirt_emu.vmx.rules.Decision`.
    """

    reason: int
    name: str
    exit_reason: int
    qualification: int
    instruction_length: Optional[int]
    instruction_info: Optional[int]
    interruption_info: int
    error_code: Optional[int]
    idt_vectoring_info: int
    idt_vectoring_error_code: Optional[int]
    guest_linear_address: Optional[int]
    guest_physical_address: Optional[int]
    guest_rip: int
    regs: Mapping[str, int]
    cause: tuple
    decision: Decision = field(repr=False)

    def __str__(self) -> str:
        parts = [f"exit {self.reason} {self.name}", f"qualification {self.qualification:#x}"]
        if self.instruction_length is not None:
            parts.append(f"length {self.instruction_length}")
        if self.instruction_info is not None:
            parts.append(f"instruction info {self.instruction_info:#x}")
        if self.interruption_info:
            parts.append(f"interruption info {self.interruption_info:#x}")
        if self.error_code is not None:
            parts.append(f"error code {self.error_code:#x}")
        if self.idt_vectoring_info:
            parts.append(f"IDT-vectoring info {self.idt_vectoring_info:#x}")
        parts.append(f"at RIP {self.guest_rip:#x}")
        return ", ".join(parts)


@dataclass(frozen=True)
class NoExit:
    """The run ended without a VM exit.

    ``why`` is "step limit" (``max_steps`` instructions retired), "halted"
    (the guest executed HLT without HLT exiting and nothing can wake it),
    "shutdown" (the core shut down) or "stopped" (the machine ended the run:
    ``message`` says why, e.g. a write to the test-exit port or a guest
    action the platform does not model).  ``guest_rip`` is the RIP of the
    next instruction; ``regs`` as in :class:`CaseExit` but read from the core.
    """

    why: str
    guest_rip: int
    regs: Mapping[str, int]
    message: str = ""

    def __str__(self) -> str:
        tail = f": {self.message}" if self.message else ""
        return f"no exit ({self.why}) at RIP {self.guest_rip:#x}{tail}"


@dataclass(frozen=True)
class CaseResult:
    """What a case produced: exactly one of ``exit``, ``entry_failure``, ``no_exit``.

    ``steps`` is the number of guest instructions retired.  ``vmcs`` is a
    snapshot (name -> value) of every supported VMCS field after the run.
    ``symbols`` are the labels of assembled code (empty for bytes);
    ``code_end`` is the address of the HLT byte that follows the code;
    ``code`` the code's bytes.
    """

    exit: Optional[CaseExit]
    entry_failure: Optional[EntryFailure]
    no_exit: Optional[NoExit]
    steps: int
    vmcs: Mapping[str, int] = field(repr=False)
    symbols: Mapping[str, int] = field(repr=False)
    code_end: int = 0
    #: The guest code as loaded at :data:`CODE_BASE` (for a disassembly).
    code: bytes = field(default=b"", repr=False)
    #: The last sensitive event the exit rules let through, as (kind, RIP, the
    #: rule's cause), or None: why an instruction did not exit.
    last_no_exit: Optional[tuple] = field(default=None, repr=False)

    @property
    def outcome(self) -> str:
        """"exit", "entry_failure" or "no_exit"."""
        if self.exit is not None:
            return "exit"
        if self.entry_failure is not None:
            return "entry_failure"
        return "no_exit"

    def __str__(self) -> str:
        what = self.exit or self.no_exit or f"VM-entry failure: {self.entry_failure}"
        return f"{what} after {self.steps} steps"


# --------------------------------------------------------------------------- the L0 of a case
class _RecordingL0(FirstExitL0):
    """An L0 that takes the first VM exit (or VM-entry failure) and ends the run."""

    def record(self, vcpu) -> CaseExit:
        return _exit_from(vcpu, vcpu.last_exit)   # (the rule's cause, for the explanation)


def _exit_from(vcpu, d: Decision) -> CaseExit:
    g = vcpu.vmcs.get
    full = g(F.VM_EXIT_REASON)
    intr = g(F.VM_EXIT_INTR_INFO)
    idt = g(F.IDT_VECTORING_INFO_FIELD)
    valid_ec = C.INTR_INFO_VALID_MASK | C.INTR_INFO_DELIVER_CODE_MASK
    regs = _regs(vcpu.core, vcpu.vmcs)
    return CaseExit(
        reason=full & exit_reasons.BASIC_REASON_MASK,
        name=exit_reasons.name_of(full),
        exit_reason=full,
        qualification=g(F.EXIT_QUALIFICATION),
        instruction_length=None if d.instruction_length is None else g(F.VM_EXIT_INSTRUCTION_LEN),
        instruction_info=None if d.instruction_info is None else g(F.VMX_INSTRUCTION_INFO),
        interruption_info=intr,
        error_code=g(F.VM_EXIT_INTR_ERROR_CODE) if intr & valid_ec == valid_ec else None,
        idt_vectoring_info=idt,
        idt_vectoring_error_code=g(F.IDT_VECTORING_ERROR_CODE) if idt & valid_ec == valid_ec else None,
        guest_linear_address=d.guest_linear_address,
        guest_physical_address=d.guest_physical_address,
        guest_rip=g(F.GUEST_RIP),
        regs=regs,
        cause=tuple(d.cause),
        decision=d,
    )


def _regs(core, vmcs: Optional[Vmcs]) -> Mapping[str, int]:
    p = core.probe                  # (GPR_NAMES is in the SDM's numbering, as probe.gpr)
    regs = {n: p.gpr(i) for i, n in enumerate(GPR_NAMES)}
    if vmcs is not None:
        g = vmcs.get
        regs.update(rsp=g(F.GUEST_RSP), rip=g(F.GUEST_RIP), rflags=g(F.GUEST_RFLAGS),
                    cr0=g(F.GUEST_CR0), cr3=g(F.GUEST_CR3), cr4=g(F.GUEST_CR4))
    else:
        reg = p.reg
        regs.update(rip=reg(X.UC_X86_REG_RIP), rflags=reg(X.UC_X86_REG_EFLAGS),
                    cr0=reg(X.UC_X86_REG_CR0), cr3=reg(X.UC_X86_REG_CR3),
                    cr4=reg(X.UC_X86_REG_CR4) | (1 << 13))
    regs["cr2"] = p.reg(X.UC_X86_REG_CR2)
    return MappingProxyType(regs)


# --------------------------------------------------------------------------- the runner
_REG_FIELDS = {"rsp": "GUEST_RSP", "rip": "GUEST_RIP", "rflags": "GUEST_RFLAGS"}
_CORE_REGS = {n: r for n, r in zip(GPR_NAMES, GPR_IDS) if n != "rsp"}
_CORE_REGS["cr2"] = X.UC_X86_REG_CR2


class CaseRunner:
    """One machine that runs cases one after another (see :func:`run_case`)."""

    def __init__(self, cpu=None):
        from ..machine import Machine
        # (virtual time runs on from case to case: no limit but the step count)
        self.machine = Machine(cores=1, mem_mb=MEM_MB, max_ns=1 << 62, cpu=cpu)
        if not self.machine.cpu.has_vmx:
            raise CaseError(f"CPU model {self.machine.cpu.name} has no VMX")
        #: The CPU model the cases run on (``cpu``: a CpuModel, a spec string, or
        #: None for skylake-server): its capability MSRs decide what VM entry allows.
        self.cpu = self.machine.cpu
        self.core = self.machine.cores[0]
        self._asm_cache: dict[str, tuple[bytes, dict[str, int]]] = {}
        longmode.write_environment(self.machine)
        longmode.enter(self.core, CODE_BASE)
        self.core.uc.reg_write(X.UC_X86_REG_DR7, 0x400)
        for rid in GPR_IDS:
            if rid != X.UC_X86_REG_RSP:
                self.core.uc.reg_write(rid, 0)
        self.machine.boot(prepared=True)
        self._fresh_context = self.core.uc.context_save()
        self._env_bytes = self.machine.mem.read(longmode.GDT, longmode.PML4 + 0x3000 - longmode.GDT)
        self._bitmaps = {pa: bytes(BITMAP_SIZE) for pa in (MSR_BITMAP_PA, IO_BITMAP_A_PA, IO_BITMAP_B_PA)}
        for pa, data in self._bitmaps.items():
            self.machine.write_phys(pa, data)
        #: The EPT of the last case run with ``ept=`` (None without): its
        #: ``entry_address(gpa, level)`` and ``mem`` let a test read the entries
        #: (accessed and dirty flags) after the run.
        self.ept: Optional[EptBuilder] = None
        self._ept_snapshots: dict[tuple, tuple] = {}
        self._ept_key: Optional[tuple] = None          # the snapshot key of the last ept=
        self._ept_translations: dict[tuple, tuple] = {}   # key -> (EPTP, translations)
        self._snapshot()

    # ----------------------------------------------------------------- the snapshot
    def _snapshot(self) -> None:
        """Take the fresh state every case starts from: the CPU context (above),
        the clock, a copy of RAM, the formatted VMCS with the defaults and the
        guest state written, and start logging the pages written from now on."""
        m, core = self.machine, self.core
        mem = m.mem
        self._fresh_time = (core.clock, core.icount)
        Vmcs.format(mem, VMCS_PA, model=self.cpu)
        vcpu = VmxVcpu(core, VMCS_PA, _RecordingL0(m))
        self._write_vmcs(vcpu, {})
        v = vcpu.vmcs
        self._caps = vcpu.caps          # (an EntryCaps is immutable: every case's vCPU shares it)
        self._fresh_vmcs = mem.read(VMCS_PA, VMCS_REGION_SIZE)
        # what the processor holds beside the region after those writes
        self._fresh_tracking = (v.live, frozenset(v.fresh), frozenset(v.written))
        self._fresh_ram = bytes(mem.view)
        self._code_len = 0              # bytes of code (and HLT) at CODE_BASE now
        #: Pages (their addresses) written since the last reset: by the platform
        #: (``Machine.write_log``) and by the guest's stores (a write hook).
        self._dirty: set[int] = set()
        self._dirty_all = False         # a store whose page was not found: compare all of RAM
        m.write_log = self._dirty
        self._seen_stores: set[tuple[int, int]] = set()     # (linear page, CR3) logged
        self._cr3 = core.probe.cr_reader(3)
        core.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_store)
        #: Microseconds the last reset took (restoring the CPU, the dirty pages, the
        #: VMCS; benchmarks/bench_cases.py reports it).
        self.last_reset_us = 0.0

    def _on_store(self, uc, access, address, size, value, data) -> None:
        """A guest store (Unicorn reports its linear address): log its pages.

        Each linear page is translated once per CR3 value in a case (a guest that
        rewrites a live paging entry in place and stores through it without
        changing CR3 is the one gap; the tests compare all of RAM)."""
        cr3 = self._cr3()
        seen = self._seen_stores
        for linear in {address & ~0xFFF, (address + max(size, 1) - 1) & ~0xFFF}:
            if (linear, cr3) in seen:
                continue
            seen.add((linear, cr3))
            try:
                self._dirty.add(self.core.translate(linear, peek=True) & ~0xFFF)
            except Exception:           # (no translation now: the next reset compares all)
                self._dirty_all = True

    # ----------------------------------------------------------------- inputs
    def _code(self, code) -> tuple[bytes, dict[str, int]]:
        return case_code(code, self._asm_cache, CODE_BASE, CODE_LIMIT)

    def _fields(self, vmcs, legal: bool) -> dict[str, int]:
        if vmcs is None:
            return {}
        if not isinstance(vmcs, Mapping):
            raise CaseError(f"vmcs is a mapping of field names to values, not {type(vmcs).__name__}")
        out: dict[str, int] = {}
        for key, value in vmcs.items():
            name = _field_name(key)
            check_int(name, value)
            if field_by_name(name).read_only:
                raise CaseError(f"{name} is a read-only VM-exit information field")
            if not caps.is_field_supported(name, self.cpu):
                raise CaseError(f"{name} is not a VMCS field of CPU model {self.cpu.name}")
            if name in out:
                raise CaseError(f"{name} is given twice")
            out[name] = value
        return legal_controls(out, self.cpu) if legal else out

    def _bitmaps_for(self, msr_bm, io_a, io_b) -> dict[int, bytes]:
        out = {}
        if msr_bm is None:
            out[MSR_BITMAP_PA] = bytes(BITMAP_SIZE)
        elif isinstance(msr_bm, Mapping):
            extra = set(msr_bm) - {"read", "write"}
            if extra:
                raise CaseError(f"msr_bitmap keys are 'read' and 'write', not {sorted(map(str, extra))}")
            out[MSR_BITMAP_PA] = msr_bitmap(msr_bm.get("read", ()), msr_bm.get("write", ()))
        else:
            out[MSR_BITMAP_PA] = _bitmap_bytes("msr_bitmap", msr_bm)
        for pa, value, what, lo in ((IO_BITMAP_A_PA, io_a, "io_bitmap_a", 0),
                                    (IO_BITMAP_B_PA, io_b, "io_bitmap_b", 0x8000)):
            if value is None:
                out[pa] = bytes(BITMAP_SIZE)
            elif isinstance(value, (bytes, bytearray, memoryview)):
                out[pa] = _bitmap_bytes(what, value)
            else:
                try:
                    ports = list(value)
                except TypeError:
                    raise CaseError(f"{what} is {BITMAP_SIZE} bytes or an iterable of ports, "
                                    f"not {type(value).__name__}") from None
                for p in ports:
                    check_int(f"{what} port", p)
                    if not lo <= p <= lo + 0x7FFF:
                        raise CaseError(f"port {p:#x} is not in {what}'s range "
                                        f"{lo:#x}-{lo + 0x7FFF:#x}")
                out[pa] = io_bitmaps(ports)[0 if lo == 0 else 1]
        return out

    def _memory(self, memory) -> list[tuple[int, bytes]]:
        return case_memory(memory, self.machine.mem.size, (VMCS_PA, RESERVED_END), "the VMCS and bitmaps",
                           "use vmcs= and the bitmap arguments")

    @staticmethod
    def _registers(regs, fields: dict[str, int]) -> dict[str, int]:
        if regs is None:
            return {}
        if not isinstance(regs, Mapping):
            raise CaseError(f"regs is a mapping of register names to values, not {type(regs).__name__}")
        core_regs = {}
        for name, value in regs.items():
            check_int(f"register {name!r}", value)
            if value > _U64:
                raise CaseError(f"register {name!r}: {value:#x} does not fit 64 bits")
            if name in _REG_FIELDS:
                f = _REG_FIELDS[name]
                if f in fields:
                    raise CaseError(f"{name!r} is given both in regs and as {f} in vmcs")
                fields[f] = value
            elif name in _CORE_REGS:
                core_regs[name] = value
            else:
                raise CaseError(f"unknown register {name!r}; one of "
                                f"{', '.join(list(GPR_NAMES) + ['rip', 'rflags', 'cr2'])}")
        return core_regs

    # ----------------------------------------------------------------- running
    def run(self, code, *, vmcs: Optional[Mapping] = None,
            msr_bitmap: Union[bytes, Mapping, None] = None,
            io_bitmap_a: Union[bytes, Iterable[int], None] = None,
            io_bitmap_b: Union[bytes, Iterable[int], None] = None,
            regs: Optional[Mapping[str, int]] = None,
            memory: Optional[Mapping[int, bytes]] = None, max_steps: int = 10_000,
            legal: bool = False, ept=None, ept_ad: bool = False) -> CaseResult:
        """Run one case; see :func:`run_case`."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise CaseError(f"max_steps is a positive int, not {max_steps!r}")
        data, symbols = self._code(code)
        fields = self._fields(vmcs, legal)
        core_regs = self._registers(regs, fields)
        bitmaps = self._bitmaps_for(msr_bitmap, io_bitmap_a, io_bitmap_b)
        writes = self._memory(memory)
        ept_items = None
        if ept is not None:
            ept_items = _ept_items(ept)
            if "EPT_POINTER" in fields:
                raise CaseError("give the EPT either as ept= or as EPT_POINTER in vmcs, not both")
            for pa, blob in writes:
                if pa < EPT_POOL_END and pa + len(blob) > EPT_POOL:
                    raise CaseError(f"memory at {pa:#x}+{len(blob):#x} overlaps the EPT tables of ept= "
                                    f"({EPT_POOL:#x}-{EPT_POOL_END:#x})")

        m, core = self.machine, self.core
        t0 = perf_counter()
        self._reset(data, bitmaps)
        l0 = _RecordingL0(m)
        vcpu = self._fresh_vcpu(l0)
        self.last_reset_us = (perf_counter() - t0) * 1e6
        for pa, blob in writes:
            m.write_phys(pa, blob)
        self.ept = None if ept_items is None else self._ept(ept_items, bool(ept_ad))
        self._write_fields(vcpu, fields)
        if self.ept is not None:
            v = vcpu.vmcs
            v.set(F.CPU_BASED_VM_EXEC_CONTROL,
                  v.get(F.CPU_BASED_VM_EXEC_CONTROL) | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS)
            v.set(F.SECONDARY_VM_EXEC_CONTROL, v.get(F.SECONDARY_VM_EXEC_CONTROL) | C.SECONDARY_EXEC_ENABLE_EPT)
            v.set(F.EPT_POINTER, self.ept.eptp)
            if not ept_ad:
                vcpu.ept_translations = self._ept_translations.get(self._ept_key)
        for name, value in core_regs.items():
            core.uc.reg_write(_CORE_REGS[name], value)
            if name == "cr2":
                core.cr2 = value            # the architectural CR2 the core keeps
        core.virt = vcpu
        icount0 = core.icount
        try:
            if vcpu.vm_entry(launch=True):
                m.step(max_steps, core=0)
        except GuestError as e:           # the guest did something the platform does not model
            m.finish("error", str(e))
        finally:
            core.virt = None
        steps = core.icount - icount0
        self._keep_ept_translations(vcpu, bool(ept_ad))
        vcpu.vmcs.flush()               # (the guest-state fields the engine holds)
        snapshot = _VmcsSnapshot(m.mem.read(VMCS_PA, VMCS_REGION_SIZE))
        code_end = CODE_BASE + len(data)
        let_through = None
        if vcpu.last_no_exit is not None:
            ev, d = vcpu.last_no_exit
            let_through = (ev.kind.value, ev.rip, tuple(d.cause))
        if l0.exit is not None:
            return CaseResult(l0.exit, None, None, steps, snapshot, symbols, code_end, data, let_through)
        if l0.failure is not None:
            return CaseResult(None, l0.failure, None, steps, snapshot, symbols, code_end, data, let_through)
        if core.state is State.HALTED and m.verdict in (None, "halted"):
            why, msg = "halted", ""
        elif core.state is State.SHUTDOWN and m.verdict in (None, "shutdown"):
            why, msg = "shutdown", ""
        elif m.verdict is not None:
            why, msg = "stopped", m.message
        else:
            why, msg = "step limit", ""
        no = NoExit(why, core.rip(), _regs(core, None), msg)
        return CaseResult(None, None, no, steps, snapshot, symbols, code_end, data, let_through)

    def _keep_ept_translations(self, vcpu: VmxVcpu, ad: bool) -> None:
        """After a case with ``ept=`` and without A/D flags whose EPT tables are
        as built (the guest did not write them): keep the EPT translations it
        cached for the next case with the same EPT, which starts from the same
        tables (so its walks would give the same translations)."""
        key = self._ept_key
        if self.ept is None or ad or vcpu.ept is None or vcpu.ept.eptp != self.ept.eptp:
            return
        _, data = self._ept_snapshots[key]
        if self.machine.mem.read(self.ept.pml4, len(data)) == data:
            if len(self._ept_translations) > 64:
                self._ept_translations.clear()
            self._ept_translations[key] = (self.ept.eptp, vcpu.ept.translations())
        else:
            self._ept_translations.pop(key, None)

    def _ept(self, items: tuple, ad: bool) -> EptBuilder:
        """Build the EPT of ``ept=`` in the pool (the tables of an EPT built
        before are put back from a snapshot: building 4096 leaves takes ~30 ms)."""
        b = EptBuilder(self.machine.mem, EPT_POOL, EPT_POOL_END - EPT_POOL, ad=ad)
        key = self._ept_key = (items, ad)
        snap = self._ept_snapshots.get(key)
        if snap is not None:
            b.restore(snap)
        else:
            try:
                _build_ept(b, items)
            finally:
                # the builder and the EPT walk (accessed and dirty flags) write the
                # pool's tables directly: the next reset restores every page in use
                self._dirty.update(range(EPT_POOL, b.snapshot()[0], PAGE_4K))
            if len(self._ept_snapshots) > 64:
                self._ept_snapshots.clear()
            snap = self._ept_snapshots[key] = b.snapshot()
        self._dirty.update(range(EPT_POOL, snap[0], PAGE_4K))
        return b

    def _reset(self, code: bytes, bitmaps: dict[int, bytes]) -> None:
        """Back to the fresh state: the CPU context, the core's model state, its
        local APIC and its clock; the pages written since the last reset; the
        bitmaps, the code and the environment tables where they differ; the
        VMCS region.  Nothing is rebuilt."""
        m, core = self.machine, self.core
        mem = m.mem
        m.new_run()
        fresh = self._fresh_ram
        m.write_log = None              # (the restores below are not the next case's writes)
        # the core: CPU context, then the model state kept beside Unicorn
        core.uc.context_restore(self._fresh_context)
        core.reset_model_state()
        core.state = State.RUNNING
        core.lapic.reset()
        core.clock, core.icount = self._fresh_time
        # (measured: after a case that watched the xAPIC page, reset_model_state
        # leaves the engine's CR2 changed; the fresh CPU context has CR2 = 0)
        core.set_cr2(0)
        if self._dirty_all:
            self._dirty.update(_differing_pages(mem.view, fresh))
            self._dirty_all = False
        code_pages = range(CODE_BASE, CODE_BASE + CODE_LIMIT, PAGE_SIZE)
        for page in self._dirty:
            if page in code_pages:
                self._code_len = CODE_LIMIT         # (compared and rewritten below)
            if m.is_code_page(page):
                m.write_phys(page, fresh[page:page + PAGE_SIZE])   # (drops its scans)
            else:
                mem.view[page:page + PAGE_SIZE] = fresh[page:page + PAGE_SIZE]
        self._dirty.clear()
        self._seen_stores.clear()
        # the bitmaps as this case gives them, the code followed by HLT (and zeros
        # where longer code was before): compared, rewritten where they differ
        for pa, data in bitmaps.items():
            if self._bitmaps.get(pa) != data or mem.read(pa, BITMAP_SIZE) != data:
                m.write_phys(pa, data)
                self._bitmaps[pa] = data
        blob = code + HLT
        if len(blob) < self._code_len:
            blob += bytes(self._code_len - len(blob))
        if mem.read(CODE_BASE, len(blob)) != blob:
            m.write_phys(CODE_BASE, blob)
        self._code_len = len(code) + 1
        # the environment tables: the engine's page walk sets accessed and dirty
        # flags in them without a store the hook sees, also
        # while the engine drops translations (the core's reset, a code page rewritten)
        env = self._env_bytes
        if mem.read(longmode.GDT, len(env)) != env:
            for page in _differing_pages(mem.view, fresh, longmode.GDT, longmode.GDT + len(env)):
                m.write_phys(page, fresh[page:page + PAGE_SIZE])
        m.write_log = self._dirty
        # the VMCS region, as formatted and written for every case
        mem.view[VMCS_PA:VMCS_PA + VMCS_REGION_SIZE] = self._fresh_vmcs

    def _fresh_vcpu(self, l0) -> VmxVcpu:
        """A vCPU over the restored VMCS, holding what the processor held after the
        defaults and the guest state were written (see :meth:`_snapshot`)."""
        vcpu = VmxVcpu(self.core, VMCS_PA, l0, caps=self._caps)
        v = vcpu.vmcs
        live, fresh, written = self._fresh_tracking
        if live:
            v.engine_holds()
            v.fresh.update(fresh)
        v.written.update(written)
        return vcpu

    def _write_vmcs(self, vcpu: VmxVcpu, fields: dict[str, int]) -> None:
        """The VMCS of a case from a formatted region: the defaults, the bitmap
        addresses, the host and guest state, then ``fields``."""
        from ..hypervisor.kvm import prepare_vmcs
        s = vcpu.vmcs.set
        for name, val in default_controls(self.cpu).items():
            s(F[name], val)
        s(F.MSR_BITMAP, MSR_BITMAP_PA)
        s(F.IO_BITMAP_A, IO_BITMAP_A_PA)
        s(F.IO_BITMAP_B, IO_BITMAP_B_PA)
        prepare_vmcs(vcpu, HOST_CR3)
        self._write_fields(vcpu, fields)

    @staticmethod
    def _write_fields(vcpu: VmxVcpu, fields: dict[str, int]) -> None:
        s = vcpu.vmcs.set
        for name, val in fields.items():
            try:
                s(F[name], val)
            except ValueError as e:
                raise CaseError(f"{name}: {e}") from None


def _differing_pages(view, fresh: bytes, start: int = 0, end: Optional[int] = None) -> list[int]:
    """The addresses of the pages in [start, end) where RAM differs from ``fresh``
    (compared 64 KiB at a time, then page by page where a block differs)."""
    end = len(fresh) if end is None else end
    out = []
    for block in range(start, end, 1 << 16):
        top = min(block + (1 << 16), end)
        if bytes(view[block:top]) != fresh[block:top]:    # (bytes compare with memcmp)
            out.extend(p for p in range(block & ~0xFFF, top, PAGE_SIZE)
                       if bytes(view[p:p + PAGE_SIZE]) != fresh[p:p + PAGE_SIZE])
    return out


class _RegionBytes:
    """A copy of a VMCS region, as the memory a :class:`Vmcs` reads."""

    def __init__(self, data: bytes):
        self.view = memoryview(bytearray(data))


class _VmcsSnapshot(Mapping):
    """Every supported VMCS field (name -> value) of a copy of the region taken
    after a case; decoded on first use (most tests look at the exit only)."""

    def __init__(self, region: bytes):
        self._region = region
        self._fields: Optional[dict[str, int]] = None

    def _decoded(self) -> dict[str, int]:
        if self._fields is None:
            self._fields = dict(Vmcs(_RegionBytes(self._region), 0).items())
        return self._fields

    def __getitem__(self, name: str) -> int:
        return self._decoded()[name]

    def __iter__(self):
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"<VMCS snapshot of {len(self)} fields>"


_runner: Optional[CaseRunner] = None     # run_case's runner on the default CPU model
_runners: dict = {}                      # other CpuModel -> the CaseRunner run_case uses for it


def run_case(code, *, vmcs: Optional[Mapping] = None,
             msr_bitmap: Union[bytes, Mapping, None] = None,
             io_bitmap_a: Union[bytes, Iterable[int], None] = None,
             io_bitmap_b: Union[bytes, Iterable[int], None] = None,
             regs: Optional[Mapping[str, int]] = None,
             memory: Optional[Mapping[int, bytes]] = None, max_steps: int = 10_000,
             legal: bool = False, ept=None, ept_ad: bool = False, cpu=None) -> CaseResult:
    """Run ``code`` as a VMX guest from the fresh 64-bit state until the first VM exit.

    ``code``: Intel-syntax assembly (assembled at :data:`CODE_BASE`; labels are
    in :attr:`CaseResult.symbols`) or raw bytes.  ``vmcs``: field name (or
    encoding) -> value, written after the defaults with the processor's own
    VMCS accesses (guest-state, host-state and control fields alike; the
    VM-exit information fields are read-only here).  ``legal``: make the
    control words given in ``vmcs`` legal first (:func:`legal_controls`).
    ``msr_bitmap``, ``io_bitmap_a``, ``io_bitmap_b``, ``regs``: see the
    module docstring.  ``memory``: physical address -> bytes written into RAM
    after the fresh state is set up (IDT gates, EPT tables, data; not over the
    VMCS and bitmap pages).  ``max_steps``: guest instructions to run at most.
    ``ept``: EPT in a line (see the module docstring, "EPT"): ``"identity"``,
    ``{gpa: (hpa, rights[, page_size])}``, :class:`EptMap`, :class:`EptEntry`
    or a list of them; ``ept_ad``: set EPTP bit 6 (accessed and dirty flags).
    ``cpu``: the CPU model (a CpuModel, a spec string such as ``"nehalem"``,
    or None for ``skylake-server``); one machine per model is kept.

    Raises :class:`CaseError` for input that cannot be run as given (a bad
    ``cpu`` spec included).
    """
    try:
        model = caps.model_of(cpu)
    except ValueError as e:
        raise CaseError(str(e)) from None
    global _runner
    if model is caps.DEFAULT_MODEL:
        if _runner is None:
            _runner = CaseRunner(model)
        runner = _runner
    else:
        runner = _runners.get(model)
        if runner is None:
            runner = _runners[model] = CaseRunner(model)
    return runner.run(code, vmcs=vmcs, msr_bitmap=msr_bitmap, io_bitmap_a=io_bitmap_a,
                       io_bitmap_b=io_bitmap_b, regs=regs, memory=memory, max_steps=max_steps,
                       legal=legal, ept=ept, ept_ad=ept_ad)
