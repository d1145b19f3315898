"""Fast resets of the direct case API: a case run after other cases on a reused
:class:`CaseRunner` gives exactly what it gives on a fresh runner.

The architectural expectation is the case API's contract (docs/vmx-cases.md:
"each case starts again from the state above"): nothing a case did (stores to
memory, the stack, the page tables, the code page, MSRs written, the VMCS, EPT
tables and their accessed/dirty flags, the clock) is visible to the next one.
Compared: the exit fields, the registers, the steps, the whole VMCS snapshot,
and all 16 MiB of RAM after the case.
"""
from __future__ import annotations

import pytest

from devirt_emu.testing.vmx_case import (CODE_BASE, SCRATCH_BASE, CaseRunner, EptEntry,
                                         xapic_mapping)

PROC = "CPU_BASED_VM_EXEC_CONTROL"

# cases that leave work for the next reset
DIRTY = [
    ("mov [rbx], rax\npush rax\npush rax\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 0x1230, "rax": 7}}),
    ("mov rdi, rbx\nmov ecx, 600\nrep stosq\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 0x7F00, "rax": -1 & 0xFF}}),
    ("mov ecx, 0xc0000102\nmov eax, 5\nmov edx, 6\nwrmsr\nmov ecx, 0x10\nwrmsr\ncpuid", {}),
    # a PML4 entry of the fresh tables rewritten, a GDT byte and an IDT gate written
    ("mov rbx, 0x20000\nmov qword ptr [rbx + 8], 0x1234003\nmov byte ptr [0x10030], 0x55\n"
     "mov qword ptr [0x12000 + 6 * 16], rbx\ncpuid", {}),
    # self-modifying code: a store into the code page, then the modified code runs
    ("lea rbx, [rip + t]\nmov byte ptr [rbx], 0x90\nt: ud2\ncpuid", {}),
    # an exception delivered through a gate the case writes: the platform pushes the frame
    ("ud2", {"memory": {0x12000 + 6 * 16: bytes.fromhex("0010080000 8e 0000") + bytes(8)}}),
    # EPT with accessed and dirty flags, a write through it
    ("mov [rbx], rax\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 8}, "ept": "identity", "ept_ad": True}),
    # a misconfigured EPT entry (EPT tables left different from the identity ones)
    ("mov rax, [rbx]", {"regs": {"rbx": SCRATCH_BASE},
                        "ept": ["identity", EptEntry(SCRATCH_BASE, 1, SCRATCH_BASE | 2 << 3 | 7)]}),
    # a long code (more than one page), different VMCS controls and bitmaps
    ("\n".join(["nop"] * 5000) + "\nhlt", {"vmcs": {PROC: 1 << 7, "EXCEPTION_BITMAP": 0xFFFF,
                                                     "CR0_GUEST_HOST_MASK": 0xFFFFFFFF},
                                            "legal": True, "msr_bitmap": {"read": [0x10]},
                                            "io_bitmap_a": [0x60, 0x70]}),
    # the xAPIC mapped and a virtual-APIC page written through the TPR shadow
    ("mov rbx, 0xFEE00000\nmov byte ptr [rbx+0x80], 0x20\nnop\ncpuid",
     {"vmcs": {PROC: (1 << 31) | (1 << 21), "SECONDARY_VM_EXEC_CONTROL": 1,
               "APIC_ACCESS_ADDR": 0xFEE00000, "VIRTUAL_APIC_PAGE_ADDR": 0x600000,
               "TPR_THRESHOLD": 0}, "legal": True, "memory": {**xapic_mapping(), 0x600080: b"\x50"}}),
    ("hlt", {"vmcs": {PROC: 1 << 7}}),           # a VM-entry failure
]

# the cases whose results are compared (each also reads what a dirty case changed)
PROBES = [
    ("cpuid", {}),
    ("mov rax, [rbx]\nmov rcx, [rsp - 8]\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 0x1230}}),
    ("mov ecx, 0xc0000102\nrdmsr\nmov r9, rax\nmov ecx, 0x10\nrdmsr\nrdtsc\ncpuid", {}),
    ("mov rax, [0x20008]\nmov rbx, [0x12000 + 6 * 16]\nud2", {"vmcs": {"EXCEPTION_BITMAP": 1 << 6}}),
    ("nop\nud2", {}),                               # to a triple fault through the zero IDT
    ("mov rax, [rbx]\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 0x7F00}, "ept": "identity",
                               "ept_ad": True}),
    ("in al, 0x60", {"vmcs": {PROC: 1 << 25}, "legal": True, "io_bitmap_a": [0x70]}),
    ("mov rax, [rbx]\nhlt", {"regs": {"rbx": CODE_BASE + 0x1000}, "vmcs": {PROC: 1 << 7},
                             "legal": True}),
]


def _observed(runner: CaseRunner, result) -> dict:
    out = {"outcome": result.outcome, "steps": result.steps, "vmcs": dict(result.vmcs),
           "ram": bytes(runner.machine.mem.view)}
    if result.exit is not None:
        e = result.exit
        out["exit"] = (e.exit_reason, e.qualification, e.instruction_length, e.instruction_info,
                       e.interruption_info, e.error_code, e.idt_vectoring_info,
                       e.guest_linear_address, e.guest_physical_address, e.guest_rip,
                       dict(e.regs), e.cause)
    elif result.entry_failure is not None:
        out["failure"] = str(result.entry_failure)
    else:
        out["no_exit"] = (result.no_exit.why, result.no_exit.guest_rip, dict(result.no_exit.regs))
    return out


def _diff(a: dict, b: dict) -> str:
    for key in a:
        if a[key] != b.get(key):
            if key == "ram":
                pages = sorted({i & ~0xFFF for i in range(0, len(a[key]), 8)
                                if a[key][i:i + 8] != b[key][i:i + 8]})
                return f"RAM differs on pages {[hex(p) for p in pages[:10]]}"
            return f"{key}: {a[key]!r} != {b.get(key)!r}"
    return ""


@pytest.fixture(scope="module")
def fresh_results():
    out = []
    for code, kw in PROBES:
        fresh = CaseRunner()
        out.append(_observed(fresh, fresh.run(code, **kw)))
    return out


@pytest.mark.parametrize("dirty", range(len(DIRTY)))
def test_case_after_reset_equals_fresh_runner(dirty, fresh_results):
    runner = CaseRunner()
    for i, (code, kw) in enumerate(PROBES):
        d_code, d_kw = DIRTY[(dirty + i) % len(DIRTY)]
        runner.run(d_code, **d_kw)
        runner.run(*DIRTY[dirty][:1], **DIRTY[dirty][1])
        got = _observed(runner, runner.run(code, **kw))
        diff = _diff(fresh_results[i], got)
        assert not diff, f"probe {i} ({code!r}) after {DIRTY[dirty][0]!r}: {diff}"


def test_each_dirty_case_itself_repeats_exactly():
    runner = CaseRunner()
    for code, kw in DIRTY:
        first = _observed(runner, runner.run(code, **kw))
        again = _observed(runner, runner.run(code, **kw))
        assert not _diff(first, again), f"{code!r}: {_diff(first, again)}"


def test_reset_after_a_store_that_faults():
    """A store through an unmapped linear address (#PF, intercepted), then one
    through the stack after RSP was moved into the scratch area: the next case
    sees RAM as a fresh runner does."""
    runner = CaseRunner()
    runner.run("mov [rbx], rax\ncpuid", regs={"rbx": 0x40000000, "rax": 1},
               vmcs={"EXCEPTION_BITMAP": 1 << 14})
    runner.run("mov rsp, rbx\npush rax\ncpuid", regs={"rbx": SCRATCH_BASE + 0x5008, "rax": 1})
    fresh = CaseRunner()
    assert not _diff(_observed(fresh, fresh.run("cpuid")), _observed(runner, runner.run("cpuid")))


def test_reset_time_is_measured():
    runner = CaseRunner()
    runner.run("mov [rbx], rax\ncpuid", regs={"rbx": SCRATCH_BASE})
    runner.run("cpuid")
    assert 0 < runner.last_reset_us < 1e6
