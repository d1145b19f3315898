"""Hypothesis strategies for VMX: control settings, bitmaps, guest states and
guest programs, built on the project's own tables (the capability MSRs of
:mod:`devirt_emu.vmx.capabilities`, the bit tables of
:mod:`devirt_emu.vmx.controls`) and checked against its own VM-entry checks
(:mod:`devirt_emu.vmx.entry`).

    >>> from hypothesis import given
    >>> from devirt_emu.testing import strategies as vs
    >>> from devirt_emu.testing.vmx_case import run_case
    >>> @given(vs.cases())
    ... def test_no_internal_error(case):
    ...     r = case.run()
    ...     assert r.no_exit is None or r.no_exit.why != "stopped"

What there is:

* :func:`control_word`: one control word the capability MSRs allow (the
  must-be-1 bits set, a subset of the optional bits);
* :func:`vmx_controls`: all control words together with the fields their bits
  need (addresses, VPID, EPT), so that VM entry accepts them;
* :func:`entry_breakage`: a valid setting with exactly one VM-entry check
  broken (NecoFuzz-style: near the boundary between valid and invalid), as a
  :class:`Breakage` saying which field the check reports and how it fails;
* :func:`exception_bitmaps` (with the #PF error-code mask and match),
  :func:`cr_masks` (CR0/CR4 guest/host masks and read shadows, CR3-target
  values), :func:`msr_bitmaps`, :func:`io_ports`;
* :func:`guest_states`: guest-state fields that pass the guest-state checks;
  ``entry_breakage(area="guest")`` gives ones failing exactly one;
* :func:`programs`: guest programs of sensitive instructions with valid
  operands (MSR numbers the platform has, ports, CRs, memory operands in the
  mapped scratch area), as :class:`Insn` items an oracle can read;
* :func:`cases`: all of it as a runnable :class:`Case`.

Everything shrinks towards the fresh case of :mod:`~devirt_emu.testing.vmx_case`:
few instructions, no optional control bit, empty bitmaps.

Every strategy takes ``model``: the CPU model whose capability MSRs it
follows (a :class:`~devirt_emu.cpumodels.CpuModel` or a spec such as
``"westmere"``; ``None`` is the default model, skylake-server); run its cases
on a runner of the same model (``CaseRunner(cpu=model)``: :attr:`Case.cpu`
says which, and :meth:`Case.run` without a runner uses it).  SVM
strategies (intercept vectors, MSRPM, IOPM) are not here yet: they belong in a
sibling module over the SVM case API, with the same :class:`Case` shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from hypothesis import strategies as st

from ..vmx import capabilities as caps
from ..vmx import controls as C
from .vmx_case import SCRATCH_BASE, CaseRunner, run_case

__all__ = [
    "Insn", "Case", "Breakage", "control_word", "vmx_controls", "entry_breakage", "breakages",
    "exception_bitmaps", "cr_masks", "msr_bitmaps", "io_ports", "guest_states", "programs",
    "cases", "subset_of", "SAFE_MSRS", "SAFE_PORTS", "FUZZ_FORBIDDEN",
]

#: Control words by capability table name and VMCS field.
WORDS = {"PINBASED": "PIN_BASED_VM_EXEC_CONTROL", "PROCBASED": "CPU_BASED_VM_EXEC_CONTROL",
         "PROCBASED2": "SECONDARY_VM_EXEC_CONTROL", "EXIT": "VM_EXIT_CONTROLS",
         "ENTRY": "VM_ENTRY_CONTROLS"}

#: Pages in the scratch area the strategies point controls at.
VIRTUAL_APIC_PAGE = SCRATCH_BASE + 0x200000
APIC_ACCESS_PAGE = SCRATCH_BASE + 0x201000
DATA_PAGE = SCRATCH_BASE + 0x1000           # memory operands of programs
POSTED_INTR_DESC = SCRATCH_BASE + 0x202000   # a posted-interrupt descriptor (64-byte aligned)
#: The notification vector the strategies give posted-interrupt processing.
POSTED_INTR_VECTOR = 0xF2

#: Bits the programs' oracle does not model (exits at instruction boundaries that
#: do not depend on the program): :func:`cases` leaves them 0 by default.
FUZZ_FORBIDDEN = {
    "PINBASED": (C.PIN_BASED_VMX_PREEMPTION_TIMER | C.PIN_BASED_VIRTUAL_NMIS
                 | C.PIN_BASED_POSTED_INTR),
    "PROCBASED": (C.CPU_BASED_MONITOR_TRAP_FLAG | C.CPU_BASED_NMI_WINDOW_EXITING
                  | C.CPU_BASED_INTR_WINDOW_EXITING | C.CPU_BASED_TPR_SHADOW),
    "PROCBASED2": (C.SECONDARY_EXEC_PAUSE_LOOP_EXITING | C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
                   | C.SECONDARY_EXEC_UNRESTRICTED_GUEST | C.SECONDARY_EXEC_ENABLE_EPT
                   | C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE | C.SECONDARY_EXEC_APIC_REGISTER_VIRT
                   | C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY),
    "EXIT": C.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER,
    "ENTRY": 0,
}


def _allowed(table: str, model=None) -> tuple[int, int]:
    """(must-be-1, may-be-1) of a control word on ``model`` (a CpuModel, a model
    spec such as "icelake-server", or None: the default model)."""
    return caps.allowed_settings(table, model=model)


def _bits(mask: int) -> list[int]:
    return [1 << n for n in range(mask.bit_length()) if mask >> n & 1]


def _or_all(bits) -> int:
    out = 0
    for b in bits:
        out |= b
    return out


def subset_of(mask: int) -> st.SearchStrategy[int]:
    """A subset of the bits of ``mask``: one integer whose bit ``i`` says whether
    the ``i``-th bit of ``mask`` is in (one draw, and shrinking the integer
    towards 0 drops bits: a failure that needs bits B shrinks to exactly B)."""
    bits = _bits(mask)
    if not bits:
        return st.just(0)
    return st.integers(0, (1 << len(bits)) - 1).map(
        lambda n: _or_all(b for i, b in enumerate(bits) if n >> i & 1))


# --------------------------------------------------------------------------- controls
def control_word(table: str, *, model=None, forbid: int = 0) -> st.SearchStrategy[int]:
    """A value of control word ``table`` ("PINBASED", "PROCBASED", "PROCBASED2",
    "EXIT", "ENTRY") that passes its allowed-settings check: every must-be-1 bit
    and a subset of the bits that may be 1 (less ``forbid``).  Shrinks to the
    must-be-1 bits alone."""
    must1, may1 = _allowed(table, model)
    return subset_of(may1 & ~must1 & ~forbid).map(lambda bits: must1 | bits)


def _fix_dependencies(fields: dict, ept: bool) -> tuple[dict, bool]:
    """The fields and EPT a set of control bits needs to pass VM entry (SDM
    "Checks on VMX Controls"), as the case API's fresh 64-bit guest has them."""
    pin = fields["PIN_BASED_VM_EXEC_CONTROL"]
    proc = fields["CPU_BASED_VM_EXEC_CONTROL"]
    sec = fields["SECONDARY_VM_EXEC_CONTROL"]
    ex = fields["VM_EXIT_CONTROLS"]
    # the guest and the host are 64-bit
    fields["VM_ENTRY_CONTROLS"] |= C.VM_ENTRY_IA32E_MODE
    ex |= C.VM_EXIT_HOST_ADDR_SPACE_SIZE
    if proc & C.CPU_BASED_NMI_WINDOW_EXITING:
        pin |= C.PIN_BASED_VIRTUAL_NMIS
    if pin & C.PIN_BASED_VIRTUAL_NMIS:
        pin |= C.PIN_BASED_NMI_EXITING
    if ex & C.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER:
        pin |= C.PIN_BASED_VMX_PREEMPTION_TIMER
    # APIC virtualization: posted interrupts need virtual-interrupt delivery and
    # "acknowledge interrupt on exit"; virtual-interrupt delivery needs external-interrupt
    # exiting; it, APIC-register virtualization and virtualize x2APIC mode need the TPR
    # shadow; virtualize x2APIC mode excludes virtualize APIC accesses
    if pin & C.PIN_BASED_POSTED_INTR:
        sec |= C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
        ex |= C.VM_EXIT_ACK_INTR_ON_EXIT
        fields["POSTED_INTR_NV"] = POSTED_INTR_VECTOR
        fields["POSTED_INTR_DESC_ADDR"] = POSTED_INTR_DESC
    if sec & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY:
        pin |= C.PIN_BASED_EXT_INTR_MASK
    if sec & (C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY | C.SECONDARY_EXEC_APIC_REGISTER_VIRT
              | C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE):
        proc |= C.CPU_BASED_TPR_SHADOW
    if sec & C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE:
        sec &= ~C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
    if sec & C.SECONDARY_EXEC_UNRESTRICTED_GUEST:
        sec |= C.SECONDARY_EXEC_ENABLE_EPT
    if sec & C.SECONDARY_EXEC_ENABLE_EPT:
        ept = True
    if ept:
        sec |= C.SECONDARY_EXEC_ENABLE_EPT
    if sec:
        proc |= C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    else:
        proc &= ~C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    if proc & C.CPU_BASED_TPR_SHADOW:
        fields["VIRTUAL_APIC_PAGE_ADDR"] = VIRTUAL_APIC_PAGE
        fields.setdefault("TPR_THRESHOLD", 0)
    if sec & C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES:
        fields["APIC_ACCESS_ADDR"] = APIC_ACCESS_PAGE
    if sec & C.SECONDARY_EXEC_ENABLE_VPID:
        fields["VIRTUAL_PROCESSOR_ID"] = fields.get("VIRTUAL_PROCESSOR_ID") or 1
    fields.update(PIN_BASED_VM_EXEC_CONTROL=pin, CPU_BASED_VM_EXEC_CONTROL=proc,
                  SECONDARY_VM_EXEC_CONTROL=sec if proc & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
                  else 0, VM_EXIT_CONTROLS=ex)
    return fields, ept


@st.composite
def vmx_controls(draw, *, model=None, forbid: Optional[Mapping[str, int]] = None):
    """(fields, ept): every control word allowed by the capability MSRs, with
    the fields their bits need (the virtual-APIC and APIC-access pages in the
    scratch area, VPID 1) and ``ept`` True when EPT is on (run it with
    ``ept="identity"``).  VM entry of the case API's fresh guest accepts it.
    ``forbid``: bits per table name never set."""
    forbid = forbid or {}
    fields = {name: draw(control_word(table, model=model, forbid=forbid.get(table, 0)))
              for table, name in WORDS.items()}
    return _fix_dependencies(fields, False)


# --------------------------------------------------------------------------- bitmaps, masks
@st.composite
def exception_bitmaps(draw, vectors=range(32)):
    """{EXCEPTION_BITMAP, PAGE_FAULT_ERROR_CODE_MASK, PAGE_FAULT_ERROR_CODE_MATCH}:
    the intercepted vectors and, when #PF (14) is one, a mask and match over the
    #PF error-code bits (P, W/R, U/S, RSVD, I/D, PK; SDM "Exception Bitmap")."""
    bitmap = draw(subset_of(_or_all(1 << v for v in vectors)))
    out = {"EXCEPTION_BITMAP": bitmap}
    if bitmap & (1 << 14):
        out["PAGE_FAULT_ERROR_CODE_MASK"] = draw(subset_of(0x3F))
        out["PAGE_FAULT_ERROR_CODE_MATCH"] = draw(subset_of(0x3F))
    return out


#: CR0 bits a guest of the fresh state may flip with no fault (MP, TS, WP, AM).
CR0_FLIPPABLE = (1 << 1) | (1 << 3) | (1 << 16) | (1 << 18)
#: CR4 bits likewise (DE, PGE, PCE, OSFXSR, OSXMMEXCPT).
CR4_FLIPPABLE = (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
FRESH_CR0 = 0x80010033
FRESH_CR4 = 0x20 | (1 << 13)


@st.composite
def cr_masks(draw, *, model=None):
    """CR0/CR4 guest/host masks and read shadows, CR3_TARGET_COUNT and the
    CR3-target values (the count at most IA32_VMX_MISC[24:16], 4 here).
    Masks are subsets of the bits the programs may flip plus a few fixed
    ones; shadows differ from the real values in a subset of those bits."""
    subset = subset_of
    cr0_mask = draw(subset(CR0_FLIPPABLE | 1 | (1 << 5) | (1 << 31)))
    cr4_mask = draw(subset(CR4_FLIPPABLE | (1 << 13)))
    misc = caps.capability_msrs(model)[caps.MSR_IA32_VMX_MISC]
    limit = C.vmx_misc_cr3_count(misc)
    count = draw(st.integers(0, limit))
    out = {"CR0_GUEST_HOST_MASK": cr0_mask,
           "CR0_READ_SHADOW": FRESH_CR0 ^ draw(subset(cr0_mask)),
           "CR4_GUEST_HOST_MASK": cr4_mask,
           "CR4_READ_SHADOW": (FRESH_CR4 & ~(1 << 13)) ^ draw(subset(cr4_mask)),
           "CR3_TARGET_COUNT": count}
    for i in range(count):
        out[f"CR3_TARGET_VALUE{i}"] = draw(st.sampled_from([0x20000, 0x21000, 0x30000]))
    return out


#: MSRs the platform implements that a program can read, and write 0 to with no
#: fault (a zero PAT is all UC; a zero SYSCALL/SYSENTER target is never used).
SAFE_MSRS = (0x10, 0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083,
             0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103)


def msr_bitmaps(msrs=SAFE_MSRS) -> st.SearchStrategy[dict]:
    """{"read": [...], "write": [...]}: which of ``msrs`` the MSR bitmap
    intercepts (for ``run_case(msr_bitmap=...)``)."""
    sub = st.lists(st.sampled_from(list(msrs)), unique=True).map(sorted)
    return st.fixed_dictionaries({"read": sub, "write": sub})


#: Ports a program may touch: nothing behind them but the floating bus (the
#: UART at 0x3F8 and the test-exit port 0xF4 are left out).
SAFE_PORTS = (0x60, 0x61, 0x70, 0x71, 0x80, 0x92, 0x8000, 0xCF8, 0xFFFF)


def io_ports(ports=SAFE_PORTS) -> st.SearchStrategy[list]:
    """Ports for the I/O bitmaps (``run_case(io_bitmap_a=..., io_bitmap_b=...)``)."""
    return st.lists(st.sampled_from(list(ports)), unique=True).map(sorted)


# --------------------------------------------------------------------------- guest state
@st.composite
def guest_states(draw):
    """Guest-state fields of a 64-bit CPL-0 guest that pass the guest-state
    checks (SDM "Checks on the Guest State Area"): RFLAGS arithmetic flags and
    IF, blocking by STI (only with IF = 1) or by MOV SS, the HLT activity
    state, DR7 bits 31:0 (no general detect), canonical FS/GS bases."""
    rflags = 2 | draw(subset_of(1 | 4 | 16 | 64 | 128 | (1 << 9) | (1 << 11)))
    out = {"GUEST_RFLAGS": rflags}
    intr = draw(st.sampled_from([0, 1, 2]))
    if intr == 1 and not rflags & (1 << 9):
        intr = 0
    if intr:
        out["GUEST_INTERRUPTIBILITY_INFO"] = intr
    if draw(st.booleans()):
        out["GUEST_ACTIVITY_STATE"] = 1 if not intr else 0
    dr7 = draw(st.sampled_from([0x400, 0x401, 0x403, 0x700]))
    if dr7 != 0x400:
        out["GUEST_DR7"] = dr7
    for seg in ("FS", "GS"):
        base = draw(st.sampled_from([0, SCRATCH_BASE, 0xFFFF800000000000]))
        if base:
            out[f"GUEST_{seg}_BASE"] = base
    return {k: v for k, v in out.items() if not (k == "GUEST_ACTIVITY_STATE" and v == 0)}


# --------------------------------------------------------------------------- breakage
@dataclass(frozen=True)
class Breakage:
    """One VM-entry check broken on purpose.

    ``fields``: what to write over the valid setting; ``field``: the VMCS field
    the check's failure reports (``EntryFailure.field``); ``error``: the
    VM-instruction error of a VMfailValid (7 controls, 8 host state) or None;
    ``exit_reason``/``qualification``: those of a VM-entry failure exit (guest
    state: 0x80000021, qualification 0 unless the check says otherwise)."""

    name: str
    fields: Mapping[str, int]
    field: str
    error: Optional[int] = None
    exit_reason: Optional[int] = None
    qualification: int = 0

    def matches(self, failure) -> bool:
        """Is ``failure`` (an EntryFailure) exactly the failure this breakage aims at?"""
        if failure is None or failure.field != self.field:
            return False
        if self.error is not None:
            return failure.error == self.error
        return failure.exit_reason == self.exit_reason and failure.qualification == self.qualification


_CTL, _HOST, _GUEST = 7, 8, 0x80000021


def _control_breakages(fields: dict, model) -> list:
    out = []
    for table, name in WORDS.items():
        must1, may1 = _allowed(table, model)
        value = fields[name]
        for bit in _bits(must1):
            out.append(Breakage(f"{name}: must-be-1 bit {bit.bit_length() - 1} cleared",
                                {name: value & ~bit}, name, error=_CTL))
        not_allowed = ~may1 & 0xFFFFFFFF
        if table == "PROCBASED2":
            if not fields["CPU_BASED_VM_EXEC_CONTROL"] & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
                continue                    # (the word is not checked without activation)
        for bit in _bits(not_allowed)[:6]:
            out.append(Breakage(f"{name}: bit {bit.bit_length() - 1} set (not allowed 1)",
                                {name: value | bit}, name, error=_CTL))
    proc = fields["CPU_BASED_VM_EXEC_CONTROL"]
    sec = fields["SECONDARY_VM_EXEC_CONTROL"] if proc & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
    if not sec & C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY:
        # (with virtual-interrupt delivery the TPR threshold is not checked)
        out.append(Breakage("TPR_THRESHOLD bits 31:4 with the TPR shadow",
                            {"CPU_BASED_VM_EXEC_CONTROL": proc | C.CPU_BASED_TPR_SHADOW,
                             "VIRTUAL_APIC_PAGE_ADDR": VIRTUAL_APIC_PAGE, "TPR_THRESHOLD": 0x10},
                            "TPR_THRESHOLD", error=_CTL))
    out += [
        Breakage("CR3_TARGET_COUNT above IA32_VMX_MISC[24:16]", {"CR3_TARGET_COUNT": 5},
                 "CR3_TARGET_COUNT", error=_CTL),
        Breakage("I/O bitmap A not page-aligned",
                 {"CPU_BASED_VM_EXEC_CONTROL": proc | C.CPU_BASED_USE_IO_BITMAPS,
                  "IO_BITMAP_A": 0xF02008}, "IO_BITMAP_A", error=_CTL),
        Breakage("MSR bitmap beyond the physical-address width",
                 {"CPU_BASED_VM_EXEC_CONTROL": proc | C.CPU_BASED_USE_MSR_BITMAPS,
                  "MSR_BITMAP": 1 << 52}, "MSR_BITMAP", error=_CTL),
        Breakage("virtual-APIC page not aligned with the TPR shadow",
                 {"CPU_BASED_VM_EXEC_CONTROL": proc | C.CPU_BASED_TPR_SHADOW,
                  "VIRTUAL_APIC_PAGE_ADDR": VIRTUAL_APIC_PAGE + 0x10}, "VIRTUAL_APIC_PAGE_ADDR",
                 error=_CTL),
        Breakage("NMI-window exiting without virtual NMIs",
                 {"CPU_BASED_VM_EXEC_CONTROL": proc | C.CPU_BASED_NMI_WINDOW_EXITING,
                  "PIN_BASED_VM_EXEC_CONTROL": fields["PIN_BASED_VM_EXEC_CONTROL"]
                  & ~C.PIN_BASED_VIRTUAL_NMIS}, "CPU_BASED_VM_EXEC_CONTROL", error=_CTL),
        Breakage("virtual NMIs without NMI exiting",
                 {"PIN_BASED_VM_EXEC_CONTROL": (fields["PIN_BASED_VM_EXEC_CONTROL"]
                                                | C.PIN_BASED_VIRTUAL_NMIS) & ~C.PIN_BASED_NMI_EXITING,
                  "CPU_BASED_VM_EXEC_CONTROL": proc & ~C.CPU_BASED_NMI_WINDOW_EXITING},
                 "PIN_BASED_VM_EXEC_CONTROL", error=_CTL),
        Breakage("saving the preemption timer without the timer",
                 {"VM_EXIT_CONTROLS": fields["VM_EXIT_CONTROLS"] | C.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER,
                  "PIN_BASED_VM_EXEC_CONTROL": fields["PIN_BASED_VM_EXEC_CONTROL"]
                  & ~C.PIN_BASED_VMX_PREEMPTION_TIMER}, "VM_EXIT_CONTROLS", error=_CTL),
        Breakage("an injected NMI with vector 3",
                 {"VM_ENTRY_INTR_INFO_FIELD": C.INTR_INFO_VALID_MASK | C.INTR_TYPE_NMI_INTR | 3},
                 "VM_ENTRY_INTR_INFO_FIELD", error=_CTL),
        Breakage("a VM-entry MSR-load area not 16-byte aligned",
                 {"VM_ENTRY_MSR_LOAD_COUNT": 1, "VM_ENTRY_MSR_LOAD_ADDR": DATA_PAGE + 8},
                 "VM_ENTRY_MSR_LOAD_ADDR", error=_CTL),
    ]
    sec = fields["SECONDARY_VM_EXEC_CONTROL"]
    act = proc | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
    out += [
        Breakage("VPID enabled with VIRTUAL_PROCESSOR_ID 0",
                 {"CPU_BASED_VM_EXEC_CONTROL": act,
                  "SECONDARY_VM_EXEC_CONTROL": sec | C.SECONDARY_EXEC_ENABLE_VPID,
                  "VIRTUAL_PROCESSOR_ID": 0}, "VIRTUAL_PROCESSOR_ID", error=_CTL),
        Breakage("unrestricted guest without EPT",
                 {"CPU_BASED_VM_EXEC_CONTROL": act,
                  "SECONDARY_VM_EXEC_CONTROL": (sec | C.SECONDARY_EXEC_UNRESTRICTED_GUEST)
                  & ~C.SECONDARY_EXEC_ENABLE_EPT}, "SECONDARY_VM_EXEC_CONTROL", error=_CTL),
    ]
    return out


def _host_breakages() -> list:
    return [
        Breakage("HOST_RIP not canonical", {"HOST_RIP": 0x0000800000000000}, "HOST_RIP", error=_HOST),
        Breakage("HOST_CS_SELECTOR with TI set", {"HOST_CS_SELECTOR": 0x0C}, "HOST_CS_SELECTOR",
                 error=_HOST),
        Breakage("HOST_CR4 without PAE in a 64-bit host", {"HOST_CR4": (1 << 13)}, "HOST_CR4",
                 error=_HOST),
        Breakage("HOST_CR0 without PG (a CR0 fixed-1 bit)", {"HOST_CR0": 0x80050033 & ~(1 << 31)},
                 "HOST_CR0", error=_HOST),
    ]


def _guest_breakages(fields: dict) -> list:
    g = dict(exit_reason=_GUEST)
    debug = fields["VM_ENTRY_CONTROLS"] | C.VM_ENTRY_LOAD_DEBUG_CONTROLS
    return [
        Breakage("GUEST_CR0.NE cleared (a CR0 fixed-1 bit)", {"GUEST_CR0": FRESH_CR0 & ~(1 << 5)},
                 "GUEST_CR0", **g),
        Breakage("GUEST_CR4.VMXE cleared (a CR4 fixed-1 bit)", {"GUEST_CR4": FRESH_CR4 & ~(1 << 13)},
                 "GUEST_CR4", **g),
        Breakage("GUEST_RFLAGS bit 1 cleared", {"GUEST_RFLAGS": 0}, "GUEST_RFLAGS", **g),
        # (SDM 26.3.1.4: bits 63:N identical, N = 48; bit 47 is not part of the check, so
        # 0x0000_8000_0000_0000 enters and faults on the fetch instead)
        Breakage("GUEST_RIP bits 63:48 not identical", {"GUEST_RIP": 0xFFFE800000000000},
                 "GUEST_RIP", **g),
        Breakage("GUEST_ACTIVITY_STATE 4 (reserved)", {"GUEST_ACTIVITY_STATE": 4},
                 "GUEST_ACTIVITY_STATE", **g),
        Breakage("blocking by STI with RFLAGS.IF = 0", {"GUEST_INTERRUPTIBILITY_INFO": 1},
                 "GUEST_INTERRUPTIBILITY_INFO", **g),
        Breakage("GUEST_DR7 bits 63:32 set (with load debug controls)",
                 {"GUEST_DR7": 1 << 32, "VM_ENTRY_CONTROLS": debug}, "GUEST_DR7", **g),
        Breakage("TR unusable", {"GUEST_TR_AR_BYTES": 0x1008B}, "GUEST_TR_AR_BYTES", **g),
        Breakage("VMCS link pointer not all ones and not aligned",
                 {"VMCS_LINK_POINTER": DATA_PAGE + 4}, "VMCS_LINK_POINTER",
                 exit_reason=_GUEST, qualification=C.ENTRY_FAIL_VMCS_LINK_PTR),
    ]


@st.composite
def entry_breakage(draw, *, model=None, area: Optional[str] = None):
    """(fields, ept, breakage): a valid control setting (:func:`vmx_controls`,
    without EPT) and one :class:`Breakage` of a VM-entry check of ``area``
    ("controls", "host", "guest" or None for any).  Writing ``fields`` and
    then ``breakage.fields`` gives a VM entry that fails that check (the
    entry code reports it: :meth:`Breakage.matches`), while the valid setting
    alone passes every check: the breakage changes only what that check reads."""
    fields, ept = draw(vmx_controls(model=model, forbid={
        "PROCBASED2": C.SECONDARY_EXEC_ENABLE_EPT | C.SECONDARY_EXEC_UNRESTRICTED_GUEST}))
    pool = breakages(fields, model=model, area=area)
    # the check first, then (for the allowed-settings checks) the bit: each check
    # is as likely as any other, however many bits it has
    by_check: dict[str, list] = {}
    for b in pool:
        by_check.setdefault(b.name.split(": ")[0] if ": " in b.name else b.name, []).append(b)
    group = draw(st.sampled_from(sorted(by_check)))
    return fields, ept, draw(st.sampled_from(by_check[group]))


def breakages(fields: Mapping[str, int], *, model=None, area: Optional[str] = None) -> list:
    """Every :class:`Breakage` of ``area`` the strategies know, for the valid
    control setting ``fields`` (as :func:`vmx_controls` gives it)."""
    fields = dict(fields)
    pool = []
    if area in (None, "controls"):
        pool += _control_breakages(fields, model)
    if area in (None, "host"):
        pool += _host_breakages()
    if area in (None, "guest"):
        pool += _guest_breakages(fields)
    if not pool:
        raise ValueError(f"area is 'controls', 'host', 'guest' or None, not {area!r}")
    return pool


# --------------------------------------------------------------------------- programs
@dataclass(frozen=True)
class Insn:
    """One step of a program: ``asm`` (Intel syntax, its set-up included) ending
    in one sensitive instruction of kind ``kind`` with ``operands`` (what an
    oracle needs: the MSR, the port, the CR and its new value...)."""

    kind: str
    asm: str
    operands: Mapping[str, int] = field(default_factory=dict)


def _insn_strategies():
    msr = st.sampled_from(SAFE_MSRS)
    port = st.sampled_from(SAFE_PORTS)
    cr0 = subset_of(CR0_FLIPPABLE).map(lambda b: FRESH_CR0 ^ b)
    cr4 = subset_of(CR4_FLIPPABLE).map(lambda b: FRESH_CR4 ^ b)
    simple = {k: Insn(k, k) for k in ("cpuid", "hlt", "pause", "rdtsc", "wbinvd", "invd",
                                      "vmcall")}
    return [
        st.sampled_from(list(simple.values())),
        msr.map(lambda m: Insn("rdmsr", f"mov ecx, {m:#x}\nrdmsr", {"msr": m})),
        msr.map(lambda m: Insn("wrmsr", f"mov ecx, {m:#x}\nxor eax, eax\nxor edx, edx\nwrmsr",
                               {"msr": m})),
        port.map(lambda p: Insn("in", f"mov dx, {p:#x}\nin al, dx", {"port": p})),
        port.map(lambda p: Insn("out", f"mov dx, {p:#x}\nout dx, al", {"port": p})),
        cr0.map(lambda v: Insn("mov_to_cr0", f"mov rax, {v:#x}\nmov cr0, rax", {"value": v})),
        cr4.map(lambda v: Insn("mov_to_cr4", f"mov rax, {v:#x}\nmov cr4, rax", {"value": v})),
        st.just(Insn("mov_from_cr3", "mov rax, cr3")),
        st.just(Insn("mov_to_cr3", "mov rax, 0x20000\nmov cr3, rax", {"value": 0x20000})),
        st.just(Insn("mov_from_cr8", "mov rax, cr8")),
        st.just(Insn("mov_to_cr8", "xor eax, eax\nmov cr8, rax", {"value": 0})),
        st.just(Insn("mov_dr", "mov rax, dr7")),
        st.just(Insn("invlpg", f"mov rbx, {DATA_PAGE:#x}\ninvlpg [rbx]")),
        st.just(Insn("sgdt", f"mov rbx, {DATA_PAGE:#x}\nsgdt [rbx]")),
        st.just(Insn("sidt", f"mov rbx, {DATA_PAGE:#x}\nsidt [rbx]")),
        st.just(Insn("rdtscp", "rdtscp")),
        st.just(Insn("ud2", "ud2")),
        st.just(Insn("compute", "add rax, rbx\nxor rcx, rax\nmov [rsp - 64], rcx")),
    ]


def programs(*, max_size: int = 6) -> st.SearchStrategy[tuple]:
    """A guest program: 1 to ``max_size`` :class:`Insn` steps with valid operands
    (MSRs of :data:`SAFE_MSRS`, ports of :data:`SAFE_PORTS`, CR values that
    differ from the fresh ones only in bits that fault nowhere, memory operands
    on a mapped scratch page).  Shrinks to fewer steps, then to CPUID.

    RDRAND and RDSEED are left out: the modelled CPUID does not advertise them,
    yet the engine executes them with the host's random numbers (measured: two
    runs of one case differ; ``devirt-emu fuzz`` found it)."""
    return st.lists(st.one_of(*_insn_strategies()), min_size=1, max_size=max_size).map(tuple)


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A runnable direct VMX case (the arguments of :func:`run_case`), with the
    program as :class:`Insn` steps so an oracle can follow it."""

    program: tuple
    vmcs: Mapping[str, int]
    msr_bitmap: Optional[Mapping] = None
    io_bitmap_a: tuple = ()
    io_bitmap_b: tuple = ()
    ept: bool = False
    #: The CPU model the case was drawn for (None: the default model).
    cpu: object = None

    @property
    def code(self) -> str:
        """The program as assembly; the sensitive instruction of step ``i`` is at
        label ``step<i>`` (in ``CaseResult.symbols``)."""
        lines = []
        for i, insn in enumerate(self.program):
            *setup, last = insn.asm.split("\n")
            lines += setup + [f"step{i}:", last]
        return "\n".join(lines)

    def kwargs(self) -> dict:
        kw = {"vmcs": dict(self.vmcs)}
        if self.msr_bitmap is not None:
            kw["msr_bitmap"] = {k: list(v) for k, v in self.msr_bitmap.items()}
        if self.io_bitmap_a:
            kw["io_bitmap_a"] = list(self.io_bitmap_a)
        if self.io_bitmap_b:
            kw["io_bitmap_b"] = list(self.io_bitmap_b)
        if self.ept:
            kw["ept"] = "identity"
        return kw

    def run(self, runner: Optional[CaseRunner] = None):
        """Run it (on ``runner``, or the process's shared one)."""
        if runner is None:
            return run_case(self.code, cpu=self.cpu, **self.kwargs())
        return runner.run(self.code, **self.kwargs())


@st.composite
def cases(draw, *, model=None, forbid: Optional[Mapping[str, int]] = None, max_size: int = 6):
    """A :class:`Case`: a program (:func:`programs`) under controls
    (:func:`vmx_controls`, by default without the bits of :data:`FUZZ_FORBIDDEN`),
    an exception bitmap, CR masks and shadows, and MSR and I/O bitmaps.  VM entry
    accepts every one."""
    fields, ept = draw(vmx_controls(model=model, forbid=FUZZ_FORBIDDEN if forbid is None else forbid))
    fields.update(draw(exception_bitmaps()))
    fields.update(draw(cr_masks(model=model)))
    program = draw(programs(max_size=max_size))
    msr_bm = draw(msr_bitmaps())
    ports = draw(io_ports())
    return Case(program=program, vmcs=fields, msr_bitmap=msr_bm,
                io_bitmap_a=tuple(p for p in ports if p < 0x8000),
                io_bitmap_b=tuple(p for p in ports if p >= 0x8000), ept=ept, cpu=model)
