"""Assertions on direct VMX case results that say *why* when they fail.

    >>> from devirt_emu.testing.asserts import assert_exit
    >>> from devirt_emu.testing.vmx_case import run_case
    >>> r = run_case("hlt", vmcs={"CPU_BASED_VM_EXEC_CONTROL": 1 << 7}, legal=True)
    >>> assert_exit(r, reason="HLT", instruction_length=1)

A failing assertion's message has three parts: what was expected and what
happened; the *why*: the exit rule's cause (the rule, and the control bits,
bitmap bits, masks and shadows it looked at: ``CaseExit.cause``), the entry
check that failed (``EntryFailure.check`` and its field), or, when the case
did not exit, the control words in effect, bit by bit, and the last event the
rules let through with their cause (``CaseResult.last_no_exit``); and the guest's
disassembly around RIP (``=>`` marks the instruction at RIP).

The helpers take a :class:`~devirt_emu.testing.vmx_case.CaseResult`.  An SVM
case result will get the same three helpers in a sibling module (the exit
codes and EXITINFO fields of the VMCB in place of the VMCS fields).
"""
from __future__ import annotations

from typing import Optional, Union

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from ..vmx import capabilities as caps
from ..vmx import controls as C
from ..vmx import exit_reasons
from ..vmx.entry import FailureKind
from .vmx_case import CODE_BASE, CaseResult

__all__ = ["assert_no_exit", "assert_exit", "assert_entry_fails", "explain", "disassemble_around"]

_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_WORDS = (("PIN_BASED_VM_EXEC_CONTROL", C.PINBASED), ("CPU_BASED_VM_EXEC_CONTROL", C.PROCBASED),
          ("SECONDARY_VM_EXEC_CONTROL", C.PROCBASED2), ("VM_EXIT_CONTROLS", C.EXIT),
          ("VM_ENTRY_CONTROLS", C.ENTRY))
_OTHER = ("EXCEPTION_BITMAP", "PAGE_FAULT_ERROR_CODE_MASK", "PAGE_FAULT_ERROR_CODE_MATCH",
          "CR0_GUEST_HOST_MASK", "CR0_READ_SHADOW", "CR4_GUEST_HOST_MASK", "CR4_READ_SHADOW",
          "CR3_TARGET_COUNT")


def disassembly(code: bytes, base: int = CODE_BASE) -> list[tuple[int, str]]:
    """(address, "mnemonic operands") of each instruction of ``code`` at ``base``
    (a linear sweep; an undecodable byte is shown as ``.byte``)."""
    out, off = [], 0
    while off < len(code):
        insn = next(_CS.disasm(code[off:off + 15], base + off, 1), None)
        if insn is None:
            out.append((base + off, f".byte {code[off]:#04x}"))
            off += 1
            continue
        out.append((insn.address, f"{insn.mnemonic} {insn.op_str}".strip()))
        off += insn.size
    return out


def disassemble_around(result: CaseResult, rip: Optional[int] = None, context: int = 3) -> str:
    """The case's code around ``rip`` (default: where the case stopped), up to
    ``context`` instructions either side, ``=>`` at RIP."""
    if rip is None:
        rip = _rip(result)
    code = result.code + b"\xf4"
    lines = disassembly(code)
    at = next((i for i, (a, _) in enumerate(lines) if a >= (rip or 0)), len(lines) - 1)
    lo, hi = max(0, at - context), min(len(lines), at + context + 1)
    out = []
    for a, text in lines[lo:hi]:
        mark = "=>" if a == rip else "  "
        tail = "   (the HLT after the code)" if a == result.code_end else ""
        out.append(f"  {mark} {a:#x}: {text}{tail}")
    if rip is not None and not any(a == rip for a, _ in lines):
        out.append(f"  (RIP {rip:#x} is outside the code)")
    return "\n".join(out)


def _rip(result: CaseResult) -> Optional[int]:
    if result.exit is not None:
        return result.exit.guest_rip
    if result.no_exit is not None:
        return result.no_exit.guest_rip
    return result.vmcs.get("GUEST_RIP")


def _controls(result: CaseResult) -> list[str]:
    v = result.vmcs
    out = []
    for name, table in _WORDS:
        value = v.get(name, 0)
        if name == "SECONDARY_VM_EXEC_CONTROL" and not (
                v.get("CPU_BASED_VM_EXEC_CONTROL", 0) & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS):
            out.append(f"  {name} = {value:#x} (not activated)")
            continue
        table_name = {"PIN_BASED_VM_EXEC_CONTROL": "PINBASED",
                      "CPU_BASED_VM_EXEC_CONTROL": "PROCBASED",
                      "SECONDARY_VM_EXEC_CONTROL": "PROCBASED2", "VM_EXIT_CONTROLS": "EXIT",
                      "VM_ENTRY_CONTROLS": "ENTRY"}[name]
        forced = caps.allowed_settings(table_name)[0]
        chosen = [b for b in C.decode_bits(table, value & ~forced)]
        out.append(f"  {name} = {value:#x}: {', '.join(chosen) or 'no optional bit'}")
    for name in _OTHER:
        if v.get(name):
            out.append(f"  {name} = {v[name]:#x}")
    return out


def explain(result: CaseResult) -> str:
    """Why the case ended as it did: the rule's cause of an exit, the failed
    entry check, or (no exit) the controls in effect; then the disassembly."""
    lines = []
    if result.exit is not None:
        e = result.exit
        lines.append(f"why: {e.name} (reason {e.reason}) because " + "; ".join(e.cause))
    elif result.entry_failure is not None:
        f = result.entry_failure
        where = f" (field {f.field})" if f.field else ""
        lines.append(f"why: VM entry failed the check{where}: {f.check}")
    else:
        n = result.no_exit
        lines.append(f"why: no VM exit ({n.why}{': ' + n.message if n.message else ''}); "
                     "no rule asked for an exit under these controls:")
        lines += _controls(result)
    if result.exit is None and result.last_no_exit is not None:
        kind, rip, cause = result.last_no_exit
        lines.append(f"the last event the rules let through: {kind} at {rip:#x}, because "
                     + "; ".join(cause))
    lines.append("code:")
    lines.append(disassemble_around(result))
    return "\n".join(lines)


def _fail(summary: str, result: CaseResult):
    raise AssertionError(f"{summary}\n{explain(result)}")


def _reason_number(reason: Union[int, str]) -> int:
    return exit_reasons.reason(reason).number


def assert_no_exit(result: CaseResult, *, why: Optional[str] = None) -> None:
    """The case ran without a VM exit (and VM entry succeeded); ``why``, if
    given, is what ``result.no_exit.why`` must be ("halted", "step limit", ...)."""
    __tracebackhide__ = True
    if result.exit is not None:
        _fail(f"expected no VM exit, got {result.exit}", result)
    if result.entry_failure is not None:
        _fail(f"expected no VM exit, but VM entry failed: {result.entry_failure}", result)
    if why is not None and result.no_exit.why != why:
        _fail(f"expected the case to end with {why!r}, it ended with {result.no_exit}", result)


def assert_exit(result: CaseResult, reason: Union[int, str, None] = None, *,
                qualification: Optional[int] = None, instruction_length: Optional[int] = None,
                instruction_info: Optional[int] = None, interruption_info: Optional[int] = None,
                error_code: Optional[int] = None, rip: Optional[int] = None,
                guest_physical_address: Optional[int] = None,
                guest_linear_address: Optional[int] = None) -> None:
    """The case took a VM exit with these properties (each one given is
    compared; ``reason`` is a basic exit reason by number or by name, as in
    :mod:`devirt_emu.vmx.exit_reasons`; ``rip`` is GUEST_RIP)."""
    __tracebackhide__ = True
    if result.exit is None:
        what = result.no_exit or f"VM-entry failure: {result.entry_failure}"
        _fail(f"expected a VM exit{'' if reason is None else f' {reason}'}, got {what}", result)
    e = result.exit
    want = {"reason": None if reason is None else _reason_number(reason),
            "qualification": qualification, "instruction_length": instruction_length,
            "instruction_info": instruction_info, "interruption_info": interruption_info,
            "error_code": error_code, "guest_rip": rip,
            "guest_physical_address": guest_physical_address,
            "guest_linear_address": guest_linear_address}
    bad = []
    for name, value in want.items():
        if value is not None and getattr(e, name) != value:
            got = getattr(e, name)
            fmt = (lambda x: f"{x:#x}") if name != "reason" else (lambda x: f"{x} ({exit_reasons.name_of(x)})")
            bad.append(f"{name}: expected {fmt(value)}, got "
                       f"{'None' if got is None else fmt(got)}")
    if bad:
        _fail(f"the VM exit differs: {'; '.join(bad)}", result)


def assert_entry_fails(result: CaseResult, *, error: Optional[int] = None,
                       exit_reason: Optional[int] = None, qualification: Optional[int] = None,
                       field: Optional[str] = None) -> None:
    """VM entry failed: with VMfailValid ``error`` (VM-instruction error number,
    e.g. 7 invalid control field, 8 invalid host state), or with a VM-entry
    failure exit of full ``exit_reason`` (0x80000021 invalid guest state,
    0x80000022 MSR loading) and ``qualification``; ``field``: the VMCS field
    the failed check reports."""
    __tracebackhide__ = True
    f = result.entry_failure
    if f is None:
        _fail(f"expected VM entry to fail, but it succeeded: {result}", result)
    bad = []
    if error is not None and (f.kind is not FailureKind.VMFAIL_VALID or f.error != error):
        bad.append(f"expected VMfailValid {error}, got {f}")
    if exit_reason is not None and f.exit_reason != exit_reason:
        got = "none" if f.exit_reason is None else f"{f.exit_reason:#x}"
        bad.append(f"expected exit reason {exit_reason:#x}, got {got}")
    if qualification is not None and f.qualification != qualification:
        bad.append(f"expected qualification {qualification}, got {f.qualification}")
    if field is not None and f.field != field:
        bad.append(f"expected the check on {field}, got the check on {f.field}")
    if bad:
        _fail("the VM-entry failure differs: " + "; ".join(bad), result)
